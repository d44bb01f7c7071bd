//! Warp-specialized kernel IR (roles, TMA, mbarriers, asynchronous wgmma, named barriers): the
//! projection GEMM that ships for Hopper run by the interpreter against the CPU reference, the
//! interpreter catching broken synchronization (a missing wait, a deadlock, a premature read),
//! and the verifier's rules, one test per message.

mod common;

use ccc::ir::kernel::interp::{ForwardOutputs, INTERPRETER_SMS, Rounding, launch_sizes, run_forward, run_kernels};
use ccc::ir::size::{SizeEnv, SizeExpr};
use ccc::ir::kernel::*;
use ccc::spec::*;
use common::kernel::*;
use common::rng::XorShift64Star;
use common::specs::zaya1_like;

const TOLERANCE: f64 = 1e-10;

fn schedules() -> [WgmmaGemmSchedule; 4] {
    [
        WgmmaGemmSchedule { block_n: 128, stages: 4, ping_pong: true },
        WgmmaGemmSchedule { block_n: 64, stages: 3, ping_pong: true },
        WgmmaGemmSchedule { block_n: 128, stages: 3, ping_pong: false },
        WgmmaGemmSchedule { block_n: 192, stages: 5, ping_pong: false },
    ]
}

/// The forward kernels of `spec` in their tiled form, each that `replace` builds another kernel
/// for (from the tiled one, whose ABI it keeps) replaced by it.
fn forward_kernels_with(
    spec: &AttentionSpec,
    replace: impl Fn(ForwardKernel, &KernelFn) -> Option<Result<KernelFn, String>>,
) -> Result<Vec<KernelFn>, String> {
    ForwardKernel::launched_by(spec)
        .into_iter()
        .map(|which| {
            let base = build_forward(spec, which, &default_schedule(spec, which)?)?;
            replace(which, &base).unwrap_or(Ok(base))
        })
        .collect()
}

/// The forward kernels of `spec` with both projections replaced by the wgmma GEMM of `schedule`.
fn with_wgmma_projections(spec: &AttentionSpec, schedule: &WgmmaGemmSchedule) -> Result<Vec<KernelFn>, String> {
    forward_kernels_with(spec, |which, base| {
        matches!(which, ForwardKernel::QkvProjection | ForwardKernel::OutputProjection)
            .then(|| build_wgmma_projection(spec, which, base, schedule))
    })
}

fn assert_close(spec: &AttentionSpec, got: &ForwardOutputs, want: &ForwardOutputs, what: &str) {
    for (name, a, b) in [("q", &got.q, &want.q), ("k", &got.k, &want.k), ("v", &got.v, &want.v), ("o", &got.o, &want.o), ("out", &got.out, &want.out)] {
        let error = relative_error(a, b);
        assert!(error <= TOLERANCE, "{what}: {name} relative error {error:e} for {}", spec.name);
    }
}

fn specs() -> Vec<AttentionSpec> {
    let mut plain = AttentionSpec::plain("mha_bias", 192, 64, 3, 3);
    plain.bias = true;
    let mut shifted = zaya1_like("zaya_d64", 256, 64, 4, 2);
    shifted.bias = true;
    vec![shifted, plain, zaya1_like("zaya_d128", 256, 128, 2, 1)]
}

#[test]
fn wgmma_projection_gemms_match_the_reference() {
    let mut rng = XorShift64Star::new(7);
    for spec in specs() {
        let weights = random_weights(&spec, &mut rng);
        for (batch, seq_len) in [(2, 17), (1, 130), (1, 1)] {
            let x = random_input(&spec, batch, seq_len, &mut rng);
            let want = run_forward(&spec, &weights, &x, batch, seq_len).unwrap();
            let reference = reference(&spec, &weights, &x, batch, seq_len);
            assert!(relative_error(&want.out, &reference.out.data) <= TOLERANCE);
            for (index, schedule) in schedules().into_iter().enumerate() {
                let kernels = with_wgmma_projections(&spec, &schedule).unwrap();
                // One CTA per SM, each looping over the tiles: on a few SMs each takes several
                // (the ring runs on across tiles, the ping-pong turns pass); on an H100's 132 most
                // take none.
                let sms = if index % 2 == 1 { 1 + index as u64 } else { 132 };
                let sizes = SizeEnv { sms: Some(sms), ..launch_sizes(batch, seq_len) };
                let got = run_kernels(&spec, &kernels, &weights, &x, sizes, Rounding::Exact)
                    .unwrap_or_else(|e| panic!("{} {schedule:?} on {sms} SMs: {e}", spec.name));
                assert_close(&spec, &got, &want, &format!("{schedule:?} B {batch} S {seq_len}"));
            }
        }
    }
}

