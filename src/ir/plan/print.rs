//! The stable text form of the plan (`ccc compile --emit plan`): a header that counts the
//! kernels, the layer's buffers, then one block per kernel with its kind, buffers, schedule and grid.

use super::{Buffer, KernelKind, KernelPlan, PlannedKernel, PrologueStep, ProjectionSegment};
use crate::ir::graph::print_names::{conv_kind_name, mask_text, temperature_name};
use crate::spec::RopeStyle;
use std::fmt;

impl fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.kernels.len();
        let plural = if count == 1 { "" } else { "s" };
        writeln!(
            f,
            "plan @{}.{}: {count} kernel{plural}",
            self.name,
            self.entry.name()
        )?;
        for input in &self.inputs {
            writeln!(f, "  input {}", buffer_text(input))?;
        }
        for output in &self.outputs {
            writeln!(f, "  output {}", buffer_text(output))?;
        }
        for state in &self.state {
            writeln!(f, "  state {}", buffer_text(state))?;
        }
        for param in &self.params {
            writeln!(f, "  param @{} : {}", param.name, param.ty)?;
        }
        for (index, kernel) in self.kernels.iter().enumerate() {
            write!(f, "kernel {index} ")?;
            write_kernel(f, kernel)?;
        }
        Ok(())
    }
}

fn buffer_text(buffer: &Buffer) -> String {
    format!("{} : {}", buffer.name, buffer.ty)
}

fn write_kernel(f: &mut fmt::Formatter<'_>, kernel: &PlannedKernel) -> fmt::Result {
    writeln!(f, "@{} = {}", kernel.symbol, kind_text(&kernel.kind))?;
    for input in &kernel.inputs {
        writeln!(f, "  reads {}", buffer_text(input))?;
    }
    if !kernel.params.is_empty() {
        let params: Vec<String> = kernel.params.iter().map(|p| format!("@{p}")).collect();
        writeln!(f, "  params {}", params.join(", "))?;
    }
    for output in &kernel.outputs {
        writeln!(f, "  writes {}", buffer_text(output))?;
    }
    for state in &kernel.updates {
        writeln!(f, "  updates {}", buffer_text(state))?;
    }
    for scratch in &kernel.scratch {
        writeln!(f, "  scratch {}", buffer_text(scratch))?;
    }
    let schedule = &kernel.schedule;
    writeln!(
        f,
        "  schedule block_m={} block_n={} block_k={} warps={} stages={}",
        schedule.block_m, schedule.block_n, schedule.block_k, schedule.warps, schedule.stages
    )?;
    let grid = &kernel.grid;
    writeln!(
        f,
        "  grid ({}, {}, {}) = {} blocks",
        grid.x,
        grid.y,
        grid.z,
        grid.blocks()
    )
}

fn kind_text(kind: &KernelKind) -> String {
    match kind {
        KernelKind::QkvProjection { segments } => {
            let segments: Vec<String> = segments.iter().map(segment_text).collect();
            format!("qkv_projection {{segments = [{}]}}", segments.join(", "))
        }
        KernelKind::QkPrologue {
            halo_rows,
            prologue,
        } => {
            let steps: Vec<String> = prologue.iter().map(step_text).collect();
            format!(
                "qk_prologue {{halo_rows = {halo_rows}, steps = [{}]}}",
                steps.join(", ")
            )
        }
        KernelKind::Attention {
            mask,
            query_heads,
            kv_heads,
            head_dim,
            scale,
            saves_lse,
        } => format!(
            "attention {{mask = {}, query_heads = {query_heads}, kv_heads = {kv_heads}, \
             groups = {}, head_dim = {head_dim}, scale = {scale:?}, saves_lse = {saves_lse}}}",
            mask_text(*mask),
            query_heads / kv_heads
        ),
        KernelKind::OutputProjection { bias } => format!("output_projection {{bias = {bias}}}"),
        KernelKind::Backward(which) => format!("backward {}", which.describe()),
        KernelKind::Decode { kernel, paged } => format!(
            "{} {{page_size = {}, partition_keys = {}}}",
            kernel.suffix(),
            paged.page_size,
            paged.partition_keys
        ),
    }
}

/// `v[0..256] = x[t - 1]·@v_proj_delayed.weight + @v_proj_delayed.bias`: the channels of the
/// output a segment writes and what it computes.
fn segment_text(segment: &ProjectionSegment) -> String {
    let shift = match segment.row_shift {
        0 => String::new(),
        rows => format!("[t - {rows}]"),
    };
    let bias = segment
        .bias
        .as_ref()
        .map_or(String::new(), |bias| format!(" + @{bias}"));
    format!(
        "{}[{}..{}] = x{shift}·@{}ᵀ{bias}",
        segment.output,
        segment.column0,
        segment.column0 + segment.width,
        segment.weight
    )
}

fn step_text(step: &PrologueStep) -> String {
    match step {
        PrologueStep::CausalPad { rows } => format!("causal_pad({rows})"),
        PrologueStep::Conv { kind, width } => format!("{}({width})", conv_kind_name(*kind)),
        PrologueStep::QkMean => "qk_mean".into(),
        PrologueStep::L2Norm { key_temperature } => {
            format!(
                "l2_norm(key_temperature = {})",
                temperature_name(*key_temperature)
            )
        }
        PrologueStep::Rope {
            rotary_dim,
            theta,
            style,
        } => {
            let style = match style {
                RopeStyle::Neox => "neox",
                RopeStyle::Interleaved => "interleaved",
            };
            format!("rope(rotary_dim = {rotary_dim}, theta = {theta:?}, {style})")
        }
    }
}
