//! Rounding to the storage types and a small seeded random number generator.

use crate::spec::DType;

/// `x` rounded to the nearest bf16 or f16 value (ties to even), returned as f64. Overflow gives
/// ±infinity and underflow goes through the subnormals to ±0, as an IEEE conversion does; NaN and
/// infinities pass through. Rounds from f64 directly (no double rounding through f32).
pub fn round_to_dtype(x: f64, dtype: DType) -> f64 {
    // Precision p (significand bits including the implicit one), smallest normal exponent, largest
    // finite value.
    let (precision, min_normal_exponent, max_finite) = match dtype {
        DType::Bf16 => (8, -126, 255.0 * 2f64.powi(120)),
        DType::F16 => (11, -14, 65504.0),
    };
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    // floor(log2 |x|) from the f64 exponent field; f64 subnormals read as -1023, far below both
    // types' ranges, which is all that matters here.
    let exponent = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    // The spacing of representable values around x; below the normal range it stays fixed, which
    // is what makes the subnormals.
    let quantum_exponent = exponent.max(min_normal_exponent) - (precision - 1);
    let quantum = f64::from_bits(((quantum_exponent + 1023) as u64) << 52);
    let rounded = (x / quantum).round_ties_even() * quantum;
    if rounded.abs() > max_finite { f64::INFINITY.copysign(x) } else { rounded }
}

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast, and good enough for test data. Seeds give
/// the same stream on every machine.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next_f64()
    }

    /// Standard normal, by the Box–Muller transform.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // in (0, 1], so the logarithm is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let bf16 = |x| round_to_dtype(x, DType::Bf16);
        // bf16 keeps 8 significant bits: the spacing above 1 is 2^-7.
        assert_eq!(bf16(1.0 + 2f64.powi(-8)), 1.0); // tie, 1.0 is even
        assert_eq!(bf16(1.0 + 3.0 * 2f64.powi(-8)), 1.0 + 2f64.powi(-6)); // tie, up to even
        assert_eq!(bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-30)), 1.0 + 2f64.powi(-7)); // above tie
        assert_eq!(bf16(-2.6), -2.59375); // 166 · 2^-6
        assert_eq!(bf16(2f64.powi(-133)), 2f64.powi(-133)); // smallest subnormal
        assert_eq!(bf16(2f64.powi(-134)), 0.0); // tie between 0 and the smallest subnormal
        assert_eq!(bf16(255.0 * 2f64.powi(120)), 255.0 * 2f64.powi(120));
        assert_eq!(bf16(255.5 * 2f64.powi(120)), f64::INFINITY); // tie rounds up to 2^128
        assert_eq!(bf16(-1e300), f64::NEG_INFINITY);
        assert!(bf16(f64::NAN).is_nan());
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        let f16 = |x| round_to_dtype(x, DType::F16);
        assert_eq!(f16(1.0 + 2f64.powi(-11)), 1.0); // spacing above 1 is 2^-10
        assert_eq!(f16(0.1), 0.0999755859375); // 1638 · 2^-14, the f16 nearest to 0.1
        assert_eq!(f16(65519.0), 65504.0);
        assert_eq!(f16(65520.0), f64::INFINITY); // tie between 65504 and 65536
        assert_eq!(f16(3.0 * 2f64.powi(-25)), 2f64.powi(-23)); // subnormal tie to even
        assert_eq!(f16(2f64.powi(-25)), 0.0);
        assert_eq!(f16(-2f64.powi(-26)).to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn rng_is_seeded_and_roughly_standard() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
        let samples: Vec<f64> = (0..20000).map(|_| a.normal()).collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let var =
            samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / samples.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
