"""ResNet-BK language model and a same-size Transformer baseline, with exact FLOP counting.

A ResNet-BK block (``../shared/specs/bk_core.md``): h = LN(x), f = MoE(h) (top-1 of E experts,
the seed's ``MoEResNetBKLayer``), potentials v = 3 tanh(W_v f / 3) (one per BK channel), the
*causal* BK-core features G = [Re, Im] of 1/alpha_i of the tridiagonal operator with diagonal
-2 + v, off-diagonals 1 and z = 1j (``accel.bk_core``, exact O(N) gradient), and
x + f + W_o G. Feature i depends on positions <= i only, so the LM never sees the future, and
|G| <= 1 for this operator (Im alpha_i <= -1), so nothing is clamped.

The seed's three model-side techniques, each switchable in :class:`ModelConfig`:

* ``act`` — adaptive computation time over the model's stages, halting per token (Graves 2016,
  as the seed's ``AdaptiveResNetBKBlock``): a halting unit gives p_t per token after each stage;
  a token halts when its cumulative p reaches ``act_threshold``, its output is the p-weighted
  mix of its states, and the ponder cost N + R joins the loss. Halted tokens really skip work:
  later stages gather only the running tokens for LN, MoE and projections. The BK recursion is
  sequential over all positions, so it still steps through a halted token's site, with v = 0
  (a passive Laplacian site): O(1) per site and channel, counted.
* ``multiscale`` — the middle blocks run at N/2: pairs of positions are merged by a learned
  Linear(2d -> d) (the seed's Conv1d k=2 s=2), processed, and expanded back by Linear(d -> 2d),
  *shifted right by one position*: the seed's ConvTranspose gives position 2k the state of pair
  (2k, 2k+1) — it sees the future; shifted, position t uses only pairs ending at or before t.
* ``sparsity`` — learned sparsity that skips work in the BK-core: an importance unit decides per
  token (score > 0, causal) whether its site joins the chain. Kept sites form a shorter
  tridiagonal chain that the recursion runs over (K instead of N steps, K = kept count), their
  potentials and feature projections are computed, and a skipped position takes the features of
  the last kept site at or before it (causal carry, the seed's interpolation). A straight-through
  gate trains the unit, and (keep-rate - target)^2 holds the rate near ``sparsity_keep``.
  The seed's sketch computes the full recursion and masks afterwards, saving nothing.

FLOPs (:class:`FlopCounter`): 2 per multiply-add of every linear map actually executed (only the
routed expert of a token, only running or kept tokens), attention scores and values over the
causal triangle, and ``BK_SITE_FLOPS`` real operations per BK site and channel for the forward
recursion. A training step is counted as 3x its forward (forward + backward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accel.bk_core import bk_core
from bklm.corpus import VOCAB
from bklm.errors import ConfigError
from lm.attention import attention
from lm.routers import ROUTERS, HashRouter, make_router
from lm.routers import MoEFFN as RoutedFFN

#: Real operations per site and channel of the causal forward recursion: alpha_i = (v_i - z) -
#: p / alpha_{i-1} (one complex division, 11; one complex subtraction, 2) and G = 1 / alpha_i (7).
BK_SITE_FLOPS = 20
#: Backward + forward = this times forward (the usual 1 + 2 for linear maps).
TRAIN_FLOP_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "bk"  # "bk" (ResNet-BK) or "transformer"
    vocab: int = VOCAB
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 64
    n_heads: int = 4  # BK channels, or attention heads
    n_experts: int = 4
    ffn_mult: int = 2  # expert hidden width = ffn_mult * d_model
    balance_lambda: float = 0.01
    router: str = "switch"  # MoE FFN router (lm.routers): "switch" (learned top-k) or "hash"
    router_k: int = 1  # experts per token (hash: at most 2)
    act: bool = False
    act_threshold: float = 0.99
    act_lambda: float = 0.01
    act_init_bias: float = 0.0  # p ~ 0.5 at first, as the seed's default-initialised unit
    multiscale: bool = False
    multiscale_stride: int = 2  # 1: a control with the same pair merge, at full resolution
    sparsity: bool = False
    sparsity_keep: float = 0.5
    sparsity_lambda: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ("bk", "transformer"):
            raise ConfigError(f"arch must be 'bk' or 'transformer', got {self.arch!r}")
        for name in ("vocab", "d_model", "n_layers", "n_seq", "n_heads", "n_experts", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        if self.arch == "transformer" and (self.act or self.multiscale or self.sparsity):
            raise ConfigError("act, multiscale and sparsity are ResNet-BK techniques; the Transformer baseline is plain")
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        top = 2 if self.router == "hash" else self.n_experts
        if isinstance(self.router_k, bool) or not isinstance(self.router_k, int) or not 1 <= self.router_k <= top:
            raise ConfigError(f"router_k must be an integer in [1, {top}] for the {self.router} router, got {self.router_k!r}")
        if self.multiscale_stride not in (1, 2):
            raise ConfigError(f"multiscale_stride must be 1 or 2, got {self.multiscale_stride!r}")
        if self.multiscale and (self.n_layers < 3 or self.n_seq % 2):
            raise ConfigError("multiscale needs n_layers >= 3 (full-resolution first and last) and an even n_seq")
        if not 0 < self.act_threshold <= 1:
            raise ConfigError(f"act_threshold must be in (0, 1], got {self.act_threshold}")
        if not 0 < self.sparsity_keep <= 1:
            raise ConfigError(f"sparsity_keep must be in (0, 1], got {self.sparsity_keep}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model keys {sorted(unknown)}")
        return cls(**d)


class FlopCounter:
    """Forward FLOPs actually executed, and ACT's ponder steps (token x stage)."""

    def __init__(self) -> None:
        self.flops = 0
        self.bk_flops = 0  # of which the BK-core recursion
        self.ponder_steps = 0

    def linear(self, rows: int, d_in: int, d_out: int) -> None:
        self.flops += 2 * rows * d_in * d_out

    def elementwise(self, n: int, per: int = 1) -> None:
        self.flops += n * per


