//! Shared-memory races, found by abstract interpretation of the body.
//!
//! The state after each statement records which rows of which shared tiles have cp.async copies
//! in flight (uncommitted, then in commit groups, oldest first), and which were written or read
//! by some threads since the last barrier. Rows are concrete where a view's offset can be
//! computed (constants, and loop variables of loops with a constant start, which are unrolled
//! for `UNROLLED_ITERATIONS` iterations so that ring buffers indexed by `i % stages` are told
//! apart); otherwise the whole tile counts.

use super::*;
use std::collections::BTreeSet;

/// Enough iterations to see every phase of a ring of 1, 2, 3 or 4 buffers.
const UNROLLED_ITERATIONS: i64 = 12;

/// Rows [start, end) of a shared tile, or all of it when the offset is not known here.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Region {
    tile: TileId,
    rows: Option<(i64, i64)>,
}

impl Region {
    fn overlaps(&self, other: &Region) -> bool {
        self.tile == other.tile
            && match (self.rows, other.rows) {
                (Some(a), Some(b)) => a.0 < b.1 && b.0 < a.1,
                _ => true,
            }
    }
}

#[derive(Clone, Default)]
struct State {
    uncommitted: BTreeSet<Region>,
    /// Committed cp.async groups, oldest first.
    groups: Vec<BTreeSet<Region>>,
    written: BTreeSet<Region>,
    read: BTreeSet<Region>,
}

impl State {
    /// What holds on either path: every region that may be in flight, written or read; group
    /// queues aligned at their newest group.
    fn merge(mut self, other: State) -> State {
        self.uncommitted.extend(other.uncommitted);
        self.written.extend(other.written);
        self.read.extend(other.read);
        let (mut longer, shorter) = if self.groups.len() >= other.groups.len() {
            (std::mem::take(&mut self.groups), other.groups)
        } else {
            (other.groups, std::mem::take(&mut self.groups))
        };
        let skip = longer.len() - shorter.len();
        for (group, extra) in longer[skip..].iter_mut().zip(shorter) {
            group.extend(extra);
        }
        self.groups = longer;
        self
    }

    fn in_flight(&self, region: &Region) -> bool {
        self.uncommitted
            .iter()
            .chain(self.groups.iter().flatten())
            .any(|r| r.overlaps(region))
    }
}

pub(super) struct Hazards<'k> {
    kernel: &'k KernelFn,
    /// Values of the lets and loop variables in scope, where known.
    known: Vec<(&'k str, Option<i64>)>,
    pub errors: Vec<String>,
}

