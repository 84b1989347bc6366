"""POPB, the per-operator precision budgeter (seed 001 §3.11): probe, plan, apply.

**Operators.** Each layer of :class:`lm.longmodel.LongLM` has three: ``attn`` (the ``qkv`` and
``proj`` matrices), ``mlp`` (``fc1``, ``fc2``) and ``ln`` (the two layer norms' scale and shift,
as a ``2 x d`` matrix each).  Operator names are ``L<layer>.<op>`` (``L0.attn``); a *matrix* is
``L<layer>.<op>.<param>``.  The embedding (tied with the output head), biases and the final norm
stay float32 and are outside the budget.

**Masks.** A matrix is cut into blocks of :data:`BLOCK` consecutive columns of one row, and each
block gets a storage precision (``accel.precision``: fp32 / fp16 / bf16 / int8).  Applying a plan
quantises every matrix through :func:`accel.precision.quantise` and runs the model with the
dequantised weights (on a GPU, :func:`accel.precision.masked_matvec` reads the blocks in their
stored precision; on this CPU the float32 product of the dequantised matrix is the same
arithmetic as the kernel's reference).  Average bits = storage bits of the blocks' elements
over the matrices' elements (scales excluded; :func:`plan_bytes` counts them).

**The probe** (one step: one forward and one backward pass over a short probe context, 256
tokens and its queries by default):

* per operator and token group: the output change when that operator alone is stored in int8 —
  ``KL(p_fp32 || p_op-int8)`` of the next-token distributions, averaged over the positions of
  each group (``definition``, ``filler``, ``query``: the query and answer tokens) and over all
  positions (``all``).  Groups whose KL is above twice the mean are tagged *hot spots*;
* per block and precision: the first-order loss change ``|g . (W - Q_p(W))|`` over the block,
  from the gradient ``g`` of the answer tokens' negative log-likelihood, and the squared
  quantisation error ``||W - Q_p(W)||^2``.

**The plan.** A block's expected cost at precision ``p`` is its operator's KL (all positions) times
the block's share of the operator's int8 first-order change (weight 0.9) and squared error
(weight :data:`ERROR_MIX`) at ``p``.  Starting from int8 everywhere,
the budgeter takes the upgrades with the best cost reduction per extra bit (a greedy
multiple-choice knapsack over each block's lower convex hull) until the average-bits budget is
spent.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import random
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from accel import precision as accel_precision
from lm import varref
from lm.errors import LMError
from lm.longmodel import LongLM
from lm.lora import ADAPTER_PRECISIONS, AdapterError, Adapters

BLOCK = 32
OPS = ("attn", "mlp", "ln")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
CODE = accel_precision.PRECISIONS
NAME_OF = {v: k for k, v in CODE.items()}
GROUPS = ("definition", "filler", "query")
#: Weight of a block's share of its operator's squared quantisation error in the plan's cost (the
#: rest is its share of the first-order loss change, which is 0 where the probe's gradient is).
ERROR_MIX = 0.1


class PrecisionOrderError(LMError, ValueError):
    """A precision order names an unknown operator or matrix, an unknown precision, masks of the
    wrong shape, or a budget below int8's 8 bits."""


def matrices(model: LongLM) -> dict[str, torch.Tensor]:
    """Every budgeted matrix by name (views of the model's parameters)."""
    out = {}
    for i, blk in enumerate(model.blocks):
        out[f"L{i}.attn.qkv"] = blk.qkv.weight
        out[f"L{i}.attn.proj"] = blk.proj.weight
        out[f"L{i}.mlp.fc1"] = blk.fc1.weight
        out[f"L{i}.mlp.fc2"] = blk.fc2.weight
        out[f"L{i}.ln.ln1"] = torch.stack([blk.ln1.weight, blk.ln1.bias])
        out[f"L{i}.ln.ln2"] = torch.stack([blk.ln2.weight, blk.ln2.bias])
    return out


def operators(model: LongLM) -> list[str]:
    return [f"L{i}.{op}" for i in range(model.cfg.n_layers) for op in OPS]


