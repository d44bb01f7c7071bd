//! `KernelFn::verify`: types, shapes, layouts, scopes and shared-memory hazards.
//!
//! Every message starts with the statement it is about (its first printed line) so that a
//! failure points at the IR text.

use super::*;
use std::collections::BTreeSet;

/// Where an expression is evaluated: which implicit operands it may use.
#[derive(Clone, Copy)]
enum ExprCtx<'a> {
    /// Bounds, indices, conditions: no tile elements.
    Scalar,
    /// Inside `Map` (dst given) or `RowReduce` (the source given as `elem_of`).
    Elementwise { dst: &'a TileView },
}

struct Verifier<'a> {
    kernel: &'a KernelFn,
    errors: Vec<String>,
    scope: Vec<(String, ScalarType)>,
    /// Inside a role of `Roles`, and inside its `Elect`.
    in_role: bool,
    in_elect: bool,
}

impl KernelFn {
    /// Checks the function; on failure returns every problem found, one message each.
    pub fn verify(&self) -> Result<(), Vec<String>> {
        let mut v = Verifier {
            kernel: self,
            errors: Vec::new(),
            scope: Vec::new(),
            in_role: false,
            in_elect: false,
        };
        v.check_signature();
        v.check_tiles();
        v.check_block(&self.body);
        v.errors.extend(super::hazard::Hazards::check(self));
        let mut seen = BTreeSet::new();
        v.errors.retain(|e| seen.insert(e.clone()));
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(v.errors)
        }
    }

    /// The first printed line of a statement (a loop or branch without its body).
    pub(super) fn stmt_head(&self, stmt: &Stmt) -> String {
        let mut text = String::new();
        self.print_stmt(&mut text, stmt, 0);
        text.lines()
            .next()
            .unwrap_or("")
            .trim_end_matches(" {")
            .to_string()
    }
}

impl<'a> Verifier<'a> {
    fn err(&mut self, stmt: &Stmt, msg: impl std::fmt::Display) {
        let head = self.kernel.stmt_head(stmt);
        self.errors.push(format!("{head}: {msg}"));
    }

    fn check_signature(&mut self) {
        let k = self.kernel;
        let mut names = BTreeSet::new();
        for p in &k.params {
            if !names.insert(p.name().to_string()) {
                self.errors.push(format!(
                    "kernel {}: parameter {} declared twice",
                    k.name,
                    p.name()
                ));
            }
            if let KernelParam::Tensor { name, shape, .. } = p {
                if shape.is_empty() {
                    self.errors.push(format!(
                        "kernel {}: tensor {name} has no dimensions",
                        k.name
                    ));
                }
                for dim in shape {
                    self.check_size_vars(dim, &format!("shape of {name}"), &SizeVar::ALL);
                }
            }
        }
        for dim in &k.grid {
            // A grid of SMs CTAs needs no SMs parameter: the kernel reads its grid size.
            let passed: Vec<SizeVar> = SizeVar::ALL.into_iter().filter(|&var| var != SizeVar::SmCount).collect();
            self.check_size_vars(dim, "grid", &passed);
        }
        for p in &k.params {
            if let KernelParam::TensorMap { name, tensor, box_rows } = p {
                match k.param(tensor) {
                    Some(KernelParam::Tensor { shape, .. }) if (2..=4).contains(&shape.len()) => {}
                    _ => self.errors.push(format!(
                        "kernel {}: tensor map {name} describes {tensor}, which is not a tensor of 2 to 4 dimensions",
                        k.name
                    )),
                }
                if *box_rows == 0 || *box_rows > 256 {
                    self.errors.push(format!("kernel {}: tensor map {name} has a box of {box_rows} rows (1..=256)", k.name));
                }
            }
        }
        let mut barrier_names = BTreeSet::new();
        for barrier in &k.barriers {
            if !barrier_names.insert(barrier.name.clone()) {
                self.errors.push(format!("kernel {}: barrier @{} declared twice", k.name, barrier.name));
            }
            if barrier.slots == 0 || barrier.arrivals == 0 || barrier.arrivals > k.threads() {
                self.errors.push(format!(
                    "kernel {}: barrier @{} needs at least one slot and 1..={} arrivals",
                    k.name,
                    barrier.name,
                    k.threads()
                ));
            }
        }
        if k.warps == 0 || k.warps > 32 {
            self.errors.push(format!(
                "kernel {}: {} warps (must be 1..=32)",
                k.name, k.warps
            ));
        }
        let shared = k.shared_bytes();
        if !k.fits_ctas_per_sm(k.ctas_per_sm) {
            self.errors.push(format!(
                "kernel {}: {} resident CTAs per SM do not fit ({} threads and {shared} bytes of shared memory each)",
                k.name,
                k.ctas_per_sm,
                k.threads()
            ));
        }
        if shared > SHARED_MEMORY_LIMIT_BYTES {
            self.errors.push(format!(
                "kernel {}: shared memory {shared} bytes exceeds the {SHARED_MEMORY_LIMIT_BYTES}-byte limit",
                k.name
            ));
        }
    }

    /// Each of `vars` that `size` uses must be a parameter.
    fn check_size_vars(&mut self, size: &SizeExpr, what: &str, vars: &[SizeVar]) {
        for &var in vars {
            if size.uses(var) && !self.has_size_param(var) {
                self.errors.push(format!(
                    "kernel {}: {what} uses {} but it is not a parameter",
                    self.kernel.name,
                    var.symbol()
                ));
            }
        }
    }

    fn has_size_param(&self, var: SizeVar) -> bool {
        self.kernel.params.contains(&KernelParam::Size(var))
    }

