//! Symbolic sizes: expressions over the sizes that stay runtime values (batch, sequence length,
//! the device's SM count), so that one compiled library serves every shape on every GPU. Shapes,
//! launch grids and scratch sizes in the plan, the kernel IR and the manifest are all
//! `SizeExpr`s; the runtime and the Python loader evaluate them per call. The JSON form is a small
//! tree so that any loader can evaluate it without a parser.

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
    /// SMs: streaming multiprocessors of the device the library runs on, read by the loader when
    /// it loads (a persistent grid has one CTA per SM).
    #[serde(rename = "SMs")]
    SmCount,
    /// Pages of a paged KV cache (the pool every sequence's pages come from).
    #[serde(rename = "pages")]
    Pages,
    /// Pages per sequence in a block table (its width).
    #[serde(rename = "blocks")]
    Blocks,
}

impl SizeVar {
    pub const ALL: [SizeVar; 5] = [SizeVar::Batch, SizeVar::SeqLen, SizeVar::SmCount, SizeVar::Pages, SizeVar::Blocks];

    pub fn symbol(self) -> &'static str {
        match self {
            SizeVar::Batch => "B",
            SizeVar::SeqLen => "S",
            SizeVar::SmCount => "SMs",
            SizeVar::Pages => "pages",
            SizeVar::Blocks => "blocks",
        }
    }

    /// What the variable stands for, in messages.
    pub fn meaning(self) -> &'static str {
        match self {
            SizeVar::Batch => "the batch size",
            SizeVar::SeqLen => "the sequence length",
            SizeVar::SmCount => "the device's SM count",
            SizeVar::Pages => "the KV cache's pages",
            SizeVar::Blocks => "the block table's pages per sequence",
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
    /// SMs of the device the call runs on; `None` where there is none (graph shapes, planning
    /// without a GPU), which makes any size that uses it an error.
    pub sms: Option<u64>,
    /// A paged KV cache's pool and block-table width (serving calls only).
    pub pages: Option<u64>,
    pub blocks: Option<u64>,
}

impl SizeEnv {
    /// The value of `var`, `None` when it is not given.
    pub fn get(&self, var: SizeVar) -> Option<u64> {
        match var {
            SizeVar::Batch => Some(self.batch),
            SizeVar::SeqLen => Some(self.seq_len),
            SizeVar::SmCount => self.sms,
            SizeVar::Pages => self.pages,
            SizeVar::Blocks => self.blocks,
        }
    }
}

/// Why a size has no value in an environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalError {
    /// An intermediate value leaves the u64 range.
    Overflow,
    /// The size uses a variable the environment does not give.
    Unbound(SizeVar),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::Overflow => f.write_str("overflows"),
            EvalError::Unbound(var) => write!(f, "needs {}, {}, which is not given", var.symbol(), var.meaning()),
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
    pub fn sms() -> SizeExpr {
        SizeExpr::Var(SizeVar::SmCount)
    }
    pub fn pages() -> SizeExpr {
        SizeExpr::Var(SizeVar::Pages)
    }
    pub fn blocks() -> SizeExpr {
        SizeExpr::Var(SizeVar::Blocks)
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

    /// The value for one call.
    pub fn eval(&self, env: &SizeEnv) -> Result<u64, EvalError> {
        match self {
            SizeExpr::Const(v) => Ok(*v),
            SizeExpr::Var(var) => env.get(*var).ok_or(EvalError::Unbound(*var)),
            SizeExpr::Add(a, b) => a.eval(env)?.checked_add(b.eval(env)?).ok_or(EvalError::Overflow),
            SizeExpr::Mul(a, b) => a.eval(env)?.checked_mul(b.eval(env)?).ok_or(EvalError::Overflow),
            SizeExpr::CeilDiv(a, d) => Ok(a.eval(env)?.div_ceil(*d)),
        }
    }

    /// The expression with each variable replaced by `value(var)` (constants folded).
    pub fn substitute(&self, value: &dyn Fn(SizeVar) -> SizeExpr) -> SizeExpr {
        match self {
            SizeExpr::Const(v) => SizeExpr::Const(*v),
            SizeExpr::Var(var) => value(*var),
            SizeExpr::Add(a, b) => a.substitute(value) + b.substitute(value),
            SizeExpr::Mul(a, b) => a.substitute(value) * b.substitute(value),
            SizeExpr::CeilDiv(a, d) => a.substitute(value).ceil_div(*d),
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
        let env = SizeEnv { batch: 3, seq_len: 4097, sms: None, pages: None, blocks: None };
        assert_eq!(tiles.eval(&env), Ok(65 * 3 * 8));
        let json = serde_json::to_string(&tiles).unwrap();
        assert_eq!(serde_json::from_str::<SizeExpr>(&json).unwrap(), tiles);
    }

    #[test]
    fn constants_fold_and_overflow_is_reported() {
        assert_eq!(SizeExpr::c(6) * SizeExpr::c(7) + SizeExpr::c(0), SizeExpr::c(42));
        let big = SizeExpr::batch() * SizeExpr::seq_len();
        assert_eq!(big.eval(&SizeEnv { batch: u64::MAX, seq_len: 2, sms: None, pages: None, blocks: None }), Err(EvalError::Overflow));
        assert_eq!((SizeExpr::batch() + SizeExpr::c(1) * SizeExpr::seq_len()).to_string(), "B + S");
    }

    #[test]
    fn the_sm_count_is_a_variable_that_an_environment_may_lack() {
        let grid = SizeExpr::sms() * SizeExpr::c(2);
        assert_eq!(grid.to_string(), "SMs*2");
        assert_eq!(serde_json::to_string(&SizeExpr::sms()).unwrap(), r#"{"var":"SMs"}"#);
        assert_eq!(grid.eval(&SizeEnv { batch: 1, seq_len: 1, sms: Some(7), pages: None, blocks: None }), Ok(14));
        let without = SizeEnv { batch: 1, seq_len: 1, sms: None, pages: None, blocks: None };
        assert_eq!(grid.eval(&without), Err(EvalError::Unbound(SizeVar::SmCount)));
        assert_eq!(
            EvalError::Unbound(SizeVar::SmCount).to_string(),
            "needs SMs, the device's SM count, which is not given"
        );
    }
}
