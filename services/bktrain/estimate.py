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