#[test]
fn the_projection_grid_is_one_cta_per_sm_of_the_device() {
    let spec = zaya1_like("zaya_d64", 256, 64, 4, 2);
    let schedule = WgmmaGemmSchedule { block_n: 64, stages: 3, ping_pong: true };
    let kernels = with_wgmma_projections(&spec, &schedule).unwrap();
    let projections = [&kernels[0], kernels.last().unwrap()];
    for kernel in projections {
        assert_eq!(kernel.grid, [SizeExpr::sms(), SizeExpr::c(1), SizeExpr::c(1)], "{}", kernel.name);
        let on_7 = SizeEnv { sms: Some(7), ..launch_sizes(2, 33) };
        assert_eq!(kernel.grid.each_ref().map(|d| d.eval(&on_7)), [Ok(7), Ok(1), Ok(1)]);
    }
    // At S 130 (two row tiles) the interpreter's few SMs leave every CTA several tiles.
    for out_proj in [false, true] {
        let (_, _, _, segments) = gemm_operands(&spec, out_proj).unwrap();
        let tiles: u32 = 2 * segments.iter().map(|s| s.cols.div_ceil(schedule.block_n)).sum::<u32>();
        assert!(u64::from(tiles) >= 2 * INTERPRETER_SMS, "{tiles} tiles");
    }
    let mut rng = XorShift64Star::new(5);
    let weights = random_weights(&spec, &mut rng);
    let x = random_input(&spec, 1, 130, &mut rng);
    let got = run_kernels(&spec, &kernels, &weights, &x, launch_sizes(1, 130), Rounding::Exact).unwrap();
    let want = reference(&spec, &weights, &x, 1, 130);
    assert!(relative_error(&got.out, &want.out.data) <= TOLERANCE);
    // Without a device there is no SM count, and the launch says which kernel needs it.
    let sizes = SizeEnv { sms: None, ..launch_sizes(1, 130) };
    let error = run_kernels(&spec, &kernels, &weights, &x, sizes, Rounding::Exact).unwrap_err();
    assert_eq!(error, "zaya_d64_qkv_proj: grid dimension 0 = SMs needs SMs, the device's SM count, which is not given");
}

/// The qkv projection of a small ZAYA1-like spec with one statement of the consumer role or
/// the kernel changed by `mutate`, run at B 1 × S 130; the interpreter's error.
fn broken_run(mutate: impl Fn(&mut KernelFn)) -> String {
    let spec = zaya1_like("zaya_d64", 256, 64, 4, 2);
    let schedule = WgmmaGemmSchedule { block_n: 64, stages: 3, ping_pong: true };
    let mut kernels = with_wgmma_projections(&spec, &schedule).unwrap();
    mutate(&mut kernels[0]);
    let mut rng = XorShift64Star::new(3);
    let weights = random_weights(&spec, &mut rng);
    let x = random_input(&spec, 1, 130, &mut rng);
    let want = run_forward(&spec, &weights, &x, 1, 130).unwrap();
    // Two SMs: each CTA runs many tiles, so stages are reused and both consumers take turns.
    let sizes = SizeEnv { sms: Some(2), ..launch_sizes(1, 130) };
    match run_kernels(&spec, &kernels, &weights, &x, sizes, Rounding::Exact) {
        Err(error) => error,
        Ok(got) => {
            let error = relative_error(&got.out, &want.out);
            assert!(!(error <= TOLERANCE), "the broken kernel still matched (error {error:e})");
            format!("wrong result: relative error {error:e}")
        }
    }
}

/// Applies `f` to every statement list of the kernel's body, depth first.
fn edit_blocks(body: &mut Vec<Stmt>, f: &dyn Fn(&mut Vec<Stmt>)) {
    f(body);
    for stmt in body.iter_mut() {
        match stmt {
            Stmt::For { body, .. } | Stmt::Elect { body } => edit_blocks(body, f),
            Stmt::If { then_body, else_body, .. } => {
                edit_blocks(then_body, f);
                edit_blocks(else_body, f);
            }
            Stmt::Roles(roles) => roles.iter_mut().for_each(|role| edit_blocks(&mut role.body, f)),
            _ => {}
        }
    }
}

