//! A CPU interpreter for kernel IR: every CTA of the grid in turn, each statement on whole tiles,
//! in f64. Async copies complete at once (the verifier checks that the IR waits for them), so
//! the interpreter checks tiling, halos, masking and the online softmax, not timing.
//!
//! Warp-specialized kernels ([`Stmt::Roles`]) run their warpgroups as cooperating tasks
//! ([`roles`]): TMA copies land only when their barrier is waited for, wgmma groups are tracked
//! until their wait, and a misuse of a barrier or a deadlock is an error, not a hang.
//!
//! `Rounding::Exact` never rounds (it must agree with the f64 reference to ~1e-12);
//! `Rounding::Storage` rounds every value written to a tile or tensor to its element type, as the
//! GPU stores it.

mod roles;

use super::*;
use crate::spec::AttentionSpec;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    Exact,
    Storage,
}

/// Global tensors by parameter name, flat row-major.
pub type Buffers = BTreeMap<String, Vec<f64>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    fn int(self) -> Result<i64, String> {
        match self {
            Value::Int(v) => Ok(v),
            other => Err(format!("expected an integer, got {other:?}")),
        }
    }
    fn float(self) -> Result<f64, String> {
        match self {
            Value::Float(v) => Ok(v),
            other => Err(format!("expected a float, got {other:?}")),
        }
    }
    fn bool(self) -> Result<bool, String> {
        match self {
            Value::Bool(v) => Ok(v),
            other => Err(format!("expected a condition, got {other:?}")),
        }
    }
}

fn round_to(elem: ElemType, v: f64, rounding: Rounding) -> f64 {
    match (rounding, elem) {
        (Rounding::Exact, _) => v,
        (Rounding::Storage, ElemType::F32) => v as f32 as f64,
        (Rounding::Storage, ElemType::Bf16) => half::bf16::from_f64(v).to_f64(),
        (Rounding::Storage, ElemType::F16) => half::f16::from_f64(v).to_f64(),
        (Rounding::Storage, ElemType::I32) => v,
    }
}

/// The element a `Map` or `RowReduce` is working on.
#[derive(Clone, Copy)]
struct Element {
    row: i64,
    col: i64,
    value: f64,
}

struct Block<'k> {
    kernel: &'k KernelFn,
    shapes: &'k BTreeMap<String, (Vec<usize>, ElemType)>,
    sizes: SizeEnv,
    block_idx: [i64; 3],
    grid: [i64; 3],
    tiles: Vec<Vec<f64>>,
    scope: Vec<(&'k str, Value)>,
    rounding: Rounding,
    /// State of the running warpgroup task, mbarriers, named barriers and TMA copies in flight
    /// (warp-specialized kernels only).
    sync: roles::SyncState,
}

use crate::ir::size::{EvalError, SizeEnv};

/// SMs of the device the interpreter launches on: few, so that at test sizes every CTA of a
/// persistent grid takes several tiles and its loop runs (the ring across tiles, ping-pong turns).
pub const INTERPRETER_SMS: u64 = 3;

/// The sizes of an interpreted call of `batch` sequences of `seq_len` tokens, on
/// [`INTERPRETER_SMS`] SMs.
pub fn launch_sizes(batch: usize, seq_len: usize) -> SizeEnv {
    SizeEnv { batch: batch as u64, seq_len: seq_len as u64, sms: Some(INTERPRETER_SMS), pages: None, blocks: None }
}

