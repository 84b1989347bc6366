"""The decode worker: a :class:`lm.engine.Engine` served through the kernel.

One process holds one engine and the *decodes* it serves; a decode is an engine sequence, named
by its sequence id.  Requests are msgpack maps ``{"op": ..., ...}``:

=========== ===================================================================================
``generate`` ``{prompt | tokens | decode, max_new, width=1, stop=None, stop_count=1, keep=True,
            model="chain", prefix=True}``
            Start a decode (prefill ``prompt``) or continue ``decode``.  ``model`` names a served
            model (:data:`MODELS`; loaded on first use).  A new prompt reuses the longest run of
            whole KV blocks the model's prefix cache holds (``prefix=False``: prefill it all); the
            decode's full blocks are cached when the generate ends, so a repeated prompt or a
            continuation of an earlier answer hits.  ``width == 1``: greedy,
            one PARTIAL ``{"decode", "i", "token"}`` per token and a safe point
            (``ctx.checkpoint()``) at every token boundary, where the kernel's preempt pauses
            the decode (the engine sequence is marked paused, its state captured) and resume
            continues it.  ``width > 1``: a beam over the whole continuation (run in a thread),
            whose best candidate is appended by one prefill and streamed.  The first PARTIAL is
            ``{"decode", "request", "kernel_token", "start"}`` (``kernel_token``: the kernel's token of this
            request, which another client can pass to ``mmi.preempt``).  FINAL: ``{"decode", "tokens", "text", "new",
            "finished"}``.  ``keep=False`` frees the decode at the end.
``inject``   ``{decode, text | tokens}``: append by one prefill of the injected tokens only.
``splice``   ``{decode, start, end, width=8, mode="exact", verify=True, recompute=4}``: RoI-S
            re-decode of the token span ``[start, end)``; with ``verify`` the best candidate the
            chain verifier accepts up to the span's end is chosen (:func:`lm.roi.accept_for`).
``replace``  ``{decode, start, end, text | tokens}``: put tokens in place of a span (thunk
            forcing, tool answers); the suffix's KV is recomputed by one prefill.
``rewind``   ``{decode, pos}``: keep ``tokens[:pos]``, free the blocks past it.
``free``     ``{decode}``.
``state``    ``{decode, wait_paused_ms=0}``: tokens, text, position, engine state, whether a
            generate is streaming it (and that request's ``id`` / ``job``), whether it is
            paused.  ``wait_paused_ms`` waits (bounded) until its generate pauses or ends.
``stats``    ``{model="chain"}``: engine counters, live decodes, free KV blocks, prefix cache
            figures (lookups, hit rate, prefill tokens saved, blocks held, evictions).
``long_open`` ``{varref: {length, vars, seed} | tokens, policy: {name: sparse|full, ...}, tiers:
            {device_blocks, host_blocks, disk_blocks, block_size, prefetch}}``: prefill a context
            into a decoder of the long-context model over tiered KV (:mod:`lm.longsession`; the
            prefill runs in a thread).  The device arena (``device_blocks``) is held through the
            kernel's gate as ``kv_blocks`` of the request's job (:class:`KvBlocks`) until
            ``long_free``: a job cannot hold more device blocks than its budget.
``long_ask`` ``{long, queries: [name, ...]}``: per query feed ``?name`` and decode the answer
            greedily, one PARTIAL per answer, a safe point at every token.
``long_stats``, ``long_free`` ``{long}``.
``precision`` a POPB order (:meth:`lm.popb.PrecisionPlan.from_wire`, or ``{reset: true}``) for
            the long-context model; the same map published on ``ctl/decode/precision`` applies too
            (a malformed order there is counted in ``long_stats`` and logged, never applied).
=========== ===================================================================================

Models (:data:`MODELS`, :func:`register_model`): a name and a loader returning an
:class:`lm.engine.Engine` (or anything with its interface); ``chain`` is loaded at setup, others on
first use.  A decode's id is the worker's (unique over every model), its engine sequence id is
``Decode.seq``.

Prefix cache (:class:`spark.prefix.PrefixCache`, one per model, ``--prefix-blocks`` KV blocks;
0 turns it off): a radix tree over full KV blocks, reference counted, least recently used leaves
evicted past its ``kv_blocks`` bound, and released first when the pool runs out (an engine call
refused with ``OutOfBlocksError`` is retried once after the cache gives its blocks back).  The
cached keys/values are the ones the same prefix at the same positions computes, so greedy tokens
are those of decoding without it (exactly in float64; in float32 a prefill and a step differ by
rounding).  RoI-S splices (exact mode) and replacements insert the repaired sequence's blocks; a decode once spliced with ``mode="approx"`` is never inserted (its suffix KV is the old span's).  The tree is
kept per principal (one namespace each, one shared bound): a principal's prompt never reuses
another's blocks, so ``prefix_reused`` tells nothing about what others decoded.

Beams are bounded (``--max-beam-width``, default :data:`MAX_BEAM_WIDTH`; ``--max-beam-tokens``,
default :data:`MAX_BEAM_TOKENS`, bounds ``width * max_new`` of a generate's beam): a beam runs in a
thread with no safe point, so its bound is what the service declares to the kernel's escalation
ladder as its grace (kernel/supervisor.py ``DECLARED_GRACE_MS``).  A request over a bound is
refused before any engine call: ``bad_request`` with ``kind: "limit"`` and ``limit`` naming it.

Decode ids carry the worker's incarnation (``RECA_INCARNATION``, from the supervisor: larger for
every later run): an id of an earlier run of the worker -- its state died when that run was
killed or crashed -- answers ``session_lost``, never "no decode" (issue 23: the ladder kills a
decode worker only past another request's hard ceiling, and then says so).

Invariants: every engine call runs under ``self._lock`` (a beam or splice may run in a thread,
and the engine is not thread-safe); a decode with a generate streaming it is mutated only by
that generate unless it is paused at a safe point (``inject`` / ``splice`` / ``replace`` /
``rewind`` / ``free`` are refused otherwise).  Every token forward is charged to the request
that caused it: ``tokens`` (decoded + prefilled, the compute kind the kernel budgets) and the
counted kinds ``decoded``, ``prefilled``, ``repaired``, ``recomputed``, so the job's spend in
``mmi.job.stats`` says where the compute went.  Bad input is a typed error
(``bad_request`` with ``kind`` naming the :mod:`lm.errors` class; ``refused`` when the KV pool
is full) and leaves the decode as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import logging
import os
import time
from typing import Any, Callable

import torch

from clients.aio import AsyncClient
from kernel import errors
from kernel import protocol as P
from kernel.config import runtime_dir
from lm import tokenizer, varref
from lm.engine import Engine, EngineStats, SeqState
from lm.errors import LMError, OutOfBlocksError, UnknownSequenceError
from lm.kvtiers import BudgetTooSmallError, DiskTierFullError
from lm.longmodel import load as load_long
from lm.longsession import MAX_DEVICE_BLOCKS, LongSessions
from lm.roi import RoI, accept_for
from services.base import Context, Service
from spark.prefix import PrefixCache

log = logging.getLogger("reca.decode")

#: The upper bound of ``state``'s ``wait_paused_ms``.
MAX_WAIT_PAUSED_MS = 10_000
#: Widest beam (generate or splice) a request may ask for, unless ``--max-beam-width`` says otherwise.
MAX_BEAM_WIDTH = 16
#: Most ``width * max_new`` of a generate's beam, unless ``--max-beam-tokens`` says otherwise (the
#: bound at 16 x 256 costs ~0.2 s of CPU with the chain model).
MAX_BEAM_TOKENS = 4096
#: Decode ids of one incarnation: ``incarnation * ID_SPAN + n``.
ID_SPAN = 1 << 20
#: Counted kinds charged besides ``tokens`` (see :func:`spend_between`).
COUNTED = ("decoded", "prefilled", "repaired", "recomputed")


def spend_between(before: EngineStats, after: EngineStats) -> dict[str, int]:
    """What the engine spent between two counter snapshots, as charge kinds: ``tokens`` is every
    token forward (decoded + prefilled); the others are the engine's own counters."""
    delta = {k: getattr(after, k) - getattr(before, k) for k in COUNTED}
    out = {k: v for k, v in delta.items() if v}
    total = delta["decoded"] + delta["prefilled"]
    if total:
        out["tokens"] = total
    return out


