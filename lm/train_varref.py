"""Train the long-context model: ``python -m lm.train_varref [--minutes M] [--steps N] [--out PATH]``.

Contexts of the :mod:`lm.varref` workload, generated on the fly from ``--seed`` (default
:data:`lm.varref.TRAIN_SEED`), each followed by sixteen queries; the loss covers only the answer
values.  Lengths follow a curriculum: 96-256 tokens for the first ``--short-frac`` of the run,
then 96-960 (the model is asked about 8k-128k only at evaluation; see :mod:`lm.longmodel` for the
position scheme that makes that work).  The schedule (100 warm-up steps, cosine decay) follows
``--steps`` or ``--minutes``, whichever is further along.  ``--init`` continues from saved
weights.  Weights go to ``lm/weights/varref.pt`` with the run's facts under ``meta``.

The shipped weights: ``python -m lm.train_varref --minutes 20 --steps 6000 --short-frac 0.5
--lr 2e-3`` (one thread, ``nice -n 10``, on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import time

import torch

from lm import varref
from lm.longmodel import DEFAULT_WEIGHTS, LongConfig, LongLM, save
from lm.train import token_accuracy, train_step

MAX_TRAIN_LEN = 1024
QUERIES = 16


def make_batch(rng: random.Random, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([varref.training_example(rng, length, QUERIES) for _ in range(batch)])


def pad_batch(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (-100 where the loss mask is 0) of (tokens, mask) rows, padded."""
    batch = len(rows)
    T = max(len(t) for t, _ in rows) - 1
    inputs = torch.full((batch, T), varref.PAD, dtype=torch.long)
    targets = torch.full((batch, T), -100, dtype=torch.long)
    for r, (toks, mask) in enumerate(rows):
        t = torch.tensor(toks)
        m = torch.tensor(mask[:-1], dtype=torch.bool)
        inputs[r, : len(toks) - 1] = t[:-1]
        tgt = t[1:].clone()
        tgt[~m] = -100
        targets[r, : len(toks) - 1] = tgt
    return inputs, targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.train_varref", description=__doc__)
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--max-len", type=int, default=MAX_TRAIN_LEN)
    p.add_argument("--short-frac", type=float, default=0.25,
                   help="fraction of the run on 96-256-token contexts before the long ones")
    p.add_argument("--init", type=pathlib.Path, default=None, help="continue from these weights")
    p.add_argument("--seed", type=int, default=varref.TRAIN_SEED)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = LongConfig(vocab_size=varref.VOCAB_SIZE, n_layers=args.layers, d_model=args.d_model,
                     d_ff=4 * args.d_model, logn_len=args.max_len, prev_mix=True)
    model = LongLM(cfg)
    prior = {}
    if args.init is not None:
        blob = torch.load(args.init, map_location="cpu", weights_only=True)
        cfg = LongConfig(**blob["config"])
        model = LongLM(cfg)
        model.load_state_dict(blob["state_dict"])
        prior = blob["meta"]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0 = time.monotonic()
    budget = 60 * args.minutes
    step, warmup, loss = 0, 100, torch.tensor(0.0)
    while step < args.steps and time.monotonic() - t0 < budget:
        progress = max(step / args.steps, (time.monotonic() - t0) / budget)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        top = 256 if progress < args.short_frac else args.max_len - QUERIES * 4
        inputs, targets = make_batch(rng, args.batch, rng.randint(96, top))
        loss, logits = train_step(model, opt, inputs, targets, cfg.vocab_size)
        step += 1
        if step % 50 == 0 or step == 1:
            acc = token_accuracy(logits, targets)
            print(f"step {step:5d} len {inputs.shape[1]:5d} loss {loss.item():.4f} tok_acc {acc:.3f} "
                  f"lr {lr:.2e} {time.monotonic() - t0:6.1f}s", flush=True)
    elapsed = time.monotonic() - t0
    n_params = sum(q.numel() for q in model.parameters())
    meta = {"steps": step, "train_seconds": round(elapsed, 1), "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "params": n_params, "final_loss": loss.item(), "max_train_len": args.max_len}
    if prior:
        meta["continued_from"] = prior
    save(model, args.out, meta)
    print(f"saved {args.out} after {step} steps in {elapsed:.1f}s ({n_params} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
