"""Low-rank adapters (LoRA) of the long-context model in a storage precision (seed 004, S-4).

:class:`LoRA` attaches rank-``r`` adapters ``W + scale * B A`` (``A`` ``[r, in]``, ``B``
``[out, r]``, ``B = 0`` at first) to the budgeted linear matrices of :class:`lm.longmodel.LongLM`
(``L<i>.attn.qkv``, ``L<i>.attn.proj``, ``L<i>.mlp.fc1``, ``L<i>.mlp.fc2``: the names of
:func:`lm.popb.matrices`); the base weights stay frozen.  The adapters train in their storage
precision (quantisation-aware: the forward pass uses ``Q(A)``, ``Q(B)`` and the gradient passes
straight through ``Q``), so what is trained is what is stored.

:meth:`LoRA.pack` stores them (:func:`accel.precision.pack_adapter`: fp16, int8, or int4 packed
two per byte with a float32 scale per group), an :class:`Adapters` record; POPB bills its bits
(:meth:`lm.popb.PrecisionPlan.avg_bits`) and dequantises it on use (:meth:`Adapters.delta`) when a
plan carrying it is applied.  Bad input raises :class:`AdapterError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from accel import precision as accel_precision
from lm.errors import LMError
from lm.longmodel import LongLM

#: Adapter precisions, with their storage bits per element.
ADAPTER_PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: The matrices adapters attach to: LongLM parameter of each budgeted linear matrix.
TARGETS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
GROUP = 32
MAX_RANK = 64


class AdapterError(LMError, ValueError):
    """An unknown adapter precision or matrix, a rank out of range, or a malformed adapter."""


def fake_quant(x: torch.Tensor, precision: str, group: int = GROUP) -> torch.Tensor:
    """``x`` rounded to ``precision`` in the forward pass, identity in the backward pass (the
    straight-through estimator); the rounding equals :func:`accel.precision.pack_adapter`'s."""
    if precision == "fp32":
        return x
    if precision == "fp16":
        q = x.detach().half().float()
    else:
        qmax = 127 if precision == "int8" else 7
        rows, cols = x.shape
        nb = -(-cols // group)
        padded = torch.nn.functional.pad(x.detach().abs(), (0, nb * group - cols))
        amax = padded.reshape(rows, nb, group).amax(-1)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        scale_el = scale.repeat_interleave(group, dim=1)[:, :cols]
        q = torch.clamp(torch.round(x.detach() / scale_el), -qmax, qmax) * scale_el
    return x + (q - x).detach()


def _matrix_names(model: LongLM) -> list[str]:
    return [f"L{i}.{t}" for i in range(model.cfg.n_layers) for t in TARGETS]


def _param_name(matrix: str) -> str:
    layer, op, param = matrix.split(".")
    return f"blocks.{int(layer[1:])}.{TARGETS[f'{op}.{param}']}.weight"


@dataclasses.dataclass(frozen=True)
class Adapters:
    """Stored adapters: per matrix name the packed ``(A, B^T)`` (both ``[r, n]``: quantisation
    groups run along the long side, so a scale covers 32 elements) and the common ``scale``."""

    rank: int
    precision: str
    scale: float
    packed: dict[str, tuple[accel_precision.PackedAdapter, accel_precision.PackedAdapter]]

    def bits(self) -> int:
        """Storage bits of every adapter (payloads and group scales)."""
        return sum(a.bits + b.bits for a, b in self.packed.values())

    def delta(self, matrix: str) -> torch.Tensor:
        """``scale * B A`` of ``matrix``, dequantised from the stored form."""
        a, b = self.packed[matrix]
        return self.scale * torch.from_numpy(accel_precision.unpack_adapter(b).T @ accel_precision.unpack_adapter(a))

    def to_wire(self) -> dict:
        return {
            "rank": self.rank,
            "precision": self.precision,
            "scale": self.scale,
            "group": GROUP,
            "matrices": {
                n: {
                    "a": bytes(a.payload),
                    "a_scales": a.scales.tolist(),
                    "b": bytes(b.payload),
                    "b_scales": b.scales.tolist(),
                }
                for n, (a, b) in self.packed.items()
            },
        }

    @classmethod
    def from_wire(cls, model: LongLM, m: object) -> Adapters:
        """Adapters from an order's ``adapters`` map; everything is checked first."""
        if not isinstance(m, Mapping):
            raise AdapterError("'adapters' must be a map with rank, precision, scale, matrices")
        rank, precision, scale = m.get("rank"), m.get("precision"), m.get("scale", 1.0)
        _check(rank, precision)
        if m.get("group", GROUP) != GROUP:
            raise AdapterError(f"adapter group must be {GROUP}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise AdapterError("adapter 'scale' must be a finite number")
        mats = m.get("matrices")
        known = set(_matrix_names(model))
        if not isinstance(mats, Mapping) or not mats:
            raise AdapterError("adapter 'matrices' must be a non-empty map")
        weights = dict(model.named_parameters())
        packed = {}
        for name, parts in mats.items():
            if name not in known:
                raise AdapterError(f"unknown adapter matrix {name!r}; known: {sorted(known)}")
            out_dim, in_dim = weights[_param_name(name)].shape
            if not isinstance(parts, Mapping):
                raise AdapterError(f"adapter {name} must be a map a, a_scales, b, b_scales")
            packed[name] = (
                _unwire(parts, "a", (rank, in_dim), precision, name),
                _unwire(parts, "b", (rank, out_dim), precision, name),
            )
        return cls(rank, precision, float(scale), packed)


def _check(rank: object, precision: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"adapter rank must be an integer in [1, {MAX_RANK}], got {rank!r}")
    if precision not in ADAPTER_PRECISIONS:
        raise AdapterError(f"unknown adapter precision {precision!r}; known: {', '.join(ADAPTER_PRECISIONS)}")


def _unwire(
    parts: Mapping, key: str, shape: tuple[int, int], precision: str, name: str
) -> accel_precision.PackedAdapter:
    rows, cols = shape
    per_row = {"fp32": 4 * cols, "fp16": 2 * cols, "int8": cols, "int4": -(-cols // 2)}[precision]
    raw = parts.get(key)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != rows * per_row:
        raise AdapterError(f"adapter {name}.{key} must be {rows * per_row} bytes of {precision}")
    if precision in ("int8", "int4"):
        try:
            scales = np.asarray(parts.get(f"{key}_scales"), dtype=np.float32)
        except (TypeError, ValueError):
            scales = np.zeros(0, np.float32)
        want = (rows, -(-cols // GROUP))
        if scales.shape != want or not np.isfinite(scales).all():
            raise AdapterError(f"adapter {name}.{key}_scales must be finite numbers of shape {want}")
    else:
        scales = np.zeros((rows, 0), np.float32)
    payload = np.frombuffer(bytes(raw), np.uint8).copy()
    packed = accel_precision.PackedAdapter(payload, scales, shape, precision, GROUP)
    if not np.isfinite(accel_precision.unpack_adapter(packed)).all():
        raise AdapterError(f"adapter {name}.{key} holds non-finite values")
    return packed


class LoRA(nn.Module):
    """Trainable adapters on a frozen :class:`LongLM` (see the module docstring).  ``forward(idx)``
    gives the adapted model's logits; only the adapters have gradients."""

    def __init__(self, model: LongLM, rank: int, precision: str, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        _check(rank, precision)
        self.base = model.requires_grad_(False)
        self.rank, self.precision, self.scale = rank, precision, float(scale)
        weights = dict(model.named_parameters())
        g = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.names = _matrix_names(model)
        for name in self.names:
            out_dim, in_dim = weights[_param_name(name)].shape
            key = name.replace(".", "_")
            self.a[key] = nn.Parameter(torch.randn(rank, in_dim, generator=g) / math.sqrt(in_dim))
            self.b[key] = nn.Parameter(torch.zeros(out_dim, rank))

    def deltas(self) -> dict[str, torch.Tensor]:
        """``scale * Q(B) Q(A)`` per LongLM parameter name (quantisation-aware)."""
        out = {}
        for name in self.names:
            key = name.replace(".", "_")
            a, bt = fake_quant(self.a[key], self.precision), fake_quant(self.b[key].T, self.precision)
            out[_param_name(name)] = self.scale * (bt.T @ a)
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        weights = dict(self.base.named_parameters())
        params = {n: weights[n] + d for n, d in self.deltas().items()}
        return torch.func.functional_call(self.base, params, (idx,))

    def pack(self) -> Adapters:
        """The adapters in their storage precision."""
        packed = {}
        for name in self.names:
            key = name.replace(".", "_")
            a = self.a[key].detach().numpy().astype(np.float32)
            b = np.ascontiguousarray(self.b[key].detach().numpy().T.astype(np.float32))
            packed[name] = (
                accel_precision.pack_adapter(a, self.precision, GROUP),
                accel_precision.pack_adapter(b, self.precision, GROUP),
            )
        return Adapters(self.rank, self.precision, self.scale, packed)
