//! Warp-specialized kernels on the CPU: every warpgroup of every role is a task with its own
//! scope, register tiles and wgmma groups; tasks share the CTA's shared tiles, mbarriers and
//! named barriers. The scheduler runs each task in turn until it blocks (a wait on a barrier
//! phase that has not completed, a named barrier that has not filled) or ends, so a run is
//! deterministic, and a round in which no task moves is a deadlock, reported with what each task
//! waits for.
//!
//! What is checked as it runs, beyond the results:
//! - a TMA copy lands only when a task waits on its barrier, so a warpgroup that reads a stage
//!   without waiting reads the poison the shared tiles start with;
//! - an mbarrier phase completes when its arrivals and its expected bytes are all in; more
//!   arrivals than the phase has left, or more bytes than were expected, are errors;
//! - a wgmma group (`mma.async` up to `mma.commit`) stays in flight until an `mma.wait` retires
//!   it: reading or writing its accumulator meanwhile is an error, and so is overwriting (by TMA
//!   or any store) a shared window that an in-flight group of any warpgroup reads;
//! - a role that ends with groups in flight, and a named barrier left partly arrived, are errors.

use super::*;
use std::collections::VecDeque;

/// Arrivals a whole warpgroup makes (one per thread); `elect` makes one.
const WARPGROUP_ARRIVALS: u32 = WARPGROUP_THREADS;

#[derive(Clone, Debug)]
struct Mbarrier {
    arrivals: u32,
    /// Arrivals still missing in the current phase.
    pending: u32,
    /// Bytes expected by `arrive.expect_tx` and not yet landed.
    tx: i64,
    /// Phases completed so far: the current phase has parity `phase % 2`.
    phase: u64,
}

#[derive(Clone, Debug, Default)]
struct NamedBarrier {
    threads: u32,
    arrived: u32,
    generation: u64,
}

/// A rectangle of a shared tile.
#[derive(Clone, Copy, Debug)]
struct Region {
    tile: usize,
    rows: (usize, usize),
    cols: (usize, usize),
}

impl Region {
    fn of(window: &Window) -> Region {
        Region {
            tile: window.tile,
            rows: (window.row0, window.row0 + window.rows),
            cols: (window.col0, window.col0 + window.cols),
        }
    }
    fn overlaps(&self, other: &Region) -> bool {
        self.tile == other.tile
            && self.rows.0 < other.rows.1
            && other.rows.0 < self.rows.1
            && self.cols.0 < other.cols.1
            && other.cols.0 < self.cols.1
    }
}

/// One wgmma group: the register tiles it writes and reads (operand a) and the shared windows
/// it reads.
#[derive(Clone, Debug, Default)]
struct Group {
    writes: Vec<usize>,
    register_reads: Vec<usize>,
    reads: Vec<Region>,
}

#[derive(Clone, Debug, Default)]
struct Groups {
    open: Group,
    committed: VecDeque<Group>,
}

impl Groups {
    fn in_flight(&self) -> impl Iterator<Item = &Group> {
        std::iter::once(&self.open).chain(self.committed.iter())
    }
    fn is_empty(&self) -> bool {
        self.in_flight().all(|group| group.writes.is_empty() && group.reads.is_empty() && group.register_reads.is_empty())
    }
}

/// A TMA copy issued and not landed yet.
#[derive(Clone, Debug)]
struct Landing {
    slot: usize,
    window: Window,
    values: Vec<f64>,
    bytes: i64,
}

/// The CTA's synchronization state while its roles run.
pub(super) struct SyncState {
    /// First flat slot of each barrier ring.
    ring_base: Vec<usize>,
    mbarriers: Vec<Mbarrier>,
    named: BTreeMap<i64, NamedBarrier>,
    landings: Vec<Landing>,
    /// wgmma groups of every task; `current` is the running one.
    groups: Vec<Groups>,
    current: usize,
}

impl SyncState {
    pub(super) fn new(kernel: &KernelFn) -> SyncState {
        let mut ring_base = Vec::new();
        let mut mbarriers = Vec::new();
        for ring in &kernel.barriers {
            ring_base.push(mbarriers.len());
            for _ in 0..ring.slots {
                mbarriers.push(Mbarrier { arrivals: ring.arrivals, pending: ring.arrivals, tx: 0, phase: 0 });
            }
        }
        SyncState { ring_base, mbarriers, named: BTreeMap::new(), landings: Vec::new(), groups: Vec::new(), current: 0 }
    }
}

enum Wait {
    Mbarrier { slot: usize, parity: i64 },
    Named { id: i64, generation: u64 },
}

