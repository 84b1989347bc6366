"""KVT-P: KV-cache tiering with prefetch against its peers, on the trained long-context model.

Workload: held-out :mod:`lm.varref` contexts (8 variables defined in the first half, filler
after), each prefilled once (the dense pass; its keys and values are shared by every peer), then
decoded the same way by every peer: queries ``?k=`` fed and the answer (value and ``;``) decoded
greedily, one token per step, until ``steps`` steps.  Accuracy counts only each variable's first
query (later ones could copy the answer from the recent window).

Peers (same model, same contexts, same queries, same run):

* ``resident-full`` — every block on the device, full attention: the accuracy reference;
* ``resident-sparse`` — every block on the device, the block-sparse policy: the throughput and
  footprint reference of KVT-P (same policy, so its tokens must be identical);
* ``kvtp`` — block-sparse, device arena :data:`ARENA_FRACTION` of the blocks, host pool and disk
  tier, predictor + prefetch thread, structure-weighted LRU;
* ``lru-ondemand`` — the same tiers and policy, plain LRU, no prefetch (every miss stalls);
* ``lmcache-policy`` — a re-implementation of LMCache's published policy in this harness (not
  LMCache itself): 256-token chunks offloaded to the host with LRU, no selection (full
  attention), no prefetch, device arena of the same bytes as ``kvtp``;
* ``full-streamed`` — full attention streamed from host through the same arena, the next chunk
  prefetched while the current one is computed (exact, bandwidth-bound).

Figures per length: decode tokens/s, device footprint (arena + summaries) relative to
all-resident, stall per token (p50 / p99 / max over >= 1,000 steps in the full run), hit rate,
accuracy, whether tokens equal the resident run of the same policy.  Headline = median over
``runs`` contexts with min and max.  ``--quick``: one 8k context and 300 steps (tails from 300
samples).  Full run: 3 contexts at 8k and 32k and one at 128k with fewer steps for the
full-attention peers (prefill of 128k dense on this CPU takes minutes; see docs/decode.md).
Measured on the shared 2-core machine: absolute speeds are contended.
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import torch

from bench._common import Result, percentile
from lm import varref
from lm.kvpolicy import BlockSparse, FullAttention
from lm.longdecode import LongDecoder, TierSpec, answer_tokens
from lm.longmodel import load

#: Block-sparse parameters, chosen on training-seed contexts at 8k by ``python -m bench.kvtp``
#: (:func:`tune`: the smallest top-k whose accuracy there is within one query of full
#: attention's); reported on held-out seeds.
TOPK, SINKS, WINDOW = 2, 1, 2
#: headline metric -> the strongest peer it is measured against (the report's headline table)
HEADLINE = {"kvtp_footprint_vs_resident": "all blocks resident (measured arena sweep)",
            "kvtp_throughput_vs_resident_sparse": "resident block-sparse, same policy; the faster of prefetch and "
                                                  "LRU without it at the measured arena (the service's default: "
                                                  "prefetch off)"}
BLOCK = 64
#: KVT-P's device arena as a fraction of the all-resident block count.
ARENA_FRACTION = 0.125
#: Host pool as a fraction of the blocks; the rest goes to the disk tier.
HOST_FRACTION = 0.5
HELDOUT_SEED = 424_242
N_VARS = 8


def _context(length: int, seed: int) -> varref.Context:
    return varref.make_context(random.Random(seed), length, N_VARS)


def _queries(ctx: varref.Context, n: int, seed: int) -> list[str]:
    """Every variable once (shuffled), then random repeats: ``n`` queries."""
    rng = random.Random(seed)
    names = list(ctx.values)
    rng.shuffle(names)
    return names + [rng.choice(names) for _ in range(max(0, n - len(names)))]


PREFILL_SECONDS: dict[int, list[float]] = {}


def _prefill(model, ctx: varref.Context):
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, keys, vals = model(torch.tensor([ctx.tokens]), return_kv=True)
    PREFILL_SECONDS.setdefault(len(ctx.tokens), []).append(time.perf_counter() - t0)
    return keys.numpy(), vals.numpy(), logits[0, -1]


class _Peer:
    """One peer's decoder over one context, timed query by query."""

    def __init__(self, model, policy, spec, ctx, kv, steps, tmpdir):
        self.dec = LongDecoder(model, policy, spec, disk_dir=tmpdir)
        self.dec.load(ctx.tokens, *kv)
        self.ctx, self.steps = ctx, steps
        self.out: list[int] = []
        self.first: list[bool] = []
        self.seen: set[str] = set()
        self.wall = 0.0

    def ask(self, name: str) -> None:
        if len(self.dec.stalls) >= self.steps:
            return
        t0 = time.perf_counter()
        ans = answer_tokens(self.dec, self.ctx.query(name))
        self.wall += time.perf_counter() - t0
        self.out += ans
        if name not in self.seen:
            self.seen.add(name)
            self.first.append(ans[0] == self.ctx.answer(name)[0])

    def result(self) -> dict:
        dec = self.dec
        st = dec.tiers.stats
        reqs = st.hits + st.misses
        out = {
            "tokens": self.out, "steps": len(dec.stalls), "tok_s": len(dec.stalls) / self.wall,
            "device_bytes": dec.tiers.device_bytes(), "stalls": list(dec.stalls),
            "acc": float(np.mean(self.first)), "hit_rate": st.hits / reqs if reqs else 1.0,
            "moved_MB": (st.bytes_host_to_device + st.bytes_disk_to_device) / 1e6,
            "prefetched": st.prefetched, "prefetch_used": st.prefetch_used,
        }
        dec.close()
        return out