/// Runs `kernel` over its whole grid for `sizes`. Every tensor parameter must be in `buffers`
/// with the length its shape gives; outputs are written in place.
pub fn run_kernel(kernel: &KernelFn, buffers: &mut Buffers, sizes: SizeEnv, rounding: Rounding) -> Result<(), String> {
    let eval = |e: &SizeExpr, what: &str| {
        e.eval(&sizes).map(|v| v as usize).map_err(|error| format!("{}: {what} = {e} {error}", kernel.name))
    };
    let mut shapes = BTreeMap::new();
    for param in &kernel.params {
        if let KernelParam::Tensor {
            name, elem, shape, ..
        } = param
        {
            let dims = shape
                .iter()
                .map(|dim| eval(dim, &format!("a dimension of {name}")))
                .collect::<Result<Vec<_>, _>>()?;
            let len: usize = dims.iter().product();
            match buffers.get(name) {
                Some(data) if data.len() == len => {}
                Some(data) => {
                    return Err(format!(
                        "{}: buffer {name} has {} values, its shape needs {len}",
                        kernel.name,
                        data.len()
                    ));
                }
                None => return Err(format!("{}: no buffer bound to {name}", kernel.name)),
            }
            shapes.insert(name.clone(), (dims, *elem));
        }
    }
    let grid = [
        eval(&kernel.grid[0], "grid dimension 0")?,
        eval(&kernel.grid[1], "grid dimension 1")?,
        eval(&kernel.grid[2], "grid dimension 2")?,
    ];
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                let mut block = Block {
                    kernel,
                    shapes: &shapes,
                    sizes,
                    block_idx: [x as i64, y as i64, z as i64],
                    grid: [grid[0] as i64, grid[1] as i64, grid[2] as i64],
                    tiles: kernel
                        .tiles
                        .iter()
                        .map(|t| {
                            // Shared tiles of a warp-specialized kernel start poisoned: a
                            // warpgroup that reads a stage before its copies landed sees NaN.
                            let poisoned = !kernel.barriers.is_empty() && t.ty.space() == Space::Shared;
                            vec![if poisoned { f64::NAN } else { 0.0 }; (t.ty.rows * t.ty.cols) as usize]
                        })
                        .collect(),
                    scope: Vec::new(),
                    rounding,
                    sync: roles::SyncState::new(kernel),
                };
                block
                    .exec_block(&kernel.body, buffers)
                    .map_err(|e| format!("{} block ({x}, {y}, {z}): {e}", kernel.name))?;
            }
        }
    }
    Ok(())
}

/// A tile view with its offsets evaluated.
#[derive(Clone, Copy, Debug)]
struct Window {
    tile: usize,
    row0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Window {
    fn index(&self, r: usize, c: usize) -> usize {
        (self.row0 + r) * self.stride + self.col0 + c
    }
}

impl<'k> Block<'k> {
    fn exec_block(&mut self, body: &'k [Stmt], buffers: &mut Buffers) -> Result<(), String> {
        let depth = self.scope.len();
        for stmt in body {
            self.exec(stmt, buffers)?;
        }
        self.scope.truncate(depth);
        Ok(())
    }

    fn window(&self, view: &TileView) -> Result<Window, String> {
        let ty = &self.kernel.tile(view.tile).ty;
        let row0 = self.eval(&view.row0, None, None)?.int()?;
        let col0 = self.eval(&view.col0, None, None)?.int()?;
        if row0 < 0
            || col0 < 0
            || row0 as u64 + view.rows as u64 > ty.rows as u64
            || col0 as u64 + view.cols as u64 > ty.cols as u64
        {
            return Err(format!(
                "view [{row0} .. +{}, {col0} .. +{}] outside %{}",
                view.rows,
                view.cols,
                self.kernel.tile(view.tile).name
            ));
        }
        Ok(Window {
            tile: view.tile.0,
            row0: row0 as usize,
            col0: col0 as usize,
            rows: view.rows as usize,
            cols: view.cols as usize,
            stride: ty.cols as usize,
        })
    }

    fn tile_elem(&self, tile: usize) -> ElemType {
        self.kernel.tiles[tile].ty.elem
    }

