"""Small, same-data comparisons of two SPARK ideas against their learned peers, on the chain task
(lm/chains.py: next-token prediction of the worked answer, loss on answer tokens only):

* **sparse routing** — a mixture of ``E`` expert MLPs, one active per token, routed by a *content
  hash* of the token id (fixed, like Hash Layers), a *random hash* (a fresh random expert per token
  per forward, the seed origin's router) or a *learned* top-1 gate (Switch-style, with the usual
  load-balancing loss); beside a dense MLP with the same active parameters (one expert's width)
  and one with all of them.  Measured: held-out answer-token accuracy, load balance (std of the
  share of tokens each expert gets; 0 is perfectly even) and training / inference time.
* **procedural attention** — attention whose pattern is synthesised from fixed atoms of the relative
  distance (``sinusoid``: cos/sin at geometric frequencies; ``legendre``: Legendre polynomials of
  the scaled distance) with learned per-head coefficients, beside learned (query/key) attention
  with the same model width.  Measured: accuracy, parameters, time.

Every model is tiny (width 32, 2 layers), trained for the same steps on the same batches with fixed
seeds: the comparisons are about the ideas at equal cost, not about absolute quality.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm import tokenizer
from lm.attention import attention
from lm.model import rope

ROUTERS = ("content", "random", "learned")
ATTENTIONS = ("learned", "sinusoid", "legendre")
GOLDEN = 2654435761  # Knuth's multiplicative hash constant


@dataclasses.dataclass(frozen=True)
class Spec:
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 64  # width of one expert (and of the dense peer at equal active parameters)
    experts: int = 4
    atoms: int = 8
    attention: str = "learned"
    router: str | None = None  # None: a dense MLP of width d_ff
    max_len: int = 160


class Attention(nn.Module):
    def __init__(self, s: Spec) -> None:
        super().__init__()
        self.s = s
        self.hd = s.d_model // s.n_heads
        self.v = nn.Linear(s.d_model, s.d_model, bias=False)
        self.out = nn.Linear(s.d_model, s.d_model, bias=False)
        if s.attention == "learned":
            self.qk = nn.Linear(s.d_model, 2 * s.d_model, bias=False)
        elif s.attention in ("sinusoid", "legendre"):
            self.coef = nn.Parameter(torch.randn(s.n_heads, s.atoms) * 0.5)
            self.register_buffer("basis", self._basis(s), persistent=False)  # (atoms, T, T)
        else:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {s.attention!r}")

    @staticmethod
    def _basis(s: Spec) -> torch.Tensor:
        t = s.max_len
        dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp_min(0).float()  # causal part
        if s.attention == "sinusoid":
            freqs = [2 * math.pi / (2.0 ** (1 + i // 2)) for i in range(s.atoms)]
            atoms = [torch.cos(f * dist) if i % 2 == 0 else torch.sin(f * dist) for i, f in enumerate(freqs)]
        else:  # Legendre P_0..P_{m-1} of the distance scaled to [-1, 1]
            x = 2 * dist / (t - 1) - 1
            atoms = [torch.ones_like(x), x]
            for n in range(1, s.atoms - 1):
                atoms.append(((2 * n + 1) * x * atoms[n] - n * atoms[n - 1]) / (n + 1))
            atoms = atoms[: s.atoms]
        return torch.stack(atoms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.s.n_heads, self.hd
        v = self.v(x).view(B, T, H, D).transpose(1, 2)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if self.s.attention == "learned":
            q, k = self.qk(x).view(B, T, 2, H, D).unbind(2)
            pos = torch.arange(T)
            q, k = rope(q, pos, 10000.0).transpose(1, 2), rope(k, pos, 10000.0).transpose(1, 2)
            y = attention(q, k, v, causal=True)
        else:
            scores = torch.einsum("hm,mij->hij", self.coef, self.basis[:, :T, :T])
            w = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # the same pattern for every input
            y = torch.einsum("hij,bhjd->bhid", w, v)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class MoE(nn.Module):
    """``experts`` MLPs of width d_ff, one active per token."""

    def __init__(self, s: Spec) -> None:
        super().__init__()
        self.s = s
        e = s.experts
        self.w1 = nn.Parameter(torch.randn(e, s.d_model, s.d_ff) / math.sqrt(s.d_model))
        self.b1 = nn.Parameter(torch.zeros(e, s.d_ff))
        self.w2 = nn.Parameter(torch.randn(e, s.d_ff, s.d_model) / math.sqrt(s.d_ff))
        self.b2 = nn.Parameter(torch.zeros(e, s.d_model))
        self.gate = nn.Linear(s.d_model, e, bias=False) if s.router == "learned" else None
        self.aux = torch.zeros(())
        self.counts = torch.zeros(e)

    def route(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.s.experts
        if self.s.router == "content":
            choice = (idx * GOLDEN % (2**32)) % e
            return choice, torch.ones_like(idx, dtype=x.dtype)
        if self.s.router == "random":
            return torch.randint(0, e, idx.shape), torch.ones_like(idx, dtype=x.dtype)
        assert self.gate is not None
        probs = self.gate(x).softmax(-1)
        weight, choice = probs.max(-1)
        if self.training:  # Switch load-balancing loss: e * sum(fraction_i * mean_prob_i)
            frac = F.one_hot(choice, e).float().mean(dim=(0, 1))
            self.aux = e * (frac * probs.mean(dim=(0, 1))).sum()
        return choice, weight

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        choice, weight = self.route(x, idx)
        self.counts += torch.bincount(choice.reshape(-1), minlength=self.s.experts).float()
        flat, route = x.reshape(-1, x.shape[-1]), choice.reshape(-1)
        out = torch.zeros_like(flat)
        for e in range(self.s.experts):  # each expert runs only on its own tokens
            sel = (route == e).nonzero().squeeze(1)
            if sel.numel():
                h = F.gelu(flat[sel] @ self.w1[e] + self.b1[e])
                out = out.index_copy(0, sel, h @ self.w2[e] + self.b2[e])
        return out.view_as(x) * weight[..., None]


class Layer(nn.Module):
    def __init__(self, s: Spec) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(s.d_model), nn.LayerNorm(s.d_model)
        self.attn = Attention(s)
        self.moe = MoE(s) if s.router else None
        self.mlp = (
            None if s.router else nn.Sequential(nn.Linear(s.d_model, s.d_ff), nn.GELU(), nn.Linear(s.d_ff, s.d_model))
        )

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        return x + (self.moe(h, idx) if self.moe is not None else self.mlp(h))


class Small(nn.Module):
    def __init__(self, s: Spec) -> None:
        super().__init__()
        self.s = s
        self.emb = nn.Embedding(tokenizer.VOCAB_SIZE, s.d_model)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.n_layers))
        self.ln = nn.LayerNorm(s.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x, idx)
        return self.ln(x) @ self.emb.weight.T

    def aux_loss(self) -> torch.Tensor:
        return sum((lay.moe.aux for lay in self.layers if lay.moe is not None), torch.zeros(()))

    def active_params(self) -> int:
        """Parameters one token uses (one expert of each MoE; the gate included)."""
        total = 0
        for name, p in self.named_parameters():
            if ".moe.w" in name or ".moe.b" in name:
                total += p.numel() // self.s.experts
            else:
                total += p.numel()
        return total


def train_and_score(s: Spec, *, steps: int, batch: int = 32, seed: int = 0, eval_batches: int = 8) -> dict[str, Any]:
    """Train ``Small(s)`` for ``steps`` on seeded batches; held-out accuracy and timings."""
    from lm.train import make_batch

    torch.manual_seed(seed)
    model = Small(s)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(1234 + seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        inputs, targets = make_batch(rng, batch)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + 0.01 * model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    for lay in model.layers:
        if lay.moe is not None:
            lay.moe.counts.zero_()
    hrng = random.Random(20_251_124)
    correct = total = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(eval_batches):
            inputs, targets = make_batch(hrng, batch)
            pred = model(inputs).argmax(-1)
            valid = targets != -100
            correct += int((pred[valid] == targets[valid]).sum())
            total += int(valid.sum())
    infer_ms = 1e3 * (time.perf_counter() - t0) / eval_batches
    shares = [lay.moe.counts / lay.moe.counts.sum() for lay in model.layers if lay.moe is not None]
    balance = float(torch.stack(shares).std(dim=1).mean()) if shares else 0.0
    return {
        "accuracy": correct / total,
        "params": sum(p.numel() for p in model.parameters()),
        "active_params": model.active_params(),
        "balance_std": balance,
        "train_ms_step": 1e3 * train_s / max(1, steps),
        "infer_ms_batch": infer_ms,
    }


def router_rows(steps: int, seed: int = 0, **kw: Any) -> list[dict[str, Any]]:
    base = Spec()
    rows = []
    for name, s in [
        ("dense (1 expert wide)", base),
        ("dense (all experts wide)", dataclasses.replace(base, d_ff=base.d_ff * base.experts)),
    ] + [(f"{r} router", dataclasses.replace(base, router=r)) for r in ROUTERS]:
        rows.append({"part": "router", "model": name, **train_and_score(s, steps=steps, seed=seed, **kw)})
    return rows


def attention_rows(steps: int, seed: int = 0, *, procedural_only: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """One row per attention kind; ``procedural_only`` leaves out learned attention (the same
    model as :func:`router_rows`' dense peer, same seed: no need to train it twice)."""
    kinds = [a for a in ATTENTIONS if not procedural_only or a != "learned"]
    return [
        {
            "part": "attention",
            "model": f"{a} attention",
            **train_and_score(Spec(attention=a), steps=steps, seed=seed, **kw),
        }
        for a in kinds
    ]
