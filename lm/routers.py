"""Mixture-of-experts routing (seed 004, S-1): a content-hash router, a learned top-k router and
an MoE feed-forward block with a load-balancing loss.

* :class:`HashRouter` — no parameters: each token goes to ``k <= 2`` experts chosen by a hash of
  its content.  With token ids (``ids``) the hash is of the id (Hash Layers, Roller et al. 2021;
  SPARK's ``content`` router); without, of the sign pattern of ``bits`` fixed random projections
  of the token's vector (SimHash), so equal or nearly equal inputs share experts.  The second
  expert is a different one, from an independent hash.  Gate weights are ``1/k``.
* :class:`SwitchRouter` — a learned linear gate, softmax, the top ``k`` experts (Switch
  Transformer for ``k = 1``: the output is scaled by the winning probability; for ``k > 1`` the
  top-k probabilities are renormalised to sum to 1, as GShard).  ``balance_loss`` is Switch's
  ``E * sum_e f_e * P_e`` (``f_e``: fraction of assignments to expert ``e``; ``P_e``: mean router
  probability), 1 when balanced; the hash router's is a constant 0 (nothing to learn).

Both report, for one :class:`Routing`, :meth:`Router.expert_utilization` (the fraction of the
token-expert assignments each expert got; sums to 1) and :meth:`Router.load_balance_std` (the
standard deviation of those fractions times ``E``: the coefficient of variation of the loads, 0
when balanced, ``sqrt(E - 1)`` when one expert takes everything), so the figure does not depend on
the batch size or the number of experts' scale.

:class:`MoEFFN` runs only the experts a token is routed to (experts ``[E, d, hidden]`` GELU MLPs)
and returns ``(output, balance_weight * balance_loss)``.  Users: bklm's MoE FFN
(:class:`bklm.model.MoEFFN`, ``ModelConfig.router``); offered to SPARK's sparse router.

Bad input (unknown router name, ``k`` out of range, shapes) raises :class:`RouterError`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import LMError

#: Router names :func:`make_router` knows.
ROUTERS = ("hash", "switch")
#: Multiplicative hashing constants (Knuth; odd 32-bit), one per expert slot.
_GOLDEN = (2654435761, 2246822519)
_MASK32 = (1 << 32) - 1


class RouterError(LMError, ValueError):
    """An unknown router, a ``k`` or expert count out of range, or inputs of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """Where ``T`` tokens go.  ``experts`` ``[T, k]`` (long; a token's experts are distinct),
    ``weights`` ``[T, k]`` (the gate weight multiplying each expert's output), ``probs`` ``[T, E]``
    (the learned router's probabilities; None for a hash router)."""

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None
    num_experts: int

    def counts(self) -> torch.Tensor:
        """Assignments per expert ``[E]`` (float)."""
        return torch.bincount(self.experts.reshape(-1), minlength=self.num_experts).float()


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RouterError(f"{name} must be an integer {span}, got {value!r}")
    return value


