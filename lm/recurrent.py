"""Recurrent long-context peers of :mod:`lm.longmodel` (seed 004 C-1, C-2, C-6): decoders whose
state per token is constant, so they need no KV cache at all.

Three token mixers share one kernel, :func:`decay_scan`, the *decayed linear attention*
recurrence ``S_t = a_t S_{t-1} + k_t^T v_t`` (per head, ``S`` is ``[Dk, Dv]``) read by a query:

* ``retnet`` (C-1, RetNet retention, Sun et al. 2023): fixed multi-scale decays per head,
  ``gamma = 1 - 2^-e`` with ``e`` from 5 to 12 (the paper's 5..8 for four heads forgets a
  definition within a few hundred tokens; 12 keeps a half-life of ~2,800), swish gate, per-head
  group norm; output ``q_t S_t``.
* ``mamba`` (C-2, a Mamba-style selective state space): input-dependent step ``dt_t =
  softplus(W x_t + b)`` per head, ``a_t = exp(-dt_t exp(A_log))`` (selective decay), ``B_t`` and
  ``C_t`` projected from the input (keys and queries), values ``dt_t x_t``, skip ``D x_t`` and a
  ``silu(z)`` gate.  This is the scalar-per-head form of Mamba-2 (SSD), which has the same
  selective recurrence as Mamba with a parallel training form; there is no short convolution
  (the model's token shift plays its part).
* ``rwkv`` (C-6, an RWKV-5-style time mix): token-shift interpolation per input, learned decay
  per head, a bonus ``u`` on the current token (the output reads ``S_{t-1}`` plus ``u k_t^T v_t``),
  silu gate; an RWKV channel mix (squared ReLU, sigmoid receptance) instead of the MLP.
  Simplification, said so: the decay is per head, not per key channel.

Training and prefill run :func:`decay_scan` on chunks in its parallel (quadratic-in-chunk) form
and carry the state between chunks, so a 32k prefill costs ``T x chunk`` work, not ``T^2``;
decoding is the same call on chunks of one token.  The state of a layer is a few KB whatever the
context length (:meth:`RecurrentLM.state_bytes`).

The embedding, token shift (``prev_mix``), tied head and MLP follow :class:`lm.longmodel.LongLM`;
:func:`config_for_params` picks the MLP width so a peer has the transformer's parameter count.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import LMError

KINDS = ("retnet", "mamba", "rwkv")
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
#: Chunk length of the chunked parallel form (prefill and training).
CHUNK = 256


class ModelError(LMError, ValueError):
    """An unknown kind, an invalid config, ids of the wrong shape, or missing weights."""


def weights_path(kind: str) -> pathlib.Path:
    return WEIGHTS_DIR / f"recurrent_{kind}.pt"


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    kind: str
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    d_state: int = 16  # mamba: key (B) and query (C) width per head

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"unknown recurrent kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.d_model % self.n_heads or min(self.d_model, self.n_layers, self.n_heads, self.d_ff, self.d_state) < 1:
            raise ModelError(f"invalid recurrent config {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def decay_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    *,
    current: bool = True,
    bonus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of ``S_t = exp(log_decay_t) S_{t-1} + k_t^T v_t`` in parallel form.

    ``q``, ``k`` ``[B, H, T, Dk]``, ``v`` ``[B, H, T, Dv]``, ``log_decay`` ``[B, H, T]`` (<= 0),
    ``state`` ``[B, H, Dk, Dv]`` (the state before the chunk).  Output ``[B, H, T, Dv]``: with
    ``current`` ``o_t = q_t S_t``; without, ``o_t = q_t S_{t-1} + (q_t . bonus * k_t) v_t`` (RWKV;
    ``bonus`` ``[H, Dk]``).  Returns (outputs, state after the chunk).  Every exponent is of a
    difference ``cs_t - cs_s`` with ``s <= t`` (never positive), so no chunk overflows.
    """
    T = q.shape[2]
    cs = torch.cumsum(log_decay, dim=-1)  # [B, H, T] inclusive
    if current:
        read = cs  # decay from the chunk start to S_t
        diff = cs[..., :, None] - cs[..., None, :]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        read = cs - log_decay  # cs_{t-1}: S_{t-1}
        diff = read[..., :, None] - cs[..., None, :]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    weights = torch.exp(diff.masked_fill(~mask, -math.inf))  # [B, H, T, T]
    scores = (q @ k.transpose(-1, -2)) * weights
    out = scores @ v + (q * torch.exp(read)[..., None]) @ state
    if not current and bonus is not None:
        out = out + ((q * bonus[None, :, None, :] * k).sum(-1, keepdim=True)) * v
    tail = torch.exp(cs[..., -1:] - cs)  # [B, H, T]
    new_state = torch.exp(cs[..., -1])[..., None, None] * state + (k * tail[..., None]).transpose(-1, -2) @ v
    return out, new_state


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, h, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def _shift(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, T, d]`` shifted one step right, ``last`` ``[B, d]`` in front."""
    return torch.cat((last[:, None, :], x[:, :-1]), dim=1)


class Retention(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.qkvg = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.norm = nn.GroupNorm(cfg.n_heads, cfg.d_model, affine=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        gammas = 1 - 2.0 ** -torch.linspace(5.0, 12.0, cfg.n_heads)
        self.register_buffer("log_gamma", torch.log(gammas), persistent=False)
        self.scale = cfg.head_dim**-0.5

    def state_shape(self, cfg: RecurrentConfig) -> dict[str, tuple[int, ...]]:
        return {"S": (cfg.n_heads, cfg.head_dim, cfg.head_dim)}

    def forward(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        B, T, d = x.shape
        q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
        q, k, v = _heads(q, self.h) * self.scale, _heads(k, self.h), _heads(v, self.h)
        ld = self.log_gamma[None, :, None].expand(B, self.h, T)
        o, S = decay_scan(q, k, v, ld, st["S"])
        o = self.norm(_merge(o).reshape(B * T, d)).view(B, T, d)
        return self.out(F.silu(g) * o), {"S": S}


class SelectiveSSM(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.h, self.n = cfg.n_heads, cfg.d_state
        d = cfg.d_model
        self.in_proj = nn.Linear(d, 2 * d + 2 * cfg.n_heads * cfg.d_state + cfg.n_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.log(torch.expm1(torch.linspace(0.001, 0.1, cfg.n_heads))))
        # A_h = -exp(A_log_h): decay rates 1 .. 16 as in Mamba's S4D-real initialisation
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, cfg.n_heads)))
        self.D = nn.Parameter(torch.ones(cfg.n_heads))
        self.norm = nn.GroupNorm(cfg.n_heads, d, affine=False)
        self.out = nn.Linear(d, d, bias=False)

    def state_shape(self, cfg: RecurrentConfig) -> dict[str, tuple[int, ...]]:
        return {"S": (cfg.n_heads, cfg.d_state, cfg.head_dim)}

    def forward(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        B, T, d = x.shape
        hn = self.h * self.n
        xs, z, Bm, Cm, dt = self.in_proj(x).split((d, d, hn, hn, self.h), dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        ld = (-dt * torch.exp(self.A_log)).transpose(1, 2)  # [B, H, T]
        xh = _heads(xs, self.h)
        v = xh * dt.transpose(1, 2)[..., None]
        o, S = decay_scan(_heads(Cm, self.h), _heads(Bm, self.h), v, ld, st["S"])
        o = o + self.D[None, :, None, None] * xh
        o = self.norm(_merge(o).reshape(B * T, d)).view(B, T, d)
        return self.out(o * F.silu(z)), {"S": S}


class RWKVTimeMix(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.mix = nn.Parameter(torch.full((4, d), 0.5))  # token-shift interpolation of r, k, v, g
        self.r = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.g = nn.Linear(d, d, bias=False)
        # per-head decay w = exp(-exp(decay)): from slow to fast
        self.decay = nn.Parameter(torch.linspace(-4.0, 0.0, cfg.n_heads))
        self.bonus = nn.Parameter(torch.zeros(cfg.n_heads, cfg.head_dim))
        self.norm = nn.GroupNorm(cfg.n_heads, d, affine=False)
        self.out = nn.Linear(d, d, bias=False)
        self.scale = cfg.head_dim**-0.5

    def state_shape(self, cfg: RecurrentConfig) -> dict[str, tuple[int, ...]]:
        return {"S": (cfg.n_heads, cfg.head_dim, cfg.head_dim), "last": (cfg.d_model,)}

    def forward(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        B, T, d = x.shape
        prev = _shift(x, st["last"])
        xr, xk, xv, xg = (x + (prev - x) * m for m in self.mix)
        q = _heads(self.r(xr), self.h) * self.scale
        k, v = _heads(self.k(xk), self.h), _heads(self.v(xv), self.h)
        ld = (-torch.exp(self.decay))[None, :, None].expand(B, self.h, T)
        o, S = decay_scan(q, k, v, ld, st["S"], current=False, bonus=self.bonus)
        o = self.norm(_merge(o).reshape(B * T, d)).view(B, T, d)
        return self.out(F.silu(self.g(xg)) * o), {"S": S, "last": x[:, -1]}


class RWKVChannelMix(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        d = cfg.d_model
        self.mix = nn.Parameter(torch.full((2, d), 0.5))
        self.key = nn.Linear(d, cfg.d_ff, bias=False)
        self.value = nn.Linear(cfg.d_ff, d, bias=False)
        self.recept = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        prev = _shift(x, last)
        xk, xr = (x + (prev - x) * m for m in self.mix)
        return torch.sigmoid(self.recept(xr)) * self.value(torch.relu(self.key(xk)) ** 2)


_MIXERS = {"retnet": Retention, "mamba": SelectiveSSM, "rwkv": RWKVTimeMix}


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.kind = cfg.kind
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.mixer = _MIXERS[cfg.kind](cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if cfg.kind == "rwkv":
            self.ffn: nn.Module = RWKVChannelMix(cfg)
        else:
            self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def state_shape(self, cfg: RecurrentConfig) -> dict[str, tuple[int, ...]]:
        shape = {f"mix.{k}": s for k, s in self.mixer.state_shape(cfg).items()}
        if cfg.kind == "rwkv":
            shape["ffn.last"] = (cfg.d_model,)
        return shape

    def forward(self, x: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        mix_in = {k[4:]: v for k, v in st.items() if k.startswith("mix.")}
        y, mix_out = self.mixer(self.ln1(x), mix_in)
        x = x + y
        new = {f"mix.{k}": v for k, v in mix_out.items()}
        h = self.ln2(x)
        if self.kind == "rwkv":
            x = x + self.ffn(h, st["ffn.last"])
            new["ffn.last"] = h[:, -1]
        else:
            x = x + self.ffn(h)
        return x, new


State = dict  # {"prev": LongTensor [B], "layers": [dict of tensors per layer]}


class RecurrentLM(nn.Module):
    """Token ids -> next-token logits with a constant-size state (see the module docstring)."""

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prev = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.zeros_(self.prev.weight)
        self.blocks = nn.ModuleList(RecurrentBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.emb.weight, std=0.02)

    def init_state(self, batch: int = 1) -> State:
        layers = [{k: torch.zeros((batch, *s)) for k, s in blk.state_shape(self.cfg).items()} for blk in self.blocks]
        return {"prev": torch.zeros(batch, dtype=torch.long), "layers": layers}

    def state_bytes(self) -> int:
        """Bytes of one sequence's decoding state (float32), whatever the context length."""
        st = self.init_state(1)
        return sum(t.numel() * 4 for layer in st["layers"] for t in layer.values()) + 8

    def step_chunk(self, idx: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits ``[B, T, V]`` of the chunk ``idx`` ``[B, T]`` following ``state``; the new state."""
        prev = torch.cat((state["prev"][:, None], idx[:, :-1]), dim=1)
        x = self.emb(idx) + self.prev(self.emb(prev))
        layers = []
        for blk, st in zip(self.blocks, state["layers"]):
            x, new = blk(x, st)
            layers.append(new)
        return self.ln_f(x) @ self.emb.weight.T, {"prev": idx[:, -1], "layers": layers}

    def forward(self, idx: torch.Tensor, state: State | None = None, *, chunk: int = CHUNK, return_state: bool = False):
        """Logits ``[B, T, V]`` of ``idx`` ``[B, T]``, chunk by chunk (training and prefill)."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ModelError(f"expected token ids [B, T] with T >= 1, got shape {tuple(idx.shape)}")
        if chunk < 1:
            raise ModelError(f"chunk must be >= 1, got {chunk}")
        st = state if state is not None else self.init_state(idx.shape[0])
        outs = []
        for s in range(0, idx.shape[1], chunk):
            logits, st = self.step_chunk(idx[:, s : s + chunk], st)
            outs.append(logits)
        logits = torch.cat(outs, dim=1)
        return (logits, st) if return_state else logits


def config_for_params(kind: str, vocab_size: int, target: int, **kw) -> RecurrentConfig:
    """The config of ``kind`` (``kw`` fixed) whose MLP width brings its parameter count nearest
    ``target`` (the transformer's): equal parameters."""
    best: tuple[int, RecurrentConfig] | None = None
    for d_ff in range(16, 1025, 8):
        cfg = RecurrentConfig(kind, vocab_size, d_ff=d_ff, **kw)
        with torch.device("meta"):
            n = sum(p.numel() for p in RecurrentLM(cfg).parameters())
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cfg)
    assert best is not None
    return best[1]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model: RecurrentLM, path: pathlib.Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(model.cfg), "state_dict": model.state_dict(), "meta": meta}, path)


def load(kind_or_path: str | pathlib.Path) -> RecurrentLM:
    """A trained peer (``kind`` -> the shipped weights), eval mode, gradients off."""
    path = weights_path(kind_or_path) if kind_or_path in KINDS else pathlib.Path(kind_or_path)
    if not path.exists():
        raise ModelError(f"no recurrent weights at {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = RecurrentLM(RecurrentConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


def load_meta(kind_or_path: str | pathlib.Path) -> dict:
    path = weights_path(kind_or_path) if kind_or_path in KINDS else pathlib.Path(kind_or_path)
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]
