"""seed004 section ``lora`` (S-4): int4 LoRA against fp16 / int8 LoRA at equal rank.

Task: adapt the trained long-context model (:mod:`lm.longmodel`, frozen) to a changed rule —
a query's answer is the *next* value character of the variable's value (``A`` -> ``B``, ``9`` ->
``A``) — with rank-4 adapters on every attention and MLP matrix (:class:`lm.lora.LoRA`).  Every
precision trains the same steps on the same batches from the same initial adapters
(quantisation-aware: the forward pass uses the stored precision), then its *stored* adapters
(:meth:`lm.lora.LoRA.pack`: fp16, int8, int4 packed two per byte with a scale per 32 columns)
are applied through POPB (:meth:`lm.popb.PrecisionPlan.apply`, base float32) and scored on
held-out contexts: answer NLL (nats) and answer accuracy.  Bits: the adapters' storage (payload
and scales) and the plan's average bits over the budgeted matrices (base fp32 + adapters, as POPB
bills them).  ``fp32`` adapters are the unquantised reference; ``none`` is the base model.
POPB's pick (:func:`lm.popb.choose_adapter`) is the fewest-bits adapter within 5 % of the best
held-out NLL.  Quick: 15 steps; full: 200 steps (one seed: the shared machine's budget;
``run(seeds=...)`` takes more, median).
"""

from __future__ import annotations

import random
import statistics

import torch
import torch.nn.functional as F

from bench._common import Result
from lm import popb, varref
from lm.longmodel import load
from lm.lora import LoRA

RANK, LR, BATCH, CTX = 4, 1e-2, 8, 96
PRECISIONS = ("fp32", "fp16", "int8", "int4")
HELDOUT_SEED = 313_131


def shifted_example(rng: random.Random) -> tuple[list[int], list[int]]:
    """A varref example whose answers are the next value character (the adaptation task)."""
    tokens, mask = varref.training_example(rng, CTX, 6)
    values = [varref.encode(ch)[0] for ch in varref.VALUES]
    nxt = {v: values[(i + 1) % len(values)] for i, v in enumerate(values)}
    return [nxt[t] if i > 0 and mask[i - 1] else t for i, t in enumerate(tokens)], mask


def _batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ex = [shifted_example(rng) for _ in range(n)]
    width = max(len(t) for t, _ in ex)
    toks = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (t, m) in enumerate(ex):
        toks[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return toks, mask


def _score(logits: torch.Tensor, toks: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    sel = mask[:, :-1]
    lp = F.log_softmax(logits.double(), -1)
    tgt = toks[:, 1:]
    nll = -lp.gather(-1, tgt[..., None])[..., 0][sel]
    acc = (logits.argmax(-1) == tgt)[sel].float()
    return nll.mean().item(), acc.mean().item()


def _train(base, precision: str, steps: int, seed: int) -> LoRA:
    lora = LoRA(base, RANK, precision, seed=seed)
    opt = torch.optim.Adam(lora.parameters(), lr=LR)
    rng = random.Random(seed)
    for _ in range(steps):
        toks, mask = _batch(rng, BATCH)
        logits = lora(toks[:, :-1])
        sel = mask[:, :-1]
        loss = F.cross_entropy(logits[sel], toks[:, 1:][sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lora


def run(quick: bool, seeds: tuple[int, ...] = (0,)) -> Result:
    steps, n_eval = (5, 8) if quick else (200, 64)  # quick: a smoke test of every precision
    base = load()
    held = _batch(random.Random(HELDOUT_SEED), n_eval)
    fp32_plan = popb.PrecisionPlan.uniform(base, "fp32")
    with torch.no_grad():
        none = _score(base(held[0][:, :-1]), *held)
    per: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    last: dict[str, object] = {}
    for seed in seeds:
        for p in PRECISIONS:
            lora = _train(base, p, steps, seed)
            adapters = lora.pack()
            plan = fp32_plan.with_adapters(adapters)
            applied, _ = plan.apply(base)
            with torch.no_grad():
                nll, acc = _score(applied(held[0][:, :-1]), *held)
                trained_nll, _ = _score(lora(held[0][:, :-1]), *held)
            per[p].append({"nll": nll, "acc": acc, "adapter_bits": adapters.bits(),
                           "plan_bits": plan.avg_bits(base), "train_view_nll": trained_nll})  # fmt: skip
            last[p] = adapters
    med = {p: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for p, rows in per.items()}
    res = Result(metrics={})
    res.table.append({"adapters": "none (base)", "rank": 0, "adapter_kbit": 0, "plan_avg_bits": 32.0,
                      "heldout_nll": round(none[0], 4), "heldout_acc": round(none[1], 4)})  # fmt: skip
    for p, m in med.items():
        res.table.append({"adapters": p, "rank": RANK, "adapter_kbit": round(m["adapter_bits"] / 1e3, 1),
                          "plan_avg_bits": round(m["plan_bits"], 3), "heldout_nll": round(m["nll"], 4),
                          "heldout_acc": round(m["acc"], 4)})  # fmt: skip
        res.metrics[f"{p}_nll"] = m["nll"]
        res.metrics[f"{p}_acc"] = m["acc"]
        res.metrics[f"{p}_adapter_bits"] = m["adapter_bits"]
        # the stored adapters score what the quantisation-aware training saw
        res.metrics[f"{p}_stored_minus_trained_nll"] = m["nll"] - m["train_view_nll"]
    res.metrics["base_nll"] = none[0]
    res.metrics["int4_over_fp16_nll"] = med["int4"]["nll"] / med["fp16"]["nll"]
    res.metrics["int4_over_fp16_bits"] = med["int4"]["adapter_bits"] / med["fp16"]["adapter_bits"]
    res.targets["int4_over_fp16_bits"] = ("<=", 0.35)
    losses = {p: med[p]["nll"] for p in ("fp16", "int8", "int4")}
    pick = popb.choose_adapter(base, fp32_plan, {p: last[p] for p in losses}, losses, 64.0, tolerance=0.05)
    res.notes.append(f"POPB's pick (fewest bits within 5% of the best held-out NLL): {pick}")
    res.notes.append(
        f"rank {RANK}, lr {LR}, batch {BATCH} x {CTX}-token contexts, {steps} steps, seeds {list(seeds)} "
        f"(median), held-out {n_eval} contexts; task: answer the next value character"
    )
    return res
