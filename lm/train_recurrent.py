"""Train the recurrent long-context peers: ``python -m lm.train_recurrent KIND [KIND ...] [--minutes M]
[--steps N] [--checkpoint-dir DIR]``.

Same data, loss and curriculum as :mod:`lm.train_varref` (the transformer's trainer: contexts of
:mod:`lm.varref` followed by sixteen queries, the loss on the answer values only, 96-256 tokens
first, then up to ``--max-len``), at the transformer's parameter count
(:func:`lm.recurrent.config_for_params`).  Weights go to ``lm/weights/recurrent_KIND.pt`` with
the run's facts under ``meta`` (steps, seconds, and the training curve: mean loss and token
accuracy per ``--log-every`` steps).

Several kinds train round-robin in one process (one step of each in turn), so one thread
advances them all at the same pace.  ``--checkpoint-dir``: model, optimiser, data RNG and curve of
every kind are saved there every ``--save-every`` rounds (atomic replace) and a run started with
the same directory resumes where the last one stopped -- a long training survives being stopped
and restarted on a loaded machine.  The schedule (warm-up, cosine over ``--steps``) follows the
step count, so a resumed run continues the same schedule.  ``--minutes`` bounds this process's
wall time only; ``--init`` starts a new run (new schedule) from shipped weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import random
import time

import torch

from lm import recurrent, varref
from lm.longmodel import load as load_transformer
from lm.train import token_accuracy, train_step
from lm.train_varref import QUERIES, pad_batch


def example(rng: random.Random, length: int, n_queries: int, first_only: bool) -> tuple[list[int], list[int]]:
    """:func:`lm.varref.training_example` (same draws), with ``first_only`` the loss only on the
    answer to each variable's *first* query: a repeated query's answer stands a few tokens back,
    and copying it is the shortcut a constant-state model learns first (training accuracy rises,
    recall from the definitions does not)."""
    ctx = varref.make_context(rng, length, rng.randint(1, max(1, min(8, (length - 8) // 12))))
    tokens = list(ctx.tokens)
    mask = [0] * len(tokens)
    names, seen = list(ctx.values), set()
    for _ in range(n_queries):
        name = rng.choice(names)
        counted = int(not first_only or name not in seen)
        seen.add(name)
        tokens += ctx.query(name)
        mask += [0, counted]
        ans = ctx.answer(name)
        tokens += ans
        mask += [counted] * (len(ans) - 2) + [0, 0]
    return tokens, mask


def make_batch(
    rng: random.Random, batch: int, length: int, first_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (-100 where no loss) of ``batch`` examples, as :func:`lm.train_varref.make_batch`."""
    return pad_batch([example(rng, length, QUERIES, first_only) for _ in range(batch)])