# -- parts ------------------------------------------------------------------------------------


class MoEFFN(RoutedFFN):
    """The MoE feed-forward of every bklm block (the seed's ``MoEResNetBKLayer``): an
    :class:`lm.routers.MoEFFN` with its router chosen by ``ModelConfig.router`` / ``router_k``
    (default: the learned Switch gate, top-1, whose output is scaled by the gate probability),
    counting the FLOPs it executes.  Only a token's routed experts run.  The returned balance is
    already weighted by ``balance_lambda`` (Switch's load-balancing loss; 0 for the hash router).

    Checkpoints of the model before routers moved to :mod:`lm.routers` (the gate at ``gate.*``)
    load unchanged: their keys are renamed to ``router.gate.*``."""

    def __init__(self, d: int, experts: int, hidden: int, cfg: ModelConfig | None = None) -> None:
        cfg = cfg if cfg is not None else ModelConfig(n_experts=experts)
        super().__init__(d, experts, hidden, make_router(cfg.router, d, experts, cfg.router_k), cfg.balance_lambda)
        self.register_load_state_dict_pre_hook(_legacy_gate_keys)

    def forward(self, x: torch.Tensor, fc: FlopCounter) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out, balance = super().forward(x)
        t, d = x.shape
        k = self.router.k
        if isinstance(self.router, HashRouter):
            fc.linear(t, d, self.router.bits)  # the SimHash projections
        else:
            fc.linear(t, d, self.experts)
        fc.linear(k * t, d, self.hidden)
        fc.linear(k * t, self.hidden, d)
        fc.elementwise(k * t * self.hidden, 8)  # gelu
        return out, balance


def _legacy_gate_keys(module, state_dict, prefix, *args) -> None:
    for name in ("weight", "bias"):
        old = f"{prefix}gate.{name}"
        if old in state_dict:
            state_dict[f"{prefix}router.gate.{name}"] = state_dict.pop(old)


