"""A small model trained with ccc layers against the same model with Hugging Face's ZayaAttention:
do the loss curves agree to within bf16 noise?

    python3 bench/train_loop.py gpu-carry/train/zaya1/zaya1 [--steps 200] [--out DIR]

The model: token embedding, LAYERS blocks of (RMSNorm, attention, residual), RMSNorm, output
head, on sequences of a fixed random first-order Markov chain over VOCAB tokens (so the loss has
somewhere to go: the chain's entropy). Three runs from the same initial weights and the same
batches: the attention through the ccc library (bf16 weights, AdamW), through HF's ZayaAttention
in bf16 (the same), and through HF's in float32 (the reference curve). bf16 noise is the gap
between HF's bf16 and float32 curves; ours passes when its gap to HF's float32 curve stays within
twice that (per step, over a 10-step running mean) and its final loss within 2% of HF's bf16.
Writes DIR/train_loop.json and DIR/train_loop.svg (bench/loss_plot.py)."""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

import loss_plot  # noqa: E402

import ccc  # noqa: E402
from ccc.hf import ZayaLayer  # noqa: E402

VOCAB = 512
LAYERS = 2


class Model(torch.nn.Module):
    """Embedding, LAYERS pre-norm attention blocks, head; `attend(index, x)` is the attention."""

    def __init__(self, model_dim, attention_weights, dtype):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, model_dim, dtype=dtype)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(model_dim, dtype=dtype) for _ in range(LAYERS + 1))
        self.head = torch.nn.Linear(model_dim, VOCAB, bias=False, dtype=dtype)
        # One ParameterDict per layer, keyed by the HF name with dots replaced (nn naming rule).
        self.attention = torch.nn.ModuleList(
            torch.nn.ParameterDict({name.replace(".", "__"): torch.nn.Parameter(w.to(dtype).clone())
                                    for name, w in weights.items()})
            for weights in attention_weights)

    def weights(self, index):
        return {name.replace("__", "."): w for name, w in self.attention[index].items()}

    def forward(self, tokens, attend):
        x = self.embed(tokens)
        for index in range(LAYERS):
            x = x + attend(index, self.norms[index](x))
        return self.head(self.norms[LAYERS](x))


def markov_batches(steps, batch, seq_len, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    # Each token has a handful of likely successors: entropy well below log(VOCAB).
    logits = torch.randn(VOCAB, VOCAB, device="cuda", generator=generator) * 4
    transition = torch.softmax(logits, dim=-1)
    rows = steps * batch
    tokens = torch.empty(rows, seq_len + 1, dtype=torch.long, device="cuda")
    tokens[:, 0] = torch.randint(0, VOCAB, (rows,), device="cuda", generator=generator)
    for t in range(seq_len):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=generator)[:, 0]
    for step in tokens.view(steps, batch, seq_len + 1):
        yield step[:, :-1], step[:, 1:]


def train(model, attend, batches, lr):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for inputs, targets in batches:
        logits = model(inputs, attend)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def running_mean(values, window=10):
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("library")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default=os.environ.get("OUT", "train-out"))
    args = parser.parse_args()
    layer = ccc.load(args.library)
    spec = layer.spec
    torch.manual_seed(0)
    initial = [layer.random_state_dict(seed=index) for index in range(LAYERS)]
    base = Model(spec.model_dim, initial, torch.float32).cuda()
    data = list(markov_batches(args.steps, args.batch, args.seq_len, seed=1))

    def model_in(dtype):
        model = Model(spec.model_dim, initial, dtype).cuda()
        model.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()})
        return model

    curves = {}
    ours = model_in(torch.bfloat16)
    curves["ccc bf16"] = train(ours, lambda i, x: layer.forward(x, ours.weights(i)), data, args.lr)
    for label, dtype in (("HF bf16", torch.bfloat16), ("HF f32", torch.float32)):
        model = model_in(dtype)
        hf_layers = [ZayaLayer(spec, {k: v.detach() for k, v in model.weights(i).items()}, dtype)
                     for i in range(LAYERS)]
        # HF's modules hold the model's own parameters, so the optimizer trains what they use.
        for index, hf in enumerate(hf_layers):
            for name, parameter in hf.module.named_parameters(recurse=True):
                module_path, _, leaf = name.rpartition(".")
                owner = hf.module.get_submodule(module_path) if module_path else hf.module
                setattr(owner, leaf, model.attention[index][name.replace(".", "__")])
        curves[label] = train(model, lambda i, x: hf_layers[i].output(x), data, args.lr)
    smooth = {label: running_mean(losses) for label, losses in curves.items()}
    noise = [abs(a - b) for a, b in zip(smooth["HF bf16"], smooth["HF f32"])]
    gap = [abs(a - b) for a, b in zip(smooth["ccc bf16"], smooth["HF f32"])]
    worst = max(range(len(gap)), key=lambda i: gap[i] - 2 * noise[i])
    final_ratio = smooth["ccc bf16"][-1] / smooth["HF bf16"][-1]
    ok = all(g <= 2 * n + 1e-2 for g, n in zip(gap, noise)) and abs(final_ratio - 1) <= 0.02
    report = {"library": args.library, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
              "lr": args.lr, "layers": LAYERS, "vocab": VOCAB, "curves": curves,
              "final_smoothed": {label: values[-1] for label, values in smooth.items()},
              "worst_step": worst, "gap_at_worst": gap[worst], "noise_at_worst": noise[worst], "ok": ok}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_loop.json"), "w") as file:
        json.dump(report, file, indent=1)
    with open(os.path.join(args.out, "train_loop.svg"), "w") as file:
        file.write(loss_plot.svg(curves, loss_plot.title_of(report, spec.name)))
    for label, values in smooth.items():
        print(f"{label:9s} loss (10-step mean) step 1 {values[0]:.4f}, step {args.steps // 2} "
              f"{values[args.steps // 2 - 1]:.4f}, step {args.steps} {values[-1]:.4f}")
    print(f"largest gap to HF f32 beyond twice the bf16 noise at step {worst + 1}: gap {gap[worst]:.4f}, "
          f"noise {noise[worst]:.4f}; final ccc/HF bf16 {final_ratio:.4f}")
    print("\nloss curves agree" if ok else "\nLOSS CURVES DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
