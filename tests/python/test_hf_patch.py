"""`ccc.hf.patch`: which library serves which layer of a Hugging Face ZAYA model and the errors
when none does (stdlib only, on the fixture manifests), and, where torch and transformers are
installed, the module replacement on a tiny randomly initialised ZAYA model on the CPU, with the
ccc Layer's entry points replaced by the float64 reference (ccc.reference) so that the mechanics
(parameter sharing, positions, the paged cache through generate, torch.compile, the errors) are
checked without a GPU. Those tests compile their libraries with target/release/ccc and are skipped
without it. With both: `/path/to/venv/bin/python -m unittest discover -s tests/python -t tests/python`."""

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

from ccc.errors import ManifestError  # noqa: E402
from ccc.hf_match import (LibraryMismatch, NotSupported, check_weights, choose_library, dtype_name,  # noqa: E402
                          layer_fields, library_directories, read_libraries)

FIXTURES = os.path.join(HERE, "fixtures")
CCC = os.path.join(HERE, "..", "..", "target", "release", "ccc")

try:
    import torch
    from transformers import ZayaConfig, ZayaForCausalLM

    from ccc.reference import relative_l2
    HF_MISSING = None
    # The cache's argument and output name: `cache` from transformers 5.2x, `past_key_values` before.
    CACHE = "cache" if "cache" in inspect.signature(ZayaForCausalLM.forward).parameters else "past_key_values"
except ImportError as error:
    HF_MISSING = f"needs torch and transformers with the ZAYA model: {error}"