#[test]
fn a_consumer_that_does_not_wait_for_its_copies_reads_poison() {
    let error = broken_run(|kernel| {
        edit_blocks(&mut kernel.body, &|block| {
            block.retain(|stmt| !matches!(stmt, Stmt::WaitParity { barrier, .. } if barrier.ring == BarrierId(0)))
        })
    });
    // Whichever comes first: it reads the poison the shared tiles start with, it runs so far
    // ahead that the barriers' phases alias and nobody moves, or copies nobody waited for
    // leave a phase over-full.
    assert!(
        (error.contains("wrong result") && error.contains("NaN")) || error.contains("deadlock") || error.contains("arrivals on @full"),
        "{error}"
    );
}

#[test]
fn reading_an_accumulator_before_its_group_retires_is_an_error() {
    let error = broken_run(|kernel| {
        edit_blocks(&mut kernel.body, &|block| block.retain(|stmt| *stmt != Stmt::MmaWait { pending: 0, after: None }))
    });
    assert!(error.contains("while a wgmma group writing it is in flight"), "{error}");
}

#[test]
fn releasing_a_stage_before_its_group_retires_lets_tma_overwrite_it() {
    // Waiting for no group but the newest to retire keeps the group that read the released
    // slot in flight when the producer refills it.
    let error = broken_run(|kernel| {
        edit_blocks(&mut kernel.body, &|block| {
            for stmt in block.iter_mut() {
                if *stmt == (Stmt::MmaWait { pending: 1, after: None }) {
                    *stmt = Stmt::MmaWait { pending: 2, after: None };
                }
            }
        })
    });
    assert!(error.contains("TMA overwrites") && error.contains("while a wgmma group still reads it"), "{error}");
}

#[test]
fn too_many_arrivals_for_a_phase_is_an_error() {
    let error = broken_run(|kernel| kernel.barriers[1].arrivals = 64);
    assert!(error.contains("arrivals on @empty"), "{error}");
}

#[test]
fn a_barrier_that_never_fills_is_a_deadlock() {
    let error = broken_run(|kernel| kernel.barriers[1].arrivals = 256);
    assert!(error.starts_with("zaya_d64_qkv_proj block") && error.contains("deadlock"), "{error}");
    assert!(error.contains("waits on @empty"), "{error}");
}

#[test]
fn a_ping_pong_turn_never_passed_is_a_deadlock() {
    // Without warpgroup 1's opening pass, warpgroup 0 waits for its first turn forever.
    let error = broken_run(|kernel| {
        let Stmt::Roles(roles) = kernel.body.last_mut().unwrap() else { panic!("roles last") };
        roles[0].body.remove(0);
    });
    assert!(error.contains("deadlock") && error.contains("named barrier 1"), "{error}");
}

/// The verifier's messages about a kernel with `mutate` applied to the shipped GEMM.
fn verify_errors(mutate: impl Fn(&mut KernelFn)) -> String {
    let spec = zaya1_like("zaya_d64", 256, 64, 4, 2);
    let schedule = WgmmaGemmSchedule { block_n: 64, stages: 3, ping_pong: true };
    let mut kernel = with_wgmma_projections(&spec, &schedule).unwrap().remove(0);
    kernel.verify().expect("the shipped kernel verifies");
    mutate(&mut kernel);
    kernel.verify().expect_err("the broken kernel verifies").join("\n")
}

fn consumer(kernel: &mut KernelFn) -> &mut Vec<Stmt> {
    let Some(Stmt::Roles(roles)) = kernel.body.last_mut() else { panic!("roles last") };
    &mut roles[0].body
}

