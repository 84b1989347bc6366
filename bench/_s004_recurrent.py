"""seed004 section ``recurrent`` (C-1, C-2, C-6): RetNet retention, a Mamba-style selective SSM and
an RWKV time mix -- decoders with constant state -- beside KVT-P on kvtp's long-context task.

Same held-out contexts, same queries, same accuracy rule as ``bench/kvtp.py`` (first query of each
of the 8 variables; value token exact).  Peers: the transformer with every block resident
(``resident-full``: the accuracy reference) and ``kvtp`` (block-sparse over the tiered cache,
arena 1/8 of the blocks), both through :class:`lm.longdecode.LongDecoder`; the three recurrent
peers through :class:`lm.recurrent_decode.RecurrentDecoder` with the shipped weights
(``lm/weights/recurrent_*.pt``, trained here at the transformer's parameter count by
``python -m lm.train_recurrent``).  Memory: decoding state bytes -- the whole KV cache
(all-resident), KVT-P's device arena + summaries (measured), or the recurrent state.
``--quick``: one 2k context and a few queries; full: 8k and 32k.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from bench import kvtp as K
from bench._common import Result
from lm import recurrent
from lm.longmodel import load
from lm.recurrent_decode import RecurrentDecoder


def _recurrent_peer(model, ctx, queries, steps) -> dict:
    dec = RecurrentDecoder(model)
    t0 = time.perf_counter()
    dec.load(ctx.tokens)
    prefill = time.perf_counter() - t0
    seen, first, wall = set(), [], 0.0
    for name in queries:
        if dec.steps >= steps:
            break
        t0 = time.perf_counter()
        dec.feed(ctx.query(name))
        ans = dec.generate(2)
        wall += time.perf_counter() - t0
        if name not in seen:
            seen.add(name)
            first.append(ans[0] == ctx.answer(name)[0])
    return {
        "acc": float(np.mean(first)),
        "tok_s": dec.steps / wall,
        "state_bytes": dec.state_bytes(),
        "prefill_s": prefill,
        "steps": dec.steps,
    }


TRANSFORMER_PEERS = ("resident-full", "kvtp")


def _total_steps(meta: dict) -> int:
    """Training steps of a weights file: its run's and those of the runs it continued."""
    return int(meta.get("steps", 0)) + (_total_steps(meta["continued_from"]) if meta.get("continued_from") else 0)


def run(quick: bool, plan: list[tuple[int, int, int]] | None = None, peers: tuple[str, ...] | None = None) -> Result:
    """``plan``: (length, contexts, decode steps) per length; default by ``quick``.  ``peers``: a
    subset of ``resident-full``, ``kvtp`` and the recurrent kinds (default: all; a split run
    measures the transformer's peers and the recurrent ones at different times)."""
    torch.set_num_threads(1)
    model = load()
    plan = plan or ([(2048, 1, 24)] if quick else [(8192, 2, 200), (32768, 1, 100)])
    wanted = peers or (*TRANSFORMER_PEERS, *recurrent.KINDS)
    peers_rec = {
        kind: recurrent.load(kind)
        for kind in recurrent.KINDS
        if kind in wanted and recurrent.weights_path(kind).exists()
    }
    rows, metrics = [], {}
    with tempfile.TemporaryDirectory(prefix="reca-s004-") as tmpdir:
        for length, runs, steps in plan:
            per: dict[str, list[dict]] = {}
            for r in range(runs):
                ctx = K._context(length, K.HELDOUT_SEED + 1000 * r + length)
                queries = K._queries(ctx, steps, r)
                tf_peers = [name for name in TRANSFORMER_PEERS if name in wanted]
                if tf_peers:
                    t0 = time.perf_counter()
                    kv = K._prefill(model, ctx)
                    t_prefill = time.perf_counter() - t0
                n_blocks = -(-(length + steps + 8) // K.BLOCK)
                specs = K._peers(n_blocks)
                for name in tf_peers:
                    policy, spec = specs[name]
                    peer = K._Peer(model, policy, spec, ctx, kv, steps, tmpdir)
                    for q in queries:
                        peer.ask(q)
                    res = peer.result()
                    per.setdefault(name, []).append(
                        {
                            "acc": res["acc"],
                            "tok_s": res["tok_s"],
                            "state_bytes": res["device_bytes"],
                            "prefill_s": t_prefill,
                            "steps": res["steps"],
                        }
                    )
                for kind, rmodel in peers_rec.items():
                    per.setdefault(kind, []).append(_recurrent_peer(rmodel, ctx, queries, steps))
            for name, res in per.items():
                row = {
                    "len": length,
                    "peer": name,
                    "acc": statistics.mean(x["acc"] for x in res),
                    "tok/s": statistics.median(x["tok_s"] for x in res),
                    "state MB": statistics.median(x["state_bytes"] for x in res) / 1e6,
                    "prefill s": statistics.median(x["prefill_s"] for x in res),
                    "params": recurrent.n_params(peers_rec[name] if name in peers_rec else model),
                }
                rows.append(row)
                tag = f"{name.replace('-', '_')}_{length // 1024}k"
                metrics[f"acc_{tag}"] = row["acc"]
                metrics[f"tok_s_{tag}"] = row["tok/s"]
                metrics[f"state_bytes_{tag}"] = row["state MB"] * 1e6
    head = plan[-1][0]
    # the KV cache of the whole context (what resident-full holds), float32 keys and values
    # (measured as resident-full's device bytes when it ran; else its size: blocks x block bytes)
    full = next((r for r in rows if r["len"] == head and r["peer"] == "resident-full"), None)
    n_blocks = -(-(head + plan[-1][2] + 8) // K.BLOCK)
    kv_cache = full["state MB"] * 1e6 if full else 2 * model.cfg.n_layers * model.cfg.d_model * 4 * K.BLOCK * n_blocks
    metrics[f"kv_cache_bytes_{head // 1024}k"] = kv_cache
    for kind in peers_rec:
        row = next(r for r in rows if r["len"] == head and r["peer"] == kind)
        metrics[f"{kind}_state_over_kv_cache_{head // 1024}k"] = row["state MB"] * 1e6 / kv_cache
    notes = [
        f"lengths {[p[0] for p in plan]}; accuracy: first query of each of {K.N_VARS} variables per context, "
        "held-out seeds as bench/kvtp.py; tok/s: decode steps (fed query + generated answer tokens) per second",
        "state MB: resident-full = the whole KV cache, kvtp = device arena + block summaries (measured, the host "
        "and disk tiers hold the rest), recurrent = the decoding state (constant in the context length)",
        "recurrent weights (steps in all, this file's run and the runs it continued): "
        + "; ".join(f"{k}: {_total_steps(recurrent.load_meta(k))}" for k in peers_rec)
        + "; the transformer: 6000 steps / 20 min (lm/train_varref.py)",
        "measured on the shared 2-core CPU machine under load: absolute tok/s are contended; same-run comparisons",
    ]
    return Result(
        metrics=metrics,
        table=rows,
        notes=notes,
        targets={f"{k}_state_over_kv_cache_{head // 1024}k": ("<=", 0.01) for k in peers_rec},
    )
