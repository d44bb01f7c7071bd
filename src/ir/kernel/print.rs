//! The stable text form of a kernel (`ccc compile --emit kernel`, the insta snapshots).

use super::expr::{binop_symbol, call_name, unop_name};
use super::*;
use std::fmt::{self, Write};

impl fmt::Display for KernelFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.print_header(&mut out);
        out.push_str("{\n");
        for stmt in &self.body {
            self.print_stmt(&mut out, stmt, 1);
        }
        out.push_str("}\n");
        f.write_str(&out)
    }
}

fn layout_text(layout: Layout) -> String {
    match layout {
        Layout::RowMajor { pad } => format!("row_major(pad {pad})"),
        Layout::Swizzled128B => "swizzled128b".to_string(),
        Layout::MmaAccumulator { warps_m, warps_n } => format!("mma_acc({warps_m}x{warps_n})"),
        Layout::MmaOperandA { warps_m, warps_n } => format!("mma_a({warps_m}x{warps_n})"),
        Layout::RowVector { warps_m, warps_n } => format!("row_vector({warps_m}x{warps_n})"),
        Layout::RowShares { warps_m, warps_n } => format!("row_shares({warps_m}x{warps_n})"),
    }
}

impl KernelFn {
    fn print_header(&self, out: &mut String) {
        let _ = writeln!(out, "kernel {}", self.name);
        out.push_str("  params (ABI order):\n");
        for (index, param) in self.params.iter().enumerate() {
            let _ = match param {
                KernelParam::Tensor {
                    name,
                    elem,
                    shape,
                    access,
                } => {
                    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                    let access = match access {
                        Access::Read => "in",
                        Access::Write => "out",
                        Access::ReadWrite => "inout",
                    };
                    writeln!(
                        out,
                        "    {index:2} {name}: {}[{}] {access}",
                        elem.name(),
                        dims.join(", ")
                    )
                }
                KernelParam::Size(var) => writeln!(out, "    {index:2} {}: u32", var.symbol()),
                KernelParam::TensorMap { name, tensor, box_rows } => {
                    writeln!(out, "    {index:2} {name}: tensor_map({tensor}, box_rows {box_rows})")
                }
            };
        }
        let _ = writeln!(
            out,
            "  grid: ({}, {}, {})  block: {} threads ({} warps)",
            self.grid[0],
            self.grid[1],
            self.grid[2],
            self.threads(),
            self.warps
        );
        if self.ctas_per_sm > 1 {
            let _ = writeln!(out, "  occupancy goal: {} CTAs per SM", self.ctas_per_sm);
        }
        let s = &self.schedule;
        let _ = writeln!(
            out,
            "  schedule: block_m={} block_n={} block_k={} warps={} stages={}",
            s.block_m, s.block_n, s.block_k, s.warps, s.stages
        );
        out.push_str("  tiles:\n");
        for tile in &self.tiles {
            let ty = &tile.ty;
            let space = match ty.space() {
                Space::Shared => "shared",
                Space::Registers => "regs  ",
            };
            let _ = write!(
                out,
                "    %{}: {space} {}[{}, {}] {}",
                tile.name,
                ty.elem.name(),
                ty.rows,
                ty.cols,
                layout_text(ty.layout)
            );
            if ty.space() == Space::Shared {
                let _ = write!(out, "  ({} B)", ty.shared_bytes());
            }
            out.push('\n');
        }
        if !self.barriers.is_empty() {
            out.push_str("  barriers:\n");
            for barrier in &self.barriers {
                let _ = writeln!(out, "    @{}[{}]: mbarrier, {} arrivals", barrier.name, barrier.slots, barrier.arrivals);
            }
        }
        let _ = writeln!(
            out,
            "  shared memory: {} of {} bytes",
            self.shared_bytes(),
            SHARED_MEMORY_LIMIT_BYTES
        );
    }