#[test]
fn verifier_rules_of_warp_specialized_kernels() {
    let cases: Vec<(Box<dyn Fn(&mut KernelFn)>, &str)> = vec![
        (Box::new(|k| k.warps = 16), "the roles hold 3 warpgroups; the kernel's 512 threads are 4"),
        (Box::new(|k| { let Some(Stmt::Roles(roles)) = k.body.last_mut() else { return }; roles[1].registers = 240 }), "register budgets"),
        (Box::new(|k| { let Some(Stmt::Roles(roles)) = k.body.last_mut() else { return }; roles[1].registers = 20 }), "setmaxnreg takes a multiple of 8 in 24..=256"),
        (Box::new(|k| consumer(k).insert(0, Stmt::Barrier)), "warpgroups synchronize through mbarriers and named barriers only"),
        (Box::new(|k| consumer(k).insert(0, Stmt::NamedBarrier { id: Expr::Int(0), threads: 256, sync: true })), "named barrier 0 is not in 1..16"),
        (Box::new(|k| consumer(k).insert(0, Stmt::NamedBarrier { id: Expr::Int(3), threads: 96, sync: true })), "96 threads: whole warpgroups"),
        (Box::new(|k| k.body.insert(0, Stmt::MmaCommit)), "only inside a role of `roles`"),
        (
            Box::new(|k| {
                let arrive = Stmt::ArriveExpectTx { barrier: BarrierRef { ring: BarrierId(0), slot: Expr::Int(0) }, bytes: Expr::Int(8) };
                consumer(k).insert(0, arrive)
            }),
            "issued by one thread: only inside `elect`",
        ),
        (
            Box::new(|k| consumer(k).insert(0, Stmt::Elect { body: vec![Stmt::MmaCommit] })),
            "one thread of `elect` runs only scalar, TMA and mbarrier statements",
        ),
        (
            Box::new(|k| {
                // The producer's expect_tx of the first segment one byte short of its copies.
                let Some(Stmt::Roles(roles)) = k.body.last_mut() else { return };
                edit_blocks(&mut roles[1].body, &|block| {
                    for stmt in block.iter_mut() {
                        if let Stmt::ArriveExpectTx { bytes: Expr::Int(bytes), .. } = stmt {
                            *bytes -= 1;
                        }
                    }
                })
            }),
            "the TMA copies of its block on that barrier bring",
        ),
        (Box::new(|k| k.barriers[0].arrivals = 0), "barrier @full needs at least one slot"),
        (Box::new(|k| k.barriers[0].slots = 4), "taken modulo 3, but the ring has 4 slots"),
        (
            Box::new(|k| {
                // The consumers' full-barrier wait one phase off.
                edit_blocks(consumer(k), &|block| {
                    for stmt in block.iter_mut() {
                        if let Stmt::WaitParity { barrier, parity } = stmt
                            && barrier.ring == BarrierId(0)
                        {
                            *parity = Expr::binary(BinOp::Sub, Expr::Int(1), parity.clone());
                        }
                    }
                })
            }),
            "the phase of use n of a slot is (n / 3) % 2",
        ),
        (
            Box::new(|k| {
                for param in k.params.iter_mut() {
                    if let KernelParam::TensorMap { box_rows, .. } = param {
                        *box_rows = 64;
                    }
                }
            }),
            "is not whole boxes of 64 rows",
        ),
    ];
    for (mutate, message) in cases {
        let errors = verify_errors(mutate);
        assert!(errors.contains(message), "expected `{message}` in:\n{errors}");
    }
}

#[test]
fn random_specs_run_the_wgmma_projections() {
    // Every random spec whose shapes the wgmma GEMM takes (K a multiple of 8, head widths of
    // whole 64-column boxes), ping-pong and cooperative.
    let mut rng = XorShift64Star::new(11);
    let mut ran = 0;
    for index in 0..80 {
        let spec = random_spec(&mut rng, index);
        let schedule = WgmmaGemmSchedule { block_n: 64, stages: 3, ping_pong: index % 2 == 0 };
        let Ok(kernels) = with_wgmma_projections(&spec, &schedule) else { continue };
        let weights = random_weights(&spec, &mut rng);
        let x = random_input(&spec, 2, 33, &mut rng);
        let want = run_forward(&spec, &weights, &x, 2, 33).unwrap();
        let got = run_kernels(&spec, &kernels, &weights, &x, launch_sizes(2, 33), Rounding::Exact)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        assert_close(&spec, &got, &want, "random");
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} random specs take the wgmma projections");
}

