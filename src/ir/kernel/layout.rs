//! The shared-memory layout of wgmma and TMA operands, 128-byte swizzle, as a type of the kernel
//! IR ([`super::Layout::Swizzled128B`]), and the wgmma matrix descriptors that read it. The
//! Hopper kernels of `codegen::hopper` place their tiles with the same types.
//!
//! A [`Swizzle128BTile`] stores a `rows × cols` matrix whose `cols` are contiguous in global memory
//! (row-major there) as column panels of 128 bytes (64 bf16/f16 elements): panel `p` holds columns
//! `64p .. 64p + 63` of every row, one 128-byte line per row, panels one after another. Inside a
//! line, 16-byte chunk `c` of row `r` sits at chunk position `c ^ (r % 8)`: the hardware's
//! `Swizzle<3,4,3>` on byte addresses (bits 4..6 xor bits 7..9), so the tile must start on a
//! 1024-byte boundary. Eight consecutive rows (1024 bytes) form one swizzle atom.
//!
//! The same storage serves wgmma in two roles:
//! - K-major ([`OperandMajor::K`]): the columns are the reduction (K) dimension, rows are M or N
//!   (Q and K of attention, `S = Q · Kᵀ`).
//! - MN-major ([`OperandMajor::MN`]): the columns are the M/N dimension and rows are K (V of
//!   attention in `O = P · V`; wgmma reads it with the transpose bit).

use super::ElemType;

/// Why a tile or a slice of it does not fit the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, LayoutError>;

fn unsupported<T>(message: impl Into<String>) -> Result<T> {
    Err(LayoutError(message.into()))
}

/// Bytes of one swizzled line (a row of one panel).
pub const SWIZZLE_BYTES: u32 = 128;

/// Elements of `elem` in one 128-byte swizzle panel (line).
pub fn panel_cols(elem: ElemType) -> u32 {
    SWIZZLE_BYTES / elem.size_bytes() as u32
}
/// Rows of one swizzle atom (its byte size is the pattern's repeat: 1024 bytes).
pub const ATOM_ROWS: u32 = 8;
/// The alignment the tile base needs so that address bits 7..9 are the row within the atom.
pub const TILE_ALIGNMENT: u32 = SWIZZLE_BYTES * ATOM_ROWS;
/// Rows of the K extent of one wgmma (k16 for 16-bit types).
pub const WGMMA_K: u32 = 16;

/// Why a warps_m × warps_n warp grid cannot hold an accumulator of `rows` rows for one wgmma
/// m64nNk16 per warpgroup (whole warpgroups along M, one 16-row band per warp: the wgmma D and
/// A fragments are then the mma.sync ones of that band), if it cannot. The verifier's rule,
/// which the builders ask before they choose wgmma.
pub fn wgmma_band_error(warps_m: u32, warps_n: u32, rows: u32) -> Option<String> {
    (warps_n != 1 || !warps_m.is_multiple_of(4) || rows != 16 * warps_m)
        .then(|| format!("wgmma needs whole warpgroups along M with one 16-row band per warp, not {warps_m}x{warps_n} warps over {rows} rows"))
}

/// Why N = `cols` is not a wgmma width (a multiple of 8 in 8..=256), if it is not.
pub fn wgmma_width_error(cols: u32) -> Option<String> {
    (!(8..=256).contains(&cols) || !cols.is_multiple_of(8)).then(|| format!("wgmma N = {cols} is not a multiple of 8 in 8..=256"))
}

/// Whether the warp grid holds a rows × cols wgmma accumulator (both rules above).
pub fn wgmma_accumulator_fits(warps_m: u32, warps_n: u32, rows: u32, cols: u32) -> bool {
    wgmma_band_error(warps_m, warps_n, rows).is_none() && wgmma_width_error(cols).is_none()
}

/// Which dimension of a wgmma operand is contiguous in the tile's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperandMajor {
    /// Lines run along K (`imm-trans` = 0).
    K,
    /// Lines run along M or N (`imm-trans` = 1).
    MN,
}

/// A 16-bit matrix in shared memory in the 128-byte swizzled panel layout (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Swizzle128BTile {
    pub elem: ElemType,
    pub rows: u32,
    pub cols: u32,
}

/// The fields of a wgmma shared-memory matrix descriptor that depend on the tile and on the
/// sub-matrix, in bytes; the runtime base address is added by [`MatrixDescriptor::encode`]
/// (or, on the device, to the encoded value: the start address is its low field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatrixDescriptor {
    /// Offset of the sub-matrix's first line from the tile base.
    pub start_offset: u32,
    /// "Leading dimension byte offset": unused by K-major 128B layouts (encoded as 1 like
    /// CUTLASS does), the distance between 64-wide panels along M/N for MN-major ones.
    pub leading_byte_offset: u32,
    /// "Stride dimension byte offset": the distance between 8-row atoms (1024 bytes when dense).
    pub stride_byte_offset: u32,
}

/// Layout-type code of 128-byte swizzle in descriptor bits 62..63.
const DESCRIPTOR_SWIZZLE_128B: u64 = 1;

impl MatrixDescriptor {
    /// The 64-bit descriptor for a tile whose base is at shared-window address `base_address`
    /// (bits 0..13 start address >> 4, 16..29 leading offset >> 4, 32..45 stride offset >> 4,
    /// 62..63 swizzle mode; the base-offset field stays 0 because tiles are 1024-byte aligned).
    pub fn encode(&self, base_address: u32) -> u64 {
        let start = (((base_address + self.start_offset) >> 4) & 0x3fff) as u64;
        let leading = ((self.leading_byte_offset >> 4) & 0x3fff) as u64;
        let stride = ((self.stride_byte_offset >> 4) & 0x3fff) as u64;
        start | (leading << 16) | (stride << 32) | (DESCRIPTOR_SWIZZLE_128B << 62)
    }

