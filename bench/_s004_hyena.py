"""seed004 section ``hyena`` (C-3 Hyena, C-4 MegaByte): small models of each trained *inside the
benchmark's budget* on kvtp's task (the data, loss and batch of lm/train_varref.py, contexts of
96-256 tokens), then asked the held-out kvtp queries at ``EVAL_LEN`` tokens (one dense forward per
query; first query of each variable).  "Useful" = at least half the transformer's accuracy on the
same contexts; a peer below that is reported as not trainable here within the budget.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from bench import kvtp as K
from bench._common import Result
from lm import varref
from lm.convpeers import HyenaLM, MegaByteLM
from lm.longmodel import load
from lm.recurrent import n_params
from lm.train import train_step
from lm.train_varref import make_batch


def _accuracy(model, contexts) -> float:
    hits = []
    with torch.no_grad():
        for ctx in contexts:
            for name in ctx.values:
                ids = torch.tensor([list(ctx.tokens) + ctx.query(name)])
                hits.append(int(model(ids)[0, -1].argmax()) == ctx.answer(name)[0])
    return float(np.mean(hits))


def run(quick: bool, size: tuple[int, int, int] | None = None) -> Result:
    """``size``: (training steps, evaluation length, contexts); default by ``quick``."""
    torch.set_num_threads(1)
    steps, eval_len, n_ctx = size or ((4, 256, 1) if quick else (300, 2048, 2))
    ref = load()
    contexts = [K._context(eval_len, K.HELDOUT_SEED + 7 + i) for i in range(n_ctx)]
    rows, metrics = [], {}
    ref_acc = _accuracy(ref, contexts)
    rows.append({"peer": "transformer (shipped)", "params": n_params(ref), "train steps": 6000, "acc": ref_acc})
    for name, make in (
        ("hyena", lambda: HyenaLM(varref.VOCAB_SIZE)),
        ("megabyte", lambda: MegaByteLM(varref.VOCAB_SIZE)),
    ):
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
        rng = random.Random(varref.TRAIN_SEED)
        t0 = time.perf_counter()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            inputs, targets = make_batch(rng, 8, rng.randint(96, 256))
            loss, _ = train_step(model, opt, inputs, targets, varref.VOCAB_SIZE)
        train_s = time.perf_counter() - t0
        model.eval()
        acc = _accuracy(model, contexts)
        useful = acc >= 0.5 * ref_acc
        rows.append(
            {
                "peer": name,
                "params": n_params(model),
                "train steps": steps,
                "train s": train_s,
                "final loss": float(loss.detach()),
                "acc": acc,
                "useful": useful,
            }
        )
        metrics[f"{name}_acc_{eval_len}"] = acc
        metrics[f"{name}_useful"] = float(useful)
        metrics[f"{name}_train_s"] = train_s
    metrics[f"transformer_acc_{eval_len}"] = ref_acc
    notes = [
        f"each trained {steps} steps (AdamW lr 1e-3, batch 8, 96-256 tokens) inside this run; accuracy at {eval_len} tokens on "
        f"{n_ctx} held-out kvtp context(s), {K.N_VARS} queries each; chance is 1/36",
        "not useful here = the budget of a benchmark on this shared CPU is far below what the shipped transformer "
        "had (6000 steps); the table says which reached half the transformer's accuracy",
    ]
    return Result(metrics=metrics, table=rows, notes=notes)
