"""Train the chain model on CPU: ``python -m lm.train [--minutes M] [--threads N] [--out PATH]``.

Data are generated on the fly from a seeded RNG (no download): 85 % worked chains ``Q:``, 15 % lazy
chains ``L:`` (thunks), 1..5 items each.  The loss covers only the answer tokens (the question is
random and unpredictable).  Training stops at ``--steps`` or after ``--minutes`` of wall time,
whichever comes first (the cosine learning-rate schedule follows whichever budget is further
along), and the weights go to ``lm/weights/chain.pt`` (float32 state dict plus the config; the
run's step count and wall time are stored under ``meta``).  Held-out accuracy is measured separately by ``python -m lm.evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import random
import time

import torch
import torch.nn.functional as F

from lm import chains, tokenizer
from lm.model import ModelConfig, TinyLM

DEFAULT_WEIGHTS = pathlib.Path(__file__).parent / "weights" / "chain.pt"
TRAIN_SEED = 1234
LAZY_FRACTION = 0.15



def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on next-token cross-entropy (targets -100 are ignored), gradients
    clipped to norm 1; returns (loss, logits)."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, logits


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Greedy next-token accuracy over the positions with a target (not -100)."""
    with torch.no_grad():
        valid = targets != -100
        return (logits.argmax(-1)[valid] == targets[valid]).float().mean().item()

def sample_example(rng: random.Random) -> tuple[list[int], int]:
    """Token ids of one training chain (BOS..EOS) and the index where the answer starts."""
    items = chains.random_items(rng, rng.randint(1, chains.MAX_ITEMS))
    lazy = rng.random() < LAZY_FRACTION
    prompt_ids = tokenizer.encode(chains.prompt(items, lazy=lazy))
    answer_ids = tokenizer.encode(chains.answer(items, lazy=lazy), bos=False, eos=True)
    return prompt_ids + answer_ids, len(prompt_ids)


def make_batch(rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` ``[B, T]``; targets are ``-100`` outside the answer and on padding."""
    examples = [sample_example(rng) for _ in range(batch_size)]
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((batch_size, T), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((batch_size, T), -100, dtype=torch.long)
    for row, (ids, answer_at) in enumerate(examples):
        ids_t = torch.tensor(ids)
        inputs[row, : len(ids) - 1] = ids_t[:-1]
        targets[row, answer_at - 1 : len(ids) - 1] = ids_t[answer_at:]
    return inputs, targets


def save(model: TinyLM, path: pathlib.Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": dataclasses.asdict(model.cfg), "state_dict": model.state_dict(), "meta": meta},
        path,
    )


def load(path: pathlib.Path | str = DEFAULT_WEIGHTS, dtype: torch.dtype = torch.float32) -> TinyLM:
    """The trained model from ``path``, in eval mode, cast to ``dtype``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyLM(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.train", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads; 1 is as fast as 2 on an idle 2-core machine and far "
                        "faster when other processes compete for the cores")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    cfg = ModelConfig(
        vocab_size=tokenizer.VOCAB_SIZE, d_model=args.d_model, n_layers=args.layers,
        n_heads=4, d_ff=4 * args.d_model,
    )
    model = TinyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 200
    deadline = time.monotonic() + 60 * args.minutes
    t0 = time.monotonic()
    step = 0
    horizon = args.steps
    while step < args.steps and time.monotonic() < deadline:
        # cosine over the step budget, or over the time budget when time is what runs out first
        frac_time = (time.monotonic() - t0) / (60 * args.minutes)
        progress = max(step / horizon, frac_time)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, targets = make_batch(rng, args.batch)
        loss, logits = train_step(model, opt, inputs, targets, cfg.vocab_size)
        step += 1
        if step % 100 == 0 or step == 1:
            acc = token_accuracy(logits, targets)
            print(
                f"step {step:5d}  loss {loss.item():.4f}  tok_acc {acc:.4f}  lr {lr:.2e}  "
                f"elapsed {time.monotonic() - t0:6.1f}s",
                flush=True,
            )
    elapsed = time.monotonic() - t0
    n_params = sum(p.numel() for p in model.parameters())
    save(model, args.out, {"steps": step, "train_seconds": elapsed, "threads": args.threads,
                           "batch": args.batch, "params": n_params, "final_loss": loss.item()})
    print(f"saved {args.out} after {step} steps in {elapsed:.1f}s ({n_params} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
