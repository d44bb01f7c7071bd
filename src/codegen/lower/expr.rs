//! The expression compiler: an [`Expr`] becomes an i32, f32 or i1 value of the calling thread.
//!
//! Math follows the kernel IR interpreter's semantics with the GPU's fast instructions:
//! `exp`/`log`/`pow` go through `ex2.approx`/`lg2.approx`, `a · b ± c` is one fma, `rsqrt` is `rsqrt.approx`, and
//! `sin`/`cos` reduce their argument to [−π, π] (Cody–Waite with a two-part 2π and fma) before
//! `sin.approx`/`cos.approx`, so that RoPE angles of 10^5 rad keep their accuracy.

use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, FloatValue, IntValue};
use inkwell::{FloatPredicate, IntPredicate};

use super::super::primitives::{float_result, intrinsic};
use super::super::tile::ElementPosition;
use super::{Lowering, TileStorage};
use crate::codegen::{CodegenError, Elem, KernelBuilder, Result, SpecialRegister, unsupported};
use crate::ir::kernel::{Axis, BinOp, Expr, Layout, TileId, UnOp};

/// A scalar of one thread.
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'ctx> {
    Int(IntValue<'ctx>),
    Float(FloatValue<'ctx>),
    Bool(IntValue<'ctx>),
}

impl<'ctx> Value<'ctx> {
    pub(super) fn int(self) -> Result<IntValue<'ctx>> {
        match self {
            Value::Int(value) => Ok(value),
            other => unsupported(format!("expected an integer, got {}", other.kind())),
        }
    }
    pub(super) fn float(self) -> Result<FloatValue<'ctx>> {
        match self {
            Value::Float(value) => Ok(value),
            other => unsupported(format!("expected a float, got {}", other.kind())),
        }
    }
    pub(super) fn bool(self) -> Result<IntValue<'ctx>> {
        match self {
            Value::Bool(value) => Ok(value),
            other => unsupported(format!("expected a condition, got {}", other.kind())),
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a condition",
        }
    }
    fn basic(self) -> BasicValueEnum<'ctx> {
        match self {
            Value::Int(value) | Value::Bool(value) => value.into(),
            Value::Float(value) => value.into(),
        }
    }
}

/// The element an elementwise statement is working on (what `row`, `col` and `elem` mean).
#[derive(Clone, Copy)]
pub(super) enum ElementSite<'ctx> {
    /// Not inside an elementwise statement.
    None,
    /// An element of accumulator `tile` held by this thread.
    Accumulator { tile: TileId, position: ElementPosition<'ctx>, value: FloatValue<'ctx> },
    /// One row slot of a row vector (its column is 0).
    Row { row: IntValue<'ctx>, row_slot: u32, value: FloatValue<'ctx> },
    /// An element of a shared window, at (row, col) within the window.
    Shared { row: IntValue<'ctx>, col: IntValue<'ctx>, value: FloatValue<'ctx> },
}