#: Arena sizes swept (fractions of the all-resident blocks) for the measured footprint: the
#: headline footprint is the smallest arena at which KVT-P keeps its throughput target.
SWEEP = (0.0625, 0.25)


def _arena(n_blocks: int, fraction: float) -> int:
    # at least three steps' working sets (every layer selecting different blocks), else it thrashes
    return max(3 * (TOPK + SINKS + WINDOW), int(n_blocks * fraction))


def _peers(n_blocks: int, sweep: tuple[float, ...] = ()) -> dict:
    arena = _arena(n_blocks, ARENA_FRACTION)
    host = max(4, int(n_blocks * HOST_FRACTION))
    disk = n_blocks + 256 - host
    sparse = BlockSparse(topk=TOPK, sinks=SINKS, window=WINDOW)
    full = FullAttention(chunk_blocks=16)
    lm_arena = max(9, arena * BLOCK // 256)
    return {
        "resident-full": (full, TierSpec.resident(n_blocks * BLOCK, BLOCK)),
        "resident-sparse": (sparse, TierSpec.resident(n_blocks * BLOCK, BLOCK)),
        "kvtp": (sparse, TierSpec(arena, host, disk, BLOCK, prefetch=True)),
        "lru-ondemand": (sparse, TierSpec(arena, host, disk, BLOCK, prefetch=False, structure_weight=0.0)),
        "lmcache-policy": (FullAttention(chunk_blocks=8),
                           TierSpec(lm_arena, n_blocks // 4 + 64, 0, 256, prefetch=False, structure_weight=0.0)),
        # full attention reads 16-block chunks: its arena holds at least one chunk and the next
        "full-streamed": (full, TierSpec(max(arena, 2 * 16), host, disk, BLOCK, prefetch=True)),
        **{f"kvtp@{f:g}": (sparse, TierSpec(_arena(n_blocks, f), host, disk, BLOCK, prefetch=True)) for f in sweep},
        **{f"lru-ondemand@{f:g}": (sparse, TierSpec(_arena(n_blocks, f), host, disk, BLOCK, prefetch=False,
                                                    structure_weight=0.0)) for f in sweep},
    }


def _run_length(model, length: int, runs: int, steps: int, full_steps: int, tmpdir,
                sweep: tuple[float, ...] = ()) -> tuple[list[dict], dict]:
    per_peer: dict[str, list[dict]] = {}
    for r in range(runs):
        ctx = _context(length, HELDOUT_SEED + 1000 * r + length)
        kv = _prefill(model, ctx)
        queries = _queries(ctx, steps, r)
        n_blocks = -(-(length + steps + 8) // BLOCK)
        peers = {name: _Peer(model, policy, spec, ctx, kv, full_steps if isinstance(policy, FullAttention) else steps, tmpdir)
                 for name, (policy, spec) in _peers(n_blocks, sweep).items()}
        for q in queries:  # round robin, query by query: background load hits every peer alike
            for peer in peers.values():
                peer.ask(q)
        for name, peer in peers.items():
            per_peer.setdefault(name, []).append(peer.result())
    rows, summary = [], {}
    ref = {"full": "resident-full", "sparse": "resident-sparse"}
    for name, res in per_peer.items():
        policy = _peers(1, sweep)[name][0]
        base = per_peer[ref["full" if isinstance(policy, FullAttention) else "sparse"]]
        same = [a["tokens"] == b["tokens"][: len(a["tokens"])] for a, b in zip(res, base)]
        stalls = [s * 1e3 for x in res for s in x["stalls"]]
        tok_s = [x["tok_s"] for x in res]
        foot = [x["device_bytes"] / per_peer["resident-full"][i]["device_bytes"] for i, x in enumerate(res)]
        rel = [x["tok_s"] / per_peer["resident-sparse"][i]["tok_s"] for i, x in enumerate(res)]
        row = {
            "len": length, "peer": name, "tok/s med": statistics.median(tok_s), "min": min(tok_s), "max": max(tok_s),
            "vs res-sparse": statistics.median(rel), "footprint": statistics.median(foot),
            "stall p50 ms": percentile(stalls, 50), "p99": percentile(stalls, 99), "max ms": max(stalls),
            "hit": statistics.median(x["hit_rate"] for x in res), "acc": statistics.mean(x["acc"] for x in res),
            "MB moved": statistics.median(x["moved_MB"] for x in res),
            "same tokens": all(same), "steps": sum(x["steps"] for x in res),
        }
        rows.append(row)
        summary[name] = row
    return rows, summary


def _copy_time_per_block(model) -> float:
    """Seconds to swap one block host -> device (median of 200), for the stall bound."""
    from accel import kv as accel_kv

    cfg = model.cfg
    host = np.random.default_rng(0).standard_normal((256, cfg.n_layers, 2, BLOCK, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    dev = np.zeros((64, cfg.n_layers, 2, BLOCK, cfg.n_heads, cfg.head_dim), np.float32)
    times = []
    for i in range(200):
        t0 = time.perf_counter()
        accel_kv.swap_in(host, dev, [i % 256], [i % 64], backend="reference")
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(quick: bool) -> Result:
    import tempfile

    torch.set_num_threads(1)
    model = load()
    plan = [(4096, 1, 30, 20)] if quick else [(8192, 3, 400, 300), (32768, 3, 400, 100)]
    sweep = () if quick else SWEEP
    rows, summaries = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reca-kvtp-") as tmpdir:
        for length, runs, steps, full_steps in plan:
            r, s = _run_length(model, length, runs, steps, full_steps, tmpdir, sweep)
            rows += r
            summaries[length] = s
    copy_s = _copy_time_per_block(model)
    bound_ms = model.cfg.n_layers * (TOPK + SINKS + WINDOW) * copy_s * 1e3
    head = plan[-1][0]
    s = summaries[head]
    # the measured footprint: the smallest arena swept at which KVT-P (with prefetch) or the same
    # tiers without prefetch keep >= 0.9x resident-sparse throughput (device arena + summaries, the
    # bytes actually allocated, over all-resident's)
    arenas = [(ARENA_FRACTION, "kvtp", "lru-ondemand")] + [(f, f"kvtp@{f:g}", f"lru-ondemand@{f:g}") for f in sweep]
    sweep_rows = []
    for f, kv_name, lru_name in sorted(arenas):
        sweep_rows.append({"arena fraction": f, "footprint": s[kv_name]["footprint"],
                           "prefetch vs res-sparse": s[kv_name]["vs res-sparse"],
                           "no prefetch vs res-sparse": s[lru_name]["vs res-sparse"]})
    ok = [r for r in sweep_rows if max(r["prefetch vs res-sparse"], r["no prefetch vs res-sparse"]) >= 0.9]
    best = ok[0] if ok else sweep_rows[-1]
    prefetch_wins = best["prefetch vs res-sparse"] >= best["no prefetch vs res-sparse"]
    metrics = {
        "kvtp_footprint_vs_resident": best["footprint"],
        "kvtp_throughput_vs_resident_sparse": max(best["prefetch vs res-sparse"], best["no prefetch vs res-sparse"]),
        "kvtp_measured_arena_fraction": best["arena fraction"],
        "prefetch_wins_at_that_arena": float(prefetch_wins),
        "prefetch_vs_resident_sparse_at_that_arena": best["prefetch vs res-sparse"],
        "no_prefetch_vs_resident_sparse_at_that_arena": best["no prefetch vs res-sparse"],
        "arenas_where_prefetch_wins": float(sum(r["prefetch vs res-sparse"] > r["no prefetch vs res-sparse"]
                                                for r in sweep_rows)),
        "arenas_swept": float(len(sweep_rows)),
        "kvtp_default_arena_footprint": s["kvtp"]["footprint"],
        "kvtp_default_arena_throughput_vs_resident_sparse": s["kvtp"]["vs res-sparse"],
        "prefetch_over_no_prefetch_default_arena": s["kvtp"]["vs res-sparse"] / max(s["lru-ondemand"]["vs res-sparse"],
                                                                                    1e-9),
        "kvtp_tok_s": s["kvtp"]["tok/s med"],
        "resident_sparse_tok_s": s["resident-sparse"]["tok/s med"],
        "kvtp_stall_p99_ms": s["kvtp"]["p99"],
        "stall_bound_ms": bound_ms,
        "kvtp_stall_p99_over_bound": s["kvtp"]["p99"] / bound_ms,
        "kvtp_tokens_identical": float(s["kvtp"]["same tokens"]),
        "lru_tokens_identical": float(s["lru-ondemand"]["same tokens"]),
        "streamed_tokens_identical": float(s["full-streamed"]["same tokens"]),
        "lru_ondemand_vs_resident_sparse": s["lru-ondemand"]["vs res-sparse"],
        "lmcache_policy_vs_resident_sparse": s["lmcache-policy"]["vs res-sparse"],
        "full_streamed_vs_resident_sparse": s["full-streamed"]["vs res-sparse"],
        "seconds": time.perf_counter() - t0,
    }
    for length, sm in summaries.items():
        metrics[f"acc_full_{length // 1024}k"] = sm["resident-full"]["acc"]
        metrics[f"acc_sparse_{length // 1024}k"] = sm["resident-sparse"]["acc"]
        metrics[f"prefill_s_{length // 1024}k"] = statistics.median(PREFILL_SECONDS[length])
    return Result(
        metrics=metrics,
        targets={
            "kvtp_footprint_vs_resident": ("<=", 0.25),
            "kvtp_throughput_vs_resident_sparse": (">=", 0.90),
            "kvtp_tokens_identical": (">=", 1.0),
            "lru_tokens_identical": (">=", 1.0),
            "streamed_tokens_identical": (">=", 1.0),
            "kvtp_stall_p99_over_bound": ("<=", 1.0),
        },
        table=rows + sweep_rows,
        notes=[
            f"headline length {head}; tok/s med/min/max over the contexts of a length; stalls pooled over them",
            "footprint is measured, not configured: arenas of "
            + ", ".join(f"{r['arena fraction']:g}" for r in sweep_rows) + " of the blocks are run side by side; "
            "the headline is the smallest whose throughput (with prefetch or without, whichever is faster there: "
            f"{'prefetch' if prefetch_wins else 'no prefetch'} at the chosen arena) is >= 0.9x resident-sparse; "
            "footprint = bytes of the device arena and block summaries allocated, over all-resident's",
            "prefetch is off by default in the kvtp service (lm/longsession.PREFETCH_DEFAULT; opt in with "
            "tiers.prefetch = true): on this CPU a swap-in is a memcpy in the same process and the lookahead "
            "costs a layer-0 pass per step, so plain LRU was as fast or faster at most arenas measured; "
            "arenas_where_prefetch_wins counts this run's",
            f"block {BLOCK} tokens; block-sparse top-{TOPK} + {SINKS} sink + {WINDOW} window blocks per layer; "
            f"kvtp arena {ARENA_FRACTION:.1%} of the blocks, host {HOST_FRACTION:.0%}, rest on a numpy.memmap disk tier",
            f"stall bound: every block of one step's working set missed = {model.cfg.n_layers} layers x "
            f"{TOPK + SINKS + WINDOW} blocks x {copy_s * 1e6:.0f} us per block copy (median of 200)",
            "lmcache-policy is a re-implementation of LMCache's published policy in this harness, not LMCache",
            "accuracy: first query of each of the 8 variables per context (value token exact)",
            "measured on a shared 2-core CPU machine: absolute tok/s are contended; ratios are same-run",
        ],
    )


def tune(length: int = 8192, contexts: int = 3) -> dict[str, float]:
    """Accuracy (first query of each variable) on *training-seed* contexts for full attention and
    block-sparse top-k in 2, 4, 8, 16: the choice of :data:`TOPK`."""
    torch.set_num_threads(1)
    model = load()
    acc: dict[str, list[bool]] = {}
    for c in range(contexts):
        ctx = varref.make_context(random.Random(varref.TRAIN_SEED + c), length, N_VARS)
        kv = _prefill(model, ctx)
        n_blocks = -(-(length + 64) // BLOCK)
        for name, policy in [("full", FullAttention(16))] + [(f"top{k}", BlockSparse(topk=k)) for k in (2, 4, 8, 16)]:
            dec = LongDecoder(model, policy, TierSpec.resident(n_blocks * BLOCK, BLOCK))
            dec.load(ctx.tokens, *kv)
            for v in ctx.values:
                acc.setdefault(name, []).append(answer_tokens(dec, ctx.query(v))[0] == ctx.answer(v)[0])
            dec.close()
    return {k: float(np.mean(v)) for k, v in acc.items()}


if __name__ == "__main__":
    print(tune())
