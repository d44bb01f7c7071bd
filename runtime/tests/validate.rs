//! The validator's judgement, fed with tensors made on the CPU in place of GPU results.

mod common;

use ccc::manifest::{BufferRole, TensorDType};
use ccc::reference::{self, ForwardOutputs, Tensor};
use ccc::spec::DType;
use ccc_runtime::HostTensor;
use ccc_runtime::validate::{compare_backward, compare_forward, input_for, tolerance, weights_for};
use common::fixture_manifest;
use std::collections::BTreeMap;

fn reference_run() -> ForwardOutputs {
    let manifest = fixture_manifest();
    let (weights, _) = weights_for(&manifest, 7, None).unwrap();
    let (x, _) = input_for(&manifest, 2, 33, 8).unwrap();
    reference::forward(&manifest.spec, &weights, &x).unwrap()
}

/// What a correct GPU run would return: the reference's tensors stored in the buffers' dtypes.
fn as_gpu_outputs(expected: &ForwardOutputs) -> BTreeMap<String, (BufferRole, HostTensor)> {
    let store = |t: &Tensor, dtype| HostTensor::from_f64(dtype, t.shape.clone(), &t.data).unwrap();
    BTreeMap::from([
        (
            "out".to_string(),
            (BufferRole::Output, store(&expected.out, TensorDType::Bf16)),
        ),
        (
            "q".to_string(),
            (
                BufferRole::Intermediate,
                store(&expected.q, TensorDType::Bf16),
            ),
        ),
        (
            "o".to_string(),
            (
                BufferRole::Intermediate,
                store(&expected.attn, TensorDType::Bf16),
            ),
        ),
        (
            "lse".to_string(),
            (BufferRole::Scratch, store(&expected.lse, TensorDType::F32)),
        ),
    ])
}

#[test]
fn correct_results_rounded_to_bf16_pass() {
    let expected = reference_run();
    let checks = compare_forward(
        &as_gpu_outputs(&expected),
        &expected,
        tolerance(DType::Bf16),
    );
    let names: Vec<&str> = checks.iter().map(|c| c.tensor.as_str()).collect();
    assert_eq!(names, ["out", "q", "o", "lse"]);
    for check in &checks {
        assert!(check.passed, "{check:?}");
        // bf16 keeps 8 significant bits: rounding alone costs at most 2^-9 relative.
        assert!(check.rel_l2.unwrap() <= 2f64.powi(-9), "{check:?}");
        assert!(
            check.rel_l2.unwrap() > 0.0 || check.tensor == "lse",
            "{check:?}"
        );
    }
}

#[test]
fn nan_wrong_values_wrong_shapes_and_missing_out_fail() {
    let expected = reference_run();
    let tol = tolerance(DType::Bf16);

    let mut gpu = as_gpu_outputs(&expected);
    let mut out = expected.out.clone();
    out.data[5] = f64::NAN;
    gpu.get_mut("out").unwrap().1 =
        HostTensor::from_f64(TensorDType::Bf16, out.shape.clone(), &out.data).unwrap();
    let check = &compare_forward(&gpu, &expected, tol)[0];
    assert_eq!(
        (check.passed, check.nans, check.verdict.as_str()),
        (false, 1, "FAIL: 1 NaN of 528")
    );

    let mut gpu = as_gpu_outputs(&expected);
    let scaled: Vec<f64> = expected.attn.data.iter().map(|v| v * 1.05).collect();
    gpu.get_mut("o").unwrap().1 =
        HostTensor::from_f64(TensorDType::Bf16, expected.attn.shape.clone(), &scaled).unwrap();
    let check = &compare_forward(&gpu, &expected, tol)[2];
    assert_eq!(
        (check.tensor.as_str(), check.passed, check.verdict.as_str()),
        ("o", false, "FAIL")
    );
    assert!((check.rel_l2.unwrap() - 0.05).abs() < 5e-3, "{check:?}");

    let mut gpu = as_gpu_outputs(&expected);
    let q = &expected.q;
    let bhsd = vec![q.shape[0], q.shape[2], q.shape[1], q.shape[3]];
    gpu.get_mut("q").unwrap().1 = HostTensor::from_f64(TensorDType::Bf16, bhsd, &q.data).unwrap();
    let check = &compare_forward(&gpu, &expected, tol)[1];
    assert_eq!(
        check.verdict,
        "FAIL: shape [2, 2, 33, 4], the reference's is [2, 33, 2, 4]"
    );

    // The same memory with the head dimensions merged, as the kernel plan declares q.
    let mut gpu = as_gpu_outputs(&expected);
    let merged = vec![q.shape[0], q.shape[1], q.shape[2] * q.shape[3]];
    gpu.get_mut("q").unwrap().1 = HostTensor::from_f64(TensorDType::Bf16, merged, &q.data).unwrap();
    assert!(compare_forward(&gpu, &expected, tol)[1].passed);

    let mut gpu = as_gpu_outputs(&expected);
    gpu.remove("out");
    let checks = compare_forward(&gpu, &expected, tol);
    assert_eq!(checks[0].verdict, "FAIL: the library returned no `out`");
}