    fn exec(&mut self, stmt: &'k Stmt, buffers: &mut Buffers) -> Result<(), String> {
        self.check_in_flight(stmt)?;
        match stmt {
            Stmt::Let { var, value } => {
                let v = self.eval(value, None, Some(buffers))?;
                self.scope.push((var, v));
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let start = self.eval(start, None, Some(buffers))?.int()?;
                let end = self.eval(end, None, Some(buffers))?.int()?;
                for i in start..end {
                    self.scope.push((var, Value::Int(i)));
                    self.exec_block(body, buffers)?;
                    self.scope.pop();
                }
            }
            Stmt::If {
                cond,
                then_body,
                else_body,
            } => {
                if self.eval(cond, None, Some(buffers))?.bool()? {
                    self.exec_block(then_body, buffers)?;
                } else {
                    self.exec_block(else_body, buffers)?;
                }
            }
            Stmt::Copy { dst, src, .. } => {
                let w = self.window(dst)?;
                let elem = self.tile_elem(w.tile);
                let data = &buffers[&src.param];
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        let v = match self.global_index(src, r, c, buffers)? {
                            Some(i) => data[i],
                            None => 0.0,
                        };
                        self.tiles[w.tile][w.index(r, c)] = round_to(elem, v, self.rounding);
                    }
                }
            }
            Stmt::AsyncCommit | Stmt::AsyncWait { .. } | Stmt::Barrier | Stmt::Note(_) => {}
            Stmt::Fill { dst, value } => {
                let w = self.window(dst)?;
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        self.tiles[w.tile][w.index(r, c)] = *value;
                    }
                }
            }
            Stmt::Mma { acc, a, b, a_transposed, b_transposed } => {
                self.multiply(acc, a, b, *a_transposed, *b_transposed)?
            }
            Stmt::Convert { dst, src } => {
                let (wd, ws) = (self.window(dst)?, self.window(src)?);
                let elem = self.tile_elem(wd.tile);
                for r in 0..wd.rows {
                    for c in 0..wd.cols {
                        let v = self.tiles[ws.tile][ws.index(r, c)];
                        self.tiles[wd.tile][wd.index(r, c)] = round_to(elem, v, self.rounding);
                    }
                }
            }
            Stmt::Map { dst, expr } => {
                let w = self.window(dst)?;
                let elem = self.tile_elem(w.tile);
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        let at = w.index(r, c);
                        let element = Element {
                            row: r as i64,
                            col: c as i64,
                            value: self.tiles[w.tile][at],
                        };
                        let v = self.eval(expr, Some(element), Some(buffers))?.float()?;
                        self.tiles[w.tile][at] = round_to(elem, v, self.rounding);
                    }
                }
            }
            Stmt::RowReduce {
                dst,
                src,
                op,
                value,
            } => {
                let w = self.window(src)?;
                let elem = self.tile_elem(dst.0);
                for r in 0..w.rows {
                    let mut acc = match op {
                        ReduceOp::Max => f64::NEG_INFINITY,
                        ReduceOp::Sum => 0.0,
                    };
                    for c in 0..w.cols {
                        let element = Element {
                            row: r as i64,
                            col: c as i64,
                            value: self.tiles[w.tile][w.index(r, c)],
                        };
                        let v = self.eval(value, Some(element), Some(buffers))?.float()?;
                        acc = match op {
                            ReduceOp::Max => acc.max(v),
                            ReduceOp::Sum => acc + v,
                        };
                    }
                    self.tiles[dst.0][r] = round_to(elem, acc, self.rounding);
                }
            }
            Stmt::Roles(roles) => self.run_roles(roles, buffers)?,
            Stmt::Elect { .. }
            | Stmt::TmaLoad { .. }
            | Stmt::ArriveExpectTx { .. }
            | Stmt::Arrive { .. }
            | Stmt::WaitParity { .. }
            | Stmt::MmaAsync { .. }
            | Stmt::MmaCommit
            | Stmt::MmaWait { .. }
            | Stmt::NamedBarrier { .. } => {
                return Err(format!("`{}` outside a role", self.kernel.stmt_head(stmt)));
            }
            Stmt::AtomicAdd { src, dst } => {
                let w = self.window(src)?;
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        if let Some(i) = self.global_index(dst, r, c, buffers)? {
                            let v = self.tiles[w.tile][w.index(r, c)];
                            let element = &mut buffers.get_mut(&dst.param).expect("checked at start")[i];
                            *element = round_to(ElemType::F32, *element + v, self.rounding);
                        }
                    }
                }
            }
            Stmt::Store { src, dst } => {
                let w = self.window(src)?;
                let elem = self.shapes[&dst.param].1;
                for r in 0..w.rows {
                    for c in 0..w.cols {
                        if let Some(i) = self.global_index(dst, r, c, buffers)? {
                            let v = self.tiles[w.tile][w.index(r, c)];
                            buffers.get_mut(&dst.param).expect("checked at start")[i] =
                                round_to(elem, v, self.rounding);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `acc += a · b` (or `a · bᵀ`) on whole windows.
    fn multiply(&mut self, acc: &TileView, a: &TileView, b: &TileView, a_transposed: bool, b_transposed: bool) -> Result<(), String> {
        let (wc, wa, wb) = (self.window(acc)?, self.window(a)?, self.window(b)?);
        let depth = if a_transposed { wa.rows } else { wa.cols };
        for i in 0..wc.rows {
            for j in 0..wc.cols {
                let mut sum = 0.0;
                for k in 0..depth {
                    let av = if a_transposed { wa.index(k, i) } else { wa.index(i, k) };
                    let bv = if b_transposed { wb.index(j, k) } else { wb.index(k, j) };
                    sum += self.tiles[wa.tile][av] * self.tiles[wb.tile][bv];
                }
                self.tiles[wc.tile][wc.index(i, j)] += sum;
            }
        }
        Ok(())
    }

    /// Flat index of element (r, c) of a global box, or None when it lies outside the tensor or
    /// the span's valid range.
    fn global_index(&self, tile: &GlobalTile, r: usize, c: usize, buffers: &Buffers) -> Result<Option<usize>, String> {
        let (dims, _) = &self.shapes[&tile.param];
        let mut flat = 0usize;
        let mut spans_seen = 0;
        for (dim, extent) in tile.dims.iter().zip(dims) {
            let index = match dim {
                GlobalDim::At(e) => self.eval(e, None, Some(buffers))?.int()?,
                GlobalDim::Span { start, valid, .. } => {
                    let offset = if spans_seen == 0 { r } else { c };
                    spans_seen += 1;
                    let index = self.eval(start, None, Some(buffers))?.int()? + offset as i64;
                    if let Some((lo, hi)) = valid {
                        let lo = self.eval(lo, None, Some(buffers))?.int()?;
                        let hi = self.eval(hi, None, Some(buffers))?.int()?;
                        if index < lo || index >= hi {
                            return Ok(None);
                        }
                    }
                    index
                }
            };
            if index < 0 || index as usize >= *extent {
                if matches!(dim, GlobalDim::At(_)) {
                    return Err(format!(
                        "index {index} outside dimension {extent} of {}",
                        tile.param
                    ));
                }
                return Ok(None);
            }
            flat = flat * extent + index as usize;
        }
        Ok(Some(flat))
    }

    fn eval(
        &self,
        expr: &Expr,
        element: Option<Element>,
        buffers: Option<&Buffers>,
    ) -> Result<Value, String> {
        let f = |e: &Expr| self.eval(e, element, buffers);
        let elementwise =
            || element.ok_or_else(|| "row/col/x used outside an elementwise op".to_string());
        Ok(match expr {
            Expr::Int(v) => Value::Int(*v),
            Expr::Float(v) => Value::Float(*v),
            Expr::BlockIdx(axis) => Value::Int(self.block_idx[axis.index()]),
            Expr::GridDim(axis) => Value::Int(self.grid[axis.index()]),
            Expr::Var(name) => match self.scope.iter().rev().find(|(n, _)| n == name) {
                Some((_, v)) => *v,
                None => return Err(format!("variable {name} is not bound")),
            },
            Expr::Size(var) => match self.sizes.get(*var) {
                Some(value) => Value::Int(value as i64),
                None => return Err(format!("the kernel {}", EvalError::Unbound(*var))),
            },
            Expr::Row => Value::Int(elementwise()?.row),
            Expr::Col => Value::Int(elementwise()?.col),
            Expr::Elem => Value::Float(elementwise()?.value),
            Expr::Tile { tile, row, col } => {
                let ty = &self.kernel.tile(*tile).ty;
                let (r, c) = (f(row)?.int()?, f(col)?.int()?);
                if r < 0 || c < 0 || r >= ty.rows as i64 || c >= ty.cols as i64 {
                    return Err(format!(
                        "read of %{}[{r}, {c}] outside the tile",
                        self.kernel.tile(*tile).name
                    ));
                }
                Value::Float(self.tiles[tile.0][r as usize * ty.cols as usize + c as usize])
            }
            Expr::Global { param, index } => {
                let (dims, elem) = &self.shapes[param];
                let data = buffers.ok_or("global read outside the statements that may read them")?;
                let mut flat = 0usize;
                for (i, extent) in index.iter().zip(dims) {
                    let i = f(i)?.int()?;
                    if i < 0 || i as usize >= *extent {
                        return Err(format!("index {i} outside dimension {extent} of {param}"));
                    }
                    flat = flat * extent + i as usize;
                }
                let value = data[param][flat];
                if *elem == ElemType::I32 { Value::Int(value as i64) } else { Value::Float(value) }
            }
            Expr::Unary(op, a) => {
                let a = f(a)?;
                match op {
                    UnOp::ToFloat => Value::Float(a.int()? as f64),
                    UnOp::Exp => Value::Float(a.float()?.exp()),
                    UnOp::Log => Value::Float(a.float()?.ln()),
                    UnOp::Exp2 => Value::Float(a.float()?.exp2()),
                    UnOp::Log2 => Value::Float(a.float()?.log2()),
                    UnOp::Rsqrt => Value::Float(1.0 / a.float()?.sqrt()),
                    UnOp::Cos => Value::Float(a.float()?.cos()),
                    UnOp::Sin => Value::Float(a.float()?.sin()),
                }
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (f(a)?, f(b)?);
                match (a, b) {
                    (Value::Int(x), Value::Int(y)) => match op {
                        BinOp::Add => Value::Int(x + y),
                        BinOp::Sub => Value::Int(x - y),
                        BinOp::Mul => Value::Int(x * y),
                        BinOp::FloorDiv | BinOp::CeilDiv | BinOp::Mod if y == 0 => {
                            return Err("integer division by zero".into());
                        }
                        BinOp::FloorDiv => Value::Int(floor_div(x, y)),
                        BinOp::CeilDiv => Value::Int(-floor_div(-x, y)),
                        BinOp::Mod => Value::Int(x - y * floor_div(x, y)),
                        BinOp::Min => Value::Int(x.min(y)),
                        BinOp::Max => Value::Int(x.max(y)),
                        BinOp::Lt => Value::Bool(x < y),
                        BinOp::Le => Value::Bool(x <= y),
                        BinOp::Eq => Value::Bool(x == y),
                        _ => return Err(format!("{op:?} on integers")),
                    },
                    (Value::Float(x), Value::Float(y)) => match op {
                        BinOp::Add => Value::Float(x + y),
                        BinOp::Sub => Value::Float(x - y),
                        BinOp::Mul => Value::Float(x * y),
                        BinOp::Div => Value::Float(x / y),
                        BinOp::Min => Value::Float(x.min(y)),
                        BinOp::Max => Value::Float(x.max(y)),
                        BinOp::Pow => Value::Float(x.powf(y)),
                        BinOp::Lt => Value::Bool(x < y),
                        BinOp::Le => Value::Bool(x <= y),
                        BinOp::Eq => Value::Bool(x == y),
                        _ => return Err(format!("{op:?} on floats")),
                    },
                    (Value::Bool(x), Value::Bool(y)) if *op == BinOp::And => Value::Bool(x && y),
                    (a, b) => return Err(format!("{op:?} on {a:?} and {b:?}")),
                }
            }
            // Only the chosen arm is evaluated, as a predicated load would.
            Expr::Select(c, a, b) => {
                if f(c)?.bool()? {
                    f(a)?
                } else {
                    f(b)?
                }
            }
        })
    }
}

fn floor_div(x: i64, y: i64) -> i64 {
    let q = x / y;
    if x % y != 0 && ((x < 0) != (y < 0)) {
        q - 1
    } else {
        q
    }
}

/// The forward tensors `run_forward` produces, flat row-major: q, k, v and o are
/// [B, S, heads, d], lse [B, Hq, S], out [B, S, E].
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOutputs {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
    pub out: Vec<f64>,
}

/// Runs the forward kernels of `spec` with their default schedules, in exact mode.
/// `weights` holds every tensor of `spec.params()` by name; `x` is [B, S, E].
pub fn run_forward(
    spec: &AttentionSpec,
    weights: &Buffers,
    x: &[f64],
    batch: usize,
    seq_len: usize,
) -> Result<ForwardOutputs, String> {
    let mut schedules = BTreeMap::new();
    for which in ForwardKernel::launched_by(spec) {
        schedules.insert(which, default_schedule(spec, which)?);
    }
    run_forward_with(
        spec,
        weights,
        x,
        batch,
        seq_len,
        &|which| schedules[&which],
        Rounding::Exact,
    )
}

/// `run_forward` with an explicit schedule for each kernel it launches, and rounding. Every
/// buffer a kernel writes that is not there yet (q, k, v, p0, o, lse, out) is allocated from
/// its parameter's shape, zero-filled.
pub fn run_forward_with(
    spec: &AttentionSpec,
    weights: &Buffers,
    x: &[f64],
    batch: usize,
    seq_len: usize,
    schedule_of: &dyn Fn(ForwardKernel) -> Schedule,
    rounding: Rounding,
) -> Result<ForwardOutputs, String> {
    let kernels = ForwardKernel::launched_by(spec)
        .into_iter()
        .map(|which| build_forward(spec, which, &schedule_of(which)))
        .collect::<Result<Vec<_>, String>>()?;
    run_kernels(spec, &kernels, weights, x, launch_sizes(batch, seq_len), rounding)
}

/// Runs `kernels` in order as one forward call of `spec` for `sizes` (the kernels of
/// [`run_forward_with`], or any that replace them with the same buffers). Every buffer a kernel
/// writes that is not there yet is allocated from its parameter's shape, zero-filled.
pub fn run_kernels(
    spec: &AttentionSpec,
    kernels: &[KernelFn],
    weights: &Buffers,
    x: &[f64],
    sizes: SizeEnv,
    rounding: Rounding,
) -> Result<ForwardOutputs, String> {
    let mut buffers = weights.clone();
    buffers.insert("x".into(), x.to_vec());
    for kernel in kernels {
        for param in &kernel.params {
            if let KernelParam::Tensor {
                name,
                shape,
                access: Access::Write,
                ..
            } = param
                && !buffers.contains_key(name)
            {
                let mut len = 1usize;
                for dim in shape {
                    let extent = dim
                        .eval(&sizes)
                        .map_err(|error| format!("{}: a dimension of {name} = {dim} {error}", kernel.name))?
                        as usize;
                    len = len
                        .checked_mul(extent)
                        .ok_or_else(|| format!("{}: buffer {name} overflows", kernel.name))?;
                }
                buffers.insert(name.clone(), vec![0.0; len]);
            }
        }
        run_kernel(kernel, &mut buffers, sizes, rounding)?;
    }
    let mut take = |name: &str| {
        buffers
            .remove(name)
            .ok_or_else(|| format!("no forward kernel of {} writes {name}", spec.name))
    };
    Ok(ForwardOutputs {
        q: take("q")?,
        k: take("k")?,
        v: take("v")?,
        o: take("o")?,
        lse: take("lse")?,
        out: take("out")?,
    })
}
