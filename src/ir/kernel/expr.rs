//! Scalar expressions: indices and bounds (i32) and elementwise math (f32) in one small tree.

use super::TileId;
use crate::ir::size::{SizeExpr, SizeVar};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    X,
    Y,
    Z,
}

impl Axis {
    pub fn name(self) -> &'static str {
        match self {
            Axis::X => "x",
            Axis::Y => "y",
            Axis::Z => "z",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalarType {
    I32,
    F32,
    Bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Exp,
    Log,
    /// 2^x and log2 x: softmax in base 2 takes one fma and one `ex2` per score.
    Exp2,
    Log2,
    Rsqrt,
    Cos,
    Sin,
    /// i32 → f32.
    ToFloat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    /// f32 division.
    Div,
    /// i32 division rounding toward −∞.
    FloorDiv,
    /// i32 ⌈a / b⌉.
    CeilDiv,
    /// i32 remainder with the sign of the divisor.
    Mod,
    Min,
    Max,
    /// f32 a^b.
    Pow,
    Lt,
    Le,
    Eq,
    And,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Int(i64),
    Float(f64),
    BlockIdx(Axis),
    /// CTAs in the grid along an axis (a persistent kernel's stride over its work).
    GridDim(Axis),
    /// A loop variable or a `Let`.
    Var(String),
    Size(SizeVar),
    /// Inside `Map`: the element's row / column within the destination view.
    Row,
    Col,
    /// Inside `Map`: the destination's old value; inside `RowReduce`: the source element.
    /// Printed `elem`.
    Elem,
    /// A tile element by position in the tile (shared tiles: any position; register tiles: only
    /// the element being mapped).
    Tile {
        tile: TileId,
        row: Box<Expr>,
        col: Box<Expr>,
    },
    /// One element of a global tensor parameter (row-major multi-index).
    Global {
        param: String,
        index: Vec<Expr>,
    },
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn var(name: &str) -> Expr {
        Expr::Var(name.to_string())
    }
    pub fn tile(tile: TileId, row: Expr, col: Expr) -> Expr {
        Expr::Tile {
            tile,
            row: Box::new(row),
            col: Box::new(col),
        }
    }
    pub fn global(param: &str, index: Vec<Expr>) -> Expr {
        Expr::Global {
            param: param.to_string(),
            index,
        }
    }
    pub fn unary(op: UnOp, a: Expr) -> Expr {
        Expr::Unary(op, Box::new(a))
    }
    pub fn binary(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }
    pub fn select(cond: Expr, then: Expr, otherwise: Expr) -> Expr {
        Expr::Select(Box::new(cond), Box::new(then), Box::new(otherwise))
    }
    pub fn min(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Min, self, other)
    }
    pub fn max(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Max, self, other)
    }
    pub fn floor_div(self, other: Expr) -> Expr {
        Expr::binary(BinOp::FloorDiv, self, other)
    }
    pub fn ceil_div(self, other: Expr) -> Expr {
        Expr::binary(BinOp::CeilDiv, self, other)
    }
    pub fn modulo(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Mod, self, other)
    }
    pub fn lt(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Lt, self, other)
    }
    pub fn le(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Le, self, other)
    }
    pub fn eq(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Eq, self, other)
    }
    pub fn and(self, other: Expr) -> Expr {
        Expr::binary(BinOp::And, self, other)
    }
    pub fn pow(self, other: Expr) -> Expr {
        Expr::binary(BinOp::Pow, self, other)
    }
    pub fn to_float(self) -> Expr {
        Expr::unary(UnOp::ToFloat, self)
    }
    pub fn exp(self) -> Expr {
        Expr::unary(UnOp::Exp, self)
    }
    pub fn log(self) -> Expr {
        Expr::unary(UnOp::Log, self)
    }
    pub fn exp2(self) -> Expr {
        Expr::unary(UnOp::Exp2, self)
    }
    pub fn log2(self) -> Expr {
        Expr::unary(UnOp::Log2, self)
    }
    pub fn rsqrt(self) -> Expr {
        Expr::unary(UnOp::Rsqrt, self)
    }
    pub fn cos(self) -> Expr {
        Expr::unary(UnOp::Cos, self)
    }
    pub fn sin(self) -> Expr {
        Expr::unary(UnOp::Sin, self)
    }

    /// Whether the expression is a multiple of `k` whatever its variables are (a constant
    /// multiple, a product with one, a sum or difference of such).
    pub fn is_always_multiple_of(&self, k: u32) -> bool {
        match self {
            Expr::Int(value) => value % k as i64 == 0,
            Expr::Binary(BinOp::Mul, a, b) => a.is_always_multiple_of(k) || b.is_always_multiple_of(k),
            Expr::Binary(BinOp::Add | BinOp::Sub, a, b) => a.is_always_multiple_of(k) && b.is_always_multiple_of(k),
            _ => false,
        }
    }

    /// The expression with every sub-expression for which `f` answers replaced by that answer
    /// (outermost first: an answer is not searched further).
    pub fn rewritten(&self, f: &dyn Fn(&Expr) -> Option<Expr>) -> Expr {
        if let Some(replacement) = f(self) {
            return replacement;
        }
        let boxed = |e: &Expr| Box::new(e.rewritten(f));
        match self {
            Expr::Tile { tile, row, col } => Expr::Tile { tile: *tile, row: boxed(row), col: boxed(col) },
            Expr::Global { param, index } => Expr::Global { param: param.clone(), index: index.iter().map(|e| e.rewritten(f)).collect() },
            Expr::Unary(op, a) => Expr::Unary(*op, boxed(a)),
            Expr::Binary(op, a, b) => Expr::Binary(*op, boxed(a), boxed(b)),
            Expr::Select(c, a, b) => Expr::Select(boxed(c), boxed(a), boxed(b)),
            leaf => leaf.clone(),
        }
    }

    /// A runtime size as an index expression.
    pub fn of_size(size: &SizeExpr) -> Expr {
        match size {
            SizeExpr::Const(v) => Expr::Int(*v as i64),
            SizeExpr::Var(var) => Expr::Size(*var),
            SizeExpr::Add(a, b) => Expr::of_size(a) + Expr::of_size(b),
            SizeExpr::Mul(a, b) => Expr::of_size(a) * Expr::of_size(b),
            SizeExpr::CeilDiv(a, d) => Expr::of_size(a).ceil_div(Expr::Int(*d as i64)),
        }
    }

    /// Calls `f` on every sub-expression, this one included (pre-order).
    pub fn visit(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Tile { row, col, .. } => {
                row.visit(f);
                col.visit(f);
            }
            Expr::Global { index, .. } => index.iter().for_each(|e| e.visit(f)),
            Expr::Unary(_, a) => a.visit(f),
            Expr::Binary(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Select(c, a, b) => {
                c.visit(f);
                a.visit(f);
                b.visit(f);
            }
            _ => {}
        }
    }
}