def typed_error(exc: LMError) -> errors.RecaError:
    """The wire error of an engine error: ``refused`` for a full KV pool (may succeed later),
    else ``bad_request``; ``kind`` names the :mod:`lm.errors` class."""
    if isinstance(exc, (OutOfBlocksError, BudgetTooSmallError, DiskTierFullError)):
        return errors.Refused(str(exc), kind=type(exc).__name__)
    return errors.BadRequest(str(exc), kind=type(exc).__name__)


#: The counted resource a tiered decode's device arena is held as, and the lease of a hold (the
#: longest the gate allows; a decode held longer loses its hold).
KV_BLOCKS = "kv_blocks"
ARENA_LEASE_S = 3600.0
#: Bound on one gate call, seconds.
GATE_TIMEOUT = 10.0


class KvBlocks:
    """The kernel's gate, in one place: hold ``n`` ``kv_blocks`` of a job for a decode's life."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.client: AsyncClient | None = None

    async def hold(self, job: str | None, n: int) -> str:
        if self.client is None:
            self.client = AsyncClient(self.endpoint, timeout=GATE_TIMEOUT, retries=0)
        args = {"resource": KV_BLOCKS, "amount": n, "commit": False, "lease_s": ARENA_LEASE_S}
        if job is not None:
            args["job"] = job
        return (await self.client.call(P.MMI_GATE_RESERVE, args))["reservation"]

    async def release(self, reservation: str) -> None:
        assert self.client is not None
        await self.client.call(P.MMI_GATE_RELEASE, {"reservation": reservation})

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """What a model loader is given: the worker's options."""

    dtype: torch.dtype
    num_blocks: int
    weights: str | None = None