/// What ships: the driver's kernel IR for every example and 120 random specs (the projection
/// GEMMs with the tiles the resource model chose, the other kernels in their kernel-IR form), run
/// by the interpreter against the CPU reference at B 2 × S 17 and B 1 × S 130.
#[cfg(feature = "llvm")]
#[test]
fn the_planned_kernel_ir_of_every_example_and_random_spec_matches_the_reference() {
    let mut rng = XorShift64Star::new(29);
    let mut specs = common::specs::example_files();
    let examples = specs.len();
    specs.extend((0..120).map(|index| random_spec(&mut rng, index)));
    let mut with_roles = 0;
    for (index, spec) in specs.iter().enumerate() {
        let Ok(kernels) = ccc::driver::planned_kernel_ir(spec) else {
            assert!(index >= examples, "{}: every example compiles", spec.name);
            continue;
        };
        if kernels.iter().any(KernelFn::has_roles) {
            with_roles += 1;
        }
        let weights = random_weights(spec, &mut rng);
        let shapes: &[(usize, usize)] = if index < examples { &[(2, 17)] } else { &[(2, 17), (1, 130)] };
        for &(batch, seq_len) in shapes {
            let x = random_input(spec, batch, seq_len, &mut rng);
            let got = run_kernels(spec, &kernels, &weights, &x, launch_sizes(batch, seq_len), Rounding::Exact)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            let want = reference(spec, &weights, &x, batch, seq_len);
            for (name, a, b) in [("q", &got.q, &want.q.data), ("k", &got.k, &want.k.data), ("v", &got.v, &want.v.data), ("o", &got.o, &want.attn.data), ("lse", &got.lse, &want.lse.data), ("out", &got.out, &want.out.data)] {
                let error = relative_error(a, b);
                assert!(error <= TOLERANCE, "{} B {batch} S {seq_len}: {name} relative error {error:e}", spec.name);
            }
        }
    }
    assert!(with_roles >= examples + 40, "only {with_roles} specs ship a warp-specialized GEMM");
}

/// `--emit plan` shows the launches the manifest makes: every kernel's grid and threads, for
/// every example and 40 random specs.
#[cfg(feature = "llvm")]
#[test]
fn the_plan_launches_what_the_manifest_launches() {
    let mut rng = XorShift64Star::new(5);
    let mut specs = common::specs::example_files();
    specs.extend((0..40).map(|index| random_spec(&mut rng, index)));
    for spec in specs {
        let Ok(plans) = ccc::driver::launched_plans(&spec) else { continue };
        let library = ccc::driver::compile_library(&spec, &Default::default()).unwrap();
        let launched = &library.manifest.entry_points[0].kernels;
        assert_eq!(plans[0].kernels.len(), launched.len(), "{}", spec.name);
        for (planned, launched) in plans[0].kernels.iter().zip(launched) {
            assert_eq!(planned.symbol, launched.symbol);
            let grid = [planned.grid.x.clone(), planned.grid.y.clone(), planned.grid.z.clone()];
            assert_eq!(grid, launched.grid, "{}", planned.symbol);
            assert_eq!([planned.schedule.warps * 32, 1, 1], launched.block, "{}", planned.symbol);
        }
    }
}