macro_rules! arith {
    ($trait:ident, $method:ident, $op:ident) => {
        impl std::ops::$trait for Expr {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                Expr::binary(BinOp::$op, self, rhs)
            }
        }
    };
}
arith!(Add, add, Add);
arith!(Sub, sub, Sub);
arith!(Mul, mul, Mul);
arith!(Div, div, Div);

pub(super) fn binop_symbol(op: BinOp) -> Option<(&'static str, u8)> {
    // (infix symbol, precedence); None for ops printed as calls.
    Some(match op {
        BinOp::And => ("&&", 1),
        BinOp::Lt => ("<", 2),
        BinOp::Le => ("<=", 2),
        BinOp::Eq => ("==", 2),
        BinOp::Add => ("+", 3),
        BinOp::Sub => ("-", 3),
        BinOp::Mul => ("*", 4),
        BinOp::Div | BinOp::FloorDiv => ("/", 4),
        BinOp::Mod => ("%", 4),
        BinOp::CeilDiv | BinOp::Min | BinOp::Max | BinOp::Pow => return None,
    })
}

pub(super) fn call_name(op: BinOp) -> &'static str {
    match op {
        BinOp::CeilDiv => "ceil_div",
        BinOp::Min => "min",
        BinOp::Max => "max",
        BinOp::Pow => "pow",
        _ => unreachable!("infix operators are printed by binop_symbol"),
    }
}

pub(super) fn unop_name(op: UnOp) -> &'static str {
    match op {
        UnOp::Exp => "exp",
        UnOp::Log => "log",
        UnOp::Exp2 => "exp2",
        UnOp::Log2 => "log2",
        UnOp::Rsqrt => "rsqrt",
        UnOp::Cos => "cos",
        UnOp::Sin => "sin",
        UnOp::ToFloat => "f32",
    }
}