class _Run:
    """One kind's training state: model, optimiser, data RNG, step and curve."""

    def __init__(self, kind: str, args: argparse.Namespace, target: int) -> None:
        self.kind = kind
        torch.manual_seed(args.seed)
        self.rng = random.Random(args.seed)
        self.prior: dict = {}
        init = args.init
        if init is not None and init.is_dir():
            init = recurrent.weights_path(kind) if init == recurrent.WEIGHTS_DIR else init / f"recurrent_{kind}.pt"
        if init is not None:
            self.model = recurrent.load(init).train().requires_grad_(True)
            self.prior = recurrent.load_meta(init)
        elif args.d_ff is not None:  # an explicit size (tests, small trials)
            cfg = recurrent.RecurrentConfig(kind, varref.VOCAB_SIZE, d_model=args.d_model, d_ff=args.d_ff)
            self.model = recurrent.RecurrentLM(cfg)
        else:
            self.model = recurrent.RecurrentLM(recurrent.config_for_params(kind, varref.VOCAB_SIZE, target))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.step, self.seconds = 0, 0.0
        self.curve: list[list[float]] = []  # [step, mean loss, mean token accuracy] per log window
        self._win: list[tuple[float, float]] = []
        self.loss = 0.0

    def state(self) -> dict:
        return {
            "kind": self.kind,
            "config": dataclasses.asdict(self.model.cfg),
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "seconds": self.seconds,
            "curve": self.curve,
            "prior": self.prior,
        }

    def restore(self, blob: dict) -> None:
        self.model = recurrent.RecurrentLM(recurrent.RecurrentConfig(**blob["config"]))
        self.model.load_state_dict(blob["model"])
        self.opt = torch.optim.AdamW(self.model.parameters())
        self.opt.load_state_dict(blob["opt"])
        self.rng.setstate(blob["rng"])
        torch.set_rng_state(blob["torch_rng"])
        self.step, self.seconds, self.curve, self.prior = blob["step"], blob["seconds"], blob["curve"], blob["prior"]

    def train_one(self, args: argparse.Namespace) -> None:
        t0 = time.monotonic()
        progress = self.step / args.steps
        lr = args.lr * min(1.0, (self.step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in self.opt.param_groups:
            g["lr"] = max(lr, args.lr * 0.02)
        top = 256 if progress < args.short_frac else args.max_len - QUERIES * 4
        inputs, targets = make_batch(self.rng, args.batch, self.rng.randint(96, top), args.loss_on == "first")
        loss, logits = train_step(self.model, self.opt, inputs, targets, self.model.cfg.vocab_size)
        self.step += 1
        self.loss = loss.item()
        self._win.append((self.loss, token_accuracy(logits, targets)))
        self.seconds += time.monotonic() - t0
        if self.step % args.log_every == 0:
            mean_loss = sum(x[0] for x in self._win) / len(self._win)
            mean_acc = sum(x[1] for x in self._win) / len(self._win)
            self.curve.append([self.step, round(mean_loss, 4), round(mean_acc, 4)])
            self._win = []
            print(
                f"{self.kind} step {self.step:5d} len<= {inputs.shape[1]:5d} loss {mean_loss:.4f} tok_acc {mean_acc:.3f} "
                f"lr {lr:.2e} {self.seconds:7.1f}s",
                flush=True,
            )

    def meta(self, args: argparse.Namespace, target: int) -> dict:
        meta = {
            "steps": self.step,
            "planned_steps": args.steps,
            "train_seconds": round(self.seconds, 1),
            "batch": args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "params": recurrent.n_params(self.model),
            "transformer_params": target,
            "final_loss": self.loss,
            "last_tok_acc": self.curve[-1][2] if self.curve else None,
            "max_train_len": args.max_len,
            "loss_on": args.loss_on,
            "curve": self.curve,
        }
        if self.prior:
            meta["continued_from"] = self.prior
        return meta


def _atomic_save(obj: dict, path: pathlib.Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.train_recurrent", description=__doc__)
    p.add_argument("kinds", nargs="+", choices=recurrent.KINDS, metavar="KIND")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-time bound of this process")
    p.add_argument("--rounds", type=int, default=None, help="at most this many rounds in this process")
    p.add_argument("--steps", type=int, default=3000, help="planned steps per kind (the cosine schedule's length)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--short-frac", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=varref.TRAIN_SEED)
    p.add_argument(
        "--loss-on", choices=("first", "all"), default="first", help="answers in the loss: first queries or all"
    )
    p.add_argument("--d-model", type=int, default=64, help="with --d-ff: this size instead of the transformer's count")
    p.add_argument("--d-ff", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=25, help="rounds between checkpoints")
    p.add_argument("--checkpoint-dir", type=pathlib.Path, default=None)
    p.add_argument("--out-dir", type=pathlib.Path, default=recurrent.WEIGHTS_DIR)
    p.add_argument(
        "--init",
        type=pathlib.Path,
        default=None,
        help="start from these weights (file, or a directory of recurrent_KIND.pt)",
    )
    p.add_argument(
        "--export-only", action="store_true", help="write the weights of the checkpoints in --checkpoint-dir and stop"
    )
    args = p.parse_args(argv)
    if args.export_only and args.checkpoint_dir is None:
        p.error("--export-only needs --checkpoint-dir")
    torch.set_num_threads(1)
    target = recurrent.n_params(load_transformer())  # the parameter count to match (and to report)
    runs = [_Run(kind, args, target) for kind in args.kinds]
    if args.checkpoint_dir is not None:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for run in runs:
            ck = args.checkpoint_dir / f"{run.kind}.ckpt"
            if ck.exists():
                run.restore(torch.load(ck, map_location="cpu", weights_only=False))
                print(f"{run.kind}: resumed at step {run.step}", flush=True)

    def checkpoint() -> None:
        if args.checkpoint_dir is not None:
            for run in runs:
                _atomic_save(run.state(), args.checkpoint_dir / f"{run.kind}.ckpt")

    t0, budget, rounds = time.monotonic(), (0.0 if args.export_only else 60 * args.minutes), 0
    max_rounds = args.rounds if args.rounds is not None else float("inf")
    while time.monotonic() - t0 < budget and rounds < max_rounds and any(run.step < args.steps for run in runs):
        for run in runs:
            if run.step < args.steps:
                run.train_one(args)
        rounds += 1
        if rounds % args.save_every == 0:
            checkpoint()
    if not args.export_only:
        checkpoint()
    for run in runs:
        out = args.out_dir / f"recurrent_{run.kind}.pt"
        recurrent.save(run.model, out, run.meta(args, target))
        print(f"saved {out} after {run.step} steps in {run.seconds:.1f}s ({recurrent.n_params(run.model)} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