def operator_of(matrix: str) -> str:
    return matrix.rsplit(".", 1)[0]


def _set_matrix(model: LongLM, name: str, value: torch.Tensor) -> None:
    layer, op, param = name.split(".")
    blk = model.blocks[int(layer[1:])]
    with torch.no_grad():
        if op == "ln":
            norm = getattr(blk, param)
            norm.weight.copy_(value[0])
            norm.bias.copy_(value[1])
        else:
            getattr(blk, param).weight.copy_(value)


def n_blocks(shape: tuple[int, int]) -> int:
    return accel_precision.num_blocks(shape[1], BLOCK)


@dataclasses.dataclass
class PrecisionPlan:
    """Per-block codes (``accel.precision.PRECISIONS``) of every budgeted matrix, and optionally
    low-rank adapters (:class:`lm.lora.Adapters`, fp16 / int8 / int4) added to the dequantised
    matrices when the plan is applied; their storage bits count in :meth:`avg_bits`."""

    codes: dict[str, np.ndarray]
    adapters: Adapters | None = None

    @classmethod
    def uniform(cls, model: LongLM, precision: str) -> PrecisionPlan:
        if precision not in CODE:
            raise PrecisionOrderError(f"unknown precision {precision!r}; known: {sorted(CODE)}")
        return cls({n: np.full((w.shape[0], n_blocks(w.shape)), CODE[precision], np.uint8)
                    for n, w in matrices(model).items()})

    def avg_bits(self, model: LongLM) -> float:
        bits = elems = 0
        mats = matrices(model)
        for n, c in self.codes.items():
            lengths = accel_precision.block_lengths(mats[n].shape[1], BLOCK)[None, :]
            bits += int((accel_precision.BYTES_PER_ELEMENT[c.astype(np.int64)] * 8 * lengths).sum())
            elems += int(lengths.sum() * c.shape[0])
        if self.adapters is not None:  # billed: payload and scales of every adapter
            bits += self.adapters.bits()
        return bits / elems

    def with_adapters(self, adapters: Adapters | None) -> PrecisionPlan:
        return PrecisionPlan(self.codes, adapters)

    def to_wire(self) -> dict:
        out: dict = {"block": BLOCK, "codes": {n: c.tolist() for n, c in self.codes.items()}}
        if self.adapters is not None:
            out["adapters"] = self.adapters.to_wire()
        return out

    @classmethod
    def from_wire(cls, model: LongLM, message: Mapping) -> PrecisionPlan:
        """A plan from an order: ``{"block": 32, "codes": {matrix: [[code]]}}`` (whole masks) or
        ``{"operators": {"L0.attn": "int8", ...}}`` (one precision per operator; the others
        float32), either with ``adapters`` (:meth:`lm.lora.Adapters.from_wire`).  Everything is
        checked before a plan exists."""
        if not isinstance(message, Mapping):
            raise PrecisionOrderError("a precision order is a map")
        plan = cls._from_wire_codes(model, message)
        if "adapters" in message:
            try:
                plan.adapters = Adapters.from_wire(model, message["adapters"])
            except AdapterError as exc:
                raise PrecisionOrderError(str(exc)) from None
        return plan

    @classmethod
    def _from_wire_codes(cls, model: LongLM, message: Mapping) -> PrecisionPlan:
        mats = matrices(model)
        ops = set(operators(model))
        if "operators" in message:
            per_op = message["operators"]
            if not isinstance(per_op, Mapping) or not per_op:
                raise PrecisionOrderError("'operators' must be a non-empty map operator -> precision")
            for op, prec in per_op.items():
                if op not in ops:
                    raise PrecisionOrderError(f"unknown operator {op!r}; known: {sorted(ops)}")
                if prec not in CODE:
                    raise PrecisionOrderError(f"unknown precision {prec!r} for {op}; known: {sorted(CODE)}")
            plan = cls.uniform(model, "fp32")
            for n in plan.codes:
                if operator_of(n) in per_op:
                    plan.codes[n][:] = CODE[per_op[operator_of(n)]]
            return plan
        if message.get("block", BLOCK) != BLOCK or not isinstance(message.get("codes"), Mapping):
            raise PrecisionOrderError(f"an order needs 'operators', or 'codes' with block {BLOCK}")
        codes = {}
        for n, c in message["codes"].items():
            if n not in mats:
                raise PrecisionOrderError(f"unknown matrix {n!r}; known: {sorted(mats)}")
            arr = np.asarray(c)
            want = (mats[n].shape[0], n_blocks(mats[n].shape))
            if arr.shape != want or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 3:
                raise PrecisionOrderError(f"codes of {n} must be integers 0..3 of shape {want}")
            codes[n] = arr.astype(np.uint8)
        missing = set(mats) - set(codes)
        if missing:
            raise PrecisionOrderError(f"codes missing for {sorted(missing)}")
        return cls(codes)

    def apply(self, model: LongLM, *, backend: str = "auto") -> tuple[LongLM, int]:
        """A copy of ``model`` running on the dequantised weights, and the plan's storage bytes
        (payload and scales, from ``accel.precision.quantise``)."""
        out = copy.deepcopy(model)
        total = 0
        for n, w in matrices(model).items():
            x = w.detach().float().numpy().astype(np.float32)
            q = accel_precision.quantise(x, self.codes[n], BLOCK, backend=backend)
            total += q.nbytes
            deq = accel_precision.dequantise(q, backend=backend)
            deq = torch.from_numpy(np.asarray(deq.get() if hasattr(deq, "get") else deq))
            if self.adapters is not None and n in self.adapters.packed:
                deq = deq + self.adapters.delta(n)  # dequantised on use
            _set_matrix(out, n, deq)
        if self.adapters is not None:
            total += self.adapters.bits() // 8
        return out.eval().requires_grad_(False), total


