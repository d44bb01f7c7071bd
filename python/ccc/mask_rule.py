"""Which keys a query may see, written out from docs/language.md (step 7 and `mask` in Items) for
the torch reference and python/validate.py. Deliberately not taken from the compiler (its
`Mask` in src/spec.rs or the kernels' block skipping): a check that imported the rule it checks
would pass a wrong rule. Stdlib only, so that the unit tests cover it without torch.

Every mask here lets query t see one contiguous run of keys, [first, last] (inclusive):

    none               0 <= key <= S - 1
    causal             0 <= key <= t
    sliding_window(W)  t - W < key <= t        (the W most recent keys, t's own included)

The two `*_leak`/`*_wide` rules are deliberately wrong masks, one key off, that validate.py
runs the reference with to show that its checks would catch such a bug."""

# Correct rules (docs/language.md) and the deliberately wrong ones validate.py plants.
MASK_KINDS = ("none", "causal", "sliding_window")
WRONG_KINDS = ("causal_leak", "window_wide")


def key_range(kind, window, query, seq_len):
    """(first, last) keys query `query` may see (inclusive) in a sequence of seq_len tokens, or
    None when it sees none. `window` is W for sliding_window and window_wide, else ignored.

    causal_leak: causal (or the sliding window, with window > 0) plus the next key, t + 1: the
    one-key leak past the diagonal. window_wide: the sliding window one key too long,
    t - W <= key <= t."""
    if kind == "none":
        first, last = 0, seq_len - 1
    elif kind == "causal":
        first, last = 0, query
    elif kind == "sliding_window":
        if window < 1:
            raise ValueError("a sliding window must hold at least one key")
        first, last = query - window + 1, query
    elif kind == "causal_leak":
        first = query - window + 1 if window > 0 else 0
        last = query + 1
    elif kind == "window_wide":
        if window < 1:
            raise ValueError("a sliding window must hold at least one key")
        first, last = query - window, query
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    first, last = max(first, 0), min(last, seq_len - 1)
    return (first, last) if first <= last else None


def block_key_range(kind, window, first_query, end_query, seq_len):
    """[start, end) keys that any query in [first_query, end_query) may see: the union of their
    runs (each run's ends move monotonically with t), for slicing a query block's keys."""
    first = key_range(kind, window, first_query, seq_len)
    last = key_range(kind, window, end_query - 1, seq_len)
    return (first[0] if first else 0), (last[1] + 1 if last else seq_len)


def wrong_masks(kind, window, seq_len):
    """The deliberately wrong masks that differ from (kind, window) in at least one allowed key
    at this length, as (label, kind, window): a one-key leak past the diagonal for causal and
    sliding-window masks (needs S >= 2), and a window one key too long (needs S > W). None for
    `none`, which has nothing to leak."""
    wrong = []
    if kind in ("causal", "sliding_window") and seq_len >= 2:
        wrong.append(("one-key causal leak (key <= query + 1)", "causal_leak",
                      window if kind == "sliding_window" else 0))
    if kind == "sliding_window" and seq_len > window:
        wrong.append((f"window off by one ({window + 1} keys)", "window_wide", window))
    return wrong