    fn check_tiles(&mut self) {
        // In a warp-specialized kernel each warpgroup of a role holds its own register tiles.
        let warps = if self.kernel.has_roles() { WARPGROUP_THREADS / 32 } else { self.kernel.warps };
        let mut names = BTreeSet::new();
        for decl in &self.kernel.tiles {
            let ty = &decl.ty;
            let name = &decl.name;
            let mut bad = |msg: String| self.errors.push(format!("tile %{name}: {msg}"));
            if !names.insert(name.clone()) {
                bad("declared twice".into());
            }
            if ty.rows == 0 || ty.cols == 0 {
                bad("empty shape".into());
            }
            if ty.elem == ElemType::I32 {
                bad("i32 is for index tensors, read element by element in expressions: no tile holds it".into());
            }
            match ty.layout {
                Layout::RowMajor { .. } => {}
                Layout::Swizzled128B => {
                    if let Some(Err(error)) = ty.swizzled() {
                        bad(error.0);
                    }
                }
                Layout::MmaAccumulator { warps_m, warps_n }
                | Layout::MmaOperandA { warps_m, warps_n } => {
                    if warps_m * warps_n != warps {
                        bad(format!(
                            "warp grid {warps_m}x{warps_n} does not match {warps} warps"
                        ));
                    } else if ty.rows % (16 * warps_m) != 0 || ty.cols % (8 * warps_n) != 0 {
                        bad(format!(
                            "{}x{} over {warps_m}x{warps_n} warps is not made of 16x8 mma fragments",
                            ty.rows, ty.cols
                        ));
                    }
                    if matches!(ty.layout, Layout::MmaAccumulator { .. })
                        && ty.elem != ElemType::F32
                    {
                        bad("mma accumulators are f32".into());
                    }
                    if matches!(ty.layout, Layout::MmaOperandA { .. }) && !ty.elem.is_mma_operand()
                    {
                        bad("mma operands are bf16 or f16".into());
                    }
                }
                Layout::RowVector { warps_m, warps_n } | Layout::RowShares { warps_m, warps_n } => {
                    if warps_m * warps_n != warps {
                        bad(format!(
                            "warp grid {warps_m}x{warps_n} does not match {warps} warps"
                        ));
                    }
                    if ty.cols != 1 || ty.rows % (16 * warps_m) != 0 {
                        bad(format!(
                            "a row vector is [16k·warps_m, 1], not [{}, {}]",
                            ty.rows, ty.cols
                        ));
                    }
                }
            }
        }
    }

    fn ty(&self, view: &TileView) -> TileType {
        self.kernel.tile(view.tile).ty
    }

    /// Checks a view's offsets and bounds; returns false when the tile does not exist.
    fn check_view(&mut self, stmt: &Stmt, view: &TileView) -> bool {
        if view.tile.0 >= self.kernel.tiles.len() {
            self.err(stmt, format!("tile #{} does not exist", view.tile.0));
            return false;
        }
        let ty = self.ty(view);
        let name = self.kernel.tile(view.tile).name.clone();
        for (offset, len, extent, what) in [
            (&view.row0, view.rows, ty.rows, "rows"),
            (&view.col0, view.cols, ty.cols, "cols"),
        ] {
            self.expect_type(
                stmt,
                offset,
                ScalarType::I32,
                ExprCtx::Scalar,
                "view offset",
            );
            if len == 0 {
                self.err(stmt, format!("empty view of %{name}"));
            }
            if let Expr::Int(start) = offset
                && (*start < 0 || *start as u64 + len as u64 > extent as u64)
            {
                self.err(
                    stmt,
                    format!(
                        "{what} {start}..{} outside %{name} ({extent} {what})",
                        *start + len as i64
                    ),
                );
            }
        }
        if ty.space() == Space::Registers && !view.is_whole(&ty) {
            self.err(stmt, format!("register tile %{name} must be used whole"));
        }
        if let Some(Ok(swizzled)) = ty.swizzled() {
            let panel = swizzled.panel_cols();
            let whole_atoms = view.rows.is_multiple_of(layout::ATOM_ROWS) && view.row0.is_always_multiple_of(layout::ATOM_ROWS);
            let whole_panels = view.cols.is_multiple_of(panel) && matches!(view.col0, Expr::Int(c) if c % panel as i64 == 0);
            if !whole_atoms || !whole_panels {
                self.err(
                    stmt,
                    format!(
                        "a window of swizzled128b tile %{name} spans whole {}-row atoms and {panel}-column panels (row offset a multiple of {}, constant column offset)",
                        layout::ATOM_ROWS,
                        layout::ATOM_ROWS
                    ),
                );
            }
        }
        true
    }

    /// Swizzled tiles are written by `Copy`, TMA and `Convert` from an accumulator, and read by
    /// `Mma` only.
    fn not_swizzled(&mut self, stmt: &Stmt, view: &TileView) {
        if view.tile.0 < self.kernel.tiles.len() && self.ty(view).layout == Layout::Swizzled128B {
            let name = &self.kernel.tile(view.tile).name;
            self.err(stmt, format!("swizzled128b tile %{name} is only written by copy, TMA and convert from an accumulator, and read by mma"));
        }
    }

