// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

//! Shared by the kernel IR tests: a small deterministic generator, random weights, and a
//! straightforward per-token f64 implementation of language.md's forward semantics to judge the
//! interpreter against.

use ccc::ir::kernel::interp::Buffers;
use ccc::spec::*;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() - 1)]
    }
}

pub fn zaya1_like(name: &str, model_dim: usize, head_dim: usize, hq: usize, hk: usize) -> AttentionSpec {
    AttentionSpec {
        qk_conv: vec![
            ConvStage { kind: ConvKind::Depthwise, width: 2 },
            ConvStage { kind: ConvKind::PerHead, width: 2 },
        ],
        qk_mean: true,
        value_shift: 1,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::Learned,
        rope: Some(Rope { fraction: 0.5, rotary_dim: head_dim / 2, theta: 5e6, style: RopeStyle::Neox }),
        ..AttentionSpec::plain(name, model_dim, head_dim, hq, hk)
    }
}

/// A random valid spec with head_dim a multiple of 16.
pub fn random_spec(rng: &mut Rng, index: usize) -> AttentionSpec {
    let d = if rng.range(0, 9) == 0 { 64 } else { rng.pick(&[16, 32]) };
    let kv_heads = rng.range(1, 3);
    let groups = rng.range(1, 3);
    let model_dim = d * rng.range(1, 4);
    let mut spec = AttentionSpec::plain(&format!("random{index}"), model_dim, d, kv_heads * groups, kv_heads);
    spec.qk_conv = (0..rng.range(0, 3))
        .map(|_| ConvStage {
            kind: if rng.coin() { ConvKind::Depthwise } else { ConvKind::PerHead },
            width: rng.range(1, 4),
        })
        .collect();
    spec.qk_mean = rng.coin();
    spec.value_shift = rng.range(0, kv_heads);
    if rng.coin() {
        spec.qk_norm = QkNorm::L2;
        spec.key_temperature = rng.pick(&[KeyTemperature::None, KeyTemperature::Learned, KeyTemperature::LearnedExp]);
        spec.norm_eps = rng.pick(&[1e-12, 1e-6]);
    }
    if rng.range(0, 3) > 0 {
        let rotary_dim = 2 * rng.range(1, d / 2);
        spec.rope = Some(Rope {
            fraction: rotary_dim as f64 / d as f64,
            rotary_dim,
            theta: rng.pick(&[100.0, 10_000.0, 5e6]),
            style: if rng.coin() { RopeStyle::Neox } else { RopeStyle::Interleaved },
        });
    }
    spec.mask = match rng.range(0, 3) {
        0 => Mask::None,
        1 => Mask::Causal,
        _ => Mask::SlidingWindow { window: rng.pick(&[1, 3, 7, 16, 20, 64, 70, 100]) },
    };
    if rng.coin() {
        spec.softmax_scale = rng.uniform(0.05, 0.5);
    }
    spec.dtype = if rng.coin() { DType::Bf16 } else { DType::F16 };
    spec.bias = rng.coin();
    spec.validate().expect("the generator only builds valid specs");
    spec
}

pub fn random_weights(spec: &AttentionSpec, rng: &mut Rng) -> Buffers {
    spec.params()
        .into_iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let (lo, hi) = match p.role {
                ParamRole::KeyTemperature => match spec.key_temperature {
                    // learned_exp: values on both sides of the clamp.
                    KeyTemperature::LearnedExp => (-1.0, 3.0),
                    _ => (0.5, 1.5),
                },
                ParamRole::ConvWeight { .. } => (-0.6, 0.6),
                _ => {
                    let fan_in = *p.shape.last().unwrap_or(&1) as f64;
                    (-1.0 / fan_in.sqrt(), 1.0 / fan_in.sqrt())
                }
            };
            (p.name, (0..n).map(|_| rng.uniform(lo, hi)).collect())
        })
        .collect()
}

