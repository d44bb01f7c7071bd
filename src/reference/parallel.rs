//! Row-parallel filling of output buffers, for the long sequences of GPU validation.

/// Fills `rows` (consecutive rows of `width`) with `fill(row_index, row, scratch)`, spread over the
/// machine's cores, each thread with its own `make_scratch()`. Every row is computed by the same
/// code whatever the split, so results do not depend on the number of threads.
pub(super) fn fill_rows<Scratch>(
    rows: &mut [f64],
    width: usize,
    make_scratch: impl Fn() -> Scratch + Sync,
    fill: impl Fn(usize, &mut [f64], &mut Scratch) + Sync,
) {
    if width == 0 || rows.is_empty() {
        return;
    }
    let row_count = rows.len() / width;
    // Spawning costs microseconds; small sequences (most tests) stay on one thread.
    const MIN_ROWS_PER_THREAD: usize = 32;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(row_count / MIN_ROWS_PER_THREAD).max(1);
    if threads == 1 {
        let mut scratch = make_scratch();
        for (t, row) in rows.chunks_mut(width).enumerate() {
            fill(t, row, &mut scratch);
        }
        return;
    }
    // Causal rows cost more the later they are: deal out small blocks round-robin for balance.
    let rows_per_block = row_count.div_ceil(threads * 8);
    let mut blocks_of_thread: Vec<Vec<(usize, &mut [f64])>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (block_index, block) in rows.chunks_mut(rows_per_block * width).enumerate() {
        blocks_of_thread[block_index % threads].push((block_index * rows_per_block, block));
    }
    std::thread::scope(|scope| {
        for blocks in blocks_of_thread {
            let (make_scratch, fill) = (&make_scratch, &fill);
            scope.spawn(move || {
                let mut scratch = make_scratch();
                for (first_row, block) in blocks {
                    for (i, row) in block.chunks_mut(width).enumerate() {
                        fill(first_row + i, row, &mut scratch);
                    }
                }
            });
        }
    });
}
