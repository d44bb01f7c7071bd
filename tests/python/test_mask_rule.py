"""The reference's mask rule (python/ccc/mask_rule.py) against the sets docs/language.md defines,
key by key, and the deliberately wrong masks of validate.py's self-check. Stdlib only."""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

from ccc.mask_rule import block_key_range, key_range, wrong_masks  # noqa: E402


def keys(kind, window, query, seq_len):
    run = key_range(kind, window, query, seq_len)
    return set() if run is None else set(range(run[0], run[1] + 1))


class MaskRule(unittest.TestCase):
    def test_rules_as_the_language_defines_them(self):
        for seq_len in (1, 2, 7, 17):
            for t in range(seq_len):
                self.assertEqual(keys("none", 0, t, seq_len), set(range(seq_len)))
                self.assertEqual(keys("causal", 0, t, seq_len), {j for j in range(seq_len) if j <= t})
                for window in (1, 2, 3, 7, 100):
                    self.assertEqual(keys("sliding_window", window, t, seq_len),
                                     {j for j in range(seq_len) if t - window < j <= t},
                                     (window, t, seq_len))

    def test_examples(self):
        # Query 5 with a window of 3 sees keys 3, 4 and 5; query 0 only itself.
        self.assertEqual(key_range("sliding_window", 3, 5, 10), (3, 5))
        self.assertEqual(key_range("sliding_window", 3, 0, 10), (0, 0))
        self.assertEqual(key_range("causal", 0, 4, 10), (0, 4))
        # A window at least as long as the sequence is causal.
        for t in range(17):
            self.assertEqual(key_range("sliding_window", 4096, t, 17), key_range("causal", 0, t, 17))

    def test_wrong_masks_are_one_key_off(self):
        seq_len = 17
        for t in range(seq_len):
            leak = keys("causal_leak", 0, t, seq_len)
            self.assertEqual(leak - keys("causal", 0, t, seq_len), {t + 1} if t + 1 < seq_len else set())
            window_leak = keys("causal_leak", 7, t, seq_len)
            self.assertEqual(window_leak - keys("sliding_window", 7, t, seq_len),
                             {t + 1} if t + 1 < seq_len else set())
            wide = keys("window_wide", 7, t, seq_len)
            self.assertEqual(wide - keys("sliding_window", 7, t, seq_len), {t - 7} if t >= 7 else set())
            self.assertTrue(keys("sliding_window", 7, t, seq_len) <= wide)

    def test_wrong_masks_only_where_they_change_something(self):
        self.assertEqual(wrong_masks("none", 0, 100), [])
        self.assertEqual(wrong_masks("causal", 0, 1), [])
        self.assertEqual([kind for _, kind, _ in wrong_masks("causal", 0, 2)], ["causal_leak"])
        self.assertEqual([kind for _, kind, _ in wrong_masks("sliding_window", 7, 7)], ["causal_leak"])
        self.assertEqual([(kind, w) for _, kind, w in wrong_masks("sliding_window", 7, 8)],
                         [("causal_leak", 7), ("window_wide", 7)])

    def test_block_key_range_covers_every_row_of_the_block(self):
        for kind, window in (("none", 0), ("causal", 0), ("sliding_window", 5), ("causal_leak", 0),
                             ("causal_leak", 5), ("window_wide", 5)):
            for start in range(0, 20, 3):
                for end in range(start + 1, 21):
                    first, stop = block_key_range(kind, window, start, end, 20)
                    wanted = set().union(*(keys(kind, window, t, 20) for t in range(start, end)))
                    self.assertTrue(wanted <= set(range(first, stop)), (kind, window, start, end))

    def test_bad_arguments(self):
        with self.assertRaises(ValueError):
            key_range("sliding_window", 0, 3, 10)
        with self.assertRaises(ValueError):
            key_range("diagonal", 0, 3, 10)


if __name__ == "__main__":
    unittest.main()