    fn check_global(&mut self, stmt: &Stmt, tile: &GlobalTile, access: Access) -> Option<ElemType> {
        let Some(param) = self.kernel.param(&tile.param) else {
            self.err(stmt, format!("no parameter named {}", tile.param));
            return None;
        };
        let KernelParam::Tensor {
            elem,
            shape,
            access: declared,
            ..
        } = param.clone()
        else {
            self.err(stmt, format!("{} is a size, not a tensor", tile.param));
            return None;
        };
        if elem == ElemType::I32 {
            self.err(stmt, format!("{} is an i32 index tensor: read it element by element in expressions, not as a box", tile.param));
            return None;
        }
        let allowed = if access == Access::Read { declared.reads() } else { declared.writes() };
        if !allowed {
            let verb = if access == Access::Read {
                "read"
            } else {
                "written"
            };
            self.err(
                stmt,
                format!("{} is {verb} but not declared so", tile.param),
            );
        }
        if shape.len() != tile.dims.len() {
            self.err(
                stmt,
                format!(
                    "{} has {} dimensions, indexed with {}",
                    tile.param,
                    shape.len(),
                    tile.dims.len()
                ),
            );
        }
        if tile.box_shape().is_none() {
            self.err(
                stmt,
                format!("a box of {} needs one or two spans", tile.param),
            );
        }
        for dim in &tile.dims {
            match dim {
                GlobalDim::At(index) => {
                    self.expect_type(stmt, index, ScalarType::I32, ExprCtx::Scalar, "index")
                }
                GlobalDim::Span { start, valid, .. } => {
                    self.expect_type(stmt, start, ScalarType::I32, ExprCtx::Scalar, "span start");
                    if let Some((lo, hi)) = valid {
                        self.expect_type(stmt, lo, ScalarType::I32, ExprCtx::Scalar, "bound");
                        self.expect_type(stmt, hi, ScalarType::I32, ExprCtx::Scalar, "bound");
                    }
                }
            }
        }
        Some(elem)
    }

    fn expect_type(
        &mut self,
        stmt: &Stmt,
        expr: &Expr,
        want: ScalarType,
        ctx: ExprCtx,
        what: &str,
    ) {
        match self.expr_type(expr, ctx) {
            Ok(found) if found == want => {}
            Ok(found) => self.err(
                stmt,
                format!(
                    "{what} `{}` is {found:?}, expected {want:?}",
                    self.kernel.expr(expr)
                ),
            ),
            Err(msg) => self.err(stmt, msg),
        }
    }

    fn expr_type(&self, expr: &Expr, ctx: ExprCtx) -> Result<ScalarType, String> {
        use ScalarType::*;
        let elementwise = |what: &str| match ctx {
            ExprCtx::Elementwise { .. } => Ok(()),
            ExprCtx::Scalar => Err(format!(
                "`{what}` is only defined inside map and row reductions"
            )),
        };
        Ok(match expr {
            Expr::Int(_) => I32,
            Expr::Float(_) => F32,
            Expr::BlockIdx(_) | Expr::GridDim(_) => I32,
            Expr::Var(name) => match self.scope.iter().rev().find(|(n, _)| n == name) {
                Some((_, ty)) => *ty,
                None => return Err(format!("variable {name} is not in scope")),
            },
            Expr::Size(var) => {
                if !self.has_size_param(*var) {
                    return Err(format!("size {} is not a parameter", var.symbol()));
                }
                I32
            }
            Expr::Row | Expr::Col => {
                elementwise(if *expr == Expr::Row { "row" } else { "col" })?;
                I32
            }
            Expr::Elem => {
                elementwise("x")?;
                F32
            }
            Expr::Tile { tile, row, col } => {
                let ExprCtx::Elementwise { dst, .. } = ctx else {
                    return Err("tile elements are only read inside map and row reductions".into());
                };
                self.tile_read_rule(*tile, row, col, dst)?;
                for index in [row, col] {
                    if self.expr_type(index, ctx)? != I32 {
                        return Err(format!(
                            "tile index `{}` is not i32",
                            self.kernel.expr(index)
                        ));
                    }
                }
                F32
            }
            Expr::Global { param, index } => {
                let Some(KernelParam::Tensor { shape, access, elem, .. }) = self.kernel.param(param)
                else {
                    return Err(format!("no tensor parameter named {param}"));
                };
                if !access.reads() {
                    return Err(format!("{param} is an output and cannot be read"));
                }
                if shape.len() != index.len() {
                    return Err(format!(
                        "{param} has {} dimensions, indexed with {}",
                        shape.len(),
                        index.len()
                    ));
                }
                for i in index {
                    if self.expr_type(i, ctx)? != I32 {
                        return Err(format!(
                            "index `{}` of {param} is not i32",
                            self.kernel.expr(i)
                        ));
                    }
                }
                if *elem == ElemType::I32 { I32 } else { F32 }
            }
            Expr::Unary(op, a) => {
                let ta = self.expr_type(a, ctx)?;
                match op {
                    UnOp::ToFloat if ta == I32 => F32,
                    UnOp::Exp | UnOp::Log | UnOp::Exp2 | UnOp::Log2 | UnOp::Rsqrt | UnOp::Cos | UnOp::Sin if ta == F32 => F32,
                    _ => return Err(format!("`{}` applied to {ta:?}", self.kernel.expr(expr))),
                }
            }
            Expr::Binary(op, a, b) => {
                let (ta, tb) = (self.expr_type(a, ctx)?, self.expr_type(b, ctx)?);
                let mismatch = || format!("`{}` mixes {ta:?} and {tb:?}", self.kernel.expr(expr));
                match op {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Min | BinOp::Max
                        if ta == tb && ta != Bool =>
                    {
                        ta
                    }
                    BinOp::Div | BinOp::Pow if ta == F32 && tb == F32 => F32,
                    BinOp::FloorDiv | BinOp::CeilDiv | BinOp::Mod if ta == I32 && tb == I32 => I32,
                    BinOp::Lt | BinOp::Le | BinOp::Eq if ta == tb && ta != Bool => Bool,
                    BinOp::And if ta == Bool && tb == Bool => Bool,
                    _ => return Err(mismatch()),
                }
            }
            Expr::Select(c, a, b) => {
                if self.expr_type(c, ctx)? != Bool {
                    return Err(format!(
                        "select condition `{}` is not a comparison",
                        self.kernel.expr(c)
                    ));
                }
                let (ta, tb) = (self.expr_type(a, ctx)?, self.expr_type(b, ctx)?);
                if ta != tb {
                    return Err(format!(
                        "select arms of `{}` differ: {ta:?} and {tb:?}",
                        self.kernel.expr(expr)
                    ));
                }
                ta
            }
        })
    }