enum FrameKind<'k> {
    Block,
    Elect,
    Loop { var: &'k str, current: i64, end: i64 },
}

struct Frame<'k> {
    body: &'k [Stmt],
    next: usize,
    scope_depth: usize,
    kind: FrameKind<'k>,
}

struct Task<'k> {
    name: String,
    frames: Vec<Frame<'k>>,
    scope: Vec<(&'k str, Value)>,
    /// The task's register tiles (an empty vector at the index of each shared tile).
    registers: Vec<Vec<f64>>,
    wait: Option<Wait>,
    done: bool,
}

impl<'k> Block<'k> {
    /// Runs every warpgroup of every role to its end.
    pub(super) fn run_roles(&mut self, roles: &'k [Role], buffers: &mut Buffers) -> Result<(), String> {
        let kernel = self.kernel;
        let mut tasks = Vec::new();
        for role in roles {
            for index in 0..role.warpgroups {
                let mut scope = self.scope.clone();
                scope.push((role.index.as_str(), Value::Int(index as i64)));
                let registers = kernel
                    .tiles
                    .iter()
                    .zip(&self.tiles)
                    .map(|(decl, data)| if decl.ty.space() == Space::Registers { data.clone() } else { Vec::new() })
                    .collect();
                tasks.push(Task {
                    name: format!("{} {index}", role.name),
                    frames: vec![Frame { body: &role.body, next: 0, scope_depth: scope.len(), kind: FrameKind::Block }],
                    scope,
                    registers,
                    wait: None,
                    done: false,
                });
            }
        }
        self.sync.groups = vec![Groups::default(); tasks.len()];
        loop {
            let mut live = false;
            let mut moved = false;
            for (index, task) in tasks.iter_mut().enumerate() {
                if task.done {
                    continue;
                }
                live = true;
                self.sync.current = index;
                self.swap_task(task);
                let step = self.step(task, buffers);
                self.swap_task(task);
                moved |= step.map_err(|error| format!("role {}: {error}", task.name))?;
            }
            if !live {
                break;
            }
            if !moved {
                let waits: Vec<String> =
                    tasks.iter().filter(|task| !task.done).map(|task| self.describe_wait(task)).collect();
                return Err(format!("deadlock: {}", waits.join("; ")));
            }
        }
        self.sync.groups.clear();
        for landing in std::mem::take(&mut self.sync.landings) {
            self.land(landing)?;
        }
        for (id, barrier) in &self.sync.named {
            if barrier.arrived != 0 {
                return Err(format!(
                    "named barrier {id} ends with {} of {} threads arrived",
                    barrier.arrived, barrier.threads
                ));
            }
        }
        Ok(())
    }

    /// Exchanges the block's scope and register tiles with the task's.
    fn swap_task(&mut self, task: &mut Task<'k>) {
        std::mem::swap(&mut self.scope, &mut task.scope);
        for (tile, registers) in self.tiles.iter_mut().zip(task.registers.iter_mut()) {
            if !registers.is_empty() {
                std::mem::swap(tile, registers);
            }
        }
    }

    fn describe_wait(&self, task: &Task<'k>) -> String {
        match task.wait {
            Some(Wait::Mbarrier { slot, parity }) => {
                let barrier = &self.sync.mbarriers[slot];
                format!(
                    "{} waits on {} for parity {parity} (phase {} open: {} of {} arrivals and {} bytes missing)",
                    task.name,
                    self.slot_name(slot),
                    barrier.phase,
                    barrier.pending,
                    barrier.arrivals,
                    barrier.tx
                )
            }
            Some(Wait::Named { id, .. }) => {
                let barrier = self.sync.named.get(&id).cloned().unwrap_or_default();
                format!(
                    "{} waits at named barrier {id} ({} of {} threads arrived)",
                    task.name, barrier.arrived, barrier.threads
                )
            }
            None => format!("{} is stuck", task.name),
        }
    }

    fn slot_name(&self, slot: usize) -> String {
        let ring = self.sync.ring_base.iter().rposition(|base| *base <= slot).unwrap_or(0);
        format!("@{}[{}]", self.kernel.barriers[ring].name, slot - self.sync.ring_base[ring])
    }