def _load_chain(a: ModelArgs) -> Engine:
    return Engine.load(a.weights, dtype=a.dtype, num_blocks=a.num_blocks)


def _spark(task: int) -> Callable[[ModelArgs], Any]:
    """The procedural integration model (:mod:`spark.procedural`) with task ``task``'s generated
    delta folded in."""

    def load(a: ModelArgs) -> Any:
        from spark.procedural import load_engine

        return load_engine(task=task, dtype=a.dtype, num_blocks=a.num_blocks)

    return load


#: The models a worker serves, by name: a loader called once, on first use (``chain`` at setup).
#: Another model (a recurrent one, say) registers here with :func:`register_model`.
MODELS: dict[str, Callable[[ModelArgs], Any]] = {
    "chain": _load_chain,
    "spark": _spark(0),
    **{f"spark-k{k}": _spark(k) for k in range(1, 10)},
}
DEFAULT_MODEL = "chain"


def register_model(name: str, loader: Callable[[ModelArgs], Any]) -> None:
    """Serve ``loader``'s engine as ``model=name`` (it needs :class:`lm.engine.Engine`'s API)."""
    if not isinstance(name, str) or not name or name in MODELS:
        raise ValueError(f"model name {name!r} is empty or taken")
    MODELS[name] = loader


@dataclasses.dataclass(eq=False)
class Served:
    """One loaded model: its engine and its prefix cache (None when off)."""

    name: str
    engine: Any
    prefix: PrefixCache | None
    pressure_evictions: int = 0

    def prefix_stats(self) -> dict:
        if self.prefix is None:
            return {"enabled": False}
        st = self.prefix.stats
        return {"enabled": True, "max_blocks": self.prefix.max_blocks, "blocks": self.prefix.size,
                **dataclasses.asdict(st), "hit_rate": st.hit_rate, "saved_fraction": st.saved_fraction,
                "pressure_evictions": self.pressure_evictions}


@dataclasses.dataclass(eq=False)
class Decode:
    """One served decode.  Invariant: ``owner`` is the generate request streaming it (or None);
    ``paused`` is set exactly while that request waits at a safe point after a preempt.
    ``id`` is the worker's decode id, ``seq`` the sequence in ``served``'s engine."""

    id: int
    seq: int
    served: Served
    #: The principal that started it: only its requests see or touch it (issue 24).
    principal: str = ""
    #: False once an approximate splice reused old KV: its blocks are not what a prefill of its
    #: tokens computes, so they never enter the prefix cache.
    exact: bool = True
    owner: Context | None = None
    paused: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


def _incarnation() -> int:
    """This run's incarnation (``RECA_INCARNATION`` from the supervisor; without one, this start's
    own: kernel.protocol.incarnation_at)."""
    try:
        return max(1, int(os.environ.get(P.ENV_INCARNATION, "")))
    except ValueError:
        return P.incarnation_at(time.time())


def _int(payload: dict, key: str, default: Any = None, *, lo: int | None = None) -> int:
    return errors.require_int(payload, key, default, lo=lo)