    /// Which tile reads a thread can do: shared tiles anywhere (except the destination's own
    /// other elements); register tiles only where the thread holds the mapped element.
    fn tile_read_rule(
        &self,
        tile: TileId,
        row: &Expr,
        col: &Expr,
        dst: &TileView,
    ) -> Result<(), String> {
        let Some(decl) = self.kernel.tiles.get(tile.0) else {
            return Err(format!("tile #{} does not exist", tile.0));
        };
        let dst_ty = self.ty(dst);
        let name = &decl.name;
        match decl.ty.space() {
            Space::Shared => {
                if decl.ty.layout == Layout::Swizzled128B {
                    return Err(format!("swizzled128b tile %{name} is only read by mma"));
                }
                if tile == dst.tile {
                    return Err(format!(
                        "map reads its own destination %{name} by position; use x"
                    ));
                }
                Ok(())
            }
            Space::Registers => {
                if dst_ty.space() != Space::Registers {
                    return Err(format!(
                        "register tile %{name} read by a map into shared memory"
                    ));
                }
                let holds_row = decl.ty.rows == dst_ty.rows && *row == Expr::Row;
                let same_warps = |a: Layout, b: Layout| warp_grid(a) == warp_grid(b);
                let shares_into_shares =
                    matches!(dst_ty.layout, Layout::RowShares { .. }) || !matches!(decl.ty.layout, Layout::RowShares { .. });
                if !shares_into_shares {
                    return Err(format!("row shares %{name} are read only by maps into row shares (convert them to a row vector first)"));
                }
                match decl.ty.layout {
                    Layout::RowVector { .. } | Layout::RowShares { .. } => {
                        if holds_row
                            && *col == Expr::Int(0)
                            && same_warps(decl.ty.layout, dst_ty.layout)
                        {
                            Ok(())
                        } else {
                            Err(format!(
                                "row vector %{name} must be read as %{name}[row] with the destination's warp grid"
                            ))
                        }
                    }
                    layout => {
                        if holds_row
                            && *col == Expr::Col
                            && decl.ty.cols == dst_ty.cols
                            && layout == dst_ty.layout
                        {
                            Ok(())
                        } else {
                            Err(format!(
                                "register tile %{name} must be read at [row, col] with the destination's shape and layout"
                            ))
                        }
                    }
                }
            }
        }
    }

    fn check_block(&mut self, body: &[Stmt]) {
        let depth = self.scope.len();
        for (index, stmt) in body.iter().enumerate() {
            self.check_stmt(stmt);
            if let Stmt::AsyncWait { .. } = stmt
                && body.get(index + 1) != Some(&Stmt::Barrier)
            {
                self.err(
                    stmt,
                    "must be followed by a barrier so that every thread sees the copied tile",
                );
            }
        }
        self.scope.truncate(depth);
    }

