//! Judging a library's results against the f64 CPU reference (`ccc::reference`). The GPU only
//! supplies the tensors; everything here is host code, tested without a GPU.

use crate::error::RuntimeError;
use crate::tensor::HostTensor;
use crate::weights::WeightSet;
use ccc::manifest::{BufferRole, Manifest};
use ccc::reference::{self, ForwardOutputs, Tensor, Weights};
use ccc::spec::DType;
use std::collections::BTreeMap;
use std::path::Path;

/// Relative L2 error a library of `dtype` must stay under, against the f64 reference.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::Bf16 => 1e-2,
        DType::F16 => 5e-3,
    }
}

/// The weights both sides read, already rounded to the library's dtype: seeded random ones
/// (`ccc::reference::Weights::random`) or a safetensors file's.
pub fn weights_for(
    manifest: &Manifest,
    seed: u64,
    file: Option<(&Path, &str)>,
) -> Result<(Weights, WeightSet), RuntimeError> {
    let spec = &manifest.spec;
    let reference_weights = match file {
        Some((path, prefix)) => {
            let set = WeightSet::from_safetensors_file(path, manifest, prefix)?;
            let tensors = set
                .iter()
                .map(|(name, tensor)| {
                    (
                        name.to_string(),
                        Tensor {
                            shape: tensor.shape.clone(),
                            data: tensor.to_f64(),
                        },
                    )
                })
                .collect();
            Weights { tensors }
        }
        None => Weights::random(spec, seed).rounded_to(spec.dtype),
    };
    let set = WeightSet::from_f64(
        manifest,
        reference_weights
            .tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice(), t.data.as_slice())),
    )?;
    Ok((reference_weights, set))
}

/// A seeded input x [B, S, E], rounded to the library's dtype, for both sides.
pub fn input_for(
    manifest: &Manifest,
    batch: usize,
    seq_len: usize,
    seed: u64,
) -> Result<(Tensor, HostTensor), RuntimeError> {
    let spec = &manifest.spec;
    let x = reference::random_input(spec, batch, seq_len, seed).rounded_to(spec.dtype);
    let host = HostTensor::from_f64(spec.dtype.into(), x.shape.clone(), &x.data)?;
    Ok((x, host))
}

/// Buffer names whose contents the reference also computes, in the reference's layout
/// (docs/manifest.md, "Names the validator knows").
pub fn reference_tensors(expected: &ForwardOutputs) -> [(&'static str, &Tensor); 6] {
    [
        ("out", &expected.out),
        ("q", &expected.q),
        ("k", &expected.k),
        ("v", &expected.v),
        ("o", &expected.attn),
        ("lse", &expected.lse),
    ]
}

#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub tensor: String,
    /// `None` when the shapes differ.
    pub max_abs: Option<f64>,
    pub rel_l2: Option<f64>,
    pub tolerance: f64,
    pub nans: usize,
    pub passed: bool,
    /// `pass`, `FAIL`, or `FAIL: ` and the reason.
    pub verdict: String,
}

impl Comparison {
    /// A check that failed before any error could be measured (a missing tensor, a wrong shape).
    fn failed(tensor: &str, tolerance: f64, nans: usize, verdict: String) -> Comparison {
        Comparison { tensor: tensor.to_string(), max_abs: None, rel_l2: None, tolerance, nans, passed: false, verdict }
    }
}

/// Compares one GPU tensor with the reference: passes when the shapes agree, nothing is NaN and
/// the relative L2 error is below `tolerance`.
pub fn compare(name: &str, gpu: &HostTensor, expected: &Tensor, tolerance: f64) -> Comparison {
    let failed = |verdict: String, nans| Comparison::failed(name, tolerance, nans, verdict);
    if !same_memory_order(&gpu.shape, &expected.shape) {
        return failed(
            format!(
                "FAIL: shape {:?}, the reference's is {:?}",
                gpu.shape, expected.shape
            ),
            0,
        );
    }
    let actual = Tensor {
        shape: expected.shape.clone(),
        data: gpu.to_f64(),
    };
    let nans = actual.data.iter().filter(|v| v.is_nan()).count();
    let (Ok(max_abs), Ok(rel_l2)) = (
        reference::max_abs_diff(&actual, expected),
        reference::rel_l2_error(&actual, expected),
    ) else {
        return failed("FAIL: the reference tensor is malformed".into(), nans);
    };
    let passed = nans == 0 && rel_l2 < tolerance;
    let verdict = match (nans, passed) {
        (0, true) => "pass".to_string(),
        (0, false) => "FAIL".to_string(),
        (n, _) => format!("FAIL: {n} NaN of {}", actual.data.len()),
    };
    Comparison {
        tensor: name.to_string(),
        max_abs: Some(max_abs),
        rel_l2: Some(rel_l2),
        tolerance,
        nans,
        passed,
        verdict,
    }
}

