"""Long-context decodes as a service holds them: tiering and precision control, no sockets.

:class:`LongSessions` is what the decode worker keeps for its ``long_*`` ops: decoders of the
long-context model (:class:`lm.longdecode.LongDecoder`) by id, each with its attention policy and
its tiers, and the precision plan every one of them runs with (POPB orders).  Requests arrive as
plain maps; every argument is checked before anything is created, and a bad one raises a typed
:mod:`lm` error (``ValueError`` subclasses for bad input, :class:`lm.kvtiers.BudgetTooSmallError`
for an arena below one step's working set).

``device_cap`` (the ``kv_blocks`` the caller holds through the kernel's gate) bounds the arena:
asking for more device blocks than the cap is refused, never clamped silently.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from lm import varref
from lm.errors import LMError, UnknownSequenceError
from lm.kvpolicy import BlockSparse, FullAttention, Policy, TopKKeys
from lm.kvtiers import BudgetTooSmallError
from lm.longdecode import LongDecoder, TierSpec
from lm.longmodel import LongLM
from lm.popb import PrecisionPlan

#: Largest tier sizes a request may ask for (blocks): bounded memory whatever the input.
MAX_DEVICE_BLOCKS = 4096
MAX_HOST_BLOCKS = 8192
MAX_DISK_BLOCKS = 1 << 15
#: Longest generated varref context a request may ask for.
MAX_VARREF_LEN = 1 << 17


class RequestError(LMError, ValueError):
    """A long-context request with a missing or malformed field."""


def _int(m: Mapping, key: str, default: Any, lo: int, hi: int) -> int:
    v = m.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_policy(m: Any) -> Policy:
    m = {} if m is None else m
    if not isinstance(m, Mapping):
        raise RequestError("'policy' must be a map")
    name = m.get("name", "sparse")
    try:
        if name == "sparse":
            return BlockSparse(topk=_int(m, "topk", 8, 0, 256), sinks=_int(m, "sinks", 1, 0, 16),
                               window=_int(m, "window", 2, 1, 64))
        if name == "full":
            return FullAttention(chunk_blocks=_int(m, "chunk_blocks", 16, 1, 1024))
        if name == "topk_keys":
            return TopKKeys(k_top=_int(m, "k_top", 256, 1, 1 << 16), chunk_blocks=_int(m, "chunk_blocks", 16, 1, 1024))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    raise RequestError(f"unknown policy {name!r}; policies: sparse, full, topk_keys, cold, recurrent")


#: The cold policy's codec width and exception rows per block: chosen on two training-seed 8k
#: contexts (not the benchmark's held-out ones) as the fewest bytes at the best accuracy there
#: (16 / 2: 0.875 as 32 / 2, against 0.81 with one row; docs/seeds.md, s31c figures).
COLD_CODE_DIM, COLD_EXACT_ROWS = 16, 2


def parse_cold(m: Mapping) -> dict:
    """``policy: {name: cold, topk, sinks, window, code_dim, exact_rows, retrieval}`` ->
    :class:`lm.coldtier.ColdTierDecoder` settings (``window`` in blocks; ``code_dim`` 0 keeps
    cold rows as float16)."""
    from lm.coldtier import RETRIEVALS

    retrieval = m.get("retrieval", "bound")
    if retrieval not in RETRIEVALS:
        raise RequestError(f"'retrieval' must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
    return {
        "topk": _int(m, "topk", 2, 1, 256),
        "sinks": _int(m, "sinks", 1, 0, 16),
        "window": _int(m, "window", 2, 1, 64),
        "code_dim": _int(m, "code_dim", COLD_CODE_DIM, 0, 1024),
        "exact_rows": _int(m, "exact_rows", COLD_EXACT_ROWS, 0, 64),
        "retrieval": retrieval,
    }


#: Prefetch when a request does not say: off.  Measured (``python -m bench kvtp``, block-sparse
#: top-2 on this CPU, where a swap-in is a memcpy in the same process): plain LRU without prefetch
#: was as fast or faster in 3 of 4 comparisons (1.07x vs 0.887x resident at 32k; 0.940x vs 0.863x
#: in a re-run; at 8k 0.886x vs 0.871x and 0.981x vs 0.849x at arenas of 16 and 15 blocks);
#: prefetch won only at a 33-block arena (0.992x vs 0.939x).  ``"prefetch": true`` opts in.
PREFETCH_DEFAULT = False


def parse_tiers(m: Any, device_cap: int | None) -> TierSpec:
    if not isinstance(m, Mapping):
        raise RequestError("'tiers' must be a map with device_blocks, host_blocks (disk_blocks, block_size, prefetch)")
    device = _int(m, "device_blocks", None, 1, MAX_DEVICE_BLOCKS)
    if device_cap is not None and device > device_cap:
        raise BudgetTooSmallError(f"{device} device blocks asked for, {device_cap} kv_blocks held")
    prefetch = m.get("prefetch", PREFETCH_DEFAULT)
    if not isinstance(prefetch, bool):
        raise RequestError("'prefetch' must be a boolean")
    return TierSpec(device_blocks=device, host_blocks=_int(m, "host_blocks", None, 1, MAX_HOST_BLOCKS),
                    disk_blocks=_int(m, "disk_blocks", 0, 0, MAX_DISK_BLOCKS),
                    block_size=_int(m, "block_size", 64, 32, 64), prefetch=prefetch)


def parse_context(m: Mapping) -> tuple[list[int], dict[str, str]]:
    """``tokens`` (checked ids) or ``varref: {length, vars, seed}`` (a generated context)."""
    if "tokens" in m:
        if not isinstance(m["tokens"], list):
            raise RequestError("'tokens' must be a list of token ids")
        return varref.check_ids(m["tokens"]), {}
    spec = m.get("varref")
    if not isinstance(spec, Mapping):
        raise RequestError("give 'tokens' or 'varref': {length, vars, seed}")
    import random

    length = _int(spec, "length", None, 64, MAX_VARREF_LEN)
    n_vars = _int(spec, "vars", 4, 1, len(varref.NAMES))
    try:
        ctx = varref.make_context(random.Random(_int(spec, "seed", 0, 0, 2**31)), length, n_vars)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return list(ctx.tokens), dict(ctx.values)


def _is_cold(dec: Any) -> bool:
    from lm.coldtier import ColdTierDecoder

    return isinstance(dec, ColdTierDecoder)


class LongSessions:
    def __init__(self, model: LongLM, *, disk_dir: str | None = None):
        self.base = model
        self.model = model
        self.plan: PrecisionPlan | None = None
        self.plan_info: dict = {"avg_bits": 32.0}
        self.disk_dir = disk_dir
        self.decoders: dict[int, LongDecoder] = {}
        self.values: dict[int, dict[str, str]] = {}
        #: constant-state peers (policy ``recurrent``), loaded on first use
        self.recurrent_models: dict[str, Any] = {}
        #: cold-tier codecs by code width (policy ``cold``), fitted on first use on a training context
        self.codecs: dict[int, Any] = {}
        self._ids = itertools.count(1)

    def _open_recurrent(self, request: Mapping, device_cap: int | None) -> int:
        """``policy: {name: recurrent, kind}``: a constant-state peer (:mod:`lm.recurrent`)."""
        from lm import recurrent
        from lm.recurrent_decode import RecurrentDecoder

        kind = request["policy"].get("kind")
        if kind not in recurrent.KINDS:
            raise RequestError(f"recurrent kind must be one of {', '.join(recurrent.KINDS)}, got {kind!r}")
        parse_tiers(request.get("tiers"), device_cap)
        tokens, values = parse_context(request)
        if kind not in self.recurrent_models:
            self.recurrent_models[kind] = recurrent.load(kind)
        dec = RecurrentDecoder(self.recurrent_models[kind])
        dec.prefill(tokens)
        sid = next(self._ids)
        self.decoders[sid] = dec  # type: ignore[assignment]
        self.values[sid] = values
        return sid

    def _open_cold(self, request: Mapping, device_cap: int | None) -> int:
        """``policy: {name: cold, ...}``: the transformer with distant blocks compressed and found by
        vector search (:mod:`lm.coldtier`).  The arena must hold one step's exact blocks (sinks +
        window + topk), as for the block-sparse policy; the codes live in host memory."""
        from lm.coldtier import ColdTierDecoder, default_codecs

        opts = parse_cold(request["policy"])
        spec = parse_tiers(request.get("tiers"), device_cap)
        need = opts["sinks"] + opts["window"] + opts["topk"]
        if spec.device_blocks < need:
            raise BudgetTooSmallError(
                f"policy cold reads {need} blocks at once (sinks + window + topk); "
                f"a device arena of {spec.device_blocks} blocks cannot hold one step's working set")
        if opts["exact_rows"] > spec.block_size:
            raise RequestError(f"'exact_rows' must be at most the block size {spec.block_size}")
        tokens, values = parse_context(request)
        code_dim = opts.pop("code_dim")
        if code_dim > 2 * self.base.cfg.d_model:
            raise RequestError(f"'code_dim' must be at most {2 * self.base.cfg.d_model} (the [k|v] row width)")
        if code_dim not in self.codecs:
            self.codecs[code_dim] = default_codecs(self.base, code_dim)
        dec = ColdTierDecoder(self.model, self.codecs[code_dim], block=spec.block_size,
                              window=opts.pop("window") * spec.block_size, **opts)
        dec.prefill(tokens)
        sid = next(self._ids)
        dec.model = self.model  # an order that arrived during the prefill applies from the first step
        self.decoders[sid] = dec  # type: ignore[assignment]
        self.values[sid] = values
        return sid

    def open(self, request: Mapping, *, device_cap: int | None = None) -> int:
        """Prefill a context into a new decoder; returns its id.  Nothing is created on error."""
        pm = request.get("policy")
        if isinstance(pm, Mapping) and pm.get("name") == "recurrent":
            return self._open_recurrent(request, device_cap)
        if isinstance(pm, Mapping) and pm.get("name") == "cold":
            return self._open_cold(request, device_cap)
        policy = parse_policy(request.get("policy"))
        spec = parse_tiers(request.get("tiers"), device_cap)
        tokens, values = parse_context(request)
        dec = LongDecoder(self.model, policy, spec, disk_dir=self.disk_dir)
        try:
            dec.prefill(tokens)
        except BaseException:
            dec.close()
            raise
        sid = next(self._ids)
        dec.model = self.model  # an order that arrived during the prefill applies from the first step
        self.decoders[sid] = dec
        self.values[sid] = values
        return sid

    def get(self, sid: Any) -> LongDecoder:
        dec = self.decoders.get(sid) if isinstance(sid, int) and not isinstance(sid, bool) else None
        if dec is None:
            raise UnknownSequenceError(f"no long decode {sid!r}")
        return dec

    def query_tokens(self, sid: int, name: Any) -> list[int]:
        if not isinstance(name, str) or len(name) != 1 or name not in varref.NAMES:
            raise RequestError(f"a query names one variable in {varref.NAMES!r}, got {name!r}")
        return varref.encode(f"?{name}")

    def expected(self, sid: int, name: str) -> str | None:
        return self.values.get(sid, {}).get(name)

    def free(self, sid: Any) -> None:
        dec = self.get(sid)
        dec.close()
        del self.decoders[sid]
        self.values.pop(sid, None)

    def stats(self, sid: Any) -> dict:
        dec = self.get(sid)
        if _is_cold(dec):
            exact, cold = dec.exact_bytes(), dec.cold_bytes()
            return {"tokens": len(dec.tokens), "policy": dec.describe(), "device_blocks": dec.device_blocks(),
                    "device_bytes": exact, "cold_bytes": cold, "cold_blocks": dec.n_cold,
                    "retrieved": dec.retrieved, "precision": self.plan_info}
        if not isinstance(dec, LongDecoder):  # a recurrent peer: no cache, no tiers
            return {"tokens": len(dec.tokens), "policy": {"name": "recurrent", "kind": dec.model.cfg.kind},
                    "device_blocks": 0, "device_bytes": dec.state_bytes(), "state_bytes": dec.state_bytes(),
                    "precision": {"avg_bits": 32.0}}
        st = dec.tiers.stats
        stalls = sorted(dec.stalls)
        return {
            "tokens": len(dec.tokens), "policy": dec.policy.describe(),
            "device_blocks": dec.tiers.device_blocks, "device_bytes": dec.tiers.device_bytes(),
            "blocks": dec.tiers.num_blocks, "hits": st.hits, "misses": st.misses, "waits": st.waits,
            "prefetched": st.prefetched, "prefetch_used": st.prefetch_used, "evictions": st.evictions,
            "demotions": st.demotions, "stall_s": st.stall_s,
            "stall_max_ms": 1e3 * stalls[-1] if stalls else 0.0, "precision": self.plan_info,
        }

    def set_precision(self, order: Mapping) -> dict:
        """Apply a POPB order (see :meth:`lm.popb.PrecisionPlan.from_wire`; ``{"reset": true}``
        returns to float32) to every decoder, from its next step on."""
        if isinstance(order, Mapping) and order.get("reset") is True:
            self.plan, self.model, self.plan_info = None, self.base, {"avg_bits": 32.0}
        else:
            plan = PrecisionPlan.from_wire(self.base, order)
            model, nbytes = plan.apply(self.base)
            self.plan, self.model = plan, model
            self.plan_info = {"avg_bits": plan.avg_bits(self.base), "bytes": nbytes}
        for dec in self.decoders.values():
            if isinstance(dec, LongDecoder) or _is_cold(dec):  # recurrent peers keep their own weights
                dec.model = self.model
        return dict(self.plan_info)

    def close(self) -> None:
        for sid in list(self.decoders):
            self.free(sid)