def roundtrip(w: np.ndarray, precision: str) -> np.ndarray:
    codes = np.full((w.shape[0], n_blocks(w.shape)), CODE[precision], np.uint8)
    return accel_precision.dequantise(accel_precision.quantise(w, codes, BLOCK, backend="reference"),
                                      backend="reference")


# ------------------------------------------------------------------------------- probe


def probe_context(seed: int, length: int = 512, n_queries: int = 8) -> tuple[list[int], list[int], list[str]]:
    """A probe sequence: tokens, answer mask (positions whose next token is an answer token) and
    each position's token group."""
    rng = random.Random(seed)
    tokens, mask = varref.training_example(rng, length, n_queries)
    groups = []
    in_def = 0
    for i, t in enumerate(tokens):
        if i >= length:
            groups.append("query")
            continue
        if t == varref.encode("=")[0] and i + 1 < len(tokens) and varref.decode([tokens[i + 1]]) in varref.NAMES:
            in_def = 2 + varref.VALUE_LEN + 1
        groups.append("definition" if in_def > 0 else "filler")
        in_def = max(0, in_def - 1)
    return tokens, mask, groups


@dataclasses.dataclass
class Probe:
    """What one probe measured.  ``kl[op][group]``: mean KL of the next-token distribution when
    ``op`` alone is int8 (and ``kl[op]["all"]`` over every position); ``block_cost[matrix][precision]``: per-block (first-order loss change,
    squared quantisation error);
    ``hot``: (op, group) pairs tagged hot; ``seconds``: the probe's wall time."""

    kl: dict[str, dict[str, float]]
    block_cost: dict[str, dict[str, np.ndarray]]
    hot: list[tuple[str, str]]
    seconds: float
    tokens: int


def _log_probs(model: LongLM, tokens: list[int]) -> torch.Tensor:
    """float64 log-probabilities (a KL of near-identical distributions needs the precision)."""
    return F.log_softmax(model(torch.tensor([tokens[:-1]]))[0].double(), -1)