def zaya1_config(**changes):
    """ZAYA1's attention fields as ZayaConfig holds them, two layers: causal, then sliding."""
    fields = dict(hidden_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128, cca_time0=2,
                  cca_time1=2, attention_bias=False, layer_types=["hybrid", "hybrid_sliding"], sliding_window=4096,
                  rope_parameters={
                      "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
                      "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}})
    fields.update(changes)
    return types.SimpleNamespace(**fields)


def write_library(root, name, source="zaya1_serve_manifest.json", **spec_changes):
    """root/name/: a fixture manifest (ZAYA1's causal layer) with its spec renamed and changed."""
    with open(os.path.join(FIXTURES, source)) as file:
        manifest = json.load(file)
    manifest["spec"].update(name=name, **spec_changes)
    directory = os.path.join(root, name)
    os.makedirs(directory)
    with open(os.path.join(directory, "manifest.json"), "w") as file:
        json.dump(manifest, file)
    open(os.path.join(directory, manifest["ptx_file"]), "w").close()
    return directory


def write_zaya1_libraries(root):
    """What `ccc compile` writes for ZAYA1's two layer types (from the fixture manifests)."""
    write_library(root, "zaya")
    sliding_rope = {"fraction": 0.5, "rotary_dim": 64, "theta": 10000.0, "style": "neox"}
    write_library(root, "zaya_sliding", mask={"sliding_window": {"window": 4096}}, rope=sliding_rope)


class Matching(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        write_zaya1_libraries(self.root)
        self.candidates = read_libraries(self.root)

    def chosen(self, config, index, dtype="bf16"):
        return os.path.basename(choose_library(config, index, dtype, self.candidates, self.root)[0])

    def test_each_layer_type_gets_its_library(self):
        config = zaya1_config(layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"])
        self.assertEqual([self.chosen(config, index) for index in range(4)],
                         ["zaya", "zaya_sliding", "zaya_sliding", "zaya"])

    def test_no_match_names_the_layer_and_what_differs(self):
        with self.assertRaises(LibraryMismatch) as caught:
            self.chosen(zaya1_config(sliding_window=2048), 1)
        message = str(caught.exception)
        self.assertIn("layer 1 (`hybrid_sliding`", message)
        self.assertIn("zaya_sliding: mask sliding_window(4096), not sliding_window(2048)", message)
        self.assertIn("zaya: rope neox, rotary_dim 64, theta 5000000.0, not neox, rotary_dim 64, theta 10000.0", message)
        self.assertIn("ccc spec --from-hf", message)

    def test_widths_heads_convolutions_bias_and_dtype_are_compared(self):
        cases = [(dict(hidden_size=4096), "model_dim 2048, not 4096"),
                 (dict(num_attention_heads=16), "query_heads 8, not 16"),
                 (dict(num_key_value_heads=4), "kv_heads 2, not 4"),
                 (dict(head_dim=64), "head_dim 128, not 64"),
                 (dict(cca_time0=3), "qk_conv depthwise(2), per_head(2), not depthwise(3), per_head(2)"),
                 (dict(attention_bias=True), "bias False, not True")]
        for changes, expected in cases:
            with self.subTest(changes=changes), self.assertRaises(LibraryMismatch) as caught:
                self.chosen(zaya1_config(**changes), 0)
            self.assertIn(expected, str(caught.exception))
        with self.assertRaises(LibraryMismatch) as caught:
            self.chosen(zaya1_config(), 0, dtype="f16")
        self.assertIn("dtype bf16, not f16", str(caught.exception))

    def test_rope_as_zaya_rotary_embedding_reads_it(self):
        # Without partial_rotary_factor ZayaRotaryEmbedding rotates the whole head.
        rope = {"hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0}}
        with self.assertRaises(LibraryMismatch) as caught:
            self.chosen(zaya1_config(rope_parameters=rope), 0)
        self.assertIn("rotary_dim 64, theta 5000000.0, not neox, rotary_dim 128", str(caught.exception))

    def test_several_matching_libraries_are_refused(self):
        write_library(self.root, "zaya_copy")
        with self.assertRaises(LibraryMismatch) as caught:
            choose_library(zaya1_config(), 0, "bf16", read_libraries(self.root), self.root)
        self.assertIn("matches several libraries", str(caught.exception))
        self.assertIn("zaya, zaya_copy", str(caught.exception))

    def test_what_no_spec_expresses_is_not_supported(self):
        yarn = {"hybrid": {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0}}
        cases = [(zaya1_config(num_key_value_heads=3, num_attention_heads=9), 0, "3 kv heads"),
                 (zaya1_config(rope_parameters=yarn), 0, "rope_type `yarn`"),
                 (zaya1_config(rope_parameters={"rope_type": "default", "rope_theta": 5e6}), 0,
                  "no `hybrid` entry"),
                 (zaya1_config(layer_types=["hybrid", "mamba"]), 1, "layer type `mamba`"),
                 (zaya1_config(sliding_window=None), 1, "sliding_window is None")]
        for config, index, expected in cases:
            with self.subTest(expected=expected), self.assertRaises(NotSupported) as caught:
                layer_fields(config, index, "bf16")
            self.assertIn(expected, str(caught.exception))
            self.assertIsInstance(caught.exception, NotImplementedError)
        with self.assertRaises(NotSupported) as caught:
            dtype_name("torch.float32")
        self.assertIn("float32", str(caught.exception))
        self.assertEqual((dtype_name("torch.bfloat16"), dtype_name("torch.float16")), ("bf16", "f16"))

    def test_library_directories(self):
        self.assertEqual([os.path.basename(d) for d in library_directories(self.root)], ["zaya", "zaya_sliding"])
        # A library's own directory is a directory of one.
        own = os.path.join(self.root, "zaya")
        self.assertEqual(library_directories(own), [own])
        with self.assertRaises(LibraryMismatch) as caught:
            library_directories(tempfile.mkdtemp(dir=self.root))
        self.assertIn("holds no library", str(caught.exception))
        with self.assertRaises(LibraryMismatch):
            library_directories(os.path.join(self.root, "absent"))

    def test_a_broken_manifest_is_named(self):
        broken = os.path.join(self.root, "broken")
        os.makedirs(broken)
        with open(os.path.join(broken, "manifest.json"), "w") as file:
            file.write("{")
        with self.assertRaises(ManifestError) as caught:
            read_libraries(self.root)
        self.assertIn(broken, str(caught.exception))

    def test_the_module_parameters_must_be_the_weights(self):
        manifest = self.candidates[0][1]
        weights = [(w.name, w.shape) for w in manifest.weights]
        check_weights(manifest, list(reversed(weights)), 0)
        renamed = [("o_proj.base_layer.weight", shape) if name == "o_proj.weight" else (name, shape)
                   for name, shape in weights]
        with self.assertRaises(ManifestError) as caught:
            check_weights(manifest, renamed, 3)
        self.assertIn("layer 3", str(caught.exception))
        self.assertIn("o_proj.base_layer.weight [2048, 1024]", str(caught.exception))
        self.assertIn("o_proj.weight [2048, 1024]", str(caught.exception))

    @unittest.skipUnless(os.path.exists(CCC), "needs target/release/ccc (cargo build --release)")
    def test_what_ccc_spec_from_hf_writes_matches_its_config(self):
        config = dict(model_type="zaya", hidden_size=2048, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4096,
                      num_hidden_layers=3, rope_parameters=vars(zaya1_config())["rope_parameters"])
        libraries = compile_from_hf(config, self.root, "compiled", emit="forward")
        candidates = read_libraries(libraries)
        names = [os.path.basename(choose_library(types.SimpleNamespace(**{**vars(zaya1_config()), **config}), index,
                                                 "bf16", candidates, libraries)[0]) for index in range(3)]
        self.assertEqual(names, ["zaya", "zaya_sliding", "zaya"])


def compile_from_hf(config, root, name, emit):
    """`ccc spec --from-hf` of `config` with `emit = [EMIT]` in every block, compiled into
    root/name/; returns that directory."""
    work = os.path.join(root, f"{name}-spec")
    os.makedirs(work)
    config_path = os.path.join(work, "config.json")
    with open(config_path, "w") as file:
        json.dump(config, file)
    spec = subprocess.run([CCC, "spec", "--from-hf", config_path], capture_output=True, text=True, check=True).stdout
    spec = re.sub(r"\n}", f"\n    emit = [{emit}]\n}}", spec)
    spec_path = os.path.join(work, "model.attn")
    with open(spec_path, "w") as file:
        file.write(spec)
    out = os.path.join(root, name)
    subprocess.run([CCC, "compile", spec_path, "-o", out], capture_output=True, text=True, check=True)
    return out


# --- The module replacement, on the CPU with the reference in place of the kernels ------------

TINY = dict(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=8, num_experts=2,
            moe_intermediate_size=32, router_hidden_size=16, max_position_embeddings=256, eos_token_id=None)


def tiny_model(seed=0):
    """A tiny ZAYA model in bfloat16 with weights at scales where attention is far from uniform
    (transformers' init zeroes the key temperature)."""
    model = ZayaForCausalLM(ZayaConfig(**TINY))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if name.endswith("temp"):
                value = torch.rand(shape, generator=generator) + 0.5
            elif parameter.dim() == 1:
                if not name.endswith("bias"):
                    continue
                value = 0.1 * torch.randn(shape, generator=generator)
            else:
                fan_in = shape[1] * shape[2] if "conv" in name else shape[-1]
                value = torch.randn(shape, generator=generator) / fan_in**0.5
            parameter.copy_(value)
    return model.to(torch.bfloat16).eval()


def prompt(batch=2, length=10, seed=1):
    # Above the pad (0), bos and eos ids, so that generate builds an all-ones mask.
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


class ReferenceKernels:
    """The Layer's entry points as the float64 reference computes them, with a stand-in decode
    state: `k_cache` [pages, page size, E] holds each token's x in its page, where the kernels keep
    its k and v, so that prefill and decode recompute the sequence from the pages and a wrong page,
    position or length shows in the output (`shift_state` [B, 1], unused, stands for the states
    that growing the pool copies whole). Counts the calls."""

    def __init__(self):
        self.calls = {"forward": 0, "prefill": 0, "decode": 0}

    def install(self, test):
        from ccc.library import Layer

        for entry in ("forward", "prefill", "decode", "decode_cache"):
            # A plain function, so that the Layer comes in as its first argument.
            method = getattr(self, entry)
            patcher = mock.patch.object(Layer, entry, lambda layer, *args, method=method: method(layer, *args))
            patcher.start()
            test.addCleanup(patcher.stop)

    def out(self, layer, state_dict, x):
        from ccc.reference import reference_forward

        return reference_forward(layer.spec, state_dict, x)["out"].to(x.dtype)

    def forward(self, layer, x, state_dict):
        self.calls["forward"] += 1
        return self.out(layer, state_dict, x)

    def decode_cache(self, layer, sequences, pages, device="cuda"):
        page_size = layer.manifest.entry_point("decode").buffer("k_cache").shape[1].eval({})
        return {"k_cache": torch.zeros(pages, page_size, layer.spec.model_dim, dtype=torch.float64, device=device),
                "shift_state": torch.zeros(sequences, 1, dtype=torch.float64, device=device)}

    def extend(self, layer, state_dict, cache, block_table, sequence, rows, length):
        """Writes the new `rows` of `sequence`, ending at `length`, into its pages; their outputs."""
        pages = cache["k_cache"]
        page_size = pages.shape[1]
        start = length - rows.shape[0]
        slot = lambda t: (int(block_table[sequence, t // page_size]), t % page_size)  # noqa: E731
        for t in range(start, length):
            pages[slot(t)] = rows[t - start]
        history = torch.stack([pages[slot(t)] for t in range(length)]).to(rows.dtype)
        return self.out(layer, state_dict, history[None])[0, start:]

    def prefill(self, layer, x, state_dict, cache, cu_seqlens, block_table, seq_lens):
        self.calls["prefill"] += 1
        bounds = cu_seqlens.tolist()
        return torch.cat([self.extend(layer, state_dict, cache, block_table, b, x[bounds[b]:bounds[b + 1]], length)
                          for b, length in enumerate(seq_lens.tolist())])

    def decode(self, layer, x, state_dict, cache, block_table, seq_lens):
        self.calls["decode"] += 1
        return torch.stack([self.extend(layer, state_dict, cache, block_table, b, x[b], length)
                            for b, length in enumerate(seq_lens.tolist())])


# The patched model (reference in float64, the rest in float32) against the unpatched one in
# float32: what float32 rounding leaves (2e-5 for the logits, 1e-4 for the attention weights'
# gradients here), far below what a wrong position, mask or page gives (1e-2 and more).
LOGITS_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3


@unittest.skipIf(HF_MISSING, HF_MISSING)
@unittest.skipUnless(os.path.exists(CCC), "needs target/release/ccc (cargo build --release) to compile the tiny "
                                          "model's libraries")
class Patch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import ccc.hf

        cls.hf = ccc.hf
        cls.root = tempfile.mkdtemp()
        config = json.loads(ZayaConfig(**TINY).to_json_string())
        cls.serve = compile_from_hf(config, cls.root, "serve", "forward, decode")
        cls.forward_only = compile_from_hf(config, cls.root, "forward-only", "forward")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root)

    def setUp(self):
        self.kernels = ReferenceKernels()
        self.kernels.install(self)

    def pair(self, libraries=None):
        """(patched, unpatched peer): the same tiny model, both in float32 after patching (the
        reference stands in for the bf16 kernels; `.to()` reaches the shared parameters)."""
        model = tiny_model()
        peer = copy.deepcopy(model)
        self.hf.patch(model, libraries or self.serve)
        return model.float(), peer.float()

    def test_parameters_are_the_models_own(self):
        model = tiny_model()
        before = {name: tensor for name, tensor in model.state_dict().items()}
        originals = [layer.self_attn for layer in model.model.layers]
        parameters = [dict(attention.named_parameters()) for attention in originals]
        self.hf.patch(model, self.serve)
        patched = [layer.self_attn for layer in model.model.layers]
        self.assertEqual([type(a).__name__ for a in patched], ["CccZayaAttention"] * 3)
        self.assertEqual([os.path.basename(a.library.directory) for a in patched], ["zaya", "zaya_sliding", "zaya"])
        after = model.state_dict()
        self.assertEqual(list(after), list(before))
        for name, tensor in after.items():
            self.assertEqual(tensor.data_ptr(), before[name].data_ptr(), name)
        for attention, own in zip(patched, parameters):
            for name, parameter in attention.named_parameters():
                self.assertIs(parameter, own[name])
        # One Layer per library, shared by the layers of its type.
        self.assertIs(patched[0].library, patched[2].library)
        # .to() converts the shared parameters, and unpatch() puts back the originals on them.
        model.float()
        self.hf.unpatch(model)
        self.assertEqual([layer.self_attn for layer in model.model.layers], originals)
        self.assertEqual(originals[0].o_proj.weight.dtype, torch.float32)
        self.assertFalse(hasattr(model.model, "_ccc_input_check"))

    def test_forward_matches_the_unpatched_model(self):
        model, peer = self.pair()
        ids = prompt()
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            expected = peer(ids, use_cache=False).logits
        self.assertEqual(self.kernels.calls["forward"], 3)
        self.assertLess(relative_l2(logits, expected), LOGITS_TOLERANCE)

    def test_greedy_generation_matches_through_ccc_pages(self):
        model, peer = self.pair()
        ids = prompt()
        # 10 + 14 tokens: past the sliding window (8) and across a page boundary (16), so that the
        # pool grows mid-generation.
        tokens = model.generate(ids, max_new_tokens=14, do_sample=False)
        self.assertEqual(self.kernels.calls["prefill"], 3)
        self.assertEqual(self.kernels.calls["decode"], 3 * 13)
        expected = peer.generate(ids, max_new_tokens=14, do_sample=False)
        self.assertEqual(tokens.tolist(), expected.tolist())
        # A second generate starts a new cache, and a prompt of one token is a decode step.
        self.assertEqual(model.generate(ids, max_new_tokens=14, do_sample=False).tolist(), expected.tolist())
        one = ids[:, :1]
        self.assertEqual(model.generate(one, max_new_tokens=5, do_sample=False).tolist(),
                         peer.generate(one, max_new_tokens=5, do_sample=False).tolist())

    def test_a_chunked_prefill_continues_the_pages(self):
        model, peer = self.pair()
        ids = prompt(length=20)
        with torch.no_grad():
            first = model(ids[:, :12])
            second = model(ids[:, 12:], **{CACHE: getattr(first, CACHE)})
            expected = peer(ids).logits
        self.assertLess(relative_l2(torch.cat([first.logits, second.logits], 1), expected), LOGITS_TOLERANCE)
        self.assertEqual(getattr(first, CACHE).get_seq_length(), 20)

    def test_gradients_reach_the_models_parameters(self):
        model, peer = self.pair()
        ids = prompt()
        model(ids, labels=ids, use_cache=False).loss.backward()
        peer(ids, labels=ids, use_cache=False).loss.backward()
        for (name, parameter), (_, expected) in zip(model.named_parameters(), peer.named_parameters()):
            if "self_attn" in name:
                self.assertLess(relative_l2(parameter.grad, expected.grad), GRADIENT_TOLERANCE, name)

    def test_training_needs_a_backward(self):
        model, _ = self.pair()
        mock.patch.stopall()  # the Layer's own forward: its autograd path checks the library first
        with self.assertRaises(ManifestError) as caught:
            model(prompt(), use_cache=False)
        self.assertIn("add `backward` to `emit`", str(caught.exception))

    def test_torch_compile_fullgraph_traces_the_patched_model(self):
        model, _ = self.pair()
        ids = prompt()
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)

    def test_a_padded_batch_is_refused(self):
        model, _ = self.pair()
        ids = prompt()
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with self.assertRaises(NotSupported) as caught, torch.no_grad():
            model(ids, attention_mask=mask)
        self.assertIn("padded batch", str(caught.exception))
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids))
        with self.assertRaises(NotSupported) as caught, torch.no_grad():
            model(ids, attention_mask={"causal": None})
        self.assertIn("attention mask other than", str(caught.exception))

    def test_positions_other_than_the_cached_length_on_are_refused(self):
        model, _ = self.pair()
        ids = prompt()
        with self.assertRaises(NotSupported) as caught, torch.no_grad():
            model(ids, position_ids=torch.arange(ids.shape[1])[None] + 3)
        self.assertIn("position_ids other than 0..9", str(caught.exception))
        with torch.no_grad():
            cache = {CACHE: getattr(model(ids), CACHE)}
            model(ids[:, :1], position_ids=torch.tensor([[10]]), **cache)
            with self.assertRaises(NotSupported) as caught:
                model(ids[:, :1], position_ids=torch.tensor([[3]]), **cache)
        self.assertIn("position_ids other than 11..11", str(caught.exception))

    def test_a_cache_without_a_decode_entry_point(self):
        model, _ = self.pair(self.forward_only)
        ids = prompt()
        with torch.no_grad():
            # A forward that starts a cache (use_cache is on by default) runs; continuing it cannot.
            cache = getattr(model(ids), CACHE)
            with self.assertRaises(ManifestError) as caught:
                model(ids[:, :1], **{CACHE: cache})
        self.assertIn("emit = [forward, decode]", str(caught.exception))
        self.assertIn("layer 0", str(caught.exception))
        with self.assertRaises(ManifestError):
            model.generate(ids, max_new_tokens=2, do_sample=False)

    def test_a_cache_changed_outside_the_layer_is_refused(self):
        model, _ = self.pair()
        ids = prompt()
        with torch.no_grad():
            cache = getattr(model(ids), CACHE)
            cache.reorder_cache(torch.tensor([1, 0]))
            with self.assertRaises(NotSupported) as caught:
                model(ids[:, :1], **{CACHE: cache})
        self.assertIn("changed outside this layer", str(caught.exception))
        with torch.no_grad():
            stranger = getattr(self.hf.unpatch(copy.deepcopy(model))(ids), CACHE)
            with self.assertRaises(NotSupported) as caught:
                model(ids[:, :1], **{CACHE: stranger})
        self.assertIn("did not compute", str(caught.exception))

    def test_patch_changes_nothing_when_a_layer_has_no_library(self):
        model = tiny_model()
        model.config.sliding_window = 4
        originals = [layer.self_attn for layer in model.model.layers]
        with self.assertRaises(LibraryMismatch) as caught:
            self.hf.patch(model, self.serve)
        self.assertIn("layer 1", str(caught.exception))
        self.assertIn("mask sliding_window(8), not sliding_window(4)", str(caught.exception))
        self.assertEqual([layer.self_attn for layer in model.model.layers], originals)
        with self.assertRaises(NotSupported):
            self.hf.patch(tiny_model().float(), self.serve)
        patched = self.hf.patch(tiny_model(), self.serve)
        with self.assertRaises(ValueError) as caught:
            self.hf.patch(patched, self.serve)
        self.assertIn("patched already", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