    /// Runs the task until it blocks or ends; whether it moved at all.
    fn step(&mut self, task: &mut Task<'k>, buffers: &mut Buffers) -> Result<bool, String> {
        let mut moved = false;
        loop {
            let single = task.frames.iter().any(|frame| matches!(frame.kind, FrameKind::Elect));
            let Some(frame) = task.frames.last_mut() else {
                if !self.sync.groups[self.sync.current].is_empty() {
                    return Err("ends with wgmma groups in flight (mma.wait 0 missing)".to_string());
                }
                task.done = true;
                return Ok(true);
            };
            let body: &'k [Stmt] = frame.body;
            if frame.next == body.len() {
                self.scope.truncate(frame.scope_depth);
                if let FrameKind::Loop { var, current, end } = &mut frame.kind {
                    *current += 1;
                    if *current < *end {
                        self.scope.push((var, Value::Int(*current)));
                        frame.next = 0;
                        continue;
                    }
                }
                task.frames.pop();
                continue;
            }
            let stmt: &'k Stmt = &body[frame.next];
            let depth = self.scope.len();
            match stmt {
                Stmt::For { var, start, end, body } => {
                    let (start, end) = (self.eval(start, None, None)?.int()?, self.eval(end, None, None)?.int()?);
                    frame.next += 1;
                    if start < end {
                        self.scope.push((var, Value::Int(start)));
                        let kind = FrameKind::Loop { var, current: start, end };
                        task.frames.push(Frame { body, next: 0, scope_depth: depth, kind });
                    }
                }
                Stmt::If { cond, then_body, else_body } => {
                    let chosen = if self.eval(cond, None, None)?.bool()? { then_body } else { else_body };
                    frame.next += 1;
                    task.frames.push(Frame { body: chosen, next: 0, scope_depth: depth, kind: FrameKind::Block });
                }
                Stmt::Elect { body } => {
                    frame.next += 1;
                    task.frames.push(Frame { body, next: 0, scope_depth: depth, kind: FrameKind::Elect });
                }
                Stmt::WaitParity { barrier, parity } => {
                    let slot = self.barrier_slot(barrier)?;
                    let parity = self.eval(parity, None, None)?.int()?;
                    if parity != 0 && parity != 1 {
                        return Err(format!("waits for parity {parity} on {}", self.slot_name(slot)));
                    }
                    self.land_on(slot)?;
                    if (self.sync.mbarriers[slot].phase % 2) as i64 == parity {
                        task.wait = Some(Wait::Mbarrier { slot, parity });
                        return Ok(moved);
                    }
                    task.wait = None;
                    frame.next += 1;
                }
                Stmt::NamedBarrier { id, threads, sync } => {
                    let id = self.eval(id, None, None)?.int()?;
                    if let Some(Wait::Named { id: waiting, generation }) = task.wait {
                        if self.sync.named[&waiting].generation == generation {
                            return Ok(moved);
                        }
                        task.wait = None;
                        frame.next += 1;
                    } else {
                        let barrier = self.sync.named.entry(id).or_default();
                        if barrier.arrived != 0 && barrier.threads != *threads {
                            return Err(format!(
                                "named barrier {id} used for {threads} threads while {} of {} arrived",
                                barrier.arrived, barrier.threads
                            ));
                        }
                        barrier.threads = *threads;
                        barrier.arrived += WARPGROUP_THREADS;
                        let generation = barrier.generation;
                        if barrier.arrived > *threads {
                            return Err(format!("named barrier {id}: {} arrivals for {threads} threads", barrier.arrived));
                        }
                        if barrier.arrived == *threads {
                            barrier.arrived = 0;
                            barrier.generation += 1;
                        }
                        if *sync && barrier.generation == generation {
                            task.wait = Some(Wait::Named { id, generation });
                            return Ok(true);
                        }
                        frame.next += 1;
                    }
                }
                Stmt::Arrive { barrier } => {
                    let slot = self.barrier_slot(barrier)?;
                    self.arrive(slot, if single { 1 } else { WARPGROUP_ARRIVALS }, 0)?;
                    frame.next += 1;
                }
                Stmt::ArriveExpectTx { barrier, bytes } => {
                    let slot = self.barrier_slot(barrier)?;
                    let bytes = self.eval(bytes, None, None)?.int()?;
                    self.arrive(slot, 1, bytes)?;
                    frame.next += 1;
                }
                Stmt::TmaLoad { dst, map, coords, barrier } => {
                    self.issue_tma(dst, map, coords, barrier, buffers)?;
                    frame.next += 1;
                }
                Stmt::MmaAsync { acc, a, b, a_transposed, b_transposed } => {
                    let reads = [self.window(a)?, self.window(b)?]
                        .into_iter()
                        .filter(|window| self.kernel.tiles[window.tile].ty.space() == Space::Shared)
                        .map(|window| Region::of(&window))
                        .collect::<Vec<_>>();
                    // The operands: a register operand a must not be pending (the accumulator
                    // may be: wgmma chains on its own accumulator).
                    let a_tile = a.tile.0;
                    if self.sync.groups[self.sync.current].in_flight().any(|group| group.writes.contains(&a_tile)) {
                        return Err(format!("mma.async reads %{} while a wgmma group writes it", self.kernel.tiles[a_tile].name));
                    }
                    self.multiply(acc, a, b, *a_transposed, *b_transposed)?;
                    let a_in_registers = self.kernel.tiles[a_tile].ty.space() == Space::Registers;
                    let group = &mut self.sync.groups[self.sync.current].open;
                    if !group.writes.contains(&acc.tile.0) {
                        group.writes.push(acc.tile.0);
                    }
                    if a_in_registers && !group.register_reads.contains(&a_tile) {
                        group.register_reads.push(a_tile);
                    }
                    group.reads.extend(reads);
                    frame.next += 1;
                }
                Stmt::MmaCommit => {
                    let groups = &mut self.sync.groups[self.sync.current];
                    let open = std::mem::take(&mut groups.open);
                    groups.committed.push_back(open);
                    frame.next += 1;
                }
                Stmt::MmaWait { pending, .. } => {
                    let groups = &mut self.sync.groups[self.sync.current];
                    while groups.committed.len() > *pending as usize {
                        groups.committed.pop_front();
                    }
                    frame.next += 1;
                }
                Stmt::Let { var, value } => {
                    let value = self.eval(value, None, None)?;
                    self.scope.push((var, value));
                    frame.next += 1;
                }
                _ => {
                    self.exec(stmt, buffers)?;
                    frame.next += 1;
                }
            }
            moved = true;
        }
    }