/// One warpgroup: TMA loads Q, K, V (64 × 64 each), then S = Q·Kᵀ and O = P·V as asynchronous
/// wgmma with P = S converted to A fragments in registers; `overwrite_p_early` converts into P
/// again while the P·V group still reads it.
fn register_operand_kernel(overwrite_p_early: bool) -> KernelFn {
    use ccc::ir::size::SizeExpr;
    let n = 64u32;
    let square = || vec![SizeExpr::c(n as u64), SizeExpr::c(n as u64)];
    let tensor = |name: &str, elem, access| KernelParam::Tensor { name: name.into(), elem, shape: square(), access };
    let map = |tensor: &str| KernelParam::TensorMap { name: format!("{tensor}.tensor_map"), tensor: tensor.into(), box_rows: n };
    let swizzled = |name: &str| TileDecl { name: name.into(), ty: TileType { elem: ElemType::Bf16, rows: n, cols: n, layout: Layout::Swizzled128B } };
    let registers = |name: &str, elem, layout| TileDecl { name: name.into(), ty: TileType { elem, rows: n, cols: n, layout } };
    let acc_layout = Layout::MmaAccumulator { warps_m: 4, warps_n: 1 };
    let tiles = vec![
        swizzled("q"),
        swizzled("k"),
        swizzled("v"),
        registers("s", ElemType::F32, acc_layout),
        registers("p", ElemType::Bf16, Layout::MmaOperandA { warps_m: 4, warps_n: 1 }),
        registers("o", ElemType::F32, acc_layout),
    ];
    let whole = |id: usize| TileView::whole(TileId(id), &tiles[id].ty);
    let full = BarrierRef { ring: BarrierId(0), slot: Expr::Int(0) };
    let load = |tile: usize, tensor: &str| Stmt::TmaLoad {
        dst: whole(tile),
        map: format!("{tensor}.tensor_map"),
        coords: vec![Expr::Int(0), Expr::Int(0)],
        barrier: full.clone(),
    };
    let mut body = vec![
        Stmt::Elect {
            body: vec![
                Stmt::ArriveExpectTx { barrier: full.clone(), bytes: Expr::Int(3 * 64 * 64 * 2) },
                load(0, "q"),
                load(1, "k"),
                load(2, "v"),
            ],
        },
        Stmt::WaitParity { barrier: full.clone(), parity: Expr::Int(0) },
        Stmt::Fill { dst: whole(3), value: 0.0 },
        Stmt::Fill { dst: whole(5), value: 0.0 },
        Stmt::MmaAsync { acc: whole(3), a: whole(0), b: whole(1), a_transposed: false, b_transposed: true },
        Stmt::MmaCommit,
        Stmt::MmaWait { pending: 0, after: None },
        Stmt::Convert { dst: whole(4), src: whole(3) },
        Stmt::MmaAsync { acc: whole(5), a: whole(4), b: whole(2), a_transposed: false, b_transposed: false },
        Stmt::MmaCommit,
    ];
    if overwrite_p_early {
        body.push(Stmt::Convert { dst: whole(4), src: whole(3) });
    }
    body.extend([
        Stmt::MmaWait { pending: 0, after: None },
        Stmt::Store {
            src: whole(5),
            dst: GlobalTile {
                param: "o".into(),
                dims: vec![
                    GlobalDim::Span { start: Expr::Int(0), len: n, valid: None },
                    GlobalDim::Span { start: Expr::Int(0), len: n, valid: None },
                ],
            },
        },
    ]);
    KernelFn {
        name: "pv_async".into(),
        params: vec![
            tensor("q", ElemType::Bf16, Access::Read),
            tensor("k", ElemType::Bf16, Access::Read),
            tensor("v", ElemType::Bf16, Access::Read),
            tensor("o", ElemType::F32, Access::Write),
            map("q"),
            map("k"),
            map("v"),
        ],
        grid: [SizeExpr::c(1), SizeExpr::c(1), SizeExpr::c(1)],
        warps: 4,
        tiles,
        barriers: vec![BarrierDecl { name: "full".into(), slots: 1, arrivals: 1 }],
        schedule: Schedule { block_m: 64, block_n: 64, block_k: 64, warps: 4, stages: 1 },
        ctas_per_sm: 1,
        body: vec![Stmt::Roles(vec![Role { name: "consumer".into(), warpgroups: 1, index: "wg".into(), registers: 240, body }])],
    }
}