def _tokens_of(payload: dict, *, bos: bool) -> list[int]:
    """``text`` (encoded; BOS first when ``bos``) or ``tokens`` (checked) of a request."""
    try:
        if isinstance(payload.get("text"), str):
            return tokenizer.encode(payload["text"], bos=bos)
        if isinstance(payload.get("prompt"), str):
            return tokenizer.encode(payload["prompt"], bos=bos)
        if isinstance(payload.get("tokens"), list):
            return tokenizer.check_ids(payload["tokens"])
    except LMError as exc:
        raise typed_error(exc) from None
    raise errors.BadRequest("give 'text' (or 'prompt') as a string or 'tokens' as a list of ids")


class DecodeService(Service):
    name = "decode"
    #: One slot streams a decode; the others serve inject / splice / state while it is paused.
    capacity = 4

    def __init__(self) -> None:
        self.engine: Engine | None = None  # the default model's engine
        self.models: dict[str, Served] = {}
        self.prefix_blocks = 128
        self.incarnation = _incarnation()
        self._ids = itertools.count(self.incarnation * ID_SPAN + 1)
        self.max_beam_width = MAX_BEAM_WIDTH
        self.max_beam_tokens = MAX_BEAM_TOKENS
        self.decodes: dict[int, Decode] = {}
        self._lock = asyncio.Lock()
        self.num_blocks = 1024
        self.dtype = "float32"
        self.weights: str | None = None
        self.long: LongSessions | None = None
        self._long_lock = asyncio.Lock()
        self._holds: dict[int, str] = {}  # long decode -> its kv_blocks reservation
        self._long_owner: dict[int, str] = {}  # long decode -> the principal that opened it
        self.gate: KvBlocks | None = None
        self.rejected_precision = 0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-blocks", type=int, default=self.num_blocks)
        parser.add_argument("--dtype", choices=("float32", "float64"), default=self.dtype)
        parser.add_argument("--weights", default=None, help="weights file (default: the shipped ones)")
        parser.add_argument("--prefix-blocks", type=int, default=self.prefix_blocks,
                            help="KV blocks each model's prefix cache may hold (0: no cache)")
        parser.add_argument("--max-beam-width", type=int, default=self.max_beam_width,
                            help="widest beam a generate or splice may ask for")
        parser.add_argument("--max-beam-tokens", type=int, default=self.max_beam_tokens,
                            help="most width * max_new of a generate's beam")

    def configure(self, args: argparse.Namespace) -> None:
        self.num_blocks, self.dtype, self.weights = args.num_blocks, args.dtype, args.weights
        if args.prefix_blocks < 0 or args.prefix_blocks > args.num_blocks:
            raise SystemExit(f"--prefix-blocks must be in [0, --num-blocks], got {args.prefix_blocks}")
        self.prefix_blocks = args.prefix_blocks
        if args.max_beam_width < 1 or args.max_beam_tokens < 1:
            raise SystemExit("--max-beam-width and --max-beam-tokens must be >= 1")
        self.max_beam_width, self.max_beam_tokens = args.max_beam_width, args.max_beam_tokens
        self.gate = KvBlocks(getattr(args, "endpoint", None) or f"ipc://{runtime_dir()}/kernel.sock")

    async def setup(self) -> None:
        self.engine = self._served_now(DEFAULT_MODEL).engine
        self.long = LongSessions(load_long())

    def _served_now(self, name: str) -> Served:
        served = self.models.get(name)
        if served is None:
            args = ModelArgs(getattr(torch, self.dtype), self.num_blocks,
                             self.weights if name == DEFAULT_MODEL else None)
            eng = MODELS[name](args)
            cache = PrefixCache(eng, self.prefix_blocks) if self.prefix_blocks else None
            served = self.models[name] = Served(name, eng, cache)
        return served

    async def _served(self, payload: dict) -> Served:
        """The model a request names (``model``, default ``chain``), loaded on first use."""
        name = payload.get("model", DEFAULT_MODEL)
        if not isinstance(name, str) or name not in MODELS:
            raise errors.BadRequest(f"unknown model {name!r}; models: {', '.join(sorted(MODELS))}",
                                    kind="UnknownModel")
        if name not in self.models:
            async with self._lock:
                if name not in self.models:
                    try:
                        await asyncio.to_thread(self._served_now, name)
                    except FileNotFoundError as exc:
                        raise errors.BadRequest(f"model {name!r} has no weights: {exc}", kind="UnknownModel") \
                            from None
        return self.models[name]

    async def teardown(self) -> None:
        if self.long is not None:
            self.long.close()
        if self.gate is not None:
            await self.gate.close()

    # -- plumbing --------------------------------------------------------------------------------

    async def _call(self, ctx: Context, served: Served, fn: Callable[..., Any], *args: Any, thread: bool = False,
                    **kw: Any) -> Any:
        """Run one engine call under the lock and charge what it spent to ``ctx``.  A call the
        KV pool refuses is retried once after the prefix cache released its blocks (an engine
        error leaves the engine as it was, so the retry starts from the same state)."""
        eng = served.engine
        async with self._lock:
            before = eng.stats()
            try:
                for attempt in (0, 1):
                    try:
                        if thread:
                            return await asyncio.to_thread(fn, *args, **kw)
                        return fn(*args, **kw)
                    except OutOfBlocksError:
                        if attempt or served.prefix is None or not served.prefix.size:
                            raise
                        served.pressure_evictions += served.prefix.evict(served.prefix.size)
                raise AssertionError("unreachable")
            except LMError as exc:
                raise typed_error(exc) from None
            finally:
                spent = spend_between(before, eng.stats())
                if spent:
                    ctx.charge(**spent)

    def _cache(self, dec: Decode) -> None:
        """Insert ``dec``'s full blocks into its model's prefix cache (under the lock)."""
        cache = dec.served.prefix
        if cache is not None and dec.exact and dec.seq in dec.served.engine.live_sequences:
            cache.insert(dec.seq, dec.principal)

    def _decode(self, ctx: Context, payload: dict) -> Decode:
        """The caller's decode named in ``payload``: another principal's answers exactly as one
        that never existed."""
        did = payload.get("decode")
        dec = self.decodes.get(did) if isinstance(did, int) and not isinstance(did, bool) else None
        if dec is None and isinstance(did, int) and not isinstance(did, bool) and 0 < did // ID_SPAN < self.incarnation:
            raise errors.SessionLost(f"decode {did} was of an earlier run of this worker, which ended (killed or "
                                     "restarted): its state is gone; start a new decode", decode=did)
        if dec is None or dec.principal != ctx.principal:
            raise errors.BadRequest(f"no decode {did!r} on this worker", kind="UnknownSequenceError")
        return dec

    def _check_beam(self, width: int, max_new: int | None = None) -> None:
        """A beam within the worker's bounds, else ``bad_request`` ``kind: limit`` naming the bound."""
        if width > self.max_beam_width:
            raise errors.BadRequest(f"beam width {width} is over this worker's limit max_beam_width = "
                                    f"{self.max_beam_width}", kind="limit", limit="max_beam_width",
                                    max=self.max_beam_width, got=width)
        if max_new is not None and width > 1 and width * max_new > self.max_beam_tokens:
            raise errors.BadRequest(f"beam width * max_new = {width * max_new} is over this worker's limit "
                                    f"max_beam_tokens = {self.max_beam_tokens}", kind="limit",
                                    limit="max_beam_tokens", max=self.max_beam_tokens, got=width * max_new)

    @staticmethod
    def _eng(dec: Decode) -> Any:
        return dec.served.engine

    def _mutable(self, ctx: Context, payload: dict) -> Decode:
        dec = self._decode(ctx, payload)
        if dec.owner is not None and not dec.paused.is_set():
            raise errors.BadRequest(f"decode {dec.id} is being generated; pause it first (ids.pause)",
                                    kind="DecodeBusy")
        return dec

    def _view(self, dec: Decode) -> dict:
        eng = self._eng(dec)
        toks = eng.tokens(dec.seq)
        out = {
            "decode": dec.id, "model": dec.served.name, "tokens": toks, "text": tokenizer.decode(toks), "position": len(toks),
            "state": eng.state(dec.seq).value, "running": dec.owner is not None,
            "paused": dec.paused.is_set(), "block_table": list(eng.snapshot(dec.seq).block_table),
        }
        if dec.owner is not None:
            out["request"] = {"id": dec.owner.id, "job": dec.owner.job, "token": dec.owner.token}
        return out

    async def _safe_point(self, ctx: Context, dec: Decode) -> None:
        """A token boundary.  If a preempt addressed this request, the sequence is marked paused
        in the engine (capturing its state) before the pause is acknowledged, and resumed when
        the wait ends."""
        eng = self._eng(dec)

        def pause() -> None:
            eng.pause(dec.seq)
            dec.paused.set()

        def resume() -> None:
            dec.paused.clear()
            if dec.seq in eng.live_sequences and eng.state(dec.seq) is SeqState.PAUSED:
                eng.resume(dec.seq)

        await ctx.checkpoint(on_pause=pause, on_resume=resume)

    def on_control(self, op: str, message: dict) -> None:
        if op == P.ControlOp.PRECISION.value:
            try:
                self._precision(message)
            except errors.BadRequest as exc:
                self.rejected_precision += 1
                log.warning("precision order rejected: %s", exc.message)

    # -- ops -------------------------------------------------------------------------------------

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("a decode request is a map with an 'op'")
        op = payload.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise errors.BadRequest(f"unknown op {op!r}; ops: generate, inject, splice, replace, rewind, "
                                    "free, state, stats, long_open, long_ask, long_stats, long_free, precision")
        return await handler(ctx, payload)

    async def op_generate(self, ctx: Context, payload: dict) -> dict:
        max_new = _int(payload, "max_new", 64, lo=1)
        width = _int(payload, "width", 1, lo=1)
        self._check_beam(width, max_new)
        stop_count = _int(payload, "stop_count", 1, lo=1)
        stop = payload.get("stop")
        stop_token = None
        if stop is not None:
            if not isinstance(stop, str) or len(stop) != 1:
                raise errors.BadRequest(f"'stop' must be one character, got {stop!r}")
            stop_token = tokenizer.token_id(stop)
        keep = bool(payload.get("keep", True))
        reused = 0
        if "decode" in payload:
            dec = self._decode(ctx, payload)
            eng = self._eng(dec)
            if dec.owner is not None:
                raise errors.BadRequest(f"decode {dec.id} already has a generate streaming it", kind="DecodeBusy")
            if eng.state(dec.seq) is not SeqState.RUNNING:
                raise errors.BadRequest(f"decode {dec.id} is {eng.state(dec.seq).value}",
                                        kind="SequenceFinishedError")
        else:
            prompt = _tokens_of(payload, bos=True)
            seed = _int(payload, "seed", 0)
            served = await self._served(payload)
            eng = served.engine
            use_prefix = served.prefix is not None and bool(payload.get("prefix", True))
            start_fn = served.prefix.start if use_prefix else eng.start  # type: ignore[union-attr]
            before = served.prefix.stats.reused_tokens if use_prefix else 0  # type: ignore[union-attr]
            kw = {"ns": ctx.principal} if use_prefix else {}  # one tree per principal: no cross-principal hits
            seq = await self._call(ctx, served, start_fn, prompt, seed=seed, **kw)
            reused = served.prefix.stats.reused_tokens - before if use_prefix else 0  # type: ignore[union-attr]
            did = next(self._ids)
            dec = self.decodes[did] = Decode(did, seq, served, ctx.principal)
        start = len(eng.tokens(dec.seq))
        dec.owner = ctx
        dec.idle.clear()
        try:
            await ctx.partial({"decode": dec.id, "request": ctx.id, "kernel_token": ctx.token, "start": start})
            if width == 1:
                await self._greedy(ctx, dec, max_new, stop_token, stop_count)
            else:
                await self._beam(ctx, dec, width, max_new, stop_token, stop_count)
            toks = eng.tokens(dec.seq)
            result = {"decode": dec.id, "model": dec.served.name, "tokens": toks, "text": tokenizer.decode(toks),
                      "new": toks[start:], "finished": eng.state(dec.seq) is SeqState.FINISHED,
                      "prefix_reused": reused}
        finally:
            dec.owner = None
            dec.idle.set()
            async with self._lock:
                self._cache(dec)
                if not keep and self.decodes.get(dec.id) is dec:
                    del self.decodes[dec.id]
                    eng.free(dec.seq)
        if not keep:
            result["freed"] = True
        return result

    async def _greedy(self, ctx: Context, dec: Decode, max_new: int, stop_token: int | None,
                      stop_count: int) -> None:
        eng = self._eng(dec)
        seen = 0
        for i in range(max_new):
            if eng.state(dec.seq) is not SeqState.RUNNING or len(eng.tokens(dec.seq)) >= eng.max_len:
                break
            tok = await self._call(ctx, dec.served, eng.step, dec.seq)
            await ctx.partial({"decode": dec.id, "i": i, "token": tok})
            if stop_token is not None and tok == stop_token:
                seen += 1
                if seen >= stop_count:
                    break
            await self._safe_point(ctx, dec)

    async def _beam(self, ctx: Context, dec: Decode, width: int, max_new: int, stop_token: int | None,
                    stop_count: int) -> None:
        eng = self._eng(dec)
        cands = await self._call(ctx, dec.served, eng.beam, dec.seq, width, max_new, stop_token=stop_token,
                                 stop_count=stop_count, thread=True)
        await self._safe_point(ctx, dec)
        best = list(cands[0].tokens)
        await self._call(ctx, dec.served, eng.inject, dec.seq, best)
        for i, tok in enumerate(best):
            await ctx.partial({"decode": dec.id, "i": i, "token": tok, "logprob": cands[0].logprob})

    async def op_inject(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(ctx, payload)
        toks = _tokens_of(payload, bos=False)
        await self._call(ctx, dec.served, self._eng(dec).inject, dec.seq, toks)
        return self._view(dec)

    async def op_splice(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(ctx, payload)
        eng = self._eng(dec)
        start, end = _int(payload, "start"), _int(payload, "end")
        width = _int(payload, "width", 8, lo=1)
        self._check_beam(width)
        recompute = _int(payload, "recompute", 4, lo=0)
        mode = payload.get("mode", "exact")
        if mode not in ("exact", "approx"):
            raise errors.BadRequest(f"mode must be 'exact' or 'approx', got {mode!r}")
        accept = None
        if payload.get("verify", True):
            text = tokenizer.decode(eng.tokens(dec.seq))
            if not 1 <= start < end <= len(eng.tokens(dec.seq)):
                raise errors.BadRequest(f"span [{start}, {end}) is not inside [1, {len(eng.tokens(dec.seq))}]",
                                        kind="SpanError")
            accept = accept_for(text, RoI(start, end, None))  # type: ignore[arg-type]
        res = await self._call(ctx, dec.served, eng.splice, dec.seq, start, end, width=width, accept=accept,
                               mode=mode, recompute=recompute, thread=True)
        if mode == "approx":
            dec.exact = False
        async with self._lock:
            self._cache(dec)
        out = self._view(dec)
        out.update(start=res.start, old_span=tokenizer.decode(res.old_span), new_span=tokenizer.decode(res.new_span),
                   accepted=res.accepted, repaired=res.decoded, suffix_len=res.suffix_len, mode=res.mode)
        return out

    async def op_replace(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(ctx, payload)
        toks = _tokens_of(payload, bos=False)
        await self._call(ctx, dec.served, self._eng(dec).replace, dec.seq, _int(payload, "start"),
                         _int(payload, "end"), toks)
        async with self._lock:
            self._cache(dec)
        return self._view(dec)

    async def op_rewind(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(ctx, payload)
        await self._call(ctx, dec.served, self._eng(dec).rewind, dec.seq, _int(payload, "pos"))
        return self._view(dec)

    async def op_free(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(ctx, payload)
        if dec.owner is not None:
            raise errors.BadRequest(f"decode {dec.id} has a paused generate; resume or cancel it first",
                                    kind="DecodeBusy")
        await self._call(ctx, dec.served, self._eng(dec).free, dec.seq)
        del self.decodes[dec.id]
        return {"decode": dec.id, "freed": True}

    async def op_state(self, ctx: Context, payload: dict) -> dict:
        dec = self._decode(ctx, payload)
        wait_ms = _int(payload, "wait_paused_ms", 0, lo=0)
        if wait_ms:
            waits = [asyncio.ensure_future(dec.paused.wait()), asyncio.ensure_future(dec.idle.wait())]
            try:
                await asyncio.wait(waits, timeout=min(wait_ms, MAX_WAIT_PAUSED_MS) / 1000.0,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self.decodes.get(dec.id) is not dec:
                raise errors.BadRequest(f"decode {dec.id} was freed", kind="UnknownSequenceError")
        return self._view(dec)

    async def op_stats(self, ctx: Context, payload: dict) -> dict:
        served = await self._served(payload)
        eng = served.engine
        return {"model": served.name, "counters": dataclasses.asdict(eng.stats()),
                "decodes": sorted(i for i, d in self.decodes.items()
                                  if d.principal == ctx.principal and d.served is served),
                "free_blocks": eng.cache.allocator.num_free, "prefix": served.prefix_stats(),
                "models": sorted(MODELS), "loaded": sorted(self.models)}

    # -- long-context decodes over tiered KV, with precision control -----------------------------

    def _precision(self, order: Any) -> dict:
        assert self.long is not None
        try:
            return self.long.set_precision(order)
        except LMError as exc:
            raise typed_error(exc) from None

    async def op_precision(self, ctx: Context, payload: dict) -> dict:
        order = {k: v for k, v in payload.items() if k != "op"}
        async with self._long_lock:  # between two steps of every long decode
            return self._precision(order)

    async def op_long_open(self, ctx: Context, payload: dict) -> dict:
        assert self.long is not None and self.gate is not None
        tiers = payload.get("tiers")
        n = tiers.get("device_blocks") if isinstance(tiers, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEVICE_BLOCKS:
            raise errors.BadRequest(f"'tiers.device_blocks' must be an integer in [1, {MAX_DEVICE_BLOCKS}]")
        reservation = await self.gate.hold(ctx.job, n)  # Refused when the job has too few kv_blocks
        try:
            async with self._long_lock:
                try:
                    sid = await asyncio.to_thread(self.long.open, payload)
                except LMError as exc:
                    raise typed_error(exc) from None
        except BaseException:
            await self.gate.release(reservation)
            raise
        self._holds[sid] = reservation
        self._long_owner[sid] = ctx.principal
        n_tok = len(self.long.get(sid).tokens)
        ctx.charge(tokens=n_tok, prefilled=n_tok)
        return {"long": sid, "reservation": reservation, **self.long.stats(sid)}

    def _long_id(self, ctx: Context, payload: dict) -> Any:
        """The caller's long decode named in ``payload`` (another principal's: unknown, word for
        word as one that never existed)."""
        sid = payload.get("long")
        if isinstance(sid, int) and not isinstance(sid, bool) and sid in self._long_owner \
                and self._long_owner[sid] != ctx.principal:
            raise typed_error(UnknownSequenceError(f"no long decode {sid!r}"))
        return sid

    async def op_long_ask(self, ctx: Context, payload: dict) -> dict:
        assert self.long is not None
        self._long_id(ctx, payload)
        queries = payload.get("queries")
        if not isinstance(queries, list) or not queries or len(queries) > 10_000:
            raise errors.BadRequest("'queries' must be a non-empty list of variable names (at most 10,000)")
        try:
            dec = self.long.get(payload.get("long"))
            asks = [self.long.query_tokens(payload["long"], q) for q in queries]
        except LMError as exc:
            raise typed_error(exc) from None
        sid = payload["long"]
        answers = []
        for name, toks in zip(queries, asks):
            out = []
            for i in range(len(toks) + varref.ANSWER_LEN):
                async with self._long_lock:
                    if self.long.decoders.get(sid) is not dec:
                        raise errors.BadRequest(f"long decode {sid} was freed", kind="UnknownSequenceError")
                    try:
                        tok = dec.step(toks[i] if i < len(toks) else None)
                    except LMError as exc:
                        raise typed_error(exc) from None
                ctx.charge(tokens=1, decoded=1)
                if i >= len(toks):
                    out.append(tok)
                await ctx.checkpoint()
            answer = varref.decode(out)
            item = {"query": name, "answer": answer, "expected": self.long.expected(sid, name)}
            answers.append(item)
            await ctx.partial(item)
        return {"long": sid, "answers": answers, **self.long.stats(sid)}

    async def op_long_stats(self, ctx: Context, payload: dict) -> dict:
        assert self.long is not None
        self._long_id(ctx, payload)
        try:
            return {"long": payload.get("long"), **self.long.stats(payload.get("long")),
                    "rejected_precision_orders": self.rejected_precision}
        except LMError as exc:
            raise typed_error(exc) from None

    async def op_long_free(self, ctx: Context, payload: dict) -> dict:
        assert self.long is not None and self.gate is not None
        self._long_id(ctx, payload)
        async with self._long_lock:
            try:
                self.long.free(payload.get("long"))
            except LMError as exc:
                raise typed_error(exc) from None
        self._long_owner.pop(payload["long"], None)
        reservation = self._holds.pop(payload["long"], None)
        if reservation is not None:
            await self.gate.release(reservation)
        return {"long": payload.get("long"), "freed": True}