const TWO_PI_HIGH: f32 = 6.283_185_5; // f32 nearest to 2π
const TWO_PI_LOW: f64 = std::f64::consts::TAU - TWO_PI_HIGH as f64;

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    pub(super) fn eval(&self, kb: &KernelBuilder<'_, 'ctx>, expr: &Expr, site: &ElementSite<'ctx>) -> Result<Value<'ctx>> {
        self.eval_guarded(kb, expr, site, false)
    }

    /// `eval`, `in_select_arm` inside either arm of a `select`. Both arms are evaluated and the
    /// result chosen without a branch; an arm may index out of range where it is not chosen,
    /// so its loads clamp every index into its dimension. The clamped load is harmless where
    /// the arm is dropped and exact where it is chosen, and unlike an address selected by the
    /// condition it stays the same for all elements that share the index (one load, CSE).
    pub(super) fn eval_guarded(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        expr: &Expr,
        site: &ElementSite<'ctx>,
        in_select_arm: bool,
    ) -> Result<Value<'ctx>> {
        let eval = |e: &Expr| self.eval_guarded(kb, e, site, in_select_arm);
        let outside = |what: &str| unsupported(format!("`{what}` outside an elementwise statement"));
        Ok(match expr {
            Expr::Int(value) => {
                let value = i32::try_from(*value)
                    .map_err(|_| CodegenError::Unsupported(format!("integer {value} does not fit in i32")))?;
                Value::Int(kb.i32(value as i64))
            }
            Expr::Float(value) => Value::Float(kb.f32(*value)),
            Expr::BlockIdx(axis) => Value::Int(kb.special_register(match axis {
                Axis::X => SpecialRegister::BlockX,
                Axis::Y => SpecialRegister::BlockY,
                Axis::Z => SpecialRegister::BlockZ,
            })?),
            Expr::GridDim(axis) => Value::Int(kb.special_register(match axis {
                Axis::X => SpecialRegister::GridX,
                Axis::Y => SpecialRegister::GridY,
                Axis::Z => SpecialRegister::GridZ,
            })?),
            Expr::Var(name) => match self.scope.iter().rev().find(|binding| binding.name == *name) {
                Some(binding) => binding.value,
                None => return unsupported(format!("variable `{name}` is not in scope")),
            },
            Expr::Size(var) => Value::Int(kb.size_param(var.symbol())?),
            Expr::Row => Value::Int(match site {
                ElementSite::Accumulator { position, .. } => position.row,
                ElementSite::Row { row, .. } | ElementSite::Shared { row, .. } => *row,
                ElementSite::None => return outside("row"),
            }),
            Expr::Col => Value::Int(match site {
                ElementSite::Accumulator { position, .. } => position.col,
                ElementSite::Row { .. } => kb.i32(0),
                ElementSite::Shared { col, .. } => *col,
                ElementSite::None => return outside("col"),
            }),
            Expr::Elem => Value::Float(match site {
                ElementSite::Accumulator { value, .. } | ElementSite::Row { value, .. } | ElementSite::Shared { value, .. } => *value,
                ElementSite::None => return outside("elem"),
            }),
            Expr::Tile { tile, row, col } => Value::Float(self.tile_read(kb, *tile, row, col, site, in_select_arm)?),
            Expr::Global { param, index } => {
                let tensor = self.tensor(kb, param)?;
                let mut indices = Vec::with_capacity(index.len());
                for (i, extent) in index.iter().zip(tensor.extents()) {
                    let i = eval(i)?.int()?;
                    indices.push(if in_select_arm { clamp(kb, i, *extent)? } else { i });
                }
                let pointer = tensor.element(kb, &indices)?;
                match tensor.elem {
                    Elem::I32 => Value::Int(kb.builder().build_load(kb.context().i32_type(), pointer, "")?.into_int_value()),
                    elem => Value::Float(kb.load_as_f32(pointer, elem)?),
                }
            }
            Expr::Unary(op, a) => self.unary(kb, *op, eval(a)?)?,
            Expr::Binary(BinOp::Pow, base, exponent) => {
                let exponent = eval(exponent)?.float()?;
                // A constant base folds log2(base) at compile time: one multiply and one ex2.
                let log2_base = match base.as_ref() {
                    Expr::Float(base) if *base > 0.0 => kb.f32(base.log2()),
                    base => kb.log2_approx(eval(base)?.float()?)?,
                };
                Value::Float(kb.exp2_approx(kb.fmul(exponent, log2_base)?)?)
            }
            // a · b + c, a · b − c and c + a · b as one fma (the softmax's scale-and-shift of
            // every score, a convolution's sum of taps).
            Expr::Binary(op, a, b) if fused_multiply_add(*op, a, b).is_some() => {
                let (x, y, c, negate_c) = fused_multiply_add(*op, a, b).expect("matched a fused form");
                multiply_add(kb, *op, eval(x)?, eval(y)?, eval(c)?, negate_c)?
            }
            Expr::Binary(op, a, b) => binary(kb, *op, eval(a)?, eval(b)?)?,
            Expr::Select(cond, then, otherwise) => {
                let cond = eval(cond)?.bool()?;
                let a = self.eval_guarded(kb, then, site, true)?;
                let b = self.eval_guarded(kb, otherwise, site, true)?;
                select(kb, cond, a, b)?
            }
        })
    }

    /// `%tile[row, col]`: shared tiles anywhere, register tiles only at the element being mapped.
    fn tile_read(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        tile: TileId,
        row: &Expr,
        col: &Expr,
        site: &ElementSite<'ctx>,
        in_select_arm: bool,
    ) -> Result<FloatValue<'ctx>> {
        let decl = self.kernel.tile(tile);
        match (&self.tiles[tile.0], site) {
            (TileStorage::Shared { offset }, _) => {
                let Layout::RowMajor { pad } = decl.ty.layout else {
                    return unsupported(format!("shared tile %{} without a row-major layout", decl.name));
                };
                let mut r = self.eval_guarded(kb, row, site, in_select_arm)?.int()?;
                let mut c = self.eval_guarded(kb, col, site, in_select_arm)?.int()?;
                if in_select_arm {
                    r = clamp(kb, r, kb.i32(decl.ty.rows as i64))?;
                    c = clamp(kb, c, kb.i32(decl.ty.cols as i64))?;
                }
                let elem = Elem::from(decl.ty.elem);
                let index = kb.add(kb.mul(r, kb.i32((decl.ty.cols + pad) as i64))?, c)?;
                let pointer = kb.element_pointer(self.shared_tile_base(kb, *offset)?, elem, index)?;
                kb.load_as_f32(pointer, elem)
            }
            (TileStorage::Accumulator(acc), ElementSite::Accumulator { tile: mapped, position, .. }) => {
                if self.accumulator(*mapped)?.shape != acc.shape {
                    return unsupported(format!(
                        "%{} read while mapping %{} of another shape or layout",
                        decl.name,
                        self.tile_name(*mapped)
                    ));
                }
                acc.element(kb, position.element_slot)
            }
            (TileStorage::Rows(rows), ElementSite::Accumulator { position, .. }) => rows.get(kb, position.row_slot),
            (TileStorage::Rows(rows), ElementSite::Row { row_slot, .. }) => rows.get(kb, *row_slot),
            _ => unsupported(format!("read of register tile %{} outside a map over its own layout", decl.name)),
        }
    }

    pub(super) fn unary(&self, kb: &KernelBuilder<'_, 'ctx>, op: UnOp, a: Value<'ctx>) -> Result<Value<'ctx>> {
        if op == UnOp::ToFloat {
            return Ok(Value::Float(kb.i32_to_f32(a.int()?)?));
        }
        let x = a.float()?;
        Ok(Value::Float(match op {
            UnOp::Exp => kb.exp2_approx(kb.fmul(x, kb.f32(std::f64::consts::LOG2_E))?)?,
            UnOp::Log => kb.fmul(kb.log2_approx(x)?, kb.f32(std::f64::consts::LN_2))?,
            UnOp::Exp2 => kb.exp2_approx(x)?,
            UnOp::Log2 => kb.log2_approx(x)?,
            UnOp::Rsqrt => kb.rsqrt_approx(x)?,
            UnOp::Cos | UnOp::Sin => {
                let reduced = reduce_angle(kb, x)?;
                let name = if op == UnOp::Cos { "llvm.nvvm.cos.approx.ftz.f" } else { "llvm.nvvm.sin.approx.ftz.f" };
                call_float(kb, name, &[], &[reduced])?
            }
            UnOp::ToFloat => unreachable!("handled above"),
        }))
    }
}