#[test]
fn register_operand_a_passes_through_asynchronous_groups() {
    let kernel = register_operand_kernel(false);
    kernel.verify().unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    let mut rng = XorShift64Star::new(17);
    let mut random = |len: usize| (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f64>>();
    let (q, k, v) = (random(64 * 64), random(64 * 64), random(64 * 64));
    let mut buffers = ccc::ir::kernel::interp::Buffers::new();
    for (name, data) in [("q", &q), ("k", &k), ("v", &v)] {
        buffers.insert(name.into(), data.clone());
    }
    buffers.insert("o".into(), vec![f64::NAN; 64 * 64]);
    ccc::ir::kernel::interp::run_kernel(&kernel, &mut buffers, launch_sizes(1, 1), Rounding::Exact).unwrap();
    let mut want = vec![0.0; 64 * 64];
    for i in 0..64 {
        for j in 0..64 {
            for t in 0..64 {
                let s: f64 = (0..64).map(|c| q[i * 64 + c] * k[t * 64 + c]).sum();
                want[i * 64 + j] += s * v[t * 64 + j];
            }
        }
    }
    assert!(relative_error(&buffers["o"], &want) <= TOLERANCE);
    // Converting into P while the P·V group reads it is caught.
    let broken = register_operand_kernel(true);
    buffers.insert("o".into(), vec![f64::NAN; 64 * 64]);
    let error = ccc::ir::kernel::interp::run_kernel(&broken, &mut buffers, launch_sizes(1, 1), Rounding::Exact).unwrap_err();
    assert!(error.contains("overwrites %p while a wgmma group still reads it"), "{error}");
}

/// The same kernel lowered: wgmma with A from registers, no spills, one fence per issue.
#[cfg(feature = "llvm")]
#[test]
fn register_operand_a_lowers_to_wgmma_from_registers() {
    let kernel = register_operand_kernel(false);
    let ptx = ccc::codegen::lower::lower_kernels("pv_async", std::slice::from_ref(&kernel)).expect("lowered").ptx;
    assert_eq!(ptx.matches("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16").count(), 8);
    assert_eq!(ptx.matches("wgmma.fence.sync.aligned;").count(), 2);
    assert_eq!(ptx.matches("wgmma.wait_group.sync.aligned 0;").count(), 2);
    let reports = ccc::codegen::ptxas::assemble(&ptx).expect("ptxas");
    let report = &reports[0];
    assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{report:?}");
}

fn attention_schedules() -> [WgmmaAttentionSchedule; 4] {
    let l2_group_bytes = 16 << 20;
    [
        WgmmaAttentionSchedule { block_m: 128, block_n: 128, stages: 3, ping_pong: true, l2_group_bytes },
        WgmmaAttentionSchedule { block_m: 128, block_n: 64, stages: 4, ping_pong: false, l2_group_bytes },
        WgmmaAttentionSchedule { block_m: 64, block_n: 48, stages: 3, ping_pong: false, l2_group_bytes },
        // A group of one kv head at these lengths: the longest-first order within each head.
        WgmmaAttentionSchedule { block_m: 128, block_n: 32, stages: 3, ping_pong: true, l2_group_bytes: 4096 },
    ]
}

/// The forward kernels of `spec` with attention replaced by the wgmma kernel of `schedule`.
fn with_wgmma_attention(spec: &AttentionSpec, schedule: &WgmmaAttentionSchedule) -> Result<Vec<KernelFn>, String> {
    forward_kernels_with(spec, |which, base| (which == ForwardKernel::Attention).then(|| build_wgmma_attention(spec, base, schedule, TokenRows::Batch)))
}

#[test]
fn wgmma_attention_matches_the_reference_for_every_mask_and_schedule() {
    let mut rng = XorShift64Star::new(17);
    let mut windowed = zaya1_like("zaya_window", 256, 64, 4, 2);
    windowed.mask = Mask::SlidingWindow { window: 40 };
    let mut unmasked = AttentionSpec::plain("plain_none", 128, 64, 2, 1);
    unmasked.mask = Mask::None;
    let mut long_window = AttentionSpec::plain("plain_long_window", 128, 128, 1, 1);
    long_window.mask = Mask::SlidingWindow { window: 1000 };
    for spec in [zaya1_like("zaya_d128", 256, 128, 2, 1), windowed, unmasked, long_window] {
        let weights = random_weights(&spec, &mut rng);
        for (batch, seq_len) in [(2, 17), (1, 200), (1, 1)] {
            let x = random_input(&spec, batch, seq_len, &mut rng);
            let want = reference(&spec, &weights, &x, batch, seq_len);
            for schedule in attention_schedules() {
                let kernels = with_wgmma_attention(&spec, &schedule).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
                let got = run_kernels(&spec, &kernels, &weights, &x, launch_sizes(batch, seq_len), Rounding::Exact)
                    .unwrap_or_else(|e| panic!("{} {schedule:?}: {e}", spec.name));
                for (name, a, b) in [("o", &got.o, &want.attn.data), ("lse", &got.lse, &want.lse.data), ("out", &got.out, &want.out.data)] {
                    let error = relative_error(a, b);
                    assert!(error <= TOLERANCE, "{} {schedule:?} B {batch} S {seq_len}: {name} relative error {error:e}", spec.name);
                }
            }
        }
    }
}

/// The verifier's messages about the wgmma attention kernel with `mutate` applied.
fn attention_verify_errors(mutate: impl Fn(&mut KernelFn)) -> String {
    let spec = zaya1_like("zaya_d128", 256, 128, 2, 1);
    let schedule = WgmmaAttentionSchedule { block_m: 128, block_n: 64, stages: 3, ping_pong: true, l2_group_bytes: 16 << 20 };
    let mut kernel = with_wgmma_attention(&spec, &schedule).unwrap().remove(2);
    kernel.verify().expect("the shipped kernel verifies");
    mutate(&mut kernel);
    kernel.verify().expect_err("the broken kernel verifies").join("\n")
}

fn tile_named(kernel: &KernelFn, name: &str) -> TileId {
    TileId(kernel.tiles.iter().position(|tile| tile.name == name).unwrap_or_else(|| panic!("no tile {name}")))
}

/// Replaces every statement of the consumer role that `edit` maps to `Some`.
fn edit_consumer(kernel: &mut KernelFn, edit: &dyn Fn(&Stmt) -> Option<Stmt>) {
    edit_blocks(consumer(kernel), &|block| {
        for stmt in block.iter_mut() {
            if let Some(new) = edit(stmt) {
                *stmt = new;
            }
        }
    })
}

#[test]
fn verifier_rules_of_ordered_waits_and_row_shares() {
    let cases: Vec<(Box<dyn Fn(&mut KernelFn)>, &str)> = vec![
        (
            Box::new(|k| {
                let q_s = tile_named(k, "q_s");
                edit_consumer(k, &|stmt| matches!(stmt, Stmt::MmaWait { after: Some(_), .. }).then_some(Stmt::MmaWait { pending: 0, after: Some(q_s) }))
            }),
            "mma.wait after %q_s: an f32 register tile",
        ),
        (
            Box::new(|k| {
                let l = tile_named(k, "l");
                let whole = TileView::whole(l, &k.tile(l).ty);
                consumer(k).insert(1, Stmt::Fill { dst: whole, value: 1.0 })
            }),
            "row shares start at 0",
        ),
        (
            Box::new(|k| {
                // l + 1 adds the constant once per thread of the row.
                let l = tile_named(k, "l");
                let whole = TileView::whole(l, &k.tile(l).ty);
                consumer(k).insert(1, Stmt::Map { dst: whole, expr: Expr::Elem + Expr::Float(1.0) })
            }),
            "a map into row shares must be linear in shares",
        ),
        (
            Box::new(|k| {
                let (l, alpha) = (tile_named(k, "l"), tile_named(k, "alpha"));
                let whole = TileView::whole(alpha, &k.tile(alpha).ty);
                consumer(k).insert(1, Stmt::Map { dst: whole, expr: Expr::tile(l, Expr::Row, Expr::Int(0)) })
            }),
            "row shares %l are read only by maps into row shares",
        ),
        (
            Box::new(|k| {
                let tile_sum = tile_named(k, "tile_sum");
                edit_consumer(k, &|stmt| match stmt {
                    Stmt::RowReduce { dst, src, value, .. } if *dst == tile_sum => {
                        Some(Stmt::RowReduce { dst: *dst, src: src.clone(), op: ReduceOp::Max, value: value.clone() })
                    }
                    _ => None,
                })
            }),
            "reduces an mma accumulator into a row vector (or row shares, by sum)",
        ),
    ];
    for (mutate, message) in cases {
        let errors = attention_verify_errors(mutate);
        assert!(errors.contains(message), "expected `{message}` in:\n{errors}");
    }
}

/// `--emit kernel` of every example shows the kernel IR whose PTX ships: the attention kernel and
/// both projections as warp-specialized kernel IR (roles, TMA, mbarrier waits, asynchronous
/// wgmma), the prologue as kernel IR too, and no note of a kernel coming from elsewhere.
#[cfg(feature = "llvm")]
#[test]
fn emitted_kernel_ir_is_what_ships_for_every_example() {
    for spec in common::specs::example_files() {
        let text = ccc::driver::kernel_text(&spec).unwrap_or_else(|e| panic!("{e}"));
        let kernels: Vec<&str> = text.split("\nkernel ").collect();
        for suffix in ["qkv_proj", "attention", "out_proj"] {
            let name = format!("{}_{suffix}", spec.name);
            let kernel = kernels
                .iter()
                .find(|k| k.starts_with(&name) || k.starts_with(&format!("kernel {name}")))
                .unwrap_or_else(|| panic!("{name} missing from --emit kernel"));
            for construct in ["roles {", "tma %", "wait @full", "mma.async", "mma.wait"] {
                assert!(kernel.contains(construct), "{name}: no `{construct}` in its kernel IR");
            }
        }
        let attention = kernels.iter().find(|k| k.contains("_attention\n")).expect("attention");
        assert!(attention.contains("mma.wait 0 after %l"), "{}: the softmax's ordered wait", spec.name);
        assert!(!text.contains("hand-written") && !text.contains("emitter"), "{}: a kernel noted as coming from elsewhere", spec.name);
        let lowered = ccc::driver::lowered(&spec).unwrap_or_else(|e| panic!("{e}"));
        let entries = lowered.ptx.matches(".entry ").count();
        assert_eq!(entries, kernels.len(), "{}: every PTX entry is a kernel of --emit kernel", spec.name);
    }
}