def probe(model: LongLM, *, seed: int = 7, length: int = 256) -> Probe:
    t0 = time.perf_counter()
    tokens, mask, groups = probe_context(seed, length)
    model = copy.deepcopy(model).train(False).requires_grad_(True)
    mats = matrices(model)
    logp = _log_probs(model, tokens)
    tgt = torch.tensor(tokens[1:])
    sel = torch.tensor(mask[:-1], dtype=torch.bool)
    nll = -logp[sel].gather(1, tgt[sel][:, None]).sum()
    model.zero_grad()
    nll.backward()
    # gradients of the budgeted matrices (the ln "matrix" stacks weight and bias)
    grads = {}
    for i, blk in enumerate(model.blocks):
        grads[f"L{i}.attn.qkv"], grads[f"L{i}.attn.proj"] = blk.qkv.weight.grad, blk.proj.weight.grad
        grads[f"L{i}.mlp.fc1"], grads[f"L{i}.mlp.fc2"] = blk.fc1.weight.grad, blk.fc2.weight.grad
        for ln in ("ln1", "ln2"):
            norm = getattr(blk, ln)
            grads[f"L{i}.ln.{ln}"] = torch.stack([norm.weight.grad, norm.bias.grad])
    block_cost: dict[str, dict[str, np.ndarray]] = {}
    for n, w in mats.items():
        x = w.detach().float().numpy().astype(np.float32)
        g = grads[n].detach().numpy()
        nb = n_blocks(x.shape)
        pad = nb * BLOCK - x.shape[1]
        block_cost[n] = {}
        for p in BITS:
            delta = (x - roundtrip(x, p)) if p != "fp32" else np.zeros_like(x)
            first = np.abs(np.pad(g * delta, ((0, 0), (0, pad))).reshape(x.shape[0], nb, BLOCK).sum(-1))
            sq = (np.pad(delta, ((0, 0), (0, pad))) ** 2).reshape(x.shape[0], nb, BLOCK).sum(-1)
            block_cost[n][p] = (first, sq)
    model.requires_grad_(False)
    ref = logp.detach()
    gidx = {g: torch.tensor([groups[i] == g for i in range(len(tokens) - 1)]) for g in GROUPS}
    kl: dict[str, dict[str, float]] = {}
    for op in operators(model):  # that operator alone in int8, in place, then restored
        saved = {n: w.detach().clone() for n, w in mats.items() if operator_of(n) == op}
        for n, w in saved.items():
            _set_matrix(model, n, torch.from_numpy(roundtrip(w.numpy().astype(np.float32), "int8")))
        with torch.no_grad():
            lp = _log_probs(model, tokens)
        for n, w in saved.items():
            _set_matrix(model, n, w)
        per_pos = (ref.exp() * (ref - lp)).sum(-1)
        kl[op] = {g: float(per_pos[gidx[g]].mean()) if gidx[g].any() else 0.0 for g in GROUPS}
        kl[op]["all"] = float(per_pos.mean())
    mean = float(np.mean([d[g] for d in kl.values() for g in GROUPS]))
    hot = [(op, g) for op, d in kl.items() for g in GROUPS if d[g] > 2 * mean]
    return Probe(kl, block_cost, hot, time.perf_counter() - t0, len(tokens))


# ------------------------------------------------------------------------------- plan


