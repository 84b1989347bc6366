"""The integration model (seed 003's ``procedural_model``): the chain LM rebuilt from the SPARK
parts, served by the decode worker as a second model (``model="spark"``).

Starting from the shipped dense chain LM (:func:`lm.train.load`):

* **codebook weights** — every block linear (``qkv``, ``proj``, ``fc1``, ``fc2``) is a k-means
  codebook (``dim`` weights per sub-vector, ``k`` codewords, one uint8 code each;
  :func:`spark.codebook.fit`); the codewords are fine-tuned, the codes stay fixed
  (:class:`CodebookWeight`: the matrix is synthesised from the codebook on every call);
* **procedural attention** — every head's attention logits get a bias synthesised from
  ``atoms`` fixed atoms of the query-key distance (sinusoids at geometric frequencies) with
  learned coefficients (:func:`atoms`; zero at the start, so the model starts as the codebook
  model);
* **sparse router** — a content hash of the token id (:func:`route`) switches off one of
  ``groups`` equal groups of MLP neurons per token (``(groups - 1) / groups`` of the MLP active);
* **hypernetwork deltas** — a :class:`spark.hyper.Hyper` generates LoRA deltas for ``qkv`` and
  ``fc1`` from a task's metadata (:func:`spark.hyper.meta`); a served model is the procedural model
  with one task's delta folded in (``spark`` is task 0, the ordinary chains; ``spark-k3`` task 3).

It keeps :class:`lm.model.TinyLM`'s interface (``cfg``, ``forward``, ``forward_paged``), so the
paged engine, its prefix cache, splices and the decode service run it unchanged; ``forward`` and
``forward_paged`` compute the same function (checked by the tests).

``python -m spark.procedural train`` builds it (CPU, one thread, a few minutes) and writes
``spark/weights/procedural.pt``; :func:`load` / :func:`load_engine` read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lm.model import ModelConfig, TinyLM, rope
from spark import hyper
from spark.codebook import LINEARS, fit

WEIGHTS = pathlib.Path(__file__).parent / "weights" / "procedural.pt"
HASH = 2_654_435_761  # Knuth's multiplicative hash


@dataclasses.dataclass(frozen=True)
class SparkConfig:
    dim: int = 2
    codewords: int = 256
    atoms: int = 8
    groups: int = 4
    rank: int = 4


def atoms(dist: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` sinusoid atoms of integer distances ``dist`` (any shape) -> ``[n, *dist.shape]``:
    ``cos`` and ``sin`` at periods 2, 2, 4, 4, 8, 8, ..."""
    d = dist.to(torch.float64)
    out = []
    for i in range(n):
        f = 2 * math.pi / (2.0 ** (1 + i // 2))
        out.append(torch.cos(f * d) if i % 2 == 0 else torch.sin(f * d))
    return torch.stack(out)


def route(idx: torch.Tensor, groups: int) -> torch.Tensor:
    """The neuron group each token switches off: a content hash of its id, ``[...]`` -> ``[...]``."""
    return (idx * HASH) % 2**32 % groups


class CodebookWeight(nn.Module):
    """A linear layer whose weight is ``codebook[codes]`` (codewords trainable, codes fixed), plus
    an optional fixed low-rank delta ``B A`` (a hypernetwork's, folded in at serving)."""

    def __init__(self, book: np.ndarray, codes: np.ndarray, rows: int, cols: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.codebook = nn.Parameter(torch.from_numpy(np.ascontiguousarray(book, np.float32)))
        self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(codes)).to(torch.uint8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.register_buffer("delta", torch.zeros(0), persistent=False)

    def decoded(self) -> torch.Tensor:
        return self.codebook[self.codes.long()].reshape(self.rows, self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.decoded()
        if self.delta.numel():
            w = w + self.delta
        return F.linear(x, w, self.bias)

    @property
    def stored_bytes(self) -> int:
        return self.codebook.numel() * 4 + self.codes.numel() + (0 if self.bias is None else self.bias.numel() * 4)


class SparkBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, sc: SparkConfig) -> None:
        super().__init__()
        self.cfg, self.sc = cfg, sc
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.coef = nn.Parameter(torch.zeros(cfg.n_heads, sc.atoms))
        # qkv, proj, fc1, fc2 are set by build() (CodebookWeight)
        self.qkv: nn.Module
        self.proj: nn.Module
        self.fc1: nn.Module
        self.fc2: nn.Module

    def bias(self, dist: torch.Tensor) -> torch.Tensor:
        """Procedural attention bias ``[B, H, T, S]`` of query-key distances ``[B, T, S]``."""
        basis = atoms(dist, self.sc.atoms).to(self.coef.dtype)  # [m, B, T, S]
        return torch.einsum("hm,mbts->bhts", self.coef, basis)

    def mlp(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.ln2(x)))  # [B, T, d_ff]
        g = self.sc.groups
        off = route(idx, g)  # [B, T]
        group = torch.arange(h.shape[-1], device=h.device) * g // h.shape[-1]  # [d_ff]
        keep = group[None, None, :] != off[:, :, None]
        return self.fc2(h * keep.to(h.dtype))

    def attn_bias(self, qpos: torch.Tensor, S: int) -> torch.Tensor:
        """The procedural bias ``[B|1, H, T, S]`` of queries at ``qpos`` ``[B|1, T]`` over keys
        ``0..S-1`` (:meth:`lm.model.Block.attn_bias`; ``lm.attention.attention`` adds it to the
        logits and hides the keys a query may not see)."""
        dist = qpos[:, :, None] - torch.arange(S, device=qpos.device)[None, None, :]  # [B, T, S]
        return self.bias(dist)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Residual update from ``attn`` ``[B, H, T, D]``, then the hash-routed MLP of ``idx``."""
        assert idx is not None, "the sparse router needs the tokens"
        B, T, _ = x.shape
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(x, idx)

    def qkv_rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.cfg.n_heads, self.cfg.head_dim).unbind(2)
        return rope(q, pos, self.cfg.rope_base), rope(k, pos, self.cfg.rope_base), v


class SparkLM(TinyLM):
    """The procedural chain LM (see the module docstring).  :class:`lm.model.TinyLM`'s ``forward``
    and ``forward_paged`` run it unchanged: its blocks add their bias through
    :meth:`SparkBlock.attn_bias` and route their MLP in :meth:`SparkBlock.finish`."""

    def __init__(self, cfg: ModelConfig, sc: SparkConfig) -> None:
        nn.Module.__init__(self)  # not TinyLM's: the blocks are SparkBlocks, their weights come from build()
        self.cfg, self.sc = cfg, sc
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(SparkBlock(cfg, sc) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)


def build(dense: TinyLM, sc: SparkConfig, *, seed: int = 0) -> SparkLM:
    """The procedural model from a dense chain LM: codebooks fitted (k-means), atoms at zero."""
    m = SparkLM(dense.cfg, sc)
    m.emb.load_state_dict(dense.emb.state_dict())
    m.ln_f.load_state_dict(dense.ln_f.state_dict())
    for i, (src, dst) in enumerate(zip(dense.blocks, m.blocks)):
        dst.ln1.load_state_dict(src.ln1.state_dict())
        dst.ln2.load_state_dict(src.ln2.state_dict())
        for j, name in enumerate(LINEARS):
            lin = getattr(src, name)
            cb = fit(lin.weight.detach().float().numpy(), sc.dim, sc.codewords, seed=seed * 1000 + 10 * i + j)
            setattr(dst, name, CodebookWeight(cb.codebook, cb.codes, *cb.shape, lin.bias))
    return m


def stored_bytes(m: SparkLM) -> int:
    """Bytes of the model as stored (codebooks + uint8 codes + the dense rest)."""
    total = 0
    for name, p in m.named_parameters():
        if not name.endswith("codebook"):
            total += p.numel() * 4
    for mod in m.modules():
        if isinstance(mod, CodebookWeight):
            total += mod.codebook.numel() * 4 + mod.codes.numel()
    return total


# -- hypernetwork deltas ------------------------------------------------------------------------


def with_task(m: SparkLM, hy: hyper.Hyper | None, k: int) -> SparkLM:
    """Fold task ``k``'s generated delta (``B A`` on ``qkv`` and ``fc1``) into ``m`` (in place)."""
    slots = [getattr(blk, name) for blk in m.blocks for name in hyper.TARGETS]
    if hy is None:
        for s in slots:
            s.delta = torch.zeros(0)
        return m
    with torch.no_grad():
        shapes = [_Shape(s.cols, s.rows) for s in slots]
        for s, (A, B) in zip(slots, hyper.split(hy.factors(k), shapes, m.sc.rank)):  # type: ignore[arg-type]
            s.delta = (B @ A).to(s.codebook.dtype)
    return m


@dataclasses.dataclass(frozen=True)
class _Shape:
    d_in: int
    d_out: int


def _slot_shapes(m: SparkLM) -> list[_Shape]:
    return [_Shape(getattr(b, n).cols, getattr(b, n).rows) for b in m.blocks for n in hyper.TARGETS]


# -- train, save, load --------------------------------------------------------------------------


def finetune(
    m: SparkLM, steps: int, *, batch: int = 16, lr: float = 3e-3, seed: int = 0, log: Any = None
) -> list[float]:
    """Fine-tune the codewords, atom coefficients, norms and biases on ordinary chains (the
    embedding and the codes stay fixed)."""
    from lm.train import make_batch

    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith("emb."))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed + 31)
    losses = []
    m.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        inputs, targets = make_batch(rng, batch)
        logits = m(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % 25 == 0 or step == steps - 1):
            log(f"finetune step {step} loss {loss.item():.4f}")
    m.eval().requires_grad_(False)
    return losses