class Router(nn.Module):
    """Base: ``route(x [T, d], ids [T] | None) -> Routing``, and the balance statistics."""

    name = "router"

    def __init__(self, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts = _check_int("num_experts", num_experts, 1)
        self.k = _check_int("k", k, 1, num_experts)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        return self.route(x, ids)

    def _check(self, x: torch.Tensor, ids: torch.Tensor | None, d: int | None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise RouterError(f"x must be a float tensor [T, d], got {getattr(x, 'shape', type(x).__name__)}")
        if d is not None and x.shape[1] != d:
            raise RouterError(f"x has width {x.shape[1]}, the router was built for {d}")
        if ids is not None:
            if not isinstance(ids, torch.Tensor) or ids.shape != x.shape[:1] or ids.is_floating_point():
                raise RouterError(f"ids must be an integer tensor [T] = [{x.shape[0]}]")
            if ids.numel() and int(ids.min()) < 0:
                raise RouterError("ids must be non-negative")

    def expert_utilization(self, routing: Routing) -> torch.Tensor:
        """Fraction of the token-expert assignments each expert got ``[E]`` (zeros if none)."""
        c = routing.counts()
        return c / c.sum() if c.sum() > 0 else c

    def load_balance_std(self, routing: Routing) -> float:
        """``E * std(utilization)``: the coefficient of variation of the expert loads (0 = even)."""
        u = self.expert_utilization(routing)
        return float(u.std(unbiased=False) * self.num_experts) if u.sum() > 0 else 0.0

    def balance_loss(self, routing: Routing) -> torch.Tensor:
        """Switch's ``E * sum_e f_e * P_e``; a constant 0 when the router has no probabilities."""
        if routing.probs is None or routing.experts.shape[0] == 0:
            return routing.weights.new_zeros(())
        frac = self.expert_utilization(routing)
        return self.num_experts * (frac * routing.probs.mean(0)).sum()

    def describe(self) -> dict:
        return {"router": self.name, "experts": self.num_experts, "k": self.k}


class HashRouter(Router):
    """Content-hash routing to ``k <= 2`` distinct experts (see the module docstring).  ``d``: the
    width of the vectors hashed when no ids are given (None: ids are required)."""

    name = "hash"

    def __init__(self, num_experts: int, k: int = 1, *, d: int | None = None, bits: int = 16, seed: int = 0) -> None:
        super().__init__(num_experts, k)
        if self.k > 2:
            raise RouterError(f"a hash router sends a token to at most 2 experts, got k={k}")
        self.d = None if d is None else _check_int("d", d, 1)
        self.bits = _check_int("bits", bits, 1, 30)
        g = torch.Generator().manual_seed(_check_int("seed", seed, 0))
        planes = torch.randn(d, self.bits, generator=g) if d is not None else torch.zeros(0, self.bits)
        # fixed, saved with the model so a loaded model routes as it was trained
        self.register_buffer("planes", planes)
        self.register_buffer("powers", 2 ** torch.arange(self.bits))

    def keys(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """The integer content key of each token ``[T]``: its id, or its SimHash code."""
        if ids is not None:
            return ids.long()
        if self.d is None:
            raise RouterError("this hash router hashes token ids (built without d); pass ids")
        return ((x.detach().to(self.planes.dtype) @ self.planes > 0).long() * self.powers).sum(-1)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        self._check(x, ids, None if ids is not None else self.d)
        key = self.keys(x, ids)
        first = ((key * _GOLDEN[0]) & _MASK32) % self.num_experts
        cols = [first]
        if self.k == 2:  # an independent hash picks one of the other E - 1 experts
            step = 1 + ((key * _GOLDEN[1] + 0x9E37) & _MASK32) % (self.num_experts - 1)
            cols.append((first + step) % self.num_experts)
        experts = torch.stack(cols, -1)
        weights = torch.full(experts.shape, 1.0 / self.k, dtype=x.dtype, device=x.device)
        return Routing(experts, weights, None, self.num_experts)


class SwitchRouter(Router):
    """Learned top-``k`` routing: ``gate`` is ``Linear(d, E)``; see the module docstring."""

    name = "switch"

    def __init__(self, d: int, num_experts: int, k: int = 1, *, bias: bool = True) -> None:
        super().__init__(num_experts, k)
        self.d = _check_int("d", d, 1)
        self.gate = nn.Linear(d, num_experts, bias=bias)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        self._check(x, ids, self.d)
        probs = F.softmax(self.gate(x), dim=-1)
        if self.k == 1:
            experts = probs.argmax(-1, keepdim=True)
            weights = probs.gather(1, experts)
        else:
            top, experts = probs.topk(self.k, dim=-1)
            weights = top / top.sum(-1, keepdim=True)
        return Routing(experts, weights, probs, self.num_experts)


def make_router(name: str, d: int, num_experts: int, k: int = 1, **kw: object) -> Router:
    """A router by name (``hash`` hashes vectors of width ``d``; ``switch`` learns a gate on them)."""
    if name == "hash":
        return HashRouter(num_experts, k, d=d, **kw)  # type: ignore[arg-type]
    if name == "switch":
        return SwitchRouter(d, num_experts, k, **kw)  # type: ignore[arg-type]
    raise RouterError(f"unknown router {name!r}; routers: {', '.join(ROUTERS)}")


class MoEFFN(nn.Module):
    """An MoE feed-forward block: ``router`` picks each token's experts, only those run (GELU
    MLPs ``d -> hidden -> d``), their outputs are summed with the gate weights.  ``forward``
    returns ``(out [T, d], balance_weight * router.balance_loss)``; ``last_routing`` keeps the
    last call's routing for the balance statistics.  Active parameters per token:
    ``k * (2 * d * hidden + hidden + d)`` (plus the gate's ``d * E + E`` for a learned router)."""

    def __init__(self, d: int, num_experts: int, hidden: int, router: Router, balance_weight: float = 0.01) -> None:
        super().__init__()
        if router.num_experts != num_experts:
            raise RouterError(f"router has {router.num_experts} experts, the block {num_experts}")
        if not math.isfinite(balance_weight) or balance_weight < 0:
            raise RouterError(f"balance_weight must be finite and >= 0, got {balance_weight!r}")
        self.router = router  # registered first: its parameters come first, as bklm's gate did
        self.w1 = nn.Parameter(torch.randn(num_experts, d, hidden) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d))
        self.d, self.experts, self.hidden = d, num_experts, hidden
        self.balance_weight = float(balance_weight)
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.router.route(x, ids)
        self.last_routing = routing
        out = x.new_zeros(x.shape[0], self.d)
        for slot in range(routing.experts.shape[1]):
            chosen = routing.experts[:, slot]
            for e in range(self.experts):
                idx = (chosen == e).nonzero(as_tuple=True)[0]
                if idx.numel() == 0:
                    continue
                h = F.gelu(x[idx] @ self.w1[e] + self.b1[e])
                y = (h @ self.w2[e] + self.b2[e]) * routing.weights[idx, slot, None]
                out = out.index_add(0, idx, y)
        return out, self.balance_weight * self.router.balance_loss(routing)

    def active_parameters(self) -> int:
        gate = sum(p.numel() for p in self.router.parameters())
        return self.router.k * (2 * self.d * self.hidden + self.hidden + self.d) + gate
