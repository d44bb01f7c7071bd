//! A tiny hand-written library for runtime tests: two elementwise kernels in PTX text, with a
//! manifest in the same form codegen writes. It exercises everything the launch path does (two
//! launches in order, an intermediate, a weight, size parameters, a grid from a SizeExpr, and a
//! dynamic shared memory request above 48 KB) without depending on codegen.
//!
//! - `fixture_double(x, o, B, S)`: o = 2·x, elementwise over [B, S, 8].
//! - `fixture_add_diagonal(o, o_proj.weight, out, B, S)`: out[b, s, e] = o[b, s, e] + W_o[e, e].
//!
//! Arithmetic is in f32 with one rounding to bf16 at the store.

#![allow(dead_code)] // each test binary uses a different part

use ccc::ir::size::{SizeExpr, SizeVar};
use ccc::manifest::{
    BufferManifest, BufferRole, EntryPointManifest, KernelManifest, KernelParamManifest, Manifest,
    SCHEMA_VERSION, TensorDType,
};
use ccc::spec::{AttentionSpec, EntryPoint};
use std::path::PathBuf;

pub const MODEL_DIM: usize = 8;
pub const THREADS: u32 = 64;
/// Requested by the second kernel so that the runtime must raise the function's limit.
pub const BIG_SHARED_BYTES: u32 = 64 * 1024;

pub const FIXTURE_PTX: &str = r#"
.version 8.0
.target sm_90a
.address_size 64

.visible .entry fixture_double(
    .param .u64 param_x,
    .param .u64 param_o,
    .param .u32 param_batch,
    .param .u32 param_seq_len
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<6>;
    .reg .b16 %h<3>;
    .reg .f32 %f<3>;

    ld.param.u64 %rd1, [param_x];
    ld.param.u64 %rd2, [param_o];
    ld.param.u32 %r1, [param_batch];
    ld.param.u32 %r2, [param_seq_len];
    mul.lo.u32 %r3, %r1, %r2;
    shl.b32 %r3, %r3, 3;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mad.lo.u32 %r7, %r4, %r5, %r6;
    setp.ge.u32 %p1, %r7, %r3;
    @%p1 bra double_done;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mul.wide.u32 %rd3, %r7, 2;
    add.s64 %rd4, %rd1, %rd3;
    add.s64 %rd5, %rd2, %rd3;
    ld.global.b16 %h1, [%rd4];
    cvt.f32.bf16 %f1, %h1;
    add.f32 %f2, %f1, %f1;
    cvt.rn.bf16.f32 %h2, %f2;
    st.global.b16 [%rd5], %h2;
double_done:
    ret;
}

.visible .entry fixture_add_diagonal(
    .param .u64 param_o,
    .param .u64 param_w,
    .param .u64 param_out,
    .param .u32 param_batch,
    .param .u32 param_seq_len
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<10>;
    .reg .b16 %h<4>;
    .reg .f32 %f<4>;

    ld.param.u64 %rd1, [param_o];
    ld.param.u64 %rd2, [param_w];
    ld.param.u64 %rd3, [param_out];
    ld.param.u32 %r1, [param_batch];
    ld.param.u32 %r2, [param_seq_len];
    mul.lo.u32 %r3, %r1, %r2;
    shl.b32 %r3, %r3, 3;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mad.lo.u32 %r7, %r4, %r5, %r6;
    setp.ge.u32 %p1, %r7, %r3;
    @%p1 bra add_done;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    and.b32 %r8, %r7, 7;
    mul.lo.u32 %r9, %r8, 9;
    mul.wide.u32 %rd4, %r7, 2;
    mul.wide.u32 %rd5, %r9, 2;
    add.s64 %rd6, %rd1, %rd4;
    add.s64 %rd7, %rd2, %rd5;
    add.s64 %rd8, %rd3, %rd4;
    ld.global.b16 %h1, [%rd6];
    ld.global.b16 %h2, [%rd7];
    cvt.f32.bf16 %f1, %h1;
    cvt.f32.bf16 %f2, %h2;
    add.f32 %f3, %f1, %f2;
    cvt.rn.bf16.f32 %h3, %f3;
    st.global.b16 [%rd8], %h3;
add_done:
    ret;
}
"#;

/// (name, shape, values) of every weight.
pub type WeightList = Vec<(String, Vec<usize>, Vec<f64>)>;

/// Every weight of the fixture, element i of each tensor set to `value(i)`.
pub fn fixture_weight_list(value: impl Fn(usize) -> f64) -> WeightList {
    fixture_spec()
        .params()
        .into_iter()
        .map(|p| {
            let len = p.shape.iter().product::<usize>();
            (p.name, p.shape, (0..len).map(&value).collect())
        })
        .collect()
}