def train_hyper(m: SparkLM, steps_per_task: int, *, seed: int = 0) -> hyper.Hyper:
    """A hypernetwork over the procedural model's ``qkv`` / ``fc1`` (spark.hyper's tasks)."""
    m.eval().requires_grad_(False)
    adapted, slots = hyper.adapt(m)  # type: ignore[arg-type]
    return hyper.train_hyper(adapted, slots, hyper.Setup(rank=m.sc.rank, steps=steps_per_task, seed=seed))


def save(m: SparkLM, hy: hyper.Hyper, path: pathlib.Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in m.state_dict().items()}
    torch.save(
        {
            "config": dataclasses.asdict(m.cfg),
            "spark": dataclasses.asdict(m.sc),
            "state_dict": state,
            "hyper": hy.state_dict(),
            "hidden": hy.w1.shape[0],
            "meta": meta,
        },
        path,
    )


def load(path: pathlib.Path | str = WEIGHTS, *, task: int = 0, dtype: torch.dtype = torch.float32) -> SparkLM:
    """The trained procedural model with task ``task``'s delta folded in."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg, sc = ModelConfig(**blob["config"]), SparkConfig(**blob["spark"])
    m = SparkLM(cfg, sc)
    sd = blob["state_dict"]
    for i, blk in enumerate(m.blocks):
        for name in LINEARS:
            pre = f"blocks.{i}.{name}."
            book, codes = sd[pre + "codebook"], sd[pre + "codes"]
            rows, cols = codes.shape[0], codes.shape[1] * sc.dim
            setattr(blk, name, CodebookWeight(book.numpy(), codes.numpy(), rows, cols, sd.get(pre + "bias")))
    m.load_state_dict(sd)
    hy = hyper.Hyper(_slot_shapes(m), sc.rank, blob["hidden"])  # type: ignore[arg-type]
    hy.load_state_dict(blob["hyper"])
    with_task(m, hy, task)
    object.__setattr__(m, "hyper", hy)  # not a submodule: the served model's parameters are the model's
    return m.to(dtype).eval().requires_grad_(False)


def load_engine(*, task: int = 0, dtype: torch.dtype = torch.float32, num_blocks: int = 1024) -> Any:
    from lm.engine import Engine

    return Engine(load(task=task, dtype=dtype), num_blocks=num_blocks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spark.procedural", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=("train",))
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps on ordinary chains")
    p.add_argument("--hyper-steps", type=int, default=30, help="hypernetwork steps per task")
    p.add_argument("--out", type=pathlib.Path, default=WEIGHTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from lm.train import load as load_dense

    t0 = time.monotonic()
    m = build(load_dense(), SparkConfig())
    print(f"codebooks fitted in {time.monotonic() - t0:.0f}s", flush=True)
    losses = finetune(m, args.steps, log=lambda s: print(s, flush=True))
    hy = train_hyper(m, args.hyper_steps)
    save(
        m,
        hy,
        args.out,
        {
            "steps": args.steps,
            "hyper_steps_per_task": args.hyper_steps,
            "final_loss": losses[-1] if losses else None,
            "seconds": time.monotonic() - t0,
        },
    )
    print(f"saved {args.out} in {time.monotonic() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