#[test]
fn both_sides_read_identical_rounded_numbers() {
    let manifest = fixture_manifest();
    let (weights, set) = weights_for(&manifest, 3, None).unwrap();
    assert_eq!(
        weights_for(&manifest, 3, None).unwrap().0,
        weights,
        "seeded"
    );
    for (name, tensor) in set.iter() {
        assert_eq!(tensor.dtype(), TensorDType::Bf16);
        assert_eq!(tensor.to_f64(), weights.tensors[name].data, "{name}");
    }
    let (x, host) = input_for(&manifest, 3, 5, 1).unwrap();
    assert_eq!(host.shape, [3, 5, 8]);
    assert_eq!(host.to_f64(), x.data);
    assert_eq!(x.rounded_to(DType::Bf16), x);
    assert_eq!(tolerance(DType::F16), 5e-3);
}

#[test]
fn weights_can_come_from_a_safetensors_file() {
    let manifest = fixture_manifest();
    let (random, set) = weights_for(&manifest, 11, None).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = set
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.shape.clone(),
                t.to_dtype(TensorDType::F32).to_le_bytes(),
            )
        })
        .collect();
    let views = bytes.iter().map(|(n, s, b)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    let path = common::scratch_dir("validate-weights").join("validate-weights.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let (from_file, set_from_file) = weights_for(&manifest, 999, Some((path.as_path(), ""))).unwrap();
    assert_eq!(from_file, random);
    assert_eq!(set_from_file, set);
}

#[test]
fn merged_dimensions_match_but_transposes_do_not() {
    use ccc_runtime::validate::same_memory_order;
    assert!(same_memory_order(&[2, 33, 8], &[2, 33, 2, 4]));
    assert!(same_memory_order(&[2, 33, 2, 4], &[66, 8]));
    assert!(same_memory_order(&[2, 4, 33], &[2, 4, 33]));
    assert!(!same_memory_order(&[2, 2, 33, 4], &[2, 33, 2, 4]));
    assert!(!same_memory_order(&[2, 33, 9], &[2, 33, 2, 4]));
}

/// The backward's judgement: dx against the tolerance, each weight gradient present and NaN-free
/// with its error reported (a key bias's gradient, zero in exact arithmetic, too).
#[test]
fn backward_results_pass_on_dx_and_nan_free_gradients() {
    let manifest = fixture_manifest();
    let (weights, _) = weights_for(&manifest, 7, None).unwrap();
    let (x, _) = input_for(&manifest, 2, 9, 8).unwrap();
    let (dout, _) = input_for(&manifest, 2, 9, 9).unwrap();
    let gradients = reference::backward(&manifest.spec, &weights, &x, &dout).unwrap();
    let store = |t: &Tensor, dtype| HostTensor::from_f64(dtype, t.shape.clone(), &t.data).unwrap();
    let mut gpu = BTreeMap::from([("dx".to_string(), (BufferRole::Output, store(&gradients.dx, TensorDType::Bf16)))]);
    for (name, gradient) in &gradients.weights.tensors {
        gpu.insert(format!("grad.{name}"), (BufferRole::Output, store(gradient, TensorDType::F32)));
    }
    let checks = compare_backward(&gpu, &gradients, tolerance(DType::Bf16));
    assert_eq!(checks.len(), 1 + gradients.weights.tensors.len());
    assert!(checks.iter().all(|c| c.passed), "{checks:?}");
    let first_weight = format!("grad.{}", gradients.weights.tensors.keys().next().unwrap());
    let mut poisoned = gpu.clone();
    let (_, tensor) = poisoned.get_mut(&first_weight).unwrap();
    let mut values = tensor.to_f64();
    values[0] = f64::NAN;
    *tensor = store(&Tensor { shape: tensor.shape.clone(), data: values }, TensorDType::F32);
    let checks = compare_backward(&poisoned, &gradients, tolerance(DType::Bf16));
    assert!(!checks.iter().find(|c| c.tensor == first_weight).unwrap().passed);
    let mut infinite = gpu.clone();
    let (_, tensor) = infinite.get_mut(&first_weight).unwrap();
    let mut values = tensor.to_f64();
    values[0] = f64::INFINITY;
    *tensor = store(&Tensor { shape: tensor.shape.clone(), data: values }, TensorDType::F32);
    let check = compare_backward(&infinite, &gradients, tolerance(DType::Bf16)).into_iter().find(|c| c.tensor == first_weight).unwrap();
    assert!(!check.passed && check.verdict == "FAIL: NaN or infinite values", "{check:?}");
    gpu.remove("dx");
    let checks = compare_backward(&gpu, &gradients, tolerance(DType::Bf16));
    assert_eq!(checks[0].verdict, "FAIL: the library returned no such gradient");
}
