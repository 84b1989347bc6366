"""What a ``bktrain`` request will cost, derived from its config before anything is allocated.

:func:`estimate` builds the model on PyTorch's ``meta`` device -- shapes only, no storage -- to
count its parameters exactly, and bounds from below:

* **training state**: every parameter in float32 with its gradient and AdamW's two moments,
  ``16`` bytes per parameter (activations come on top: the true peak is higher);
* **FLOPs of the least work a request can do**: one training step passes each of the batch's
  ``batch x n_seq`` tokens through the output projection (``d_model x vocab``), forward and
  backward (:data:`bklm.model.TRAIN_FLOP_FACTOR`); the closing evaluation passes at least one
  held-out window through it (the corpus decides how many it has).  A request ends with an
  evaluation even when no step is left, so the lesser of the two is what any request costs.

:func:`check` compares these with the ceilings: the ``mem_bytes`` the job granted, the service
group's memory ceiling (:mod:`kernel.enforce`) and the memory the machine has available, and the
``flops`` the job granted.  A request over any of them is refused before the model exists: a
538M-parameter config with ``flops = 1`` allocates nothing.
"""

from __future__ import annotations

import dataclasses
import psutil
import torch

from bklm.model import TRAIN_FLOP_FACTOR, LanguageModel
from bklm.train import TrainConfig
from kernel import enforce
from kernel import errors

#: Bytes of training state per parameter: float32 weight, gradient, AdamW exp_avg and exp_avg_sq.
STATE_BYTES_PER_PARAM = 16


@dataclasses.dataclass(frozen=True)
class Estimate:
    params: int
    state_bytes: int  # a lower bound of the training state's memory
    step_flops: int  # a lower bound of one training step's FLOPs
    eval_flops: int  # a lower bound of the closing evaluation's FLOPs (one window)

    @property
    def least_flops(self) -> int:
        """The least FLOPs any request spends (a finished run still evaluates)."""
        return min(self.step_flops, self.eval_flops)


def estimate(cfg: TrainConfig) -> Estimate:
    """Parameters counted on the ``meta`` device (no memory), and the lower bounds above."""
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    m = cfg.model
    head = 2 * m.n_seq * m.d_model * m.vocab  # per sequence, forward
    return Estimate(params, STATE_BYTES_PER_PARAM * params, TRAIN_FLOP_FACTOR * head * cfg.batch, head)


def group_memory_limit() -> int | None:
    """The memory ceiling of this service's enforcer group (None where it has none)."""
    try:
        group = enforce.service_group()
        return None if group is None else group.memory().limit
    except (enforce.EnforcerError, KeyError, ValueError):
        return None


def check(
    est: Estimate, granted: dict[str, float], *, group_limit: int | None = None, available: int | None = None
) -> None:
    """Refuse (``errors.Refused``) a request whose lower bounds exceed a ceiling.

    ``reason``: ``memory_exceeded`` (with ``needed``, ``limit`` and ``which``: ``mem_bytes``,
    ``group`` or ``machine``) or ``budget_too_small`` (``needed``, ``granted``)."""
    ceilings = []
    if "mem_bytes" in granted:
        ceilings.append(("mem_bytes", float(granted["mem_bytes"])))
    if group_limit is not None:
        ceilings.append(("group", float(group_limit)))
    if available is None:
        available = psutil.virtual_memory().available
    ceilings.append(("machine", float(available)))
    for which, limit in ceilings:
        if est.state_bytes > limit:
            raise errors.Refused(
                f"a model of {est.params:,} parameters needs at least {est.state_bytes:,} bytes of training "
                f"state; the {which} ceiling is {int(limit):,}",
                reason="memory_exceeded",
                needed=est.state_bytes,
                limit=int(limit),
                which=which,
                params=est.params,
            )
    if "flops" in granted and est.least_flops > float(granted["flops"]):
        raise errors.Refused(
            f"the least work of this config costs at least {est.least_flops:,} FLOPs; the job granted "
            f"{float(granted['flops']):g}",
            reason="budget_too_small",
            needed=est.least_flops,
            granted=float(granted["flops"]),
        )


#: Default margin of a budget over the FLOPs the scaling law predicts.
BUDGET_MARGIN = 1.25
#: Most points a budget request may carry.
MAX_CURVE_POINTS = 10_000


def budget_from_curve(curve: object, target_loss: object, margin: object = BUDGET_MARGIN,
                      max_breaks: object = 1) -> dict:
    """The ``flops`` budget for reaching ``target_loss``, from a pilot curve ``[[flops, loss], ...]``
    (cumulative FLOPs, loss) through :func:`lm.scaling.fit_auto`: ``margin`` x the FLOPs the law
    needs.  ``errors.BadRequest`` on a malformed curve, non-positive values, too few points or a
    target the law never reaches (``reason``: ``bad_curve``, ``too_few_points``, ``unreachable``)."""
    from lm import scaling

    if not isinstance(curve, list) or not 0 < len(curve) <= MAX_CURVE_POINTS or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in p) for p in curve):
        raise errors.BadRequest(f"curve must be a list of at most {MAX_CURVE_POINTS} [flops, loss] pairs",
                                reason="bad_curve")
    for name, value, low in (("target_loss", target_loss, 0.0), ("margin", margin, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or value != value \
                or value == float("inf"):
            raise errors.BadRequest(f"{name} must be a finite number > {low:g}, got {value!r}", reason="bad_curve")
    if isinstance(max_breaks, bool) or not isinstance(max_breaks, int) or not 0 <= max_breaks <= 2:
        raise errors.BadRequest("max_breaks must be 0, 1 or 2", reason="bad_curve")
    flops, loss = [float(p[0]) for p in curve], [float(p[1]) for p in curve]
    try:
        law = scaling.fit_auto(flops, loss, max_breaks)
        needed = law.compute_for(float(target_loss))
    except scaling.TooFewPointsError as exc:
        raise errors.BadRequest(str(exc), reason="too_few_points") from None
    except scaling.UnreachableError as exc:
        raise errors.BadRequest(str(exc), reason="unreachable") from None
    except scaling.ScalingError as exc:
        raise errors.BadRequest(str(exc), reason="bad_curve") from None
    return {"predicted_flops": needed, "budget_flops": float(margin) * needed, "margin": float(margin),
            "law": law.to_wire()}
