"""seed004 section ``memory`` (C-7): the vector store and compressor where reca uses them.

(a) **kvtp cold tier** (:mod:`lm.coldtier`): on held-out kvtp contexts, distant blocks compressed by
an autoencoder (trained on a reservoir of a *training-seed* context's keys and values) and found
again by top-k search of the block mean keys; the sink block and the recent window stay exact.
Against ``resident-full`` and ``resident-sparse`` (block-sparse top-2, every block resident, exact)
from bench/kvtp.py: accuracy (first query of each variable) and bytes kept for the context.

(b) **scch near-miss proposer** (:mod:`services.scch.nearmiss`): a cache holding verified answers of
base subgoals; queries whose canonical keys differ from every cached one (so the exact cache
misses them all) -- some with a right answer among the cached ones, some decoys close in form
whose cached neighbours are wrong for them.  Extra verified hits; wrong = an accepted answer that
fails the independent check of bench/scch.py (the query as written, fresh points).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from bench import kvtp as K
from bench._common import Result
from lm.longsession import COLD_CODE_DIM, COLD_EXACT_ROWS

#: (kind, expr) cached first; then queries: (kind, expr, has_a_right_neighbour)
BASE = [
    ("solve", "x - 3 = 0"),
    ("solve", "x**2 - 5*x + 6 = 0"),
    ("solve", "x**2 - 1 = 0"),
    ("integrate", "sin(x)**2"),
    ("integrate", "2*sin(x)*cos(x)"),
    ("integrate", "cos(x)**2 - sin(x)**2"),
    ("integrate", "tan(x)**2 + 1"),
    ("integrate", "cos(x)**2"),
    ("integrate", "exp(x)*cosh(x)"),
    ("simplify", "sin(x)**2 + cos(x)**2"),
    ("simplify", "2*sin(x)*cos(x)"),
    ("simplify", "cosh(x)**2"),
]
QUERIES = [
    ("integrate", "1 - cos(x)**2", True),
    ("integrate", "sin(2*x)", True),
    ("integrate", "cos(2*x)", True),
    ("integrate", "1/cos(x)**2", True),
    ("integrate", "1 - sin(x)**2", True),
    ("integrate", "exp(2*x)/2 + 1/2", True),
    ("simplify", "cosh(x)**2 - sinh(x)**2", True),
    ("simplify", "sin(2*x)", True),
    ("simplify", "1 + sinh(x)**2", True),
    ("solve", "(x - 2)**2*(x - 3) = 0", True),
    ("solve", "(x**2 - 1)*(x**2 + 1) = 0", False),
    ("solve", "x**2 - 6*x + 8 = 0", False),
    ("integrate", "sin(x)**3", False),
    ("integrate", "1 + cos(x)**2", False),
    ("simplify", "sin(x)**2 + cos(x)**2 + 1", False),
    ("integrate", "tan(x)**2", False),
    ("solve", "x**2 - 4 = 0", False),
    ("simplify", "cosh(x)**2 + sinh(x)**2", False),
]


def _subgoal(kind: str, expr: str) -> dict:
    return {"kind": kind, "expr": expr} if kind == "simplify" else {"kind": kind, "expr": expr, "var": "x"}


def nearmiss_part(quick: bool) -> tuple[dict, list[dict], list[str]]:
    from bench.scch import independent_check
    from reason.errors import ReasonError
    from reason.solve import compute
    from services.scch.logic import SubgoalCache
    from services.scch.nearmiss import NearMissProposer
    from services.scch.store import open_backend

    base, queries = (BASE[:7], QUERIES[:3] + QUERIES[11:13]) if quick else (BASE, QUERIES)
    cache = SubgoalCache(open_backend("sqlite"), admit_min=0.0, seed=1)
    prop = NearMissProposer()
    skipped = 0
    for t, (kind, expr) in enumerate(base):
        try:
            cn = cache.canon(_subgoal(kind, expr))
            if cache.admit(cn, compute(cn.kind, cn.form), float(t))["admitted"]:
                prop.remember(cn)
        except ReasonError:  # a time limit on a loaded machine: that base entry is simply not cached
            skipped += 1
    rng = np.random.default_rng(7)
    rows, exact_hits, extra, wrong, cpu = [], 0, 0, 0, 0.0
    for t, (kind, expr, right) in enumerate(queries):
        sg = _subgoal(kind, expr)
        try:
            cn, served, _ = cache.get(sg, 100.0 + t)
        except ReasonError:
            skipped += 1
            rows.append({"query": expr, "kind": kind, "error": "canonicalisation time limit"})
            continue
        if served is not None:
            exact_hits += 1
            rows.append({"query": expr, "kind": kind, "exact_hit": True})
            continue
        c0 = time.process_time()
        got = prop.resolve(cache, cn)
        cpu += time.process_time() - c0
        ok = got is not None and independent_check(sg, got["answer"], rng)
        extra += got is not None
        wrong += got is not None and not ok
        rows.append(
            {
                "query": expr,
                "kind": kind,
                "exact_hit": False,
                "has_right_neighbour": right,
                "near_miss_hit": got is not None,
                "answer": None if got is None else got["answer"],
                "independently_right": ok if got is not None else None,
            }
        )
    n = len(queries)
    metrics = {
        "nearmiss_queries": float(n),
        "nearmiss_exact_hits": float(exact_hits),
        "nearmiss_extra_verified_hits": float(extra),
        "nearmiss_wrong": float(wrong),
        "nearmiss_reachable": float(sum(r for *_, r in queries)),
        "nearmiss_proposed": float(prop.counts.proposed),
        "nearmiss_rejected": float(prop.counts.rejected),
        "nearmiss_cpu_s_per_miss": cpu / max(1, n - exact_hits),
        "nearmiss_time_limited": float(skipped),
    }
    notes = [
        f"near-miss: {len(base)} cached base subgoals, {n} queries none of whose canonical keys is cached "
        f"({sum(r for *_, r in queries)} have a cached neighbour whose answer is right for them, the rest are "
        f"decoys); proposer k={prop.k}, min similarity {prop.min_score}; every acceptance passed full_check on "
        "the new canonical form (solve: complete) and the query-as-written check"
    ]
    return metrics, rows, notes


#: cold-tier variants: name -> (retrieval, code_dim, exact_rows); "cold" is the policy's default
COLD_VARIANTS = {
    "cold-mean": ("mean", 32, 0),  # the first version: mean-key retrieval, codes only
    "cold-bound": ("bound", 32, 0),  # Quest-bound retrieval, codes only
    "cold-32": ("bound", 32, 2),  # + each block's two worst-coded rows kept exact
    "cold": ("bound", COLD_CODE_DIM, COLD_EXACT_ROWS),  # the policy default (16-wide codes, 2 rows)
    "cold-fp16": ("bound", 0, 0),  # no codec: float16 rows
}
QUICK_VARIANTS = ("cold-mean", "cold")


def coldtier_part(
    quick: bool, size: tuple[int, int, int] | None = None, variants: tuple[str, ...] | None = None
) -> tuple[dict, list[dict], list[str]]:
    from lm.coldtier import ColdTierDecoder, default_codecs
    from lm.longmodel import load

    model = load()
    length, runs, steps = size or ((2048, 1, 24) if quick else (8192, 2, 120))
    variants = variants or (QUICK_VARIANTS if quick else tuple(COLD_VARIANTS))
    t0 = time.perf_counter()
    codecs = {
        cd: default_codecs(model, cd, steps=60 if quick else 300) for cd in {COLD_VARIANTS[v][1] for v in variants}
    }
    codec_s = time.perf_counter() - t0
    per: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="reca-s004m-") as tmpdir:
        for r in range(runs):
            ctx = K._context(length, K.HELDOUT_SEED + 1000 * r + length)
            queries = K._queries(ctx, steps, r)
            kv = K._prefill(model, ctx)
            n_blocks = -(-(length + steps + 8) // K.BLOCK)
            specs = K._peers(n_blocks)
            for name in ("resident-full", "resident-sparse"):
                policy, spec = specs[name]
                peer = K._Peer(model, policy, spec, ctx, kv, steps, tmpdir)
                for q in queries:
                    peer.ask(q)
                res = peer.result()
                kv_bytes = kv[0].nbytes + kv[1].nbytes
                per.setdefault(name, []).append({"acc": res["acc"], "tok_s": res["tok_s"], "bytes": kv_bytes})
            for name in variants:
                retrieval, code_dim, exact_rows = COLD_VARIANTS[name]
                dec = ColdTierDecoder(
                    model,
                    codecs[code_dim],
                    block=K.BLOCK,
                    window=K.WINDOW * K.BLOCK,
                    topk=K.TOPK,
                    sinks=K.SINKS,
                    retrieval=retrieval,
                    exact_rows=exact_rows,
                )
                dec.load(ctx.tokens, torch.from_numpy(kv[0]), torch.from_numpy(kv[1]))
                seen, first, wall, n_steps = set(), [], 0.0, 0
                for q in queries:
                    if n_steps >= steps:
                        break
                    t0 = time.perf_counter()
                    dec.feed(ctx.query(q))
                    ans = dec.generate(2)
                    wall += time.perf_counter() - t0
                    n_steps += 4
                    if q not in seen:
                        seen.add(q)
                        first.append(ans[0] == ctx.answer(q)[0])
                per.setdefault(name, []).append(
                    {
                        "acc": float(np.mean(first)),
                        "tok_s": n_steps / wall,
                        "bytes": dec.cold_bytes() + dec.exact_bytes(),
                    }
                )
    rows, metrics = [], {}
    for name, res in per.items():
        row = {
            "len": length,
            "peer": name,
            "acc": float(np.mean([x["acc"] for x in res])),
            "tok/s": float(np.median([x["tok_s"] for x in res])),
            "MB kept": float(np.median([x["bytes"] for x in res])) / 1e6,
        }
        rows.append(row)
        metrics[f"coldtier_{name.replace('-', '_')}_acc"] = row["acc"]
    resident = rows[0]["MB kept"]
    for row in rows[2:]:
        metrics[f"coldtier_{row['peer'].replace('-', '_')}_bytes_over_resident"] = row["MB kept"] / resident
    metrics["coldtier_codec_train_s"] = codec_s
    notes = [
        f"cold tier at {length} tokens x {runs} held-out context(s) ({K.N_VARS} variables each, first query of "
        f"each counted): {K.SINKS} sink block + last {K.WINDOW} blocks exact, top-{K.TOPK} cold blocks per step "
        f"and layer decoded; codes: float16 codes of an autoencoder of [k|v] rows ({2 * model.cfg.d_model} "
        "floats) fitted on a training-seed context. cold-mean: one store per layer of block mean keys (heads "
        "concatenated); cold-bound: per-head stores of [kmax|kmin] searched with [max(q,0)|min(q,0)] (= Quest's "
        "bound, resident-sparse's ranking); cold-32: + each block's two worst-coded rows kept float16; cold: the policy default of services/kvtp "
        f"({COLD_CODE_DIM}-wide codes, {COLD_EXACT_ROWS} rows, chosen on training-seed contexts); cold-fp16: no codec. MB kept: codes + summaries + exact rows vs the KV cache"
    ]
    return metrics, rows, notes


def run(quick: bool) -> Result:
    torch.set_num_threads(1)
    m1, r1, n1 = coldtier_part(quick)
    m2, r2, n2 = nearmiss_part(quick)
    return Result(
        metrics={**m1, **m2},
        table=r1 + r2,
        notes=n1 + n2,
        targets={"nearmiss_wrong": ("<=", 0.0), "nearmiss_extra_verified_hits": (">=", 1.0)},
    )
