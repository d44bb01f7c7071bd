#![cfg(feature = "llvm")]
//! Per-thread primitives that the tile kernels do not all use: each must lower to the intended
//! PTX instruction and assemble.

use ccc::codegen::{Elem, ParamKind, PtxModule, SpecialRegister, ptxas};
use inkwell::context::Context;

#[test]
fn codegen_primitives_lower_to_the_intended_ptx() {
    let context = Context::create();
    let module = PtxModule::new(&context, "primitives").expect("module");
    let shared = module.static_shared("staging", 32 * 16);
    let kb = module
        .declare_kernel("primitives", &[ParamKind::GlobalPointer("x".into()), ParamKind::GlobalPointer("y".into())])
        .expect("kernel");
    let emit = || -> ccc::codegen::Result<()> {
        let thread = kb.special_register(SpecialRegister::ThreadX)?;
        let block = kb.special_register(SpecialRegister::BlockX)?;
        let chunk = kb.add(kb.mul(block, kb.i32(32))?, thread)?;
        // 128-bit global load → shared store → shared load → global store.
        let source = kb.element_pointer(kb.pointer_param("x")?, Elem::F32, kb.mul(chunk, kb.i32(4))?)?;
        let lanes = kb.load_v4(source)?;
        let staging = kb.byte_pointer(shared, kb.mul(thread, kb.i32(16))?)?;
        kb.store_v4(staging, lanes)?;
        kb.barrier()?;
        let reread = kb.load_v4(staging)?;
        let value = kb.builder().build_bit_cast(reread[0], kb.context().f32_type(), "")?.into_float_value();
        let value = kb.rsqrt_approx(kb.exp2_approx(kb.log2_approx(value)?)?)?;
        let value = kb.fadd(value, kb.shuffle_xor_f32(value, 1)?)?;
        let bits = kb.builder().build_bit_cast(value, kb.context().i32_type(), "")?.into_int_value();
        let destination = kb.element_pointer(kb.pointer_param("y")?, Elem::F32, kb.mul(chunk, kb.i32(4))?)?;
        kb.store_v4(destination, [bits, reread[1], reread[2], reread[3]])?;
        let halves = kb.byte_pointer(destination, kb.i32(0))?;
        kb.store_int(halves, kb.pack_half2(Elem::F16, value, value)?)?;
        kb.store_int(halves, kb.round_half(Elem::Bf16, value)?)?;
        Ok(())
    };
    emit().expect("emit");
    kb.finish().expect("finish");
    let ptx = module.to_ptx().expect("ptx");
    for instruction in [
        "ld.global.v4.b32",
        "st.shared.v4.b32",
        "ld.shared.v4.b32",
        "st.global.v4.b32",
        "bar.sync",
        "lg2.approx.ftz.f32",
        "ex2.approx.ftz.f32",
        "rsqrt.approx.ftz.f32",
        "shfl.sync.bfly.b32",
        "cvt.rn.f16x2.f32",
        "cvt.rn.bf16.f32",
    ] {
        assert!(ptx.contains(instruction), "no `{instruction}` in\n{ptx}");
    }
    let reports = ptxas::assemble(&ptx).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(reports[0].kernel, "primitives");
    assert_eq!(reports[0].shared_bytes, 512);
}

#[test]
fn codegen_primitives_reject_f32_for_16_bit_operations() {
    let context = Context::create();
    let module = PtxModule::new(&context, "bad").expect("module");
    let kb = module.declare_kernel("bad", &[]).expect("kernel");
    let one = kb.f32(1.0);
    assert!(kb.pack_half2(Elem::F32, one, one).is_err());
    assert!(kb.round_half(Elem::F32, one).is_err());
    let zero = kb.i32(0);
    assert!(kb.mma_m16n8k16(Elem::F32, [zero; 4], [zero; 2], [one; 4]).is_err());
    assert!(kb.size_param("S").is_err());
}
