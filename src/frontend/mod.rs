//! `.attn` text → `AttentionSpec`: parsing (pest), checking, diagnostics.