/// Whether two dense row-major shapes put the same elements at the same offsets: equal, or one
/// with runs of adjacent dimensions merged ([B, S, Hq·d] against [B, S, Hq, d]). A transposed
/// layout ([B, Hq, S, d]) is not.
pub fn same_memory_order(a: &[usize], b: &[usize]) -> bool {
    // Row-major offsets agree exactly when every running product of the coarser shape's
    // dimensions (from the outermost) is also one of the finer shape's.
    let running = |shape: &[usize]| -> Vec<usize> {
        shape
            .iter()
            .scan(1usize, |acc, &d| {
                *acc = acc.saturating_mul(d);
                Some(*acc)
            })
            .collect()
    };
    let (ra, rb) = (running(a), running(b));
    if ra.last() != rb.last() {
        return false;
    }
    let (coarse, fine) = if ra.len() <= rb.len() {
        (&ra, &rb)
    } else {
        (&rb, &ra)
    };
    coarse.iter().all(|p| fine.contains(p))
}

/// Compares the backward call's `dx` and every `grad.<name>` with the reference's gradients:
/// `dx` against `tolerance`, each weight gradient for NaN only (its error is reported: how far a
/// 16-bit gradient may be from the exact one depends on the layer's conditioning, which
/// tests/python/gpu_autograd.py judges against PyTorch's and Hugging Face's own 16-bit autograd).
pub fn compare_backward(
    gpu: &BTreeMap<String, (BufferRole, HostTensor)>,
    expected: &reference::Gradients,
    tolerance: f64,
) -> Vec<Comparison> {
    let missing = |name: &str| Comparison::failed(name, tolerance, 0, "FAIL: the library returned no such gradient".into());
    let mut comparisons = vec![match gpu.get("dx") {
        Some((_, tensor)) => compare("dx", tensor, &expected.dx, tolerance),
        None => missing("dx"),
    }];
    for (name, gradient) in &expected.weights.tensors {
        let buffer = format!("grad.{name}");
        comparisons.push(match gpu.get(&buffer) {
            Some((_, tensor)) => {
                let mut check = compare(&buffer, tensor, gradient, f64::INFINITY);
                // Right shape and every value finite: the error is reported, not judged (it is
                // not even relative for a gradient that is zero in exact arithmetic, a key bias's).
                let finite = tensor.to_f64().iter().all(|v| v.is_finite());
                check.passed = check.max_abs.is_some() && finite;
                check.verdict = match (check.max_abs.is_some(), finite) {
                    (true, true) => "pass (error reported)".into(),
                    (true, false) => "FAIL: NaN or infinite values".into(),
                    (false, _) => check.verdict,
                };
                check
            }
            None => missing(&buffer),
        });
    }
    comparisons
}

/// Compares every runtime-allocated buffer the reference also computes, in the order of
/// [`reference_tensors`]. `out` must be among them.
pub fn compare_forward(
    gpu: &BTreeMap<String, (BufferRole, HostTensor)>,
    expected: &ForwardOutputs,
    tolerance: f64,
) -> Vec<Comparison> {
    let mut comparisons = Vec::new();
    for (name, reference_tensor) in reference_tensors(expected) {
        match gpu.get(name) {
            Some((role, tensor)) if !role.is_caller_supplied() => {
                comparisons.push(compare(name, tensor, reference_tensor, tolerance))
            }
            _ if name == "out" => {
                comparisons.push(Comparison::failed(name, tolerance, 0, "FAIL: the library returned no `out`".into()))
            }
            _ => {}
        }
    }
    comparisons
}
