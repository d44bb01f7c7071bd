//! Named parameters of a layer, seeded random parameters and inputs.

use std::collections::BTreeMap;

use crate::spec::{AttentionSpec, DType, ParamRole};

use super::numeric::Rng;
use super::tensor::Tensor;

/// Named parameters, keyed by the names of `spec.params()` (Hugging Face names: `q_proj.weight`,
/// `v_proj_current.weight`, `conv_qk_depthwise.weight`, `qk_norm.temp`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Seeded parameters shaped like a freshly initialised PyTorch layer: every weight and bias
    /// U(−1/√fan_in, 1/√fan_in) (fan_in = E for the projections, d·Hq for o_proj, taps × inputs per
    /// group for a convolution), so activations stay O(1). Projection biases exist only when
    /// `spec.bias`, and are then nonzero. Temperatures are U(0.5, 1.5) so logits stay O(1) for both
    /// `learned` and `learned_exp` (whose clamp is then inactive). `spec` must be valid
    /// (`AttentionSpec::validate`), as every spec from the frontend is.
    pub fn random(spec: &AttentionSpec, seed: u64) -> Weights {
        let mut rng = Rng::new(seed);
        let mut tensors = BTreeMap::new();
        let params = spec.params();
        // o_proj's bias is drawn like its weight: from the output projection's fan-in.
        let output_fan_in = params.iter().find(|p| p.role == ParamRole::OutputProj).map_or(spec.q_width(), |p| p.shape[1]);
        for param in params {
            let len: usize = param.shape.iter().product();
            // The second dimension of a linear weight is its fan-in, as PyTorch initialises it.
            let linear_fan_in = param.shape.get(1).copied().unwrap_or(spec.model_dim);
            let (low, high) = match param.role {
                // RMSNorm weights start at 1 in PyTorch; spread around it so that a swapped or
                // ignored weight shows.
                ParamRole::KeyTemperature | ParamRole::QueryNorm | ParamRole::LatentNorm => (0.5, 1.5),
                ParamRole::ConvWeight { stage } | ParamRole::ConvBias { stage } => {
                    fan_in_bound(conv_fan_in(spec, stage))
                }
                ParamRole::OutputProj | ParamRole::OutputBias => fan_in_bound(output_fan_in),
                ParamRole::QueryUp | ParamRole::LatentUp => fan_in_bound(linear_fan_in),
                _ => fan_in_bound(spec.model_dim),
            };
            let data = (0..len).map(|_| rng.uniform(low, high)).collect();
            tensors.insert(param.name, Tensor { shape: param.shape, data });
        }
        Weights { tensors }
    }

    /// Every parameter of `spec` present with its shape, and nothing else.
    pub fn check(&self, spec: &AttentionSpec) -> Result<(), String> {
        spec.validate()?;
        let params = spec.params();
        for param in &params {
            let Some(tensor) = self.tensors.get(&param.name) else {
                return Err(format!(
                    "weight `{}` is missing (expected shape {:?})",
                    param.name, param.shape
                ));
            };
            if tensor.shape != param.shape {
                return Err(format!(
                    "weight `{}` has shape {:?}, expected {:?}",
                    param.name, tensor.shape, param.shape
                ));
            }
            tensor.check_consistent().map_err(|e| format!("weight `{}`: {e}", param.name))?;
        }
        if let Some(extra) =
            self.tensors.keys().find(|name| !params.iter().any(|p| &p.name == *name))
        {
            return Err(format!("weight `{extra}` is not a parameter of layer `{}`", spec.name));
        }
        Ok(())
    }

    /// Each value rounded to `dtype`, so that a GPU run and the reference read identical numbers.
    pub fn rounded_to(&self, dtype: DType) -> Weights {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.rounded_to(dtype)))
            .collect();
        Weights { tensors }
    }

    /// The data of a parameter that `check` has vouched for.
    pub(super) fn data(&self, name: &str) -> &[f64] {
        &self.tensors[name].data
    }
}

/// Inputs of one output channel of convolution stage `stage`: taps × input channels per group.
fn conv_fan_in(spec: &AttentionSpec, stage: usize) -> usize {
    let conv = spec.qk_conv[stage];
    let inputs_per_group = conv.kind.inputs_per_output(spec.head_dim);
    inputs_per_group * conv.width
}

fn fan_in_bound(fan_in: usize) -> (f64, f64) {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    (-bound, bound)
}

/// A seeded input [batch, seq_len, E] of standard normal values (the scale of an RMSNorm output).
pub fn random_input(spec: &AttentionSpec, batch: usize, seq_len: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let shape = vec![batch, seq_len, spec.model_dim];
    let data = (0..batch * seq_len * spec.model_dim).map(|_| rng.normal()).collect();
    Tensor { shape, data }
}
