"""The decode worker: a :class:`lm.engine.Engine` served through the kernel.

One process holds one engine and the *decodes* it serves; a decode is an engine sequence, named
by its sequence id.  Requests are msgpack maps ``{"op": ..., ...}``:

=========== ===================================================================================
``generate`` ``{prompt | tokens | decode, max_new, width=1, stop=None, stop_count=1, keep=True}``
            Start a decode (prefill ``prompt``) or continue ``decode``.  ``width == 1``: greedy,
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
``stats``    engine counters, live decodes, free KV blocks.
=========== ===================================================================================

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
from typing import Any, Callable

import torch

from kernel import errors
from kernel import protocol as P
from lm import tokenizer
from lm.engine import Engine, EngineStats, SeqState
from lm.errors import LMError, OutOfBlocksError
from lm.roi import RoI, accept_for
from services.base import Context, Service

#: The upper bound of ``state``'s ``wait_paused_ms``.
MAX_WAIT_PAUSED_MS = 10_000
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
    if isinstance(exc, OutOfBlocksError):
        return errors.Refused(str(exc), kind=type(exc).__name__)
    return errors.BadRequest(str(exc), kind=type(exc).__name__)


@dataclasses.dataclass(eq=False)
class Decode:
    """One served decode.  Invariant: ``owner`` is the generate request streaming it (or None);
    ``paused`` is set exactly while that request waits at a safe point after a preempt."""

    seq: int
    owner: Context | None = None
    paused: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


def _int(payload: dict, key: str, default: Any = None, *, lo: int | None = None) -> int:
    value = payload.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.BadRequest(f"'{key}' must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise errors.BadRequest(f"'{key}' must be >= {lo}, got {value}")
    return value


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
        self.engine: Engine | None = None
        self.decodes: dict[int, Decode] = {}
        self._lock = asyncio.Lock()
        self.num_blocks = 1024
        self.dtype = "float32"
        self.weights: str | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-blocks", type=int, default=self.num_blocks)
        parser.add_argument("--dtype", choices=("float32", "float64"), default=self.dtype)
        parser.add_argument("--weights", default=None, help="weights file (default: the shipped ones)")

    def configure(self, args: argparse.Namespace) -> None:
        self.num_blocks, self.dtype, self.weights = args.num_blocks, args.dtype, args.weights

    async def setup(self) -> None:
        self.engine = Engine.load(self.weights, dtype=getattr(torch, self.dtype), num_blocks=self.num_blocks)

    # -- plumbing --------------------------------------------------------------------------------

    async def _call(self, ctx: Context, fn: Callable[..., Any], *args: Any, thread: bool = False,
                    **kw: Any) -> Any:
        """Run one engine call under the lock and charge what it spent to ``ctx``."""
        eng = self.engine
        assert eng is not None
        async with self._lock:
            before = eng.stats()
            try:
                if thread:
                    return await asyncio.to_thread(fn, *args, **kw)
                return fn(*args, **kw)
            except LMError as exc:
                raise typed_error(exc) from None
            finally:
                spent = spend_between(before, eng.stats())
                if spent:
                    ctx.charge(**spent)

    def _decode(self, payload: dict) -> Decode:
        did = payload.get("decode")
        dec = self.decodes.get(did) if isinstance(did, int) and not isinstance(did, bool) else None
        if dec is None:
            raise errors.BadRequest(f"no decode {did!r} on this worker", kind="UnknownSequenceError")
        return dec

    def _mutable(self, payload: dict) -> Decode:
        dec = self._decode(payload)
        if dec.owner is not None and not dec.paused.is_set():
            raise errors.BadRequest(f"decode {dec.seq} is being generated; pause it first (ids.pause)",
                                    kind="DecodeBusy")
        return dec

    def _view(self, dec: Decode) -> dict:
        eng = self.engine
        assert eng is not None
        toks = eng.tokens(dec.seq)
        out = {
            "decode": dec.seq, "tokens": toks, "text": tokenizer.decode(toks), "position": len(toks),
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
        eng = self.engine
        assert eng is not None

        def pause() -> None:
            eng.pause(dec.seq)
            dec.paused.set()

        def resume() -> None:
            dec.paused.clear()
            if dec.seq in eng.live_sequences and eng.state(dec.seq) is SeqState.PAUSED:
                eng.resume(dec.seq)

        await ctx.checkpoint(on_pause=pause, on_resume=resume)

    # -- ops -------------------------------------------------------------------------------------

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("a decode request is a map with an 'op'")
        op = payload.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise errors.BadRequest(f"unknown op {op!r}; ops: generate, inject, splice, replace, rewind, "
                                    "free, state, stats")
        return await handler(ctx, payload)

    async def op_generate(self, ctx: Context, payload: dict) -> dict:
        eng = self.engine
        assert eng is not None
        max_new = _int(payload, "max_new", 64, lo=1)
        width = _int(payload, "width", 1, lo=1)
        stop_count = _int(payload, "stop_count", 1, lo=1)
        stop = payload.get("stop")
        stop_token = None
        if stop is not None:
            if not isinstance(stop, str) or len(stop) != 1:
                raise errors.BadRequest(f"'stop' must be one character, got {stop!r}")
            stop_token = tokenizer.token_id(stop)
        keep = bool(payload.get("keep", True))
        if "decode" in payload:
            dec = self._decode(payload)
            if dec.owner is not None:
                raise errors.BadRequest(f"decode {dec.seq} already has a generate streaming it", kind="DecodeBusy")
            if eng.state(dec.seq) is not SeqState.RUNNING:
                raise errors.BadRequest(f"decode {dec.seq} is {eng.state(dec.seq).value}",
                                        kind="SequenceFinishedError")
        else:
            prompt = _tokens_of(payload, bos=True)
            seq = await self._call(ctx, eng.start, prompt, seed=_int(payload, "seed", 0))
            dec = self.decodes[seq] = Decode(seq)
        start = len(eng.tokens(dec.seq))
        dec.owner = ctx
        dec.idle.clear()
        try:
            await ctx.partial({"decode": dec.seq, "request": ctx.id, "kernel_token": ctx.token, "start": start})
            if width == 1:
                await self._greedy(ctx, dec, max_new, stop_token, stop_count)
            else:
                await self._beam(ctx, dec, width, max_new, stop_token, stop_count)
            toks = eng.tokens(dec.seq)
            result = {"decode": dec.seq, "tokens": toks, "text": tokenizer.decode(toks), "new": toks[start:],
                      "finished": eng.state(dec.seq) is SeqState.FINISHED}
        finally:
            dec.owner = None
            dec.idle.set()
            if not keep and dec.seq in self.decodes:
                del self.decodes[dec.seq]
                eng.free(dec.seq)
        if not keep:
            result["freed"] = True
        return result

    async def _greedy(self, ctx: Context, dec: Decode, max_new: int, stop_token: int | None,
                      stop_count: int) -> None:
        eng = self.engine
        assert eng is not None
        seen = 0
        for i in range(max_new):
            if eng.state(dec.seq) is not SeqState.RUNNING or len(eng.tokens(dec.seq)) >= eng.max_len:
                break
            tok = await self._call(ctx, eng.step, dec.seq)
            await ctx.partial({"decode": dec.seq, "i": i, "token": tok})
            if stop_token is not None and tok == stop_token:
                seen += 1
                if seen >= stop_count:
                    break
            await self._safe_point(ctx, dec)

    async def _beam(self, ctx: Context, dec: Decode, width: int, max_new: int, stop_token: int | None,
                    stop_count: int) -> None:
        eng = self.engine
        assert eng is not None
        cands = await self._call(ctx, eng.beam, dec.seq, width, max_new, stop_token=stop_token,
                                 stop_count=stop_count, thread=True)
        await self._safe_point(ctx, dec)
        best = list(cands[0].tokens)
        await self._call(ctx, eng.inject, dec.seq, best)
        for i, tok in enumerate(best):
            await ctx.partial({"decode": dec.seq, "i": i, "token": tok, "logprob": cands[0].logprob})

    async def op_inject(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(payload)
        toks = _tokens_of(payload, bos=False)
        await self._call(ctx, self.engine.inject, dec.seq, toks)
        return self._view(dec)

    async def op_splice(self, ctx: Context, payload: dict) -> dict:
        eng = self.engine
        assert eng is not None
        dec = self._mutable(payload)
        start, end = _int(payload, "start"), _int(payload, "end")
        width = _int(payload, "width", 8, lo=1)
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
        res = await self._call(ctx, eng.splice, dec.seq, start, end, width=width, accept=accept, mode=mode,
                               recompute=recompute, thread=True)
        out = self._view(dec)
        out.update(start=res.start, old_span=tokenizer.decode(res.old_span), new_span=tokenizer.decode(res.new_span),
                   accepted=res.accepted, repaired=res.decoded, suffix_len=res.suffix_len, mode=res.mode)
        return out

    async def op_replace(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(payload)
        toks = _tokens_of(payload, bos=False)
        await self._call(ctx, self.engine.replace, dec.seq, _int(payload, "start"), _int(payload, "end"), toks)
        return self._view(dec)

    async def op_rewind(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(payload)
        await self._call(ctx, self.engine.rewind, dec.seq, _int(payload, "pos"))
        return self._view(dec)

    async def op_free(self, ctx: Context, payload: dict) -> dict:
        dec = self._mutable(payload)
        if dec.owner is not None:
            raise errors.BadRequest(f"decode {dec.seq} has a paused generate; resume or cancel it first",
                                    kind="DecodeBusy")
        await self._call(ctx, self.engine.free, dec.seq)
        del self.decodes[dec.seq]
        return {"decode": dec.seq, "freed": True}

    async def op_state(self, ctx: Context, payload: dict) -> dict:
        dec = self._decode(payload)
        wait_ms = _int(payload, "wait_paused_ms", 0, lo=0)
        if wait_ms:
            waits = [asyncio.ensure_future(dec.paused.wait()), asyncio.ensure_future(dec.idle.wait())]
            try:
                await asyncio.wait(waits, timeout=min(wait_ms, MAX_WAIT_PAUSED_MS) / 1000.0,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self.decodes.get(dec.seq) is not dec:
                raise errors.BadRequest(f"decode {dec.seq} was freed", kind="UnknownSequenceError")
        return self._view(dec)

    async def op_stats(self, ctx: Context, payload: dict) -> dict:
        eng = self.engine
        assert eng is not None
        return {"counters": dataclasses.asdict(eng.stats()), "decodes": sorted(self.decodes),
                "free_blocks": eng.cache.allocator.num_free}