    fn check_stmt(&mut self, stmt: &Stmt) {
        self.check_placement(stmt);
        match stmt {
            Stmt::Let { var, value } => {
                match self.expr_type(value, ExprCtx::Scalar) {
                    Ok(ScalarType::Bool) => self.err(stmt, "let binds i32 or f32 values"),
                    Ok(ty) => {
                        self.declare(stmt, var, ty);
                        return;
                    }
                    Err(msg) => self.err(stmt, msg),
                }
                // Keep later uses from cascading into scope errors.
                self.scope.push((var.clone(), ScalarType::I32));
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                self.expect_type(stmt, start, ScalarType::I32, ExprCtx::Scalar, "loop start");
                self.expect_type(stmt, end, ScalarType::I32, ExprCtx::Scalar, "loop end");
                let depth = self.scope.len();
                self.declare(stmt, var, ScalarType::I32);
                self.check_block(body);
                self.scope.truncate(depth);
            }
            Stmt::If {
                cond,
                then_body,
                else_body,
            } => {
                self.expect_type(stmt, cond, ScalarType::Bool, ExprCtx::Scalar, "condition");
                self.check_block(then_body);
                self.check_block(else_body);
            }
            Stmt::Copy { dst, src, is_async } => {
                if !self.check_view(stmt, dst) {
                    return;
                }
                let ty = self.ty(dst);
                if ty.space() != Space::Shared {
                    self.err(stmt, "copies from global memory go to shared tiles");
                }
                if let Some(elem) = self.check_global(stmt, src, Access::Read) {
                    if elem != ty.elem {
                        self.err(
                            stmt,
                            format!(
                                "copy of {} into {} does not convert",
                                elem.name(),
                                ty.elem.name()
                            ),
                        );
                    }
                    if *is_async {
                        let contiguous = matches!(src.dims.last(), Some(GlobalDim::Span { .. }))
                            && src.box_shape().is_some_and(|(_, cols)| cols > 1);
                        if !contiguous
                            || !(dst.cols as usize * elem.size_bytes()).is_multiple_of(16)
                        {
                            self.err(stmt, "cp.async needs rows of whole 16-byte chunks along the innermost dimension");
                        }
                    }
                }
                if let Some(shape) = src.box_shape()
                    && shape != (dst.rows, dst.cols)
                {
                    self.err(
                        stmt,
                        format!(
                            "box {}x{} into view {}x{}",
                            shape.0, shape.1, dst.rows, dst.cols
                        ),
                    );
                }
            }
            Stmt::AsyncCommit | Stmt::AsyncWait { .. } | Stmt::Barrier | Stmt::Note(_) => {}
            Stmt::Fill { dst, value } => {
                self.not_swizzled(stmt, dst);
                if self.check_view(stmt, dst) && matches!(self.ty(dst).layout, Layout::RowShares { .. }) && *value != 0.0 {
                    self.err(stmt, "row shares start at 0 (each thread's share of another value is not defined)");
                }
            }
            Stmt::Mma { acc, a, b, a_transposed, b_transposed } => {
                self.check_mma(stmt, acc, a, b, *a_transposed, *b_transposed)
            }
            Stmt::Convert { dst, src } => {
                if !(self.check_view(stmt, dst) && self.check_view(stmt, src)) {
                    return;
                }
                let (td, ts) = (self.ty(dst), self.ty(src));
                if (dst.rows, dst.cols) != (src.rows, src.cols) {
                    self.err(
                        stmt,
                        format!(
                            "shapes {}x{} and {}x{} differ",
                            dst.rows, dst.cols, src.rows, src.cols
                        ),
                    );
                }
                match (ts.layout, td.layout) {
                    (Layout::MmaAccumulator { .. }, Layout::RowMajor { .. }) => {}
                    // The operand of a later wgmma (dS of the attention backward, read transposed).
                    (Layout::MmaAccumulator { .. }, Layout::Swizzled128B) if td.elem.is_mma_operand() => {}
                    (Layout::MmaAccumulator { .. }, Layout::MmaOperandA { .. })
                    | (Layout::RowShares { .. }, Layout::RowVector { .. })
                        if warp_grid(ts.layout) == warp_grid(td.layout) => {}
                    (from, to) => self.err(
                        stmt,
                        format!("no conversion from {from:?} to {to:?} (accumulator → shared, 16-bit swizzled included, or → operand A)"),
                    ),
                }
            }
            Stmt::Map { dst, expr } => {
                self.not_swizzled(stmt, dst);
                if !self.check_view(stmt, dst) {
                    return;
                }
                let ctx = ExprCtx::Elementwise { dst };
                self.expect_type(stmt, expr, ScalarType::F32, ctx, "map value");
                if matches!(self.ty(dst).layout, Layout::RowShares { .. }) && self.share_degree(expr) != Some(ShareDegree::Linear) {
                    self.err(stmt, "a map into row shares must be linear in shares: each term a share (elem or another row-shares tile at [row]) times a row-uniform factor, no constant term");
                }
            }
            Stmt::RowReduce {
                dst, src, value, op
            } => {
                if dst.0 >= self.kernel.tiles.len() {
                    self.err(stmt, format!("tile #{} does not exist", dst.0));
                    return;
                }
                if !self.check_view(stmt, src) {
                    return;
                }
                let (td, ts) = (self.kernel.tile(*dst).ty, self.ty(src));
                let into_rows = match td.layout {
                    Layout::RowVector { .. } => true,
                    Layout::RowShares { .. } => *op == ReduceOp::Sum,
                    _ => false,
                };
                let ok = into_rows
                    && matches!(ts.layout, Layout::MmaAccumulator { .. })
                    && warp_grid(td.layout) == warp_grid(ts.layout)
                    && td.rows == ts.rows;
                if !ok {
                    self.err(stmt, "reduces an mma accumulator into a row vector (or row shares, by sum) of the same rows and warp grid");
                }
                // Warps split along the columns combine their parts through shared memory
                // between two CTA barriers.
                if let Layout::MmaAccumulator { warps_n, .. } = ts.layout
                    && warps_n > 1
                    && (self.in_role || !matches!(td.layout, Layout::RowVector { .. }))
                {
                    self.err(stmt, format!("a row reduction over warps split {warps_n} ways along the columns needs the whole CTA and a row vector (not inside a role, not into row shares)"));
                }
                let ctx = ExprCtx::Elementwise { dst: src };
                self.expect_type(stmt, value, ScalarType::F32, ctx, "reduced value");
            }
            Stmt::Roles(roles) => self.check_roles(stmt, roles),
            Stmt::Elect { body } => {
                let outer = self.in_elect;
                self.in_elect = true;
                self.check_block(body);
                self.check_transaction_bytes(body);
                self.in_elect = outer;
            }
            Stmt::TmaLoad { dst, map, coords, barrier } => self.check_tma(stmt, dst, map, coords, barrier),
            Stmt::ArriveExpectTx { barrier, bytes } => {
                self.check_barrier(stmt, barrier);
                self.expect_type(stmt, bytes, ScalarType::I32, ExprCtx::Scalar, "transaction bytes");
            }
            Stmt::Arrive { barrier } => self.check_barrier(stmt, barrier),
            Stmt::WaitParity { barrier, parity } => {
                self.check_barrier(stmt, barrier);
                self.expect_type(stmt, parity, ScalarType::I32, ExprCtx::Scalar, "parity");
                self.check_parity(stmt, barrier, parity);
            }
            Stmt::MmaAsync { acc, a, b, a_transposed, b_transposed } => {
                self.check_mma(stmt, acc, a, b, *a_transposed, *b_transposed);
                if b.tile.0 < self.kernel.tiles.len() && self.ty(b).layout != Layout::Swizzled128B {
                    self.err(stmt, "an asynchronous mma is a wgmma: operand b must be a swizzled128b tile");
                }
            }
            Stmt::MmaCommit | Stmt::MmaWait { after: None, .. } => {}
            Stmt::MmaWait { after: Some(tile), .. } => {
                if tile.0 >= self.kernel.tiles.len() {
                    self.err(stmt, format!("tile #{} does not exist", tile.0));
                    return;
                }
                let ty = self.kernel.tile(*tile).ty;
                if ty.space() != Space::Registers || ty.elem != ElemType::F32 {
                    self.err(stmt, format!("mma.wait after %{}: an f32 register tile", self.kernel.tile(*tile).name));
                }
            }
            Stmt::NamedBarrier { id, threads, .. } => {
                self.expect_type(stmt, id, ScalarType::I32, ExprCtx::Scalar, "barrier id");
                if let Expr::Int(id) = id
                    && !(1..16).contains(id)
                {
                    self.err(stmt, format!("named barrier {id} is not in 1..16 (0 is the CTA barrier)"));
                }
                if *threads == 0 || !threads.is_multiple_of(WARPGROUP_THREADS) || *threads > self.kernel.threads() {
                    self.err(
                        stmt,
                        format!("{threads} threads: whole warpgroups of the kernel's {}", self.kernel.threads()),
                    );
                }
            }
            Stmt::AtomicAdd { src, dst } => {
                if !self.check_view(stmt, src) {
                    return;
                }
                let ty = self.ty(src);
                if ty.elem != ElemType::F32 || !matches!(ty.layout, Layout::MmaAccumulator { .. }) {
                    self.err(stmt, format!("atomic_add adds an f32 accumulator tile, not %{}", self.kernel.tile(src.tile).name));
                }
                if let Some(elem) = self.check_global(stmt, dst, Access::Write)
                    && elem != ElemType::F32
                {
                    self.err(stmt, format!("atomic_add adds into f32 tensors, not {} `{}`", elem.name(), dst.param));
                }
                if let Some(shape) = dst.box_shape()
                    && shape != (src.rows, src.cols)
                {
                    self.err(stmt, format!("view {}x{} into box {}x{}", src.rows, src.cols, shape.0, shape.1));
                }
            }
            Stmt::Store { src, dst } => {
                self.not_swizzled(stmt, src);
                if !self.check_view(stmt, src) {
                    return;
                }
                self.check_global(stmt, dst, Access::Write);
                if let Some(shape) = dst.box_shape()
                    && shape != (src.rows, src.cols)
                {
                    self.err(
                        stmt,
                        format!(
                            "view {}x{} into box {}x{}",
                            src.rows, src.cols, shape.0, shape.1
                        ),
                    );
                }
            }
        }
    }