    fn barrier_slot(&self, barrier: &BarrierRef) -> Result<usize, String> {
        let ring = self.kernel.barrier(barrier.ring);
        let slot = self.eval(&barrier.slot, None, None)?.int()?.rem_euclid(ring.slots as i64) as usize;
        Ok(self.sync.ring_base[barrier.ring.0] + slot)
    }

    fn arrive(&mut self, slot: usize, count: u32, bytes: i64) -> Result<(), String> {
        let name = self.slot_name(slot);
        let barrier = &mut self.sync.mbarriers[slot];
        if count > barrier.pending {
            return Err(format!(
                "{count} arrivals on {name}, whose phase {} has {} of {} left",
                barrier.phase, barrier.pending, barrier.arrivals
            ));
        }
        barrier.pending -= count;
        barrier.tx += bytes;
        self.complete(slot);
        Ok(())
    }

    fn complete(&mut self, slot: usize) {
        let barrier = &mut self.sync.mbarriers[slot];
        if barrier.pending == 0 && barrier.tx == 0 {
            barrier.phase += 1;
            barrier.pending = barrier.arrivals;
        }
    }

    /// Lands every copy that counts on `slot` (a task waits on it).
    fn land_on(&mut self, slot: usize) -> Result<(), String> {
        let (landing, waiting): (Vec<Landing>, Vec<Landing>) =
            std::mem::take(&mut self.sync.landings).into_iter().partition(|landing| landing.slot == slot);
        self.sync.landings = waiting;
        landing.into_iter().try_for_each(|landing| self.land(landing))
    }

    fn land(&mut self, landing: Landing) -> Result<(), String> {
        let window = landing.window;
        for r in 0..window.rows {
            for c in 0..window.cols {
                self.tiles[window.tile][window.index(r, c)] = landing.values[r * window.cols + c];
            }
        }
        let name = self.slot_name(landing.slot);
        let barrier = &mut self.sync.mbarriers[landing.slot];
        barrier.tx -= landing.bytes;
        if barrier.tx < 0 {
            return Err(format!("TMA copies bring {} more bytes to {name} than its phase expects", -barrier.tx));
        }
        self.complete(landing.slot);
        Ok(())
    }

