"""``bktrain``: train the ResNet-BK LM (or its Transformer baseline) as a budgeted, preemptible job.

Payload (a map): ``run`` (id, ``[A-Za-z0-9_.-]{1,64}``), ``steps`` (the step count to reach),
``config`` (:class:`bklm.train.TrainConfig` as a map, ``model`` nested), ``checkpoint_every``
(steps, default 10), ``eval_every`` (steps, 0 = only at the end), ``corpus`` (a directory of
``*.py``; default the stdlib), ``corpus_limit_bytes`` (keep the first files only; for tests).

The run's checkpoint is ``<checkpoint-dir>/<principal>/<run>.ckpt``: a run is named within the
caller's principal (the kernel's, never the client's word), so another principal's request for
the same name starts a run of its own and never reads or trains this one. A request for a run
that has one resumes
from it: a run killed with its worker, stopped by its budget or cancelled continues from its last
checkpoint with the same step numbers and ends with the weights of an uninterrupted run
(checkpoints hold everything a step depends on). A cancelled run (budget spent, operator) writes
its checkpoint at the step boundary where the cancel lands, so no finished step is lost.

Every step: a safe point (``ctx.checkpoint``: preempt pauses here, resume continues with the
same state, cancel stops), the step in a thread (heartbeats go on), then ``flops`` (counted by the
model, see :mod:`bklm.model`) and ``ponder_steps`` (ACT's token x stage steps) charged and a
PARTIAL ``{"step", "loss", "flops", ...}`` — which carries the spending to the kernel, so a job
whose ``flops`` run out is cut off at that step. Held-out evaluations are PARTIALs
``{"eval": loss, "step"}`` and are charged too.

``op: budget`` (``curve`` ``[[flops, loss], ...]`` of a pilot run, ``target_loss``, ``margin``
default 1.25, ``max_breaks`` default 1): the FLOPs to reach the target by the breakpoint scaling law
(:mod:`lm.scaling`) and the budget ``margin x`` that -- what a client opens the training job with.
Pure arithmetic, charged nothing; a bad curve or an unreachable target -> ``bad_request``.

Errors: bad payload or config -> ``bad_request``; a corpus file that cannot be read ->
``bad_request`` with ``reason: corpus_unreadable``; a damaged checkpoint -> ``bad_request`` with
``reason: corrupt_checkpoint`` (the file is left for inspection); a grant too small for one step
-> ``refused`` with ``reason: budget_too_small``, ``needed`` and ``granted`` (no step runs).

Check before allocating (:mod:`services.bktrain.estimate`): the model's parameters are counted on
PyTorch's ``meta`` device and the least memory (training state) and FLOPs of the request bounded
from the config alone; over the granted ``mem_bytes``, the service group's memory ceiling or the
machine's available memory -> ``refused`` ``reason: memory_exceeded``; under the least FLOPs the
request can spend -> ``refused`` ``reason: budget_too_small`` -- before the model is built.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import pathlib
import re
from typing import Any

import torch

from bklm import corpus as corpus_mod
from bklm.model import LanguageModel, ModelConfig
from bklm.errors import BudgetTooSmallError, CheckpointError, ConfigError, CorpusError
from bklm.train import Trainer, TrainConfig
from kernel import errors
from kernel.config import runtime_dir
from services.base import Context, Service
from services.bktrain import estimate

RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PAYLOAD_KEYS = {"op", "run", "steps", "config", "checkpoint_every", "eval_every", "corpus", "corpus_limit_bytes"}
#: Keys of ``op: budget`` (the scaling-law FLOPs predictor, :func:`estimate.budget_from_curve`).
BUDGET_KEYS = {"op", "curve", "target_loss", "margin", "max_breaks"}
#: Largest ``steps`` one request may ask for.
MAX_STEPS = 1_000_000


def principal_dir(root: pathlib.Path, principal: str) -> pathlib.Path:
    """Where ``principal``'s runs live: a run is named within its principal (issue 24: another
    principal naming it starts a run of its own, and never reads or trains this one)."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", principal):
        return root / principal
    return root / ("p-" + hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()[:24])


def _positive_int(payload: dict, key: str, default: int | None, *, zero: bool = False) -> int:
    value = payload.get(key, default)
    low = 0 if zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_STEPS:
        raise errors.BadRequest(f"{key} must be an integer in [{low}, {MAX_STEPS}], got {value!r}")
    return value


