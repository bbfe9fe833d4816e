"""Replace Adam with a deepmomentum optimizer by changing one line.

A small character-level MLP language model is trained on Python source text read from the
Python install (no download), first with ``torch.optim.AdamW`` and then with each deepmomentum
optimizer. The training loop is the same for all of them; only the line that builds the
optimizer changes. Prints final train/validation loss (nats per character) and steps per second.

    python examples/replace_adam.py            # about 80 seconds on 2 CPU cores
    python examples/replace_adam.py --steps 100
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepmomentum as dm

# The AdamW part of Muon/M3 as deepmomentum 0.1.0 defaulted it (torch.optim.AdamW's defaults
# now), kept so the README's numbers stay reproducible.
ADAMW_0_1 = dict(adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_weight_decay=0.0)

# name -> the one line that builds the optimizer. lr picked on a small grid per optimizer.
OPTIMIZERS = {
    "torch.optim.AdamW": lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01),
    "PreconditionedMomentum": lambda params: dm.PreconditionedMomentum(
        params, lr=3e-3, weight_decay=0.01),
    "PreconditionedMomentum(value)": lambda params: dm.PreconditionedMomentum(
        params, lr=3e-3, weight_decay=0.01, precondition="value"),
    "AssociativeMomentum(nesterov)": lambda params: dm.AssociativeMomentum(
        params, lr=0.1, momentum=0.9, nesterov=True),
    # Muon and M3 take the model, to route matrices to NS and the rest to AdamW.
    "Muon (+AdamW groups)": lambda model: dm.Muon(
        dm.muon_param_groups(model, adamw_options={"lr": 3e-3}), lr=0.005, **ADAMW_0_1),
    # M3's normalized form steps as Muon does: Muon's lr (best of 0.0025, 0.005, 0.01, 0.02).
    "M3 (+AdamW groups)": lambda model: dm.M3(
        dm.muon_param_groups(model, adamw_options={"lr": 3e-3}), lr=0.005, **ADAMW_0_1),
}
TAKES_MODEL = ("Muon (+AdamW groups)", "M3 (+AdamW groups)")

STDLIB_FILES = ("argparse.py", "textwrap.py", "string.py", "random.py", "difflib.py", "ast.py")


def load_text() -> str:
    """Python source text from the running interpreter's standard library."""
    stdlib = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(stdlib, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    if not parts:
        raise RuntimeError(f"none of {STDLIB_FILES} found under {stdlib}")
    return "\n".join(parts)


class CharMLP(nn.Module):
    """Predict the next character from the previous ``context`` characters."""

    def __init__(self, vocab: int, context: int = 16, embed: int = 24, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.hidden = nn.Linear(context * embed, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):  # x: (B, context) int64
        h = self.embed(x).flatten(1)  # (B, context * embed)
        return self.out(F.gelu(self.hidden(h)))  # (B, vocab)


def batches(data: torch.Tensor, context: int, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(len(data) - context - 1, (batch,), generator=generator)
        offsets = torch.arange(context + 1)
        window = data[starts[:, None] + offsets]  # (B, context + 1)
        yield window[:, :-1], window[:, -1]


@torch.no_grad()
def evaluate(model, data, context, batches_=20, seed=1234):
    g = torch.Generator().manual_seed(seed)
    it = batches(data, context, 256, g)
    return sum(F.cross_entropy(model(x), y).item() for x, y in
               (next(it) for _ in range(batches_))) / batches_


def train(make_optimizer, train_data, val_data, vocab, steps, context=16, seed=0,
          takes_model=False):
    torch.manual_seed(seed)
    model = CharMLP(vocab, context)
    optimizer = make_optimizer(model if takes_model else model.parameters())  # the one line
    data = batches(train_data, context, 64, torch.Generator().manual_seed(seed))
    recent = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
    seconds = time.perf_counter() - start
    return sum(recent) / len(recent), evaluate(model, val_data, context), steps / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    text = load_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    print(f"{len(text):,} characters of Python source, vocabulary {len(chars)}, "
          f"uniform baseline {math.log(len(chars)):.3f} nats/char; {args.steps} steps each\n")

    print(f"| {'optimizer':<30} | train loss | val loss | steps/s |")
    print(f"|{'-' * 32}|-----------:|---------:|--------:|")
    for name, make in OPTIMIZERS.items():
        train_loss, val_loss, rate = train(make, data[:split], data[split:], len(chars),
                                           args.steps, takes_model=name in TAKES_MODEL)
        print(f"| {name:<30} | {train_loss:10.3f} | {val_loss:8.3f} | {rate:7.0f} |", flush=True)


if __name__ == "__main__":
    main()