/// `op(a, b)` as (x, y, c, negate c) when it is x · y + c, x · y − c or c + x · y.
pub(super) fn fused_multiply_add<'e>(op: BinOp, a: &'e Expr, b: &'e Expr) -> Option<(&'e Expr, &'e Expr, &'e Expr, bool)> {
    match (op, a, b) {
        (BinOp::Add | BinOp::Sub, Expr::Binary(BinOp::Mul, x, y), c) => Some((x, y, c, op == BinOp::Sub)),
        (BinOp::Add, c, Expr::Binary(BinOp::Mul, x, y)) => Some((x, y, c, false)),
        _ => None,
    }
}

/// The value of `op(x · y, c)` matched by [`fused_multiply_add`] (`negate_c` for x · y − c):
/// one fma, rounded once, for floats; the multiply and `op` for integers.
pub(super) fn multiply_add<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    op: BinOp,
    x: Value<'ctx>,
    y: Value<'ctx>,
    c: Value<'ctx>,
    negate_c: bool,
) -> Result<Value<'ctx>> {
    match (x, y, c) {
        (Value::Float(x), Value::Float(y), Value::Float(c)) => {
            let c = if negate_c { kb.builder().build_float_neg(c, "")? } else { c };
            Ok(Value::Float(kb.fma(x, y, c)?))
        }
        (x, y, c) => binary(kb, op, binary(kb, BinOp::Mul, x, y)?, c),
    }
}

/// `cond ? a : b` without a branch; both values of one kind.
pub(super) fn select<'ctx>(kb: &KernelBuilder<'_, 'ctx>, cond: IntValue<'ctx>, a: Value<'ctx>, b: Value<'ctx>) -> Result<Value<'ctx>> {
    let chosen = kb.builder().build_select(cond, a.basic(), b.basic(), "")?;
    Ok(match (a, b) {
        (Value::Int(_), Value::Int(_)) => Value::Int(chosen.into_int_value()),
        (Value::Float(_), Value::Float(_)) => Value::Float(chosen.into_float_value()),
        (Value::Bool(_), Value::Bool(_)) => Value::Bool(chosen.into_int_value()),
        (a, b) => return unsupported(format!("select between {} and {}", a.kind(), b.kind())),
    })
}

/// `index` clamped into `0 .. extent` (signed; extent ≥ 1).
pub(super) fn clamp<'ctx>(kb: &KernelBuilder<'_, 'ctx>, index: IntValue<'ctx>, extent: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
    let last = kb.sub(extent, kb.i32(1))?;
    let at_least_zero = kb.select_int(kb.lt(index, kb.i32(0))?, kb.i32(0), index)?;
    kb.min(at_least_zero, last)
}