    /// Where each statement may stand: roles at the top of the body, the Hopper synchronization
    /// inside roles, only scalar, TMA and mbarrier statements on the one thread of `Elect`, and
    /// no CTA-wide synchronization (or cp.async groups) inside roles.
    fn check_placement(&mut self, stmt: &Stmt) {
        let role_only = matches!(
            stmt,
            Stmt::Elect { .. }
                | Stmt::MmaAsync { .. }
                | Stmt::MmaCommit
                | Stmt::MmaWait { .. }
                | Stmt::NamedBarrier { .. }
        );
        if role_only && !self.in_role {
            self.err(stmt, "only inside a role of `roles`");
        }
        if matches!(stmt, Stmt::TmaLoad { .. } | Stmt::ArriveExpectTx { .. }) && !self.in_elect {
            self.err(stmt, "issued by one thread: only inside `elect`");
        }
        let single_thread_ok = matches!(
            stmt,
            Stmt::Let { .. }
                | Stmt::For { .. }
                | Stmt::If { .. }
                | Stmt::Note(_)
                | Stmt::TmaLoad { .. }
                | Stmt::ArriveExpectTx { .. }
                | Stmt::Arrive { .. }
                | Stmt::WaitParity { .. }
        );
        if self.in_elect && !single_thread_ok {
            self.err(stmt, "one thread of `elect` runs only scalar, TMA and mbarrier statements");
        }
        let cta_wide = matches!(
            stmt,
            Stmt::Barrier | Stmt::AsyncCommit | Stmt::AsyncWait { .. } | Stmt::Copy { is_async: true, .. } | Stmt::Roles(_)
        );
        if self.in_role && cta_wide {
            self.err(stmt, "inside a role, warpgroups synchronize through mbarriers and named barriers only");
        }
    }

    fn check_roles(&mut self, stmt: &Stmt, roles: &[Role]) {
        let kernel = self.kernel;
        let warpgroups: u32 = roles.iter().map(|role| role.warpgroups).sum();
        if roles.is_empty() || warpgroups * WARPGROUP_THREADS != kernel.threads() {
            self.err(
                stmt,
                format!("the roles hold {warpgroups} warpgroups; the kernel's {} threads are {}", kernel.threads(), kernel.threads() / WARPGROUP_THREADS),
            );
        }
        // `setmaxnreg` only moves registers within the CTA's allotment (what the entry's
        // `.maxntid` gives each thread, rounded down to ptxas' unit of 8); a role asking for
        // more than the others gave back waits forever.
        let allotment = (REGISTERS_PER_CTA / kernel.threads().max(1)) / 8 * 8;
        let budget: u32 = roles.iter().map(|role| role.warpgroups * role.registers).sum();
        if budget > allotment * warpgroups {
            self.err(
                stmt,
                format!("register budgets of {budget} per warpgroup row exceed the CTA's {} ({allotment} per thread)", allotment * warpgroups),
            );
        }
        for role in roles {
            if role.warpgroups == 0 {
                self.err(stmt, format!("role {} has no warpgroup", role.name));
            }
            if !(24..=256).contains(&role.registers) || !role.registers.is_multiple_of(8) {
                self.err(stmt, format!("role {}: setmaxnreg takes a multiple of 8 in 24..=256, not {}", role.name, role.registers));
            }
            let depth = self.scope.len();
            self.declare(stmt, &role.index, ScalarType::I32);
            self.in_role = true;
            self.check_block(&role.body);
            self.in_role = false;
            self.scope.truncate(depth);
        }
    }