def bk_features(v: torch.Tensor, fc: FlopCounter) -> torch.Tensor:
    """Causal BK-core features of potentials v (B, N, C) -> (B, N, 2C)."""
    b, n, c = v.shape
    diag = (v - 2.0).permute(0, 2, 1).reshape(b * c, n)
    g = bk_core(diag, causal=True, backend="reference")  # (B*C, N, 2)
    fc.elementwise(b * c * n, BK_SITE_FLOPS)
    fc.bk_flops += b * c * n * BK_SITE_FLOPS
    return g.reshape(b, c, n, 2).permute(0, 2, 1, 3).reshape(b, n, 2 * c)


def sparse_bk_features(v: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor, fc: FlopCounter) -> torch.Tensor:
    """BK features over the chain of kept sites only (see the module docstring).

    v (B, N, C) potentials (only kept entries are used); keep (B, N) bool; gate (B, N) the
    straight-through keep gate (1 on kept tokens in the forward). Rows are padded to the longest
    chain with passive sites at the end, which no real site depends on (the chain is causal).
    """
    b, n, c = v.shape
    counts = keep.sum(1)
    k = max(int(counts.max()), 1)
    pos = torch.arange(n, device=v.device)
    order = torch.argsort((~keep).long() * n + pos, dim=1)[:, :k]  # kept positions first, in order
    vk = v.gather(1, order[..., None].expand(b, k, c))
    vk = torch.where((torch.arange(k, device=v.device)[None, :] < counts[:, None])[..., None], vk, 0.0)
    gk = bk_features(vk, fc)  # (B, K, 2C): the recursion runs K steps, not N
    last = keep.long().cumsum(1) - 1  # compressed index of the last kept site <= i, -1 if none
    zero = gk.new_zeros(b, 1, 2 * c)
    gz = torch.cat([zero, gk], 1)  # index shifted by one: 0 = "no kept site yet"
    own = gz.gather(1, (last + 1)[..., None].expand(b, n, 2 * c))
    prev = gz.gather(1, torch.where(keep, last, last + 1)[..., None].expand(b, n, 2 * c))
    return prev + gate[..., None] * (own - prev)