    /// The descriptor bits without the start address: on the device the (runtime) start address
    /// >> 4 is added to this.
    pub fn constant_bits(&self) -> u64 {
        MatrixDescriptor { start_offset: 0, ..*self }.encode(0)
    }
}

impl Swizzle128BTile {
    pub fn new(elem: impl Into<ElemType>, rows: u32, cols: u32) -> Result<Self> {
        let tile = Swizzle128BTile { elem: elem.into(), rows, cols };
        tile.validate()?;
        Ok(tile)
    }

    pub fn validate(&self) -> Result<()> {
        if self.elem == ElemType::F32 {
            return unsupported("128-byte swizzled wgmma tiles hold bf16 or f16");
        }
        if self.rows == 0 || !self.rows.is_multiple_of(ATOM_ROWS) {
            return unsupported(format!("a swizzled tile needs a multiple of {ATOM_ROWS} rows, not {}", self.rows));
        }
        if self.cols == 0 || !self.cols.is_multiple_of(self.panel_cols()) {
            return unsupported(format!(
                "a 128-byte swizzled tile of {} needs a multiple of {} columns, not {}",
                self.elem.name(),
                self.panel_cols(),
                self.cols
            ));
        }
        Ok(())
    }

    /// Elements per 128-byte line.
    pub fn panel_cols(&self) -> u32 {
        panel_cols(self.elem)
    }

    pub fn panels(&self) -> u32 {
        self.cols / self.panel_cols()
    }

    pub fn panel_bytes(&self) -> u32 {
        self.rows * SWIZZLE_BYTES
    }

    /// Bytes to reserve (a multiple of 1024, so tiles placed one after another stay aligned).
    pub fn footprint_bytes(&self) -> u32 {
        self.panels() * self.panel_bytes()
    }

    /// Elements per 16-byte chunk (the unit that the swizzle permutes and cp.async copies).
    pub fn chunk_elems(&self) -> u32 {
        16 / self.elem.size_bytes() as u32
    }

    /// Byte offset of the 16-byte chunk holding elements `(row, chunk * chunk_elems ..)`.
    pub fn chunk_offset(&self, row: u32, chunk: u32) -> u32 {
        let chunks_per_line = SWIZZLE_BYTES / 16;
        let panel = chunk / chunks_per_line;
        let in_line = (chunk % chunks_per_line) ^ (row % ATOM_ROWS);
        panel * self.panel_bytes() + row * SWIZZLE_BYTES + in_line * 16
    }

    /// Byte offset of element `(row, col)`.
    pub fn element_offset(&self, row: u32, col: u32) -> u32 {
        let chunk_elems = self.chunk_elems();
        self.chunk_offset(row, col / chunk_elems) + (col % chunk_elems) * self.elem.size_bytes() as u32
    }

    /// Descriptor of a K-major operand slice: rows `row_start ..` (M or N, as many as the wgmma
    /// shape takes) by the 16 columns `k_start .. k_start + 16` (one wgmma's K).
    pub fn k_major_descriptor(&self, row_start: u32, k_start: u32) -> Result<MatrixDescriptor> {
        if !row_start.is_multiple_of(ATOM_ROWS) || row_start >= self.rows {
            return unsupported(format!(
                "K-major slice must start on an {ATOM_ROWS}-row atom inside {} rows",
                self.rows
            ));
        }
        if !k_start.is_multiple_of(WGMMA_K) || k_start + WGMMA_K > self.cols {
            return unsupported(format!("K slice at column {k_start} is not a k16 step inside {} columns", self.cols));
        }
        let panel = k_start / self.panel_cols();
        let in_line = (k_start % self.panel_cols()) * self.elem.size_bytes() as u32;
        Ok(MatrixDescriptor {
            start_offset: panel * self.panel_bytes() + row_start * SWIZZLE_BYTES + in_line,
            leading_byte_offset: 16,
            stride_byte_offset: TILE_ALIGNMENT,
        })
    }

    /// Descriptor of an MN-major operand slice: the 16 rows `k_start .. k_start + 16` (one
    /// wgmma's K) by columns `mn_start ..` (M or N, across panels).
    pub fn mn_major_descriptor(&self, k_start: u32, mn_start: u32) -> Result<MatrixDescriptor> {
        if !k_start.is_multiple_of(WGMMA_K) || k_start + WGMMA_K > self.rows {
            return unsupported(format!("K slice at row {k_start} is not a k16 step inside {} rows", self.rows));
        }
        if !mn_start.is_multiple_of(self.panel_cols()) || mn_start >= self.cols {
            return unsupported(format!("MN-major slice must start on a panel inside {} columns", self.cols));
        }
        Ok(MatrixDescriptor {
            start_offset: (mn_start / self.panel_cols()) * self.panel_bytes() + k_start * SWIZZLE_BYTES,
            leading_byte_offset: self.panel_bytes(),
            stride_byte_offset: TILE_ALIGNMENT,
        })
    }

    pub fn descriptor(&self, major: OperandMajor, row_start: u32, col_start: u32) -> Result<MatrixDescriptor> {
        match major {
            OperandMajor::K => self.k_major_descriptor(row_start, col_start),
            OperandMajor::MN => self.mn_major_descriptor(row_start, col_start),
        }
    }
}