pub fn random_input(spec: &AttentionSpec, batch: usize, seq_len: usize, rng: &mut Rng) -> Vec<f64> {
    (0..batch * seq_len * spec.model_dim).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

pub struct Reference {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
    pub out: Vec<f64>,
}

fn linear(w: &[f64], bias: Option<&Vec<f64>>, input: &[f64], outputs: usize) -> Vec<f64> {
    let n = input.len();
    (0..outputs)
        .map(|o| {
            let dot: f64 = (0..n).map(|i| w[o * n + i] * input[i]).sum();
            dot + bias.map_or(0.0, |b| b[o])
        })
        .collect()
}

/// language.md, Semantics, steps 1–8, one token at a time.
pub fn reference(spec: &AttentionSpec, w: &Buffers, x: &[f64], batch: usize, seq_len: usize) -> Reference {
    let (e, d, hq, hk) = (spec.model_dim, spec.head_dim, spec.query_heads, spec.kv_heads);
    let (lq, lk, p) = (spec.q_width(), spec.kv_width(), spec.packed_width());
    let g = spec.groups();
    let name_of = |role: ParamRole| spec.params().into_iter().find(|q| q.role == role).map(|q| q.name);
    let get = |role: ParamRole| name_of(role).map(|n| &w[&n]);
    let s_len = seq_len;
    let mut r = Reference {
        q: vec![0.0; batch * s_len * hq * d],
        k: vec![0.0; batch * s_len * hk * d],
        v: vec![0.0; batch * s_len * hk * d],
        o: vec![0.0; batch * s_len * hq * d],
        lse: vec![0.0; batch * hq * s_len],
        out: vec![0.0; batch * s_len * e],
    };
    for b in 0..batch {
        let xrow = |t: usize| &x[(b * s_len + t) * e..(b * s_len + t + 1) * e];
        let q0: Vec<Vec<f64>> =
            (0..s_len).map(|t| linear(get(ParamRole::QueryProj).unwrap(), get(ParamRole::QueryBias), xrow(t), lq)).collect();
        let k0: Vec<Vec<f64>> =
            (0..s_len).map(|t| linear(get(ParamRole::KeyProj).unwrap(), get(ParamRole::KeyBias), xrow(t), lk)).collect();
        let current = spec.current_value_heads() * d;
        let delayed = spec.value_shift * d;
        let zero_x = vec![0.0; e];
        for t in 0..s_len {
            let mut v = Vec::new();
            if current > 0 {
                v.extend(linear(get(ParamRole::ValueProjCurrent).unwrap(), get(ParamRole::ValueBiasCurrent), xrow(t), current));
            }
            if delayed > 0 {
                let prev = if t == 0 { &zero_x[..] } else { xrow(t - 1) };
                v.extend(linear(get(ParamRole::ValueProjDelayed).unwrap(), get(ParamRole::ValueBiasDelayed), prev, delayed));
            }
            r.v[(b * s_len + t) * lk..(b * s_len + t + 1) * lk].copy_from_slice(&v);
        }
        // Convolutions on the zero-padded packed rows.
        let big_t = spec.conv_history();
        let mut rows: Vec<Vec<f64>> = (0..big_t).map(|_| vec![0.0; p]).collect();
        rows.extend((0..s_len).map(|t| [q0[t].clone(), k0[t].clone()].concat()));
        for (stage_index, stage) in spec.qk_conv.iter().enumerate() {
            let weight = get(ParamRole::ConvWeight { stage: stage_index }).unwrap();
            let bias = get(ParamRole::ConvBias { stage: stage_index }).unwrap();
            let kw = stage.width;
            let next: Vec<Vec<f64>> = (0..rows.len() + 1 - kw)
                .map(|i| {
                    (0..p)
                        .map(|c| {
                            let mut acc = bias[c];
                            for tap in 0..kw {
                                match stage.kind {
                                    ConvKind::Depthwise => acc += weight[c * kw + tap] * rows[i + tap][c],
                                    ConvKind::PerHead => {
                                        let head0 = c / d * d;
                                        for ci in 0..d {
                                            acc += weight[(c * d + ci) * kw + tap] * rows[i + tap][head0 + ci];
                                        }
                                    }
                                }
                            }
                            acc
                        })
                        .collect()
                })
                .collect();
            rows = next;
        }
        assert_eq!(rows.len(), s_len);
        for t in 0..s_len {
            let y = &rows[t];
            let mut heads: Vec<Vec<f64>> = Vec::new();
            for h in 0..hq + hk {
                let mut hat: Vec<f64> = y[h * d..(h + 1) * d].to_vec();
                if spec.qk_mean {
                    for i in 0..d {
                        if h < hq {
                            hat[i] += 0.5 * q0[t][h * d + i] + 0.5 * k0[t][(h / g) * d + i];
                        } else {
                            let j = h - hq;
                            let mean: f64 = (0..g).map(|s| q0[t][(j * g + s) * d + i]).sum::<f64>() / g as f64;
                            hat[i] += 0.5 * k0[t][j * d + i] + 0.5 * mean;
                        }
                    }
                }
                if spec.qk_norm == QkNorm::L2 {
                    let ss: f64 = hat.iter().map(|v| v * v).sum();
                    let mut scale = (d as f64).sqrt() / (ss + spec.norm_eps).sqrt();
                    if h >= hq {
                        let temp = get(ParamRole::KeyTemperature).map(|t| t[h - hq]);
                        scale *= match spec.key_temperature {
                            KeyTemperature::None => 1.0,
                            KeyTemperature::Learned => temp.unwrap(),
                            KeyTemperature::LearnedExp => temp.unwrap().clamp(1e-7, 2.0).exp(),
                        };
                    }
                    hat.iter_mut().for_each(|v| *v *= scale);
                }
                if let Some(rope) = spec.rope {
                    let rd = rope.rotary_dim;
                    let src = hat.clone();
                    for i in 0..rd / 2 {
                        let angle = t as f64 * rope.theta.powf(-2.0 * i as f64 / rd as f64);
                        let (c, s) = (angle.cos(), angle.sin());
                        let (a, bidx) = match rope.style {
                            RopeStyle::Neox => (i, i + rd / 2),
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        hat[a] = src[a] * c - src[bidx] * s;
                        hat[bidx] = src[bidx] * c + src[a] * s;
                    }
                }
                heads.push(hat);
            }
            for h in 0..hq {
                let at = ((b * s_len + t) * hq + h) * d;
                r.q[at..at + d].copy_from_slice(&heads[h]);
            }
            for j in 0..hk {
                let at = ((b * s_len + t) * hk + j) * d;
                r.k[at..at + d].copy_from_slice(&heads[hq + j]);
            }
        }
        for h in 0..hq {
            let j = h / g;
            for t in 0..s_len {
                let qv = &r.q[((b * s_len + t) * hq + h) * d..][..d];
                let keys: Vec<usize> = (0..s_len).filter(|&kk| spec.mask.allows(t, kk)).collect();
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|&kk| {
                        let kv = &r.k[((b * s_len + kk) * hk + j) * d..][..d];
                        spec.softmax_scale * (0..d).map(|i| qv[i] * kv[i]).sum::<f64>()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                r.lse[(b * hq + h) * s_len + t] = max + sum.ln();
                for i in 0..d {
                    let mut acc = 0.0;
                    for (&kk, wgt) in keys.iter().zip(&weights) {
                        acc += wgt * r.v[((b * s_len + kk) * hk + j) * d + i];
                    }
                    r.o[((b * s_len + t) * hq + h) * d + i] = acc / sum;
                }
            }
        }
        for t in 0..s_len {
            let orow = &r.o[(b * s_len + t) * lq..(b * s_len + t + 1) * lq];
            let out = linear(get(ParamRole::OutputProj).unwrap(), get(ParamRole::OutputBias), orow, e);
            r.out[(b * s_len + t) * e..(b * s_len + t + 1) * e].copy_from_slice(&out);
        }
    }
    r
}

/// max |a − b| / max(1e-300, max |b|).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}