def _warm_up() -> None:
    """One tiny forward and backward before registering: torch's first-use initialisation (seconds
    on a loaded machine) happens here, not inside a request's liveness window."""
    torch.set_num_threads(1)
    model = LanguageModel(ModelConfig(d_model=16, n_seq=8, n_layers=3, n_heads=2, n_experts=2,
                                      act=True, sparsity=True, multiscale=True))
    loss, _, _ = model.loss(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()


class BKTrainService(Service):
    name = "bktrain"
    capacity = 1

    def __init__(self) -> None:
        self.checkpoint_dir: pathlib.Path | None = None
        self._corpora: dict[tuple[str | None, int | None], corpus_mod.Corpus] = {}
        #: The memory ceiling of this service's enforcer group (None: none).
        self.group_limit: int | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint-dir", default=None, help="default {runtime}/bktrain")

    def configure(self, args: argparse.Namespace) -> None:
        self.checkpoint_dir = pathlib.Path(args.checkpoint_dir or pathlib.Path(runtime_dir()) / "bktrain")

    async def setup(self) -> None:
        if self.checkpoint_dir is None:
            self.checkpoint_dir = pathlib.Path(runtime_dir()) / "bktrain"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.group_limit = estimate.group_memory_limit()
        await asyncio.to_thread(_warm_up)


    def _corpus(self, root: str | None, limit: int | None) -> corpus_mod.Corpus:
        key = (root, limit)
        if key not in self._corpora:
            try:
                self._corpora[key] = corpus_mod.load(root, limit_bytes=limit)
            except CorpusError as exc:
                raise errors.BadRequest(str(exc), reason="corpus_unreadable", path=exc.path) from exc
        return self._corpora[key]

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("bktrain takes a map payload")
        if payload.get("op") == "budget":
            unknown = set(payload) - BUDGET_KEYS
            if unknown:
                raise errors.BadRequest(f"unknown keys {sorted(unknown)}")
            return await asyncio.to_thread(
                estimate.budget_from_curve, payload.get("curve"), payload.get("target_loss"),
                payload.get("margin", estimate.BUDGET_MARGIN), payload.get("max_breaks", 1))
        unknown = set(payload) - PAYLOAD_KEYS
        if unknown:
            raise errors.BadRequest(f"unknown keys {sorted(unknown)}")
        if payload.get("op", "train") != "train":
            raise errors.BadRequest(f"unknown op {payload.get('op')!r}; bktrain takes 'train' and 'budget'")
        run = payload.get("run")
        if not isinstance(run, str) or not RUN_ID.fullmatch(run):
            raise errors.BadRequest(f"run must match {RUN_ID.pattern}, got {run!r}")
        steps = _positive_int(payload, "steps", None)
        every = _positive_int(payload, "checkpoint_every", 10)
        eval_every = _positive_int(payload, "eval_every", 0, zero=True)
        root = payload.get("corpus")
        limit = payload.get("corpus_limit_bytes")
        if root is not None and not isinstance(root, str):
            raise errors.BadRequest("corpus must be a directory path")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise errors.BadRequest("corpus_limit_bytes must be a positive integer")
        try:
            cfg = TrainConfig.from_dict(payload.get("config", {}))
        except ConfigError as exc:
            raise errors.BadRequest(f"config: {exc}") from exc
        # Check before allocating: the model's size and least FLOPs from the config alone.
        try:
            est = await asyncio.to_thread(estimate.estimate, cfg)
        except ConfigError as exc:
            raise errors.BadRequest(f"config: {exc}") from exc
        estimate.check(est, ctx.granted, group_limit=self.group_limit)
        data = await asyncio.to_thread(self._corpus, root, limit)
        try:
            trainer = await asyncio.to_thread(Trainer, cfg, data)
        except (ConfigError, CorpusError) as exc:
            raise errors.BadRequest(str(exc)) from exc
        assert self.checkpoint_dir is not None
        path = principal_dir(self.checkpoint_dir, ctx.principal) / f"{run}.ckpt"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            try:
                await asyncio.to_thread(trainer.load, path)
            except CheckpointError as exc:
                raise errors.BadRequest(f"run {run!r}: {exc}", reason="corrupt_checkpoint", path=str(path)) from exc
        resumed_from = trainer.step_count
        granted = ctx.granted.get("flops")
        if granted is not None and trainer.step_count < steps:
            try:
                trainer.check_budget(float(granted))
            except BudgetTooSmallError as exc:
                raise errors.Refused(str(exc), reason="budget_too_small", needed=exc.needed,
                                     granted=exc.available) from exc
        spent_before = trainer.flops
        try:
            while trainer.step_count < steps:
                await ctx.checkpoint()
                report = await asyncio.to_thread(trainer.step)
                ctx.charge(flops=report.flops, ponder_steps=report.ponder_steps)
                if report.step % every == 0:
                    await asyncio.to_thread(trainer.save, path)
                await ctx.partial({"step": report.step, "loss": None if math.isnan(report.loss) else report.loss,
                                   "flops": report.flops, "ponder_steps": report.ponder_steps,
                                   "cache_hit": report.cache_hit, "keep_rate": report.keep_rate})
                if eval_every and report.step % eval_every == 0 and report.step < steps:
                    loss, flops = await asyncio.to_thread(trainer.evaluate)
                    ctx.charge(flops=flops)
                    await ctx.partial({"step": report.step, "eval": loss})
        except errors.RecaError:
            # cancelled at a safe point (budget spent: budget_exceeded; operator: cancelled): the
            # trainer is at a step boundary, so nothing finished is lost
            await asyncio.to_thread(trainer.save, path)
            raise
        await ctx.checkpoint()
        loss, flops = await asyncio.to_thread(trainer.evaluate)
        ctx.charge(flops=flops)
        await asyncio.to_thread(trainer.save, path)
        return {"run": run, "steps_done": trainer.step_count, "resumed_from": resumed_from,
                "digest": trainer.weights_digest(), "heldout_loss": loss,
                "train_flops": trainer.flops - spent_before, "flops_total": trainer.flops,
                "cache_hits": trainer.cache_hits, "corpus": data.summary(), "checkpoint": str(path)}
