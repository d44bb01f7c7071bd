//! Exact reading of number literals (`5_000_000`, `1e4`, `0.5`, `-2`) without overflow.

/// What an integer item can make of a literal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Number {
    /// The literal is a whole number (`2048`, `4_096`, `1e4`, `2.0`).
    Integer(i128),
    /// Whole, but beyond the range of i128.
    TooLarge { negative: bool },
    /// Has a non-zero fractional part (`0.5`, `1e-3`).
    Fraction,
}

/// Reads a literal as the grammar's `number` rule accepts it: sign, digits with `_`, optional
/// `.digits`, optional exponent. The value is computed exactly from its decimal digits.
pub fn parse(text: &str) -> Number {
    let text: String = text.chars().filter(|&c| c != '_').collect();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text.as_str()),
    };
    let (mantissa, exponent_text) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Number::Integer(0);
    }
    // Value = digits · 10^scale.
    let exponent: i128 = match exponent_text {
        None => 0,
        Some(exponent) => match exponent.parse::<i64>() {
            Ok(exponent) => i128::from(exponent),
            // A non-zero mantissa with an exponent beyond i64 is too large or has a fraction.
            Err(_) if exponent.starts_with('-') => return Number::Fraction,
            Err(_) => return Number::TooLarge { negative },
        },
    };
    let mut scale = exponent - fraction.len() as i128;
    let mut digits = digits;
    while scale < 0 {
        match digits.strip_suffix('0') {
            Some(shorter) => {
                digits = shorter;
                scale += 1;
            }
            None => return Number::Fraction,
        }
    }
    // i128 holds up to 39 decimal digits; the bound keeps `scale` from driving a long loop.
    if digits.len() as i128 + scale > 39 {
        return Number::TooLarge { negative };
    }
    let mut value: i128 = 0;
    for digit in digits.bytes().map(|b| i128::from(b - b'0')).chain((0..scale).map(|_| 0)) {
        match value.checked_mul(10).and_then(|tens| tens.checked_add(digit)) {
            Some(next) => value = next,
            None => return Number::TooLarge { negative },
        }
    }
    Number::Integer(if negative { -value } else { value })
}

/// The literal as the nearest f64, or `None` when it is beyond f64's range.
pub fn to_f64(text: &str) -> Option<f64> {
    let text: String = text.chars().filter(|&c| c != '_').collect();
    text.parse::<f64>().ok().filter(|value| value.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_integers_exactly() {
        assert_eq!(parse("5_000_000"), Number::Integer(5_000_000));
        assert_eq!(parse("1e4"), Number::Integer(10_000));
        assert_eq!(parse("2.50e1"), Number::Integer(25));
        assert_eq!(parse("-2"), Number::Integer(-2));
        assert_eq!(parse("0.000"), Number::Integer(0));
        assert_eq!(parse("0.5"), Number::Fraction);
        assert_eq!(parse("1e-3"), Number::Fraction);
        assert_eq!(parse("100e-2"), Number::Integer(1));
        assert_eq!(parse("1e38"), Number::Integer(10i128.pow(38)));
        assert_eq!(parse("1e39"), Number::TooLarge { negative: false });
        assert_eq!(parse("170141183460469231731687303715884105727"), Number::Integer(i128::MAX));
        assert_eq!(
            parse("170141183460469231731687303715884105728"),
            Number::TooLarge { negative: false }
        );
        assert_eq!(
            parse("99999999999999999999999999999999999999999"),
            Number::TooLarge { negative: false }
        );
        assert_eq!(parse("1e99999999999999999999"), Number::TooLarge { negative: false });
        assert_eq!(parse("-1e99999999999999999999"), Number::TooLarge { negative: true });
        assert_eq!(parse("1e-99999999999999999999"), Number::Fraction);
        assert_eq!(parse("0e99999999999999999999"), Number::Integer(0));
    }

    #[test]
    fn reads_floats() {
        assert_eq!(to_f64("5_000_000"), Some(5e6));
        assert_eq!(to_f64("0.5"), Some(0.5));
        assert_eq!(to_f64("1e400"), None);
    }
}
