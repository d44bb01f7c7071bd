//! Symbolic sizes: expressions over the sizes that stay runtime values (batch, sequence length,
//! KV length), so that one compiled library serves every shape. Shapes, launch grids and scratch
//! sizes in the plan, the kernel IR and the manifest are all `SizeExpr`s; the runtime and the
//! Python loader evaluate them per call. The JSON form is a small tree so that any loader can
//! evaluate it without a parser.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A size that is only known at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SizeVar {
    /// B: sequences in the batch.
    #[serde(rename = "B")]
    Batch,
    /// S: tokens per sequence in this call.
    #[serde(rename = "S")]
    SeqLen,
}

impl SizeVar {
    pub fn symbol(self) -> &'static str {
        match self {
            SizeVar::Batch => "B",
            SizeVar::SeqLen => "S",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeExpr {
    Const(u64),
    Var(SizeVar),
    Add(Box<SizeExpr>, Box<SizeExpr>),
    Mul(Box<SizeExpr>, Box<SizeExpr>),
    /// ⌈a / b⌉ with b a positive constant (tile counts).
    CeilDiv(Box<SizeExpr>, u64),
}

/// Values of the runtime sizes for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeEnv {
    pub batch: u64,
    pub seq_len: u64,
}

impl SizeEnv {
    pub fn get(&self, var: SizeVar) -> u64 {
        match var {
            SizeVar::Batch => self.batch,
            SizeVar::SeqLen => self.seq_len,
        }
    }
}

impl SizeExpr {
    pub fn c(value: u64) -> SizeExpr {
        SizeExpr::Const(value)
    }
    pub fn batch() -> SizeExpr {
        SizeExpr::Var(SizeVar::Batch)
    }
    pub fn seq_len() -> SizeExpr {
        SizeExpr::Var(SizeVar::SeqLen)
    }
    pub fn ceil_div(self, divisor: u64) -> SizeExpr {
        assert!(divisor > 0, "ceil_div by zero is a compiler bug");
        match self {
            SizeExpr::Const(v) => SizeExpr::Const(v.div_ceil(divisor)),
            e if divisor == 1 => e,
            e => SizeExpr::CeilDiv(Box::new(e), divisor),
        }
    }
    /// Product of several factors, folding constants (an empty product is 1).
    pub fn product(factors: impl IntoIterator<Item = SizeExpr>) -> SizeExpr {
        factors.into_iter().fold(SizeExpr::Const(1), |acc, f| acc * f)
    }

    /// The value for one call, or `None` on overflow.
    pub fn eval(&self, env: &SizeEnv) -> Option<u64> {
        match self {
            SizeExpr::Const(v) => Some(*v),
            SizeExpr::Var(var) => Some(env.get(*var)),
            SizeExpr::Add(a, b) => a.eval(env)?.checked_add(b.eval(env)?),
            SizeExpr::Mul(a, b) => a.eval(env)?.checked_mul(b.eval(env)?),
            SizeExpr::CeilDiv(a, d) => Some(a.eval(env)?.div_ceil(*d)),
        }
    }

    /// Whether the expression mentions `var`.
    pub fn uses(&self, var: SizeVar) -> bool {
        match self {
            SizeExpr::Const(_) => false,
            SizeExpr::Var(v) => *v == var,
            SizeExpr::Add(a, b) | SizeExpr::Mul(a, b) => a.uses(var) || b.uses(var),
            SizeExpr::CeilDiv(a, _) => a.uses(var),
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            SizeExpr::Add(..) => 1,
            SizeExpr::Mul(..) => 2,
            _ => 3,
        }
    }
}

impl std::ops::Add for SizeExpr {
    type Output = SizeExpr;
    fn add(self, rhs: SizeExpr) -> SizeExpr {
        match (self, rhs) {
            (SizeExpr::Const(a), SizeExpr::Const(b)) => SizeExpr::Const(a + b),
            (SizeExpr::Const(0), e) | (e, SizeExpr::Const(0)) => e,
            (a, b) => SizeExpr::Add(Box::new(a), Box::new(b)),
        }
    }
}

impl std::ops::Mul for SizeExpr {
    type Output = SizeExpr;
    fn mul(self, rhs: SizeExpr) -> SizeExpr {
        match (self, rhs) {
            (SizeExpr::Const(a), SizeExpr::Const(b)) => SizeExpr::Const(a * b),
            (SizeExpr::Const(1), e) | (e, SizeExpr::Const(1)) => e,
            (SizeExpr::Const(0), _) | (_, SizeExpr::Const(0)) => SizeExpr::Const(0),
            (a, b) => SizeExpr::Mul(Box::new(a), Box::new(b)),
        }
    }
}

impl From<u64> for SizeExpr {
    fn from(value: u64) -> SizeExpr {
        SizeExpr::Const(value)
    }
}

impl From<usize> for SizeExpr {
    fn from(value: usize) -> SizeExpr {
        SizeExpr::Const(value as u64)
    }
}

impl fmt::Display for SizeExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let child = |f: &mut fmt::Formatter<'_>, e: &SizeExpr, min: u8| {
            if e.precedence() < min { write!(f, "({e})") } else { write!(f, "{e}") }
        };
        match self {
            SizeExpr::Const(v) => write!(f, "{v}"),
            SizeExpr::Var(v) => f.write_str(v.symbol()),
            SizeExpr::Add(a, b) => {
                child(f, a, 1)?;
                f.write_str(" + ")?;
                child(f, b, 2)
            }
            SizeExpr::Mul(a, b) => {
                child(f, a, 2)?;
                f.write_str("*")?;
                child(f, b, 3)
            }
            SizeExpr::CeilDiv(a, d) => write!(f, "ceil({a}/{d})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_expression_prints_and_evaluates() {
        let tiles = SizeExpr::seq_len().ceil_div(64) * SizeExpr::batch() * SizeExpr::c(8);
        assert_eq!(tiles.to_string(), "ceil(S/64)*B*8");
        let env = SizeEnv { batch: 3, seq_len: 4097 };
        assert_eq!(tiles.eval(&env), Some(65 * 3 * 8));
        let json = serde_json::to_string(&tiles).unwrap();
        assert_eq!(serde_json::from_str::<SizeExpr>(&json).unwrap(), tiles);
    }

    #[test]
    fn constants_fold_and_overflow_is_reported() {
        assert_eq!(SizeExpr::c(6) * SizeExpr::c(7) + SizeExpr::c(0), SizeExpr::c(42));
        let big = SizeExpr::batch() * SizeExpr::seq_len();
        assert_eq!(big.eval(&SizeEnv { batch: u64::MAX, seq_len: 2 }), None);
        assert_eq!((SizeExpr::batch() + SizeExpr::c(1) * SizeExpr::seq_len()).to_string(), "B + S");
    }
}
