"""Train a recurrent long-context peer: ``python -m lm.train_recurrent KIND [--minutes M] [--steps N]``.

Same data, loss and curriculum as :mod:`lm.train_varref` (the transformer's trainer: contexts of
:mod:`lm.varref` followed by sixteen queries, the loss on the answer values only, 96-256 tokens
first, then up to ``--max-len``), at the transformer's parameter count
(:func:`lm.recurrent.config_for_params`).  Weights go to ``lm/weights/recurrent_KIND.pt`` with
the run's facts under ``meta``.

The shipped weights: ``python -m lm.train_recurrent KIND --minutes 7`` for each kind (one thread,
``nice -n 10``, on the shared 2-core machine): a third of the transformer's 20 minutes, said so
in docs/seeds.md.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import time

import torch

from lm import recurrent, varref
from lm.longmodel import load as load_transformer
from lm.train import token_accuracy, train_step
from lm.train_varref import QUERIES, make_batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.train_recurrent", description=__doc__)
    p.add_argument("kind", choices=recurrent.KINDS)
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--short-frac", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=varref.TRAIN_SEED)
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--init", type=pathlib.Path, default=None, help="continue from these weights")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    target = recurrent.n_params(load_transformer())
    cfg = recurrent.config_for_params(args.kind, varref.VOCAB_SIZE, target)
    model = recurrent.RecurrentLM(cfg)
    prior = {}
    if args.init is not None:
        model = recurrent.load(args.init).train().requires_grad_(True)
        cfg, prior = model.cfg, recurrent.load_meta(args.init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, budget = time.monotonic(), 60 * args.minutes
    step, warmup, loss, acc = 0, 100, torch.tensor(0.0), 0.0
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
            print(
                f"{args.kind} step {step:5d} len {inputs.shape[1]:5d} loss {loss.item():.4f} tok_acc {acc:.3f} "
                f"lr {lr:.2e} {time.monotonic() - t0:6.1f}s",
                flush=True,
            )
    elapsed = time.monotonic() - t0
    meta = {
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "params": recurrent.n_params(model),
        "transformer_params": target,
        "final_loss": loss.item(),
        "last_tok_acc": acc,
        "max_train_len": args.max_len,
    }
    if prior:
        meta["continued_from"] = prior
    out = args.out or recurrent.weights_path(args.kind)
    recurrent.save(model, out, meta)
    print(f"saved {out} after {step} steps in {elapsed:.1f}s ({meta['params']} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