impl<'k> Hazards<'k> {
    pub fn check(kernel: &'k KernelFn) -> Vec<String> {
        let mut h = Hazards {
            kernel,
            known: Vec::new(),
            errors: Vec::new(),
        };
        let end = h.block(&kernel.body, State::default());
        let pending: BTreeSet<&str> = end
            .uncommitted
            .iter()
            .chain(end.groups.iter().flatten())
            .map(|r| kernel.tile(r.tile).name.as_str())
            .collect();
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|n| format!("%{n}")).collect();
            h.errors.push(format!(
                "kernel {}: cp.async into {} never waited for",
                kernel.name,
                names.join(", ")
            ));
        }
        h.errors
    }

    fn err(&mut self, stmt: &Stmt, msg: String) {
        let head = self.kernel.stmt_head(stmt);
        self.errors.push(format!("{head}: {msg}"));
    }

    fn value(&self, expr: &Expr) -> Option<i64> {
        let v = |e: &Expr| self.value(e);
        match expr {
            Expr::Int(i) => Some(*i),
            Expr::Var(name) => self.known.iter().rev().find(|(n, _)| n == name)?.1,
            Expr::Binary(op, a, b) => {
                let (a, b) = (v(a)?, v(b)?);
                match op {
                    BinOp::Add => a.checked_add(b),
                    BinOp::Sub => a.checked_sub(b),
                    BinOp::Mul => a.checked_mul(b),
                    BinOp::FloorDiv if b != 0 => Some(a.div_euclid(b)),
                    BinOp::Mod if b > 0 => Some(a.rem_euclid(b)),
                    BinOp::Min => Some(a.min(b)),
                    BinOp::Max => Some(a.max(b)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn truth(&self, cond: &Expr) -> Option<bool> {
        match cond {
            Expr::Binary(BinOp::And, a, b) => match (self.truth(a), self.truth(b)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Binary(op @ (BinOp::Lt | BinOp::Le | BinOp::Eq), a, b) => {
                let (a, b) = (self.value(a)?, self.value(b)?);
                Some(match op {
                    BinOp::Lt => a < b,
                    BinOp::Le => a <= b,
                    _ => a == b,
                })
            }
            _ => None,
        }
    }

    /// The shared rows a view covers; None for register tiles.
    fn region(&self, view: &TileView) -> Option<Region> {
        let ty = &self.kernel.tiles.get(view.tile.0)?.ty;
        (ty.space() == Space::Shared).then(|| Region {
            tile: view.tile,
            rows: self
                .value(&view.row0)
                .map(|start| (start, start + view.rows as i64)),
        })
    }

    fn block(&mut self, body: &'k [Stmt], mut state: State) -> State {
        let depth = self.known.len();
        for stmt in body {
            state = match stmt {
                Stmt::Let { var, value } => {
                    let v = self.value(value);
                    self.known.push((var, v));
                    state
                }
                Stmt::For {
                    var,
                    start,
                    end,
                    body,
                } => self.for_loop(var, start, end, body, state),
                Stmt::If {
                    cond,
                    then_body,
                    else_body,
                } => match self.truth(cond) {
                    Some(true) => self.block(then_body, state),
                    Some(false) => self.block(else_body, state),
                    None => {
                        let taken = self.block(then_body, state.clone());
                        taken.merge(self.block(else_body, state))
                    }
                },
                _ => {
                    self.stmt(stmt, &mut state);
                    state
                }
            };
        }
        self.known.truncate(depth);
        state
    }

    /// Unrolls the first iterations (concrete values of `var` when the start is known), so that
    /// what one iteration leaves in flight is checked against the next ones. When the end is a
    /// variable not known here, each iteration is also run as the last one (end = var + 1), so
    /// that copies guarded by "is there a next tile" are not taken to outlive the loop.
    fn for_loop(
        &mut self,
        var: &'k str,
        start: &Expr,
        end_expr: &'k Expr,
        body: &'k [Stmt],
        state: State,
    ) -> State {
        let (start, end) = (self.value(start), self.value(end_expr));
        let iterations: Vec<Option<i64>> = match start {
            Some(s) => {
                let last = end.map_or(s + UNROLLED_ITERATIONS, |e| e.min(s + UNROLLED_ITERATIONS));
                (s..last).map(Some).collect()
            }
            None => vec![None, None],
        };
        let may_skip = !matches!((start, end), (Some(s), Some(e)) if e > s);
        let mut exits = Vec::new();
        if may_skip {
            exits.push(state.clone());
        }
        let unknown_end = match end_expr {
            Expr::Var(name) if end.is_none() => Some(name.as_str()),
            _ => None,
        };
        // A constant trip count within the unrolled iterations leaves only after the last one.
        let exact = matches!((start, end), (Some(s), Some(e)) if e - s <= UNROLLED_ITERATIONS);
        let mut state = state;
        for value in iterations {
            self.known.push((var, value));
            if let (Some(end_var), Some(v)) = (unknown_end, value) {
                self.known.push((end_var, Some(v + 1)));
                exits.push(self.block(body, state.clone()));
                self.known.pop();
                state = self.block(body, state);
            } else {
                state = self.block(body, state);
                if !exact {
                    exits.push(state.clone());
                }
            }
            self.known.pop();
        }
        if exact {
            exits.push(state.clone());
        }
        exits.into_iter().reduce(State::merge).unwrap_or(state)
    }

    fn stmt(&mut self, stmt: &Stmt, state: &mut State) {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        let shared_reads = |e: &Expr, reads: &mut Vec<Region>| {
            e.visit(&mut |sub| {
                if let Expr::Tile { tile, .. } = sub
                    && self
                        .kernel
                        .tiles
                        .get(tile.0)
                        .is_some_and(|t| t.ty.space() == Space::Shared)
                {
                    reads.push(Region {
                        tile: *tile,
                        rows: None,
                    });
                }
            })
        };
        match stmt {
            Stmt::Copy {
                dst,
                is_async: true,
                ..
            } => {
                if let Some(region) = self.region(dst) {
                    self.check_write(stmt, &region, state);
                    state.uncommitted.insert(region);
                }
                return;
            }
            Stmt::AsyncCommit => {
                let group = std::mem::take(&mut state.uncommitted);
                state.groups.push(group);
                return;
            }
            Stmt::AsyncWait { pending } => {
                while state.groups.len() > *pending as usize {
                    let landed = state.groups.remove(0);
                    state.written.extend(landed);
                }
                return;
            }
            Stmt::Barrier => {
                state.written.clear();
                state.read.clear();
                return;
            }
            Stmt::Copy { dst, .. } | Stmt::Fill { dst, .. } => writes.extend(self.region(dst)),
            Stmt::Mma { acc, a, b, .. } => {
                reads.extend(self.region(a));
                reads.extend(self.region(b));
                writes.extend(self.region(acc));
            }
            Stmt::Convert { dst, src } => {
                reads.extend(self.region(src));
                writes.extend(self.region(dst));
            }
            Stmt::Map { dst, expr } => {
                shared_reads(expr, &mut reads);
                if let Some(region) = self.region(dst) {
                    let mut uses_elem = false;
                    expr.visit(&mut |e| uses_elem |= *e == Expr::Elem);
                    if uses_elem && state.written.iter().any(|w| w.overlaps(&region)) {
                        let name = &self.kernel.tile(region.tile).name;
                        self.err(
                            stmt,
                            format!("reads %{name} after another write without a barrier"),
                        );
                    }
                    writes.push(region);
                }
            }
            Stmt::RowReduce { src, value, .. } => {
                reads.extend(self.region(src));
                shared_reads(value, &mut reads);
            }
            Stmt::Store { src, .. } | Stmt::AtomicAdd { src, .. } => reads.extend(self.region(src)),
            Stmt::Let { .. } | Stmt::For { .. } | Stmt::If { .. } | Stmt::Note(_) => return,
            // Warpgroups of different roles order their accesses through mbarriers and named
            // barriers, which this analysis does not follow: the interpreter checks role bodies
            // as it runs them (copies land only when their barrier is waited for, and a wgmma
            // group's operands may not be overwritten while it is in flight).
            Stmt::Roles(_)
            | Stmt::Elect { .. }
            | Stmt::TmaLoad { .. }
            | Stmt::ArriveExpectTx { .. }
            | Stmt::Arrive { .. }
            | Stmt::WaitParity { .. }
            | Stmt::MmaAsync { .. }
            | Stmt::MmaCommit
            | Stmt::MmaWait { .. }
            | Stmt::NamedBarrier { .. } => return,
        }
        for region in reads {
            let name = &self.kernel.tile(region.tile).name;
            if state.in_flight(&region) {
                self.err(
                    stmt,
                    format!("reads %{name} before its cp.async is waited for"),
                );
            } else if state.written.iter().any(|w| w.overlaps(&region)) {
                self.err(
                    stmt,
                    format!("reads %{name} after a write without a barrier"),
                );
            }
            state.read.insert(region);
        }
        for region in writes {
            self.check_write(stmt, &region, state);
            state.written.insert(region);
        }
    }

    fn check_write(&mut self, stmt: &Stmt, region: &Region, state: &State) {
        let name = &self.kernel.tile(region.tile).name;
        if state.in_flight(region) {
            self.err(
                stmt,
                format!("writes %{name} while a cp.async into it is in flight"),
            );
        } else if state.read.iter().any(|r| r.overlaps(region)) {
            self.err(
                stmt,
                format!(
                    "overwrites %{name} while other threads may still read it (missing barrier)"
                ),
            );
        }
    }
}
