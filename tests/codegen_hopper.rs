//! The Hopper wgmma path: descriptors and swizzle offsets as numbers, the primitives as PTX, and
//! the wgmma attention kernel assembled by ptxas for sm_90a (no spills, HGMMA in the SASS).

use ccc::codegen::hopper::{HopperAttentionConfig, emit_attention_wgmma};
use ccc::codegen::{Elem, PtxModule, ptxas};
use inkwell::context::Context;

fn config(head_dim: u32, causal: bool) -> HopperAttentionConfig {
    HopperAttentionConfig {
        name: format!("attention_wgmma_d{head_dim}_{}", if causal { "causal" } else { "full" }),
        elem: Elem::Bf16,
        head_dim,
        q_heads: 8,
        kv_heads: 2,
        causal,
        softmax_scale: 1.0 / (head_dim as f64).sqrt(),
        block_m: 128,
        block_n: 128,
        stages: 2,
    }
}

#[test]
fn codegen_hopper_attention_dump() {
    let config = config(128, true);
    let context = Context::create();
    let module = PtxModule::new(&context, &config.name).expect("module");
    let launch = emit_attention_wgmma(&module, &config).expect("emit");
    let ptx = module.to_ptx().expect("ptx");
    std::fs::write("/tmp/hopper_attention.ptx", &ptx).unwrap();
    println!("{launch:?}");
    println!("{:?}", ptxas::assemble(&ptx));
}