fn call_float<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    name: &str,
    types: &[BasicTypeEnum<'ctx>],
    args: &[FloatValue<'ctx>],
) -> Result<FloatValue<'ctx>> {
    let function = intrinsic(kb.module(), name, types)?;
    let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
    float_result(kb.builder().build_call(function, &args, "")?)
}

/// x − 2π·rint(x / 2π), the multiple of 2π taken off in two fma steps (high part exact in f32).
pub(crate) fn reduce_angle<'ctx>(kb: &KernelBuilder<'_, 'ctx>, x: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
    let f32_type: BasicTypeEnum = kb.context().f32_type().into();
    let turns = call_float(kb, "llvm.rint", &[f32_type], &[kb.fmul(x, kb.f32(1.0 / std::f64::consts::TAU))?])?;
    let negative_turns = kb.builder().build_float_neg(turns, "")?;
    let high = call_float(kb, "llvm.fma", &[f32_type], &[negative_turns, kb.f32(TWO_PI_HIGH as f64), x])?;
    call_float(kb, "llvm.fma", &[f32_type], &[negative_turns, kb.f32(TWO_PI_LOW), high])
}

/// i32 division rounding toward −∞ and the matching remainder (sign of the divisor).
fn floor_div_mod<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    a: IntValue<'ctx>,
    b: IntValue<'ctx>,
) -> Result<(IntValue<'ctx>, IntValue<'ctx>)> {
    let builder = kb.builder();
    let quotient = builder.build_int_signed_div(a, b, "")?;
    let remainder = builder.build_int_signed_rem(a, b, "")?;
    let zero = kb.i32(0);
    let nonzero = builder.build_int_compare(IntPredicate::NE, remainder, zero, "")?;
    let signs_differ = builder.build_xor(kb.lt(remainder, zero)?, kb.lt(b, zero)?, "")?;
    let adjust = kb.and(nonzero, signs_differ)?;
    let floor = kb.sub(quotient, builder.build_int_z_extend(adjust, kb.context().i32_type(), "")?)?;
    let modulo = kb.add(remainder, kb.select_int(adjust, b, zero)?)?;
    Ok((floor, modulo))
}

pub(super) fn binary<'ctx>(kb: &KernelBuilder<'_, 'ctx>, op: BinOp, a: Value<'ctx>, b: Value<'ctx>) -> Result<Value<'ctx>> {
    let builder = kb.builder();
    Ok(match (a, b) {
        (Value::Int(x), Value::Int(y)) => match op {
            BinOp::Add => Value::Int(kb.add(x, y)?),
            BinOp::Sub => Value::Int(kb.sub(x, y)?),
            BinOp::Mul => Value::Int(kb.mul(x, y)?),
            BinOp::FloorDiv => Value::Int(floor_div_mod(kb, x, y)?.0),
            BinOp::Mod => Value::Int(floor_div_mod(kb, x, y)?.1),
            BinOp::CeilDiv => {
                let negated = builder.build_int_neg(x, "")?;
                Value::Int(builder.build_int_neg(floor_div_mod(kb, negated, y)?.0, "")?)
            }
            BinOp::Min => Value::Int(kb.min(x, y)?),
            BinOp::Max => Value::Int(kb.select_int(kb.lt(x, y)?, y, x)?),
            BinOp::Lt => Value::Bool(kb.lt(x, y)?),
            BinOp::Le => Value::Bool(kb.le(x, y)?),
            BinOp::Eq => Value::Bool(builder.build_int_compare(IntPredicate::EQ, x, y, "")?),
            _ => return unsupported(format!("{op:?} on integers")),
        },
        (Value::Float(x), Value::Float(y)) => match op {
            BinOp::Add => Value::Float(kb.fadd(x, y)?),
            BinOp::Sub => Value::Float(kb.fsub(x, y)?),
            BinOp::Mul => Value::Float(kb.fmul(x, y)?),
            BinOp::Div => Value::Float(kb.fdiv(x, y)?),
            BinOp::Min => {
                let f32_type: BasicTypeEnum = kb.context().f32_type().into();
                Value::Float(call_float(kb, "llvm.minnum", &[f32_type], &[x, y])?)
            }
            BinOp::Max => Value::Float(kb.fmax(x, y)?),
            BinOp::Lt => Value::Bool(builder.build_float_compare(FloatPredicate::OLT, x, y, "")?),
            BinOp::Le => Value::Bool(builder.build_float_compare(FloatPredicate::OLE, x, y, "")?),
            BinOp::Eq => Value::Bool(kb.feq(x, y)?),
            _ => return unsupported(format!("{op:?} on floats")),
        },
        (Value::Bool(x), Value::Bool(y)) if op == BinOp::And => Value::Bool(kb.and(x, y)?),
        (a, b) => return unsupported(format!("{op:?} on {} and {}", a.kind(), b.kind())),
    })
}
