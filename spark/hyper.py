"""Layer generator (seed 003): a hypernetwork that generates LoRA deltas from task metadata,
measured against per-task LoRA trained directly and against the base model, at equal trainable
parameters.

**Tasks.** A family of chain tasks the shipped chain LM was never trained on, parameterised by
an offset ``k``: the question is the ordinary ``Q:a+b*c,...;`` and the worked answer is the
ordinary two steps, except that the product step adds ``k`` (``b*c=P+k;a+(P+k)=V;``).  ``k = 0``
is the base task.  The metadata of a task is its feature vector :func:`meta` (``1, k/10,
(k/10)^2, [k odd]``); nothing in the prompt says which task is asked, so the model can only
know it from the delta.  Train tasks :data:`TRAIN_K`, held-out tasks :data:`HELDOUT_K`.

**Adapters.** Every block's ``qkv`` and ``fc1`` (:data:`TARGETS`) gets a low-rank delta
``W + B A`` (rank ``rank``; :class:`LoRALinear`; the base weights are frozen).

* **per-task LoRA**: one ``(A, B)`` set per train task, trained on that task only.  A held-out
  task has no adapter of its own; it uses the nearest train task's.
* **hypernetwork**: ``meta(k) -> tanh(W1 m + b1) -> W2 h + b2`` = every ``(A, B)`` of the
  model, trained on batches of all the train tasks.  A held-out task gets its delta from its
  metadata (zero-shot).  Its hidden width is chosen so that its parameters are the per-task
  adapters' total (:func:`hidden_for_equal_params`).

Both see the same number of training examples and optimiser steps.  :func:`compare` trains both
and scores every task teacher-forced (answer-token accuracy and loss) and by exact greedy answers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm import chains, tokenizer
from lm.model import TinyLM

TARGETS = ("qkv", "fc1")
TRAIN_K = (0, 1, 2, 4, 6, 8)
HELDOUT_K = (3, 5, 7)
META_DIM = 4
MAX_K = 20


class TaskError(ValueError):
    """A task offset outside ``[0, MAX_K]`` or an adapter shape that does not fit the model."""


def meta(k: int) -> torch.Tensor:
    """The metadata vector of the offset-``k`` task."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_K:
        raise TaskError(f"task offset must be an integer in [0, {MAX_K}], got {k!r}")
    x = k / 10
    return torch.tensor([1.0, x, x * x, float(k % 2)])


def answer(items: Sequence[chains.Item], k: int) -> str:
    out = []
    for it in items:
        p = it.product + k
        out.append(f"{it.b}*{it.c}={p};{it.a}+{p}={it.a + p};")
    return "".join(out)


def example(rng: random.Random, k: int) -> tuple[list[int], int]:
    items = chains.random_items(rng, rng.randint(1, 3))
    p = tokenizer.encode(chains.prompt(items))
    return p + tokenizer.encode(answer(items, k), bos=False, eos=True), len(p)