def plan(model: LongLM, probe_result: Probe, avg_bits: float) -> PrecisionPlan:
    """The plan with the least expected cost whose average bits stay within ``avg_bits``."""
    if not isinstance(avg_bits, (int, float)) or avg_bits < 8:
        raise PrecisionOrderError(f"avg_bits must be a number >= 8 (int8 everywhere), got {avg_bits!r}")
    mats = matrices(model)
    codes = {n: np.full((w.shape[0], n_blocks(w.shape)), CODE["int8"], np.uint8) for n, w in mats.items()}
    total_elems = sum(w.numel() for w in mats.values())
    budget = avg_bits * total_elems - 8 * total_elems  # extra bits above int8
    heap: list[tuple[float, int, str, int, int, int]] = []
    hulls: dict[tuple[str, int, int], list[tuple[int, float, str]]] = {}
    tie = 0
    for n, w in mats.items():
        op = operator_of(n)
        weight = max(probe_result.kl[op]["all"], 0.0) + 1e-12
        first = {p: c[0] for p, c in probe_result.block_cost[n].items()}
        sq = {p: c[1] for p, c in probe_result.block_cost[n].items()}
        f_tot, s_tot = first["int8"].sum() + 1e-30, sq["int8"].sum() + 1e-30
        cost = {p: weight * ((1 - ERROR_MIX) * first[p] / f_tot + ERROR_MIX * sq[p] / s_tot) for p in BITS}
        lengths = accel_precision.block_lengths(w.shape[1], BLOCK)
        for r in range(w.shape[0]):
            for k in range(first["int8"].shape[1]):
                pts = sorted(((BITS[p] * int(lengths[k]), float(cost[p][r, k]), p) for p in BITS),
                             key=lambda t: (t[0], t[1]))
                hull = [pts[0]]
                for pt in pts[1:]:  # keep the lower convex hull, strictly decreasing cost
                    if pt[1] >= hull[-1][1]:
                        continue
                    while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], pt):
                        hull.pop()
                    hull.append(pt)
                hulls[(n, r, k)] = hull
                if len(hull) > 1:
                    tie += 1
                    heapq.heappush(heap, (_slope(hull[0], hull[1]), tie, n, r, k, 1))
    while heap:
        slope, _, n, r, k, i = heapq.heappop(heap)
        hull = hulls[(n, r, k)]
        extra = hull[i][0] - hull[i - 1][0]
        if extra > budget:
            continue
        budget -= extra
        codes[n][r, k] = CODE[hull[i][2]]
        if i + 1 < len(hull):
            tie += 1
            heapq.heappush(heap, (_slope(hull[i], hull[i + 1]), tie, n, r, k, i + 1))
    return PrecisionPlan(codes)


def _slope(a: tuple[int, float, str], b: tuple[int, float, str]) -> float:
    """Cost change per extra bit from a to b (negative: an improvement; smaller is better)."""
    return (b[1] - a[1]) / max(1, b[0] - a[0])


def random_plan(model: LongLM, avg_bits: float, seed: int) -> PrecisionPlan:
    """Random masks at (just under) ``avg_bits``: blocks upgraded int8 -> fp16 or fp32 at random
    until the budget is spent."""
    rng = np.random.default_rng(seed)
    mats = matrices(model)
    codes = {n: np.full((w.shape[0], n_blocks(w.shape)), CODE["int8"], np.uint8) for n, w in mats.items()}
    total = sum(w.numel() for w in mats.values())
    budget = (avg_bits - 8) * total
    cells = [(n, r, k) for n, c in codes.items() for r in range(c.shape[0]) for k in range(c.shape[1])]
    for idx in rng.permutation(len(cells)):
        n, r, k = cells[idx]
        length = int(accel_precision.block_lengths(mats[n].shape[1], BLOCK)[k])
        p = "fp16" if rng.random() < 0.5 else "fp32"
        extra = (BITS[p] - 8) * length
        if extra <= budget:
            budget -= extra
            codes[n][r, k] = CODE[p]
    return PrecisionPlan(codes)


# ------------------------------------------------------------------------------- adapters


def choose_adapter(model: LongLM, base: PrecisionPlan, candidates: Mapping[str, Adapters],
                   losses: Mapping[str, float], avg_bits: float, *, tolerance: float = 0.0) -> str | None:
    """The adapter precision POPB picks: among ``candidates`` (precision -> trained adapters,
    each measured at ``losses[precision]`` on held-out data) whose plan ``base + adapters`` fits
    ``avg_bits``, the fewest bits whose loss is within ``tolerance`` (relative) of the best
    fitting loss.  None when no candidate fits the budget."""
    for p in candidates:
        if p not in ADAPTER_PRECISIONS or p not in losses:
            raise PrecisionOrderError(f"adapter candidate {p!r} has no measured loss or is unknown")
    fits = {p: base.with_adapters(a).avg_bits(model) for p, a in candidates.items()}
    fits = {p: b for p, b in fits.items() if b <= avg_bits}
    if not fits:
        return None
    best = min(losses[p] for p in fits)
    ok = [p for p in fits if losses[p] <= best + tolerance * abs(best)]
    return min(ok, key=lambda p: (fits[p], losses[p]))