    fn check_barrier(&mut self, stmt: &Stmt, barrier: &BarrierRef) {
        let Some(ring) = self.kernel.barriers.get(barrier.ring.0) else {
            self.err(stmt, format!("barrier ring #{} does not exist", barrier.ring.0));
            return;
        };
        self.expect_type(stmt, &barrier.slot, ScalarType::I32, ExprCtx::Scalar, "barrier slot");
        // A ring is indexed by its use count n as n % slots.
        if let Expr::Binary(BinOp::Mod, _, modulus) = &barrier.slot
            && **modulus != Expr::Int(ring.slots as i64)
        {
            self.err(
                stmt,
                format!("slot of @{} taken modulo {}, but the ring has {} slots", ring.name, self.kernel.expr(modulus), ring.slots),
            );
        }
    }

    /// Use n of a ring's slot n % slots is that slot's phase n / slots: a wait on it names the
    /// parity (n / slots) % 2 of the same n. (A slot given as a constant may wait on any parity.)
    fn check_parity(&mut self, stmt: &Stmt, barrier: &BarrierRef, parity: &Expr) {
        let Some(ring) = self.kernel.barriers.get(barrier.ring.0) else { return };
        let slots = Expr::Int(ring.slots as i64);
        match &barrier.slot {
            Expr::Int(_) => {}
            Expr::Binary(BinOp::Mod, use_count, _) => {
                let want = Expr::binary(
                    BinOp::Mod,
                    Expr::binary(BinOp::FloorDiv, (**use_count).clone(), slots),
                    Expr::Int(2),
                );
                if *parity != want {
                    self.err(
                        stmt,
                        format!(
                            "waits for parity `{}` on slot `{}`: the phase of use n of a slot is (n / {}) % 2, `{}`",
                            self.kernel.expr(parity),
                            self.kernel.expr(&barrier.slot),
                            ring.slots,
                            self.kernel.expr(&want)
                        ),
                    );
                }
            }
            other => self.err(
                stmt,
                format!("slot `{}` of @{} is neither a constant nor n % {}", self.kernel.expr(other), ring.name, ring.slots),
            ),
        }
    }

    fn check_tma(&mut self, stmt: &Stmt, dst: &TileView, map: &str, coords: &[Expr], barrier: &BarrierRef) {
        self.check_barrier(stmt, barrier);
        for coord in coords {
            self.expect_type(stmt, coord, ScalarType::I32, ExprCtx::Scalar, "coordinate");
        }
        if !self.check_view(stmt, dst) {
            return;
        }
        let ty = self.ty(dst);
        let Some(Ok(swizzled)) = ty.swizzled() else {
            self.err(stmt, "TMA writes swizzled128b shared tiles");
            return;
        };
        let Some(KernelParam::TensorMap { tensor, box_rows, .. }) = self.kernel.param(map).cloned() else {
            self.err(stmt, format!("{map} is not a tensor map parameter"));
            return;
        };
        if let Some(KernelParam::Tensor { elem, shape, .. }) = self.kernel.param(&tensor).cloned() {
            if elem != ty.elem {
                self.err(stmt, format!("{tensor} holds {}, the tile {}", elem.name(), ty.elem.name()));
            }
            if shape.len() != coords.len() {
                self.err(stmt, format!("{tensor} has {} dimensions, {} coordinates given", shape.len(), coords.len()));
            }
        }
        if dst.rows != box_rows || !dst.cols.is_multiple_of(swizzled.panel_cols()) {
            self.err(
                stmt,
                format!(
                    "a view of {}x{} is not whole boxes of {box_rows} rows x {} columns",
                    dst.rows,
                    dst.cols,
                    swizzled.panel_cols()
                ),
            );
        }
    }

    /// Within one block of `elect`, an `arrive.expect_tx` with constant bytes must expect what
    /// the TMA copies of that block count on the same barrier slot.
    fn check_transaction_bytes(&mut self, body: &[Stmt]) {
        for stmt in body {
            match stmt {
                Stmt::For { body, .. } => self.check_transaction_bytes(body),
                Stmt::If { then_body, else_body, .. } => {
                    self.check_transaction_bytes(then_body);
                    self.check_transaction_bytes(else_body);
                }
                _ => {}
            }
        }
        for stmt in body {
            let Stmt::ArriveExpectTx { barrier, bytes: Expr::Int(bytes) } = stmt else { continue };
            let copied: i64 = body
                .iter()
                .filter_map(|other| match other {
                    Stmt::TmaLoad { dst, barrier: target, .. } if target == barrier && dst.tile.0 < self.kernel.tiles.len() => {
                        Some((dst.rows * dst.cols) as i64 * self.ty(dst).elem.size_bytes() as i64)
                    }
                    _ => None,
                })
                .sum();
            if copied != *bytes {
                self.err(stmt, format!("expects {bytes} bytes, the TMA copies of its block on that barrier bring {copied}"));
            }
        }
    }

    fn declare(&mut self, stmt: &Stmt, var: &str, ty: ScalarType) {
        if self.scope.iter().any(|(n, _)| n == var) {
            self.err(stmt, format!("{var} shadows a variable in scope"));
        }
        self.scope.push((var.to_string(), ty));
    }