def batch(rng: random.Random, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of one example per entry of ``ks``; targets -100 outside answers."""
    exs = [example(rng, k) for k in ks]
    T = max(len(ids) for ids, _ in exs) - 1
    inputs = torch.full((len(ks), T), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(ks), T), -100, dtype=torch.long)
    for row, (ids, at) in enumerate(exs):
        t = torch.tensor(ids)
        inputs[row, : len(ids) - 1] = t[:-1]
        targets[row, at - 1 : len(ids) - 1] = t[at:]
    return inputs, targets


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T`` with ``(A, B)`` set per forward (:meth:`set`): ``A`` ``[r, in]``
    and ``B`` ``[out, r]``, or one pair per batch row (``[N, r, in]``, ``[N, out, r]``)."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int) -> None:
        super().__init__()
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def set(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        self.A, self.B = A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.A is None or self.B is None:
            return y
        if self.A.dim() == 2:
            return y + (x @ self.A.T) @ self.B.T
        return y + torch.einsum("btr,bor->bto", torch.einsum("btd,brd->btr", x, self.A), self.B)


def adapt(model: TinyLM) -> tuple[TinyLM, list[LoRALinear]]:
    """A frozen copy of ``model`` with :data:`TARGETS` wrapped in :class:`LoRALinear`."""
    out = copy.deepcopy(model).train(False).requires_grad_(False)
    slots = []
    for blk in out.blocks:
        for name in TARGETS:
            base = getattr(blk, name)
            w = base.weight if hasattr(base, "weight") else base.decoded()
            slot = LoRALinear(base, w.shape[1], w.shape[0])
            setattr(blk, name, slot)
            slots.append(slot)
    return out, slots


def factor_sizes(slots: Sequence[LoRALinear], rank: int) -> list[tuple[int, int]]:
    return [(rank * s.d_in, s.d_out * rank) for s in slots]


def lora_params(slots: Sequence[LoRALinear], rank: int) -> int:
    """Parameters of one full adapter set (every slot's ``A`` and ``B``)."""
    return sum(a + b for a, b in factor_sizes(slots, rank))


def split(flat: torch.Tensor, slots: Sequence[LoRALinear], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a flat factor vector ``[..., P]`` into each slot's ``(A, B)``."""
    out, at = [], 0
    lead = flat.shape[:-1]
    for s, (a, b) in zip(slots, factor_sizes(slots, rank)):
        A = flat[..., at : at + a].reshape(*lead, rank, s.d_in)
        B = flat[..., at + a : at + a + b].reshape(*lead, s.d_out, rank)
        out.append((A, B))
        at += a + b
    return out


def _init_flat(slots: Sequence[LoRALinear], rank: int, gen: torch.Generator) -> torch.Tensor:
    """LoRA's initialisation: ``A`` small random, ``B`` zero (the delta starts at zero)."""
    parts = []
    for s, (a, b) in zip(slots, factor_sizes(slots, rank)):
        parts += [torch.randn(a, generator=gen) / math.sqrt(s.d_in), torch.zeros(b)]
    return torch.cat(parts)


class PerTask(nn.Module):
    """One directly trained adapter set per train task."""

    def __init__(self, slots: Sequence[LoRALinear], rank: int, ks: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ks = tuple(ks)
        self.flat = nn.Parameter(torch.stack([_init_flat(slots, rank, gen) for _ in ks]))

    def factors(self, k: int) -> torch.Tensor:
        near = min(self.ks, key=lambda t: (abs(t - k), t))  # a held-out task: the nearest one's
        return self.flat[self.ks.index(near)]


class Hyper(nn.Module):
    """``meta(k) -> tanh(W1 m + b1) -> W2 h + b2``: every adapter of the model from metadata."""

    def __init__(self, slots: Sequence[LoRALinear], rank: int, hidden: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        p = lora_params(slots, rank)
        self.w1 = nn.Parameter(torch.randn(hidden, META_DIM, generator=gen))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(p, hidden))
        self.b2 = nn.Parameter(_init_flat(slots, rank, gen))  # the shared part starts as LoRA's init
        # the A-part of w2 starts small random so the metadata matters from the first step
        with torch.no_grad():
            at = 0
            for a, b in factor_sizes(slots, rank):
                self.w2[at : at + a] = torch.randn(a, hidden, generator=gen) * 0.01
                at += a + b

    def factors(self, k: int | torch.Tensor) -> torch.Tensor:
        m = meta(k) if isinstance(k, int) else k
        return torch.tanh(m @ self.w1.T + self.b1) @ self.w2.T + self.b2


def hidden_for_equal_params(slots: Sequence[LoRALinear], rank: int, n_tasks: int) -> int:
    """The hidden width whose hypernetwork has at most ``n_tasks`` adapter sets' parameters."""
    p = lora_params(slots, rank)
    h = 1
    while (h + 1) * (META_DIM + 1 + p) + p <= n_tasks * p:
        h += 1
    return h


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _apply(slots: Sequence[LoRALinear], flat: torch.Tensor | None, rank: int) -> None:
    if flat is None:
        for s in slots:
            s.set(None, None)
        return
    for s, (A, B) in zip(slots, split(flat, slots, rank)):
        s.set(A, B)


def _loss(model: TinyLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclasses.dataclass
class Setup:
    rank: int = 4
    steps: int = 150  # optimiser steps per train task (the hypernetwork gets steps * tasks)
    batch: int = 16
    lr: float = 1e-2
    seed: int = 0
    eval_batches: int = 4
    greedy_n: int = 8  # greedy answers per task (0: none; "exact" is then 0)
    eval_k: tuple[int, ...] | None = None  # the tasks scored (None: every train and held-out task)


def train_per_task(model: TinyLM, slots: list[LoRALinear], s: Setup) -> PerTask:
    pt = PerTask(slots, s.rank, TRAIN_K, seed=s.seed)
    for i, k in enumerate(TRAIN_K):
        rng = random.Random(s.seed * 1000 + 17 * i + 1)
        opt = torch.optim.Adam([pt.flat], lr=s.lr)
        for _ in range(s.steps):
            inputs, targets = batch(rng, [k] * s.batch)
            flat = pt.flat[i]
            _apply(slots, flat, s.rank)
            loss = _loss(model, inputs, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _apply(slots, None, s.rank)
    return pt


def train_hyper(model: TinyLM, slots: list[LoRALinear], s: Setup) -> Hyper:
    hidden = hidden_for_equal_params(slots, s.rank, len(TRAIN_K))
    hy = Hyper(slots, s.rank, hidden, seed=s.seed)
    rng = random.Random(s.seed * 1000 + 999)
    opt = torch.optim.Adam(hy.parameters(), lr=s.lr)
    metas = torch.stack([meta(k) for k in TRAIN_K])
    for step in range(s.steps * len(TRAIN_K)):
        # every batch mixes the tasks, one task per row: the generator sees them all each step
        ks = [TRAIN_K[(step + j) % len(TRAIN_K)] for j in range(s.batch)]
        inputs, targets = batch(rng, ks)
        flat = hy.factors(metas[[TRAIN_K.index(k) for k in ks]])  # [batch, P]
        _apply(slots, flat, s.rank)
        loss = _loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _apply(slots, None, s.rank)
    return hy


@torch.no_grad()
def score(model: TinyLM, slots: list[LoRALinear], flat: torch.Tensor | None, k: int, s: Setup) -> dict[str, float]:
    """Teacher-forced answer-token accuracy and loss, and exact greedy answers, on task ``k``
    (held-out questions: a seed no training uses)."""
    _apply(slots, flat, s.rank)
    rng = random.Random(424_242 + k)
    correct = total = 0
    nll = 0.0
    for _ in range(s.eval_batches):
        inputs, targets = batch(rng, [k] * s.batch)
        logits = model(inputs)
        valid = targets != -100
        nll += F.cross_entropy(logits[valid], targets[valid], reduction="sum").item()
        correct += int((logits.argmax(-1)[valid] == targets[valid]).sum())
        total += int(valid.sum())
    exact = 0
    for _ in range(s.greedy_n):
        ids, at = example(rng, k)
        seq = ids[:at]
        while len(seq) < len(ids) + 2 and seq[-1] != tokenizer.EOS:
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        exact += seq == ids
    _apply(slots, None, s.rank)
    return {"token_acc": correct / total, "loss": nll / total, "exact": exact / max(1, s.greedy_n)}


def compare(model: TinyLM, s: Setup) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train both and score base, per-task LoRA and the hypernetwork on every task.  Returns one
    row per (method, task) and the trained adapters (``per_task``, ``hyper``, ``slots``...)."""
    torch.manual_seed(s.seed)
    adapted, slots = adapt(model)
    t0 = time.perf_counter()
    pt = train_per_task(adapted, slots, s)
    t_pt = time.perf_counter() - t0
    t0 = time.perf_counter()
    hy = train_hyper(adapted, slots, s)
    t_hy = time.perf_counter() - t0
    rows = []
    for k in s.eval_k if s.eval_k is not None else TRAIN_K + HELDOUT_K:
        split_ = "train" if k in TRAIN_K else "held-out"
        for method, flat, params, secs in (
            ("base", None, 0, 0.0),
            ("per-task LoRA", pt.factors(k).detach(), n_params(pt), t_pt),
            ("hypernetwork", hy.factors(k).detach(), n_params(hy), t_hy),
        ):
            rows.append(
                {
                    "method": method,
                    "task_k": k,
                    "split": split_,
                    "trainable": params,
                    "train_s": round(secs, 1),
                    **score(adapted, slots, flat, k, s),
                }
            )
    return rows, {
        "per_task": pt,
        "hyper": hy,
        "adapted": adapted,
        "slots": slots,
        "lora_params_per_task": lora_params(slots, s.rank),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean token accuracy / exact answers per method and split."""
    out: dict[str, float] = {}
    for method, tag in (("base", "base"), ("per-task LoRA", "lora"), ("hypernetwork", "hyper")):
        for split_ in ("train", "held-out"):
            rs = [r for r in rows if r["method"] == method and r["split"] == split_]
            key = split_.replace("-", "")
            out[f"hyper_{tag}_{key}_token_acc"] = sum(r["token_acc"] for r in rs) / len(rs)
            out[f"hyper_{tag}_{key}_exact"] = sum(r["exact"] for r in rs) / len(rs)
    params = {r["method"]: r["trainable"] for r in rows}
    out["hyper_params_vs_lora"] = params["hypernetwork"] / params["per-task LoRA"]
    return out