class BKBlock(nn.Module):
    """One ResNet-BK residual block (optionally with a sparsity unit). ``active``: flat indices
    of the tokens that run this block (ACT); the others pass through unchanged."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, c = cfg.d_model, cfg.n_heads
        self.cfg = cfg
        self.ln = nn.LayerNorm(d)
        self.moe = MoEFFN(d, cfg.n_experts, cfg.ffn_mult * d, cfg)
        self.to_v = nn.Linear(d, c)
        self.out = nn.Linear(2 * c, d)
        self.importance = nn.Linear(d, 1) if cfg.sparsity else None

    def forward(self, x: torch.Tensor, fc: FlopCounter, aux: dict, active: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        c = self.cfg.n_heads
        flat = x.reshape(b * n, d)
        xa = flat if active is None else flat[active]
        t = xa.shape[0]
        h = self.ln(xa)
        fc.elementwise(t * d, 8)
        f, balance = self.moe(h, fc)
        aux["balance"] = aux.get("balance", 0.0) + balance
        keep_a = None
        if self.importance is not None:
            score = self.importance(f).squeeze(-1)
            fc.linear(t, d, 1)
            soft = torch.sigmoid(score)
            keep_a = score > 0
            gate_a = keep_a.float() + soft - soft.detach()
            aux["keep_soft"] = aux.get("keep_soft", []) + [soft]
            aux["kept"] = aux.get("kept", 0) + int(keep_a.sum())
            aux["sites"] = aux.get("sites", 0) + t
            rows = keep_a.nonzero(as_tuple=True)[0]
            va = f.new_zeros(t, c).index_copy(0, rows, 3 * torch.tanh(self.to_v(f[rows]) / 3))
            fc.linear(len(rows), d, c)
        else:
            va = 3 * torch.tanh(self.to_v(f) / 3)
            fc.linear(t, d, c)
        v = va if active is None else va.new_zeros(b * n, c).index_copy(0, active, va)
        if keep_a is None:
            g = bk_features(v.reshape(b, n, c), fc)
            fc.linear(t, 2 * c, d)
        else:
            keep = keep_a if active is None else torch.zeros(b * n, dtype=torch.bool).index_fill(0, active[keep_a], True)
            gate = gate_a if active is None else gate_a.new_zeros(b * n).index_copy(0, active, gate_a)
            g = sparse_bk_features(v.reshape(b, n, c), keep.reshape(b, n), gate.reshape(b, n), fc)
            # features of kept sites are projected; a skipped position reuses its carried projection
            fc.linear(int(keep_a.sum()), 2 * c, d)
        ga = g.reshape(b * n, 2 * c)
        if active is not None:
            ga = ga[active]
        y = f + self.out(ga)
        if active is None:
            return x + y.reshape(b, n, d)
        return flat.index_add(0, active, y).reshape(b, n, d)


class MultiScale(nn.Module):
    """Middle blocks at half resolution: merge pairs, process, expand causally (shift by one).

    ``multiscale_stride=1`` is the control that isolates the pair merge from the resolution: each
    position t merges (x_{t-1}, x_t) by the same Linear(2d -> d), the blocks run at full length,
    and Linear(d -> d) expands."""

    def __init__(self, cfg: ModelConfig, blocks: list[BKBlock]) -> None:
        super().__init__()
        d = cfg.d_model
        self.stride = cfg.multiscale_stride
        self.down = nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(blocks)
        self.up = nn.Linear(d, self.stride * d)

    def forward(self, x: torch.Tensor, fc: FlopCounter, aux: dict, active: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        m = n // self.stride
        if self.stride == 2:
            pairs = x.reshape(b, m, 2 * d)
        else:
            pairs = torch.cat([torch.cat([x.new_zeros(b, 1, d), x[:, :-1]], 1), x], -1)
        z = self.ln(self.down(pairs))
        fc.linear(b * m, 2 * d, d)
        for block in self.blocks:
            z = block(z, fc, aux)
        u = self.up(z).reshape(b, n, d)
        fc.linear(b * m, d, self.stride * d)
        if self.stride == 2:
            u = torch.cat([u.new_zeros(b, 1, d), u[:, :-1]], 1)  # position t sees pairs ending <= t
        if active is None:
            return x + u
        flat = x.reshape(b * n, d)
        return flat.index_add(0, active, u.reshape(b * n, d)[active]).reshape(b, n, d)


class AttentionBlock(nn.Module):
    """Pre-LN Transformer block: causal attention (:func:`lm.attention.attention`), the same MoE FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.moe = MoEFFN(d, cfg.n_experts, cfg.ffn_mult * d, cfg)

    def forward(self, x: torch.Tensor, fc: FlopCounter, aux: dict, active: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        hds = self.cfg.n_heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, hds, d // hds).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        fc.linear(b * n, d, 3 * d)
        fc.flops += 2 * 2 * b * d * n * (n + 1) // 2  # scores and values over the causal triangle
        fc.elementwise(b * hds * n * (n + 1) // 2, 5)  # softmax
        fc.linear(b * n, d, d)
        fc.elementwise(2 * b * n * d, 8)
        f, balance = self.moe(self.ln2(x).reshape(b * n, d), fc)
        aux["balance"] = aux.get("balance", 0.0) + balance
        return x + f.reshape(b, n, d)


# -- the language model -------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    """What one forward pass gives: logits, the loss terms, and the work it did."""

    logits: torch.Tensor
    aux_loss: torch.Tensor  # balance + ponder + sparsity terms, already weighted
    flops: int  # forward FLOPs executed
    bk_flops: int  # of which the BK-core recursion
    ponder_steps: int  # token-stage steps executed (= tokens x stages without ACT)
    mean_stages: float
    keep_rate: float  # kept BK sites / sites offered (1.0 without sparsity)


class LanguageModel(nn.Module):
    """ResNet-BK (``arch="bk"``) or the Transformer baseline, with the switchable techniques."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab, d)
        self.pos = nn.Embedding(cfg.n_seq, d)
        if cfg.arch == "transformer":
            stages: list[nn.Module] = [AttentionBlock(cfg) for _ in range(cfg.n_layers)]
        elif cfg.multiscale:
            blocks = [BKBlock(cfg) for _ in range(cfg.n_layers)]
            stages = [blocks[0], MultiScale(cfg, blocks[1:-1]), blocks[-1]]
        else:
            stages = [BKBlock(cfg) for _ in range(cfg.n_layers)]
        self.stages = nn.ModuleList(stages)
        self.halt = None
        if cfg.act:
            self.halt = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, 1))
            nn.init.constant_(self.halt[2].bias, cfg.act_init_bias)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> Output:
        b, n = ids.shape
        if n > self.cfg.n_seq:
            raise ConfigError(f"sequence of {n} tokens is longer than n_seq={self.cfg.n_seq}")
        fc = FlopCounter()
        aux: dict = {}
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))[None]
        if self.halt is None:
            for stage in self.stages:
                x = stage(x, fc, aux)
            fc.ponder_steps = b * n * len(self.stages)
            extra = x.new_zeros(())
            mean_stages = float(len(self.stages))
        else:
            x, ponder, mean_stages = self._act(x, fc, aux)
            extra = self.cfg.act_lambda * ponder
        h = self.ln_f(x)
        logits = self.head(h)
        fc.elementwise(b * n * self.cfg.d_model, 8)
        fc.linear(b * n, self.cfg.d_model, self.cfg.vocab)
        extra = extra + aux.get("balance", 0.0)  # already weighted by balance_lambda
        keep_rate = 1.0
        if "keep_soft" in aux:
            soft = torch.cat(aux["keep_soft"])
            extra = extra + self.cfg.sparsity_lambda * (soft.mean() - self.cfg.sparsity_keep) ** 2
            keep_rate = aux["kept"] / max(aux["sites"], 1)
        return Output(logits, extra, fc.flops, fc.bk_flops, fc.ponder_steps, mean_stages, keep_rate)

    def _act(self, x: torch.Tensor, fc: FlopCounter, aux: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Graves-style ACT over the stages; halting per token; halted tokens skip later stages."""
        b, n, d = x.shape
        cfg = self.cfg
        assert self.halt is not None
        cum = x.new_zeros(b * n)
        acc = x.new_zeros(b * n, d)
        running = torch.arange(b * n, device=x.device)  # flat indices of running tokens
        ponder = x.new_zeros(())
        steps_taken = 0
        last = len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            x = stage(x, fc, aux, active=None if len(running) == b * n else running)
            fc.ponder_steps += len(running)
            steps_taken += len(running)
            xr = x.reshape(b * n, d)[running]
            c = cum[running]
            if s == last:
                halting = torch.ones_like(c, dtype=torch.bool)
                p = x.new_zeros(len(running))
            else:
                p = torch.sigmoid(self.halt(xr)).squeeze(-1)
                fc.linear(len(running), d, d // 2)
                fc.linear(len(running), d // 2, 1)
                halting = (c + p) >= cfg.act_threshold
            remainder = 1.0 - c
            w = torch.where(halting, remainder, p)
            acc = acc.index_add(0, running, w[:, None] * xr)
            # ponder cost N + R: the remainder of halting tokens carries the gradient
            ponder = ponder + torch.where(halting, remainder, torch.zeros_like(remainder)).sum()
            cum = cum.index_add(0, running, torch.where(halting, remainder, p))
            running = running[~halting]
            if len(running) == 0:
                break
        ponder = (ponder + steps_taken) / (b * n)
        return acc.reshape(b, n, d), ponder, steps_taken / (b * n)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Output]:
        """(training loss, cross-entropy per token (B, N), output)."""
        out = self(ids)
        ce = F.cross_entropy(out.logits.reshape(-1, self.cfg.vocab), targets.reshape(-1), reduction="none")
        return ce.mean() + out.aux_loss, ce.reshape(ids.shape), out


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