    fn check_mma(
        &mut self,
        stmt: &Stmt,
        acc: &TileView,
        a: &TileView,
        b: &TileView,
        a_transposed: bool,
        b_transposed: bool,
    ) {
        if !(self.check_view(stmt, acc) && self.check_view(stmt, a) && self.check_view(stmt, b)) {
            return;
        }
        // A transposed A is read from shared memory: by ldmatrix.trans from a row-major tile
        // (mma.sync, b row-major too), or MN-major by wgmma from a swizzled one (b swizzled).
        if a_transposed {
            let (la, lb) = (self.ty(a).layout, self.ty(b).layout);
            let mma_sync = matches!(la, Layout::RowMajor { .. }) && lb != Layout::Swizzled128B;
            let wgmma = la == Layout::Swizzled128B && lb == Layout::Swizzled128B;
            if !(mma_sync || wgmma) {
                self.err(
                    stmt,
                    "a transposed operand a must be a row-major shared tile with a row-major b (mma.sync) or a swizzled128b tile with a swizzled128b b (wgmma)",
                );
            }
        }
        let (a_m, a_k) = if a_transposed { (a.cols, a.rows) } else { (a.rows, a.cols) };
        let (tc, ta, tb) = (self.ty(acc), self.ty(a), self.ty(b));
        if !matches!(tc.layout, Layout::MmaAccumulator { .. }) {
            self.err(stmt, "the accumulator must be an mma_acc register tile");
        }
        if tb.layout == Layout::Swizzled128B {
            self.check_wgmma(stmt, acc, &tc, &ta);
        } else if ta.layout == Layout::Swizzled128B {
            self.err(stmt, "a swizzled128b operand a needs a swizzled128b operand b (wgmma)");
        }
        match ta.layout {
            Layout::RowMajor { .. } | Layout::Swizzled128B => {}
            Layout::MmaOperandA { .. } if warp_grid(ta.layout) == warp_grid(tc.layout) => {}
            _ => self.err(
                stmt,
                "operand a must be shared or an mma_a tile with the accumulator's warp grid",
            ),
        }
        if tb.space() != Space::Shared {
            self.err(stmt, "operand b must be a shared tile");
        }
        if !ta.elem.is_mma_operand() || ta.elem != tb.elem {
            self.err(
                stmt,
                format!(
                    "operands {} and {} (need the same 16-bit type)",
                    ta.elem.name(),
                    tb.elem.name()
                ),
            );
        }
        let (b_k, b_n) = if b_transposed {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if a_m != acc.rows {
            self.err(stmt, format!("M of a ({a_m}) != M of acc ({})", acc.rows));
        }
        if b_n != acc.cols {
            self.err(stmt, format!("N of b ({b_n}) != N of acc ({})", acc.cols));
        }
        if a_k != b_k {
            self.err(stmt, format!("K of a ({a_k}) != K of b ({b_k})"));
        }
        if !a_k.is_multiple_of(16) {
            self.err(stmt, format!("K = {a_k} is not a multiple of 16 (m16n8k16)"));
        }
        // mma.sync reads B in 16-column ldmatrix pairs per warp.
        if let Layout::MmaAccumulator { warps_n, .. } = tc.layout
            && tb.layout != Layout::Swizzled128B
            && !(acc.cols / warps_n.max(1)).is_multiple_of(16)
        {
            self.err(stmt, format!("each warp's N extent ({} columns over {warps_n} warps) is not a multiple of 16", acc.cols));
        }
    }
}

impl Verifier<'_> {
    /// An `Mma` with a swizzled B is one wgmma m64nNk16 per warpgroup and k16 step
    /// (`layout::wgmma_band_error`, `layout::wgmma_width_error`).
    fn check_wgmma(&mut self, stmt: &Stmt, acc: &TileView, tc: &TileType, ta: &TileType) {
        if let Layout::MmaAccumulator { warps_m, warps_n } = tc.layout
            && let Some(error) = layout::wgmma_band_error(warps_m, warps_n, tc.rows)
        {
            self.err(stmt, error);
        }
        if let Some(error) = layout::wgmma_width_error(acc.cols) {
            self.err(stmt, error);
        }
        if !matches!(ta.layout, Layout::Swizzled128B | Layout::MmaOperandA { .. }) {
            self.err(stmt, "wgmma reads operand a from a swizzled128b tile or mma_a registers");
        }
    }
}

/// How an expression of a map into row shares depends on the shares: not at all (the same for
/// every thread of a row), or linearly (so that the threads' results add up to the row's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShareDegree {
    Uniform,
    Linear,
}

impl Verifier<'_> {
    fn share_degree(&self, expr: &Expr) -> Option<ShareDegree> {
        use ShareDegree::{Linear, Uniform};
        let both = |a: &Expr, b: &Expr| Some((self.share_degree(a)?, self.share_degree(b)?));
        match expr {
            Expr::Elem => Some(Linear),
            Expr::Col => None,
            Expr::Tile { tile, .. } => match self.kernel.tiles.get(tile.0)?.ty.layout {
                Layout::RowShares { .. } => Some(Linear),
                _ => Some(Uniform),
            },
            Expr::Unary(_, a) => (self.share_degree(a)? == Uniform).then_some(Uniform),
            Expr::Binary(BinOp::Add | BinOp::Sub, a, b) => match both(a, b)? {
                (x, y) if x == y => Some(x),
                _ => None,
            },
            Expr::Binary(BinOp::Mul, a, b) => match both(a, b)? {
                (Uniform, Uniform) => Some(Uniform),
                (Linear, Linear) => None,
                _ => Some(Linear),
            },
            Expr::Binary(BinOp::Div, a, b) => match both(a, b)? {
                (degree, Uniform) => Some(degree),
                _ => None,
            },
            Expr::Binary(_, a, b) => (both(a, b)? == (Uniform, Uniform)).then_some(Uniform),
            Expr::Select(c, a, b) => {
                if self.share_degree(c)? != Uniform {
                    return None;
                }
                match both(a, b)? {
                    (x, y) if x == y => Some(x),
                    _ => None,
                }
            }
            _ => Some(Uniform),
        }
    }
}

fn warp_grid(layout: Layout) -> Option<(u32, u32)> {
    match layout {
        Layout::RowMajor { .. } | Layout::Swizzled128B => None,
        Layout::MmaAccumulator { warps_m, warps_n }
        | Layout::MmaOperandA { warps_m, warps_n }
        | Layout::RowVector { warps_m, warps_n }
        | Layout::RowShares { warps_m, warps_n } => Some((warps_m, warps_n)),
    }
}