    pub(super) fn print_stmt(&self, out: &mut String, stmt: &Stmt, depth: usize) {
        let pad = "  ".repeat(depth);
        let _ = match stmt {
            Stmt::Let { var, value } => writeln!(out, "{pad}let {var} = {}", self.expr(value)),
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let _ = writeln!(
                    out,
                    "{pad}for {var} in {}..{} {{",
                    self.expr(start),
                    self.expr(end)
                );
                body.iter().for_each(|s| self.print_stmt(out, s, depth + 1));
                writeln!(out, "{pad}}}")
            }
            Stmt::If {
                cond,
                then_body,
                else_body,
            } => {
                let _ = writeln!(out, "{pad}if {} {{", self.expr(cond));
                then_body
                    .iter()
                    .for_each(|s| self.print_stmt(out, s, depth + 1));
                if !else_body.is_empty() {
                    let _ = writeln!(out, "{pad}}} else {{");
                    else_body
                        .iter()
                        .for_each(|s| self.print_stmt(out, s, depth + 1));
                }
                writeln!(out, "{pad}}}")
            }
            Stmt::Copy { dst, src, is_async } => writeln!(
                out,
                "{pad}{} {} <- {}",
                if *is_async { "cp.async" } else { "copy" },
                self.view(dst),
                self.global(src)
            ),
            Stmt::AsyncCommit => writeln!(out, "{pad}cp.async.commit"),
            Stmt::AsyncWait { pending } => writeln!(out, "{pad}cp.async.wait {pending}"),
            Stmt::Barrier => writeln!(out, "{pad}barrier"),
            Stmt::Fill { dst, value } => {
                writeln!(out, "{pad}fill {} = {}", self.view(dst), float_text(*value))
            }
            Stmt::Mma { acc, a, b, a_transposed, b_transposed } => writeln!(
                out,
                "{pad}mma {} += {}{} * {}{}",
                self.view(acc),
                self.view(a),
                if *a_transposed { "^T" } else { "" },
                self.view(b),
                if *b_transposed { "^T" } else { "" }
            ),
            Stmt::Convert { dst, src } => {
                writeln!(out, "{pad}convert {} <- {}", self.view(dst), self.view(src))
            }
            Stmt::Map { dst, expr } => {
                writeln!(out, "{pad}map {} = {}", self.view(dst), self.expr(expr))
            }
            Stmt::RowReduce {
                dst,
                src,
                op,
                value,
            } => writeln!(
                out,
                "{pad}row_{} %{} <- {} of {}",
                match op {
                    ReduceOp::Max => "max",
                    ReduceOp::Sum => "sum",
                },
                self.tile(*dst).name,
                self.view(src),
                self.expr(value)
            ),
            Stmt::Store { src, dst } => {
                writeln!(out, "{pad}store {} -> {}", self.view(src), self.global(dst))
            }
            Stmt::AtomicAdd { src, dst } => {
                writeln!(out, "{pad}atomic_add {} -> {}", self.view(src), self.global(dst))
            }
            Stmt::Note(text) => writeln!(out, "{pad}// {text}"),
            Stmt::Roles(roles) => {
                let _ = writeln!(out, "{pad}roles {{");
                for role in roles {
                    let _ = writeln!(
                        out,
                        "{pad}  role {} x{} ({} in 0..{}, {} registers) {{",
                        role.name, role.warpgroups, role.index, role.warpgroups, role.registers
                    );
                    role.body.iter().for_each(|s| self.print_stmt(out, s, depth + 2));
                    let _ = writeln!(out, "{pad}  }}");
                }
                writeln!(out, "{pad}}}")
            }
            Stmt::Elect { body } => {
                let _ = writeln!(out, "{pad}elect one thread {{");
                body.iter().for_each(|s| self.print_stmt(out, s, depth + 1));
                writeln!(out, "{pad}}}")
            }
            Stmt::TmaLoad { dst, map, coords, barrier } => {
                let coords: Vec<String> = coords.iter().map(|c| self.expr(c)).collect();
                writeln!(out, "{pad}tma {} <- {map}({}) on {}", self.view(dst), coords.join(", "), self.barrier_ref(barrier))
            }
            Stmt::ArriveExpectTx { barrier, bytes } => {
                writeln!(out, "{pad}arrive.expect_tx {} + {} bytes", self.barrier_ref(barrier), self.expr(bytes))
            }
            Stmt::Arrive { barrier } => writeln!(out, "{pad}arrive {}", self.barrier_ref(barrier)),
            Stmt::WaitParity { barrier, parity } => {
                writeln!(out, "{pad}wait {} parity {}", self.barrier_ref(barrier), self.expr(parity))
            }
            Stmt::MmaAsync { acc, a, b, a_transposed, b_transposed } => writeln!(
                out,
                "{pad}mma.async {} += {}{} * {}{}",
                self.view(acc),
                self.view(a),
                if *a_transposed { "^T" } else { "" },
                self.view(b),
                if *b_transposed { "^T" } else { "" }
            ),
            Stmt::MmaCommit => writeln!(out, "{pad}mma.commit"),
            Stmt::MmaWait { pending, after: None } => writeln!(out, "{pad}mma.wait {pending}"),
            Stmt::MmaWait { pending, after: Some(tile) } => {
                writeln!(out, "{pad}mma.wait {pending} after %{}", self.tile(*tile).name)
            }
            Stmt::NamedBarrier { id, threads, sync } => writeln!(
                out,
                "{pad}{} {} ({threads} threads)",
                if *sync { "named_barrier.sync" } else { "named_barrier.arrive" },
                self.expr(id)
            ),
        };
    }

    fn barrier_ref(&self, barrier: &BarrierRef) -> String {
        format!("@{}[{}]", self.barrier(barrier.ring).name, self.expr(&barrier.slot))
    }

    fn view(&self, view: &TileView) -> String {
        let decl = self.tile(view.tile);
        if view.is_whole(&decl.ty) {
            return format!("%{}", decl.name);
        }
        let span = |start: &Expr, len: u32, full: u32| {
            if *start == Expr::Int(0) && len == full {
                ":".to_string()
            } else {
                format!("{} .. +{len}", self.expr(start))
            }
        };
        format!(
            "%{}[{}, {}]",
            decl.name,
            span(&view.row0, view.rows, decl.ty.rows),
            span(&view.col0, view.cols, decl.ty.cols)
        )
    }

    fn global(&self, tile: &GlobalTile) -> String {
        let dims: Vec<String> = tile
            .dims
            .iter()
            .map(|dim| match dim {
                GlobalDim::At(index) => self.expr(index),
                GlobalDim::Span { start, len, valid } => {
                    let mut text = format!("{} .. +{len}", self.expr(start));
                    if let Some((lo, hi)) = valid {
                        let _ = write!(text, " within [{}, {})", self.expr(lo), self.expr(hi));
                    }
                    text
                }
            })
            .collect();
        format!("{}[{}]", tile.param, dims.join(", "))
    }

    /// An expression in infix form with the fewest parentheses that keep its meaning.
    pub fn expr(&self, expr: &Expr) -> String {
        self.expr_prec(expr, 0)
    }

    fn expr_prec(&self, expr: &Expr, min_prec: u8) -> String {
        match expr {
            Expr::Int(v) => v.to_string(),
            Expr::Float(v) => float_text(*v),
            Expr::BlockIdx(axis) => format!("blockIdx.{}", axis.name()),
            Expr::GridDim(axis) => format!("gridDim.{}", axis.name()),
            Expr::Var(name) => name.clone(),
            Expr::Size(var) => var.symbol().to_string(),
            Expr::Row => "row".into(),
            Expr::Col => "col".into(),
            Expr::Elem => "elem".into(),
            Expr::Tile { tile, row, col } => {
                let decl = self.tile(*tile);
                if decl.ty.cols == 1 && **col == Expr::Int(0) {
                    format!("%{}[{}]", decl.name, self.expr(row))
                } else {
                    format!("%{}[{}, {}]", decl.name, self.expr(row), self.expr(col))
                }
            }
            Expr::Global { param, index } => {
                let index: Vec<String> = index.iter().map(|e| self.expr(e)).collect();
                format!("{param}[{}]", index.join(", "))
            }
            Expr::Unary(op, a) => format!("{}({})", unop_name(*op), self.expr(a)),
            Expr::Binary(op, a, b) => match binop_symbol(*op) {
                Some((symbol, prec)) => {
                    // Left-associative: the right operand needs parentheses at equal precedence.
                    let text = format!(
                        "{} {symbol} {}",
                        self.expr_prec(a, prec),
                        self.expr_prec(b, prec + 1)
                    );
                    if prec < min_prec {
                        format!("({text})")
                    } else {
                        text
                    }
                }
                None => format!("{}({}, {})", call_name(*op), self.expr(a), self.expr(b)),
            },
            Expr::Select(c, a, b) => {
                format!(
                    "select({}, {}, {})",
                    self.expr(c),
                    self.expr(a),
                    self.expr(b)
                )
            }
        }
    }
}

fn float_text(v: f64) -> String {
    if v == f64::NEG_INFINITY {
        "-inf".into()
    } else if v == f64::INFINITY {
        "inf".into()
    } else {
        format!("{v:?}")
    }
}