/// A weight list as the borrowed entries `WeightSet::from_f64` takes.
pub fn weight_entries(
    list: &[(String, Vec<usize>, Vec<f64>)],
) -> impl Iterator<Item = (&str, &[usize], &[f64])> {
    list.iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
}

/// MHA with E = 8, d = 4, two heads: the smallest spec whose manifest passes validation.
pub fn fixture_spec() -> AttentionSpec {
    AttentionSpec::plain("fixture", MODEL_DIM, 4, 2, 2)
}

pub fn fixture_manifest() -> Manifest {
    let spec = fixture_spec();
    let (b, s) = (SizeExpr::batch(), SizeExpr::seq_len());
    let tokens = vec![b.clone(), s.clone(), MODEL_DIM.into()];
    let buffer = |name: &str, role, shape: Vec<SizeExpr>, layout: &str| BufferManifest {
        name: name.into(),
        role,
        dtype: TensorDType::Bf16,
        shape,
        layout: layout.into(),
    };
    let buffers = vec![
        buffer("x", BufferRole::Input, tokens.clone(), "BSE"),
        buffer("out", BufferRole::Output, tokens.clone(), "BSE"),
        buffer(
            "o",
            BufferRole::Intermediate,
            vec![b.clone(), s.clone(), 2usize.into(), 4usize.into()],
            "BSHD",
        ),
        buffer(
            "o_proj.weight",
            BufferRole::Weight,
            vec![8usize.into(), 8usize.into()],
            "row_major",
        ),
    ];
    let grid = [
        (b * s * SizeExpr::c(MODEL_DIM as u64)).ceil_div(u64::from(THREADS)),
        SizeExpr::c(1),
        SizeExpr::c(1),
    ];
    let params = |names: &[&str]| {
        names
            .iter()
            .map(|n| KernelParamManifest::Buffer {
                name: n.to_string(),
            })
            .chain([SizeVar::Batch, SizeVar::SeqLen].map(|var| KernelParamManifest::Size { var }))
            .collect()
    };
    let kernels = vec![
        KernelManifest {
            symbol: "fixture_double".into(),
            params: params(&["x", "o"]),
            grid: grid.clone(),
            block: [THREADS, 1, 1],
            dynamic_shared_bytes: 0,
            ptxas: None,
        },
        KernelManifest {
            symbol: "fixture_add_diagonal".into(),
            params: params(&["o", "o_proj.weight", "out"]),
            grid,
            block: [THREADS, 1, 1],
            dynamic_shared_bytes: BIG_SHARED_BYTES,
            ptxas: None,
        },
    ];
    Manifest {
        schema_version: SCHEMA_VERSION,
        compiler_version: "fixture".into(),
        weights: Manifest::weights_for(&spec),
        spec,
        target: "sm_90a".into(),
        ptx_file: "fixture.ptx".into(),
        cubin_file: None,
        entry_points: vec![EntryPointManifest {
            entry: EntryPoint::Forward,
            kernels,
            buffers,
        }],
    }
}

/// A fresh scratch directory. Under the system temp dir rather than cargo's, because the GPU
/// test binary is built here and run on a machine without this checkout (docs/gpu-tests.md).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("ccc-runtime-tests-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `ccc-run` binary: `CCC_RUN` when set (the GPU machine), else the one cargo built.
pub fn ccc_run() -> std::process::Command {
    std::process::Command::new(
        std::env::var("CCC_RUN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ccc-run").to_string()),
    )
}

/// Writes the fixture library into a fresh scratch directory named `name`.
pub fn write_fixture(name: &str) -> PathBuf {
    write_library(name, &fixture_manifest())
}

/// Writes `manifest` with the fixture's PTX into a fresh scratch directory named `name`.
pub fn write_library(name: &str, manifest: &Manifest) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("manifest.json"), manifest.to_json()).unwrap();
    std::fs::write(dir.join("fixture.ptx"), FIXTURE_PTX).unwrap();
    dir
}

/// The fixture with its second kernel on a grid of one CTA per SM, `[SMs, 1, 1]`. Its CTAs do not
/// loop: they write the first 64·SMs elements of `out`, which shows the grid a call launched.
pub fn persistent_fixture() -> Manifest {
    let mut manifest = fixture_manifest();
    manifest.entry_points[0].kernels[1].grid = [SizeExpr::sms(), SizeExpr::c(1), SizeExpr::c(1)];
    manifest.validate().unwrap();
    manifest
}

pub fn culib_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