    fn issue_tma(
        &mut self,
        dst: &TileView,
        map: &str,
        coords: &[Expr],
        barrier: &BarrierRef,
        buffers: &Buffers,
    ) -> Result<(), String> {
        let window = self.window(dst)?;
        self.check_overwrite(&Region::of(&window), "TMA overwrites")?;
        let Some(KernelParam::TensorMap { tensor, box_rows, .. }) = self.kernel.param(map) else {
            return Err(format!("{map} is not a tensor map"));
        };
        let (dims, _) = &self.shapes[tensor];
        let elem = self.tile_elem(window.tile);
        let geometry = TensorMapBox { rank: dims.len(), panel_cols: 128 / elem.size_bytes() as u32, box_rows: *box_rows };
        let start = coords.iter().map(|c| self.eval(c, None, None)?.int()).collect::<Result<Vec<i64>, String>>()?;
        if start.len() != dims.len() || window.rows != *box_rows as usize {
            return Err(format!("a TMA box of {tensor} does not match its map"));
        }
        let data = &buffers[tensor];
        let panel = geometry.panel_cols as usize;
        let mut values = vec![0.0; window.rows * window.cols];
        for r in 0..window.rows {
            for c in 0..window.cols {
                let mut at = start.clone();
                at[0] += c as i64;
                at[geometry.row_dim()] += r as i64;
                // Innermost first: coordinate i runs along dims[rank - 1 - i].
                let mut flat = Some(0usize);
                for (i, coordinate) in at.iter().enumerate().rev() {
                    let extent = dims[dims.len() - 1 - i];
                    flat = match flat {
                        Some(flat) if *coordinate >= 0 && (*coordinate as usize) < extent => {
                            Some(flat * extent + *coordinate as usize)
                        }
                        _ => None,
                    };
                }
                let value = flat.map_or(0.0, |flat| data[flat]);
                values[r * window.cols + c] = round_to(elem, value, self.rounding);
            }
        }
        debug_assert!(window.cols.is_multiple_of(panel));
        let slot = self.barrier_slot(barrier)?;
        let bytes = (window.rows * window.cols * elem.size_bytes()) as i64;
        self.sync.landings.push(Landing { slot, window, values, bytes });
        Ok(())
    }

    /// A write to `region` while an in-flight wgmma group of any warpgroup reads it.
    fn check_overwrite(&self, region: &Region, what: &str) -> Result<(), String> {
        for groups in &self.sync.groups {
            if groups.in_flight().any(|group| group.reads.iter().any(|read| read.overlaps(region))) {
                return Err(format!(
                    "{what} %{} while a wgmma group still reads it",
                    self.kernel.tiles[region.tile].name
                ));
            }
        }
        Ok(())
    }

    /// Before a tile statement of a role: it may not touch a register tile that an in-flight
    /// wgmma group of its warpgroup writes, nor write shared memory that any group reads.
    pub(super) fn check_in_flight(&self, stmt: &Stmt) -> Result<(), String> {
        if self.sync.groups.is_empty() {
            return Ok(());
        }
        let mut tiles = Vec::new();
        let mut written = None;
        let expr_tiles = |expr: &Expr, tiles: &mut Vec<usize>| {
            expr.visit(&mut |e| {
                if let Expr::Tile { tile, .. } = e {
                    tiles.push(tile.0);
                }
            })
        };
        match stmt {
            Stmt::Fill { dst, .. } | Stmt::Copy { dst, .. } => {
                tiles.push(dst.tile.0);
                written = Some(dst);
            }
            Stmt::Map { dst, expr } => {
                tiles.push(dst.tile.0);
                expr_tiles(expr, &mut tiles);
                written = Some(dst);
            }
            Stmt::Convert { dst, src } => {
                tiles.extend([dst.tile.0, src.tile.0]);
                written = Some(dst);
            }
            Stmt::RowReduce { dst, src, value, .. } => {
                tiles.extend([dst.0, src.tile.0]);
                expr_tiles(value, &mut tiles);
            }
            Stmt::Mma { acc, a, b, .. } => tiles.extend([acc.tile.0, a.tile.0, b.tile.0]),
            Stmt::Store { src, .. } | Stmt::AtomicAdd { src, .. } => tiles.push(src.tile.0),
            _ => {}
        }
        let own = &self.sync.groups[self.sync.current];
        if let Some(dst) = written
            && own.in_flight().any(|group| group.register_reads.contains(&dst.tile.0))
        {
            return Err(format!(
                "`{}` overwrites %{} while a wgmma group still reads it (mma.wait first)",
                self.kernel.stmt_head(stmt),
                self.kernel.tiles[dst.tile.0].name
            ));
        }
        for tile in tiles {
            if own.in_flight().any(|group| group.writes.contains(&tile)) {
                return Err(format!(
                    "`{}` touches %{} while a wgmma group writing it is in flight (mma.wait first)",
                    self.kernel.stmt_head(stmt),
                    self.kernel.tiles[tile].name
                ));
            }
        }
        if let Some(dst) = written
            && self.kernel.tile(dst.tile).ty.space() == Space::Shared
        {
            self.check_overwrite(&Region::of(&self.window(dst)?), &format!("`{}` overwrites", self.kernel.stmt_head(stmt)))?;
        }
        Ok(())
    }
}
