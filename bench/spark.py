"""``python -m bench spark``: SPARK (seed 003) parts beside the dense or learned thing each replaces.

* **vm** — randomised reasoning tapes (benign and hostile: infinite loops, unbounded recursion,
  huge allocations, stack and integer bombs) through the ``sparkvm`` service under a real kernel,
  each with a random ``vm_steps`` grant: tapes that ran past their grant (target 0), hostile tapes
  stopped, billing equal to the steps run, outcomes identical to the in-process interpreter (the
  peer: the same interpreter with no kernel), and per-tape latency of both.  A second worker that
  ignores its grant (``--enforce kernel``) shows the kernel alone caps what is billed.
* **codebook** (spark/codebook.py) — the chain LM with its linear weights replaced by k-means
  codebooks at several sizes vs the dense model: bytes, held-out loss/perplexity, next-token
  accuracy, time per token.
* **router** / **attention** (spark/compare.py) — content hash vs random hash vs learned top-k
  routing at equal active parameters; procedural (sinusoid / Legendre) attention vs learned
  attention of the same size.
* **prefix** (spark/prefix.py) — the KV prefix cache vs the same engine without it.
* **hyper** (spark/hyper.py) — hypernetwork LoRA deltas from task metadata vs per-task LoRA
  trained directly vs the base model, at equal trainable parameters, on train and held-out tasks.
* **integration** (spark/procedural.py) — the shipped procedural model (codebook weights,
  procedural attention bias, hash-routed MLP, generated delta) vs the dense chain LM.

``--quick`` runs every part at a smoke-test size (a 4-weight, 16-codeword codebook, a few training
steps, a handful of chains): its figures show the machinery runs, not the claims.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from bench._common import Result, percentile
from kernel import protocol as P

HEADLINE = {
    "vm_tapes_past_budget": "the in-process interpreter (same tapes and grants, no kernel)",
    "vm_kernel_only_billed_past_grant": "a worker that ignores its grant (only the kernel caps it)",
    "cb_d2_k256_size_vs_dense": "the dense fp32 chain LM (and per-row int8)",
    "router_content_acc_minus_dense_active": "a dense MLP with the same active parameters",
    "attn_sinusoid_acc_minus_learned": "learned (query/key) attention of the same width",
    "prefix_prefill_saved_frac": "the same engine without the cache (tokens identical)",
    "hyper_hyper_heldout_token_acc": "per-task LoRA (nearest task's adapter) at equal trainable parameters",
    "integration_chain_acc_vs_dense": "the dense chain LM",
}


# -- vm -----------------------------------------------------------------------------------------


def _outcome(res: dict) -> tuple:
    return res.get("status"), res.get("fault"), res.get("steps")


def _vm(quick: bool) -> tuple[dict[str, float], list[dict], list[str], dict[str, int]]:
    import zmq

    from clients import Client
    from clients.launch import LocalKernel, kernel_config, service_block
    from kernel import errors
    from spark import tapes, vm

    n = 40 if quick else 1000
    n_kernel = 8 if quick else 200
    rng = random.Random(30)
    drawn = [tapes.random_tape(rng) for _ in range(n)]
    grants = [rng.randint(100, 4000) for _ in range(n)]
    services = (
        service_block("sparkvm", "services.sparkvm")
        + service_block("sparkvmk", "services.sparkvm", args=["--name", "sparkvmk", "--enforce", "kernel"])
        + service_block("echo", "services.echo")
    )
    kern = LocalKernel(kernel_config(services, heartbeat=0.5, liveness=10))
    past = mismatched = hostile = hostile_stopped = typed = 0
    by_kind: dict[str, list[int]] = {}
    lat_reca: list[float] = []
    lat_direct: list[float] = []
    steps_total = 0
    try:
        with Client(kern.endpoint, timeout=120, retries=0, context=zmq.Context.instance()) as c:
            for name in ("sparkvm", "sparkvmk", "echo"):
                c.wait_for_service(name, 60)
            job = f"bench-vm-{time.monotonic_ns()}"
            c.open_job(job, {"vm_steps": float(sum(grants) + 1)})
            for (kind, raw), grant in zip(drawn, grants):
                t0 = time.perf_counter()
                try:
                    res = c.call("sparkvm", {"tape": raw}, job=job, budget={"vm_steps": grant})
                except errors.RecaError as exc:
                    res = {"status": "faulted", "fault": exc.detail.get("fault"), "steps": exc.detail.get("steps")}
                lat_reca.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                direct = vm.run_local(vm.parse_tape(raw), vm.Limits(max_steps=grant)).result()
                lat_direct.append(time.perf_counter() - t0)
                steps = res.get("steps")
                steps_total += steps or 0
                past += steps is None or steps > grant
                mismatched += _outcome(res) != _outcome(direct)
                if tapes.KINDS[kind]:
                    hostile += 1
                    hostile_stopped += res["status"] == "faulted"
                by_kind.setdefault(kind, []).append(steps or 0)
            billed = c.call(P.MMI_JOB_STATS, {"job": job})["spent"].get("vm_steps", 0.0)
            c.call(P.MMI_JOB_CLOSE, {"job": job})
            for kind in tapes.MALFORMED:
                try:
                    c.call("sparkvm", {"tape": tapes.malformed_tape(kind)}, budget={"vm_steps": 100})
                except errors.BadRequest as exc:
                    typed += exc.detail.get("kind") in ("malformed_tape", "unknown_opcode")
            # A worker that ignores its grant: only the kernel stands between the tape and the job.
            over_billed = 0
            kernel_stopped = 0
            for i in range(n_kernel):
                kind = ("infinite", "alloc_loop", "int_bomb", "loop")[i % 4]
                raw = tapes.random_tape(rng, kind)[1]
                grant = rng.randint(100, 4000)
                kjob = f"bench-vmk-{i}-{time.monotonic_ns()}"
                c.open_job(kjob, {"vm_steps": float(10 * grant)})
                try:
                    c.call("sparkvmk", {"tape": raw}, job=kjob, budget={"vm_steps": grant})
                except errors.BudgetExceeded:
                    kernel_stopped += 1
                except errors.RecaError:
                    pass  # a fault of its own (memory, arithmetic) before the grant
                spent = c.call(P.MMI_JOB_STATS, {"job": kjob})["spent"].get("vm_steps", 0.0)
                over_billed += spent > grant
                c.call(P.MMI_JOB_CLOSE, {"job": kjob})
    finally:
        kern.stop()
    metrics = {
        "vm_tapes": float(n),
        "vm_tapes_past_budget": float(past),
        "vm_hostile_stopped_frac": hostile_stopped / max(1, hostile),
        "vm_outcome_mismatch_vs_direct": float(mismatched),
        "vm_billed_minus_steps_run": float(billed - steps_total),
        "vm_malformed_typed_frac": typed / len(tapes.MALFORMED),
        "vm_kernel_only_tapes": float(n_kernel),
        "vm_kernel_only_stopped": float(kernel_stopped),
        "vm_kernel_only_billed_past_grant": float(over_billed),
        "vm_reca_p50_ms": 1e3 * percentile(lat_reca, 50),
        "vm_reca_p99_ms": 1e3 * percentile(lat_reca, 99),
        "vm_direct_p50_ms": 1e3 * percentile(lat_direct, 50),
        "vm_direct_p99_ms": 1e3 * percentile(lat_direct, 99),
        "vm_steps_per_s_reca": steps_total / sum(lat_reca),
        "vm_steps_per_s_direct": steps_total / sum(lat_direct),
    }
    rows = [
        {"part": "vm", "kind": k, "hostile": tapes.KINDS[k], "tapes": len(v), "steps_med": statistics.median(v)}
        for k, v in sorted(by_kind.items())
    ]
    notes = [
        f"vm: {n} tapes drawn uniformly over {len(tapes.KINDS)} kinds ({hostile} hostile), grants uniform in "
        "[100, 4000] vm_steps; the peer is the same interpreter in-process with no kernel (no enforcement "
        "across a process boundary, no billing)",
        f"vm kernel-only: {n_kernel} tapes on a worker started with --enforce kernel (it ignores its grant), one job "
        "each; billed = the job's vm_steps after the call",
    ]
    samples = {k: n for k in ("vm_reca_p50_ms", "vm_reca_p99_ms", "vm_direct_p50_ms", "vm_direct_p99_ms")}
    return metrics, rows, notes, samples


# -- codebook ---------------------------------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def _codebook(quick: bool) -> tuple[dict[str, float], list[dict], list[str]]:
    import torch

    from lm.train import load
    from spark import codebook as cbk

    torch.set_num_threads(1)
    configs = [(4, 16)] if quick else [(4, 16), (4, 64), (4, 256), (2, 256)]
    chains_n = 1 if quick else 30
    key = f"codebook-{quick}"
    if key not in _CACHE:  # fitted and scored once per process; every run re-measures time per token
        _CACHE[key] = cbk.compare(
            load(), configs, chains_n=chains_n, score_batches=1 if quick else 8, score_batch_size=8 if quick else 32
        )
    rows, models = _CACHE[key]
    ms = cbk.interleaved_ms_per_token(models, rounds=1 if quick else 5, tokens=4 if quick else 32)
    rows = [dict(r, ms_tok=ms[r["model"]]) for r in rows]
    dense = rows[0]
    metrics: dict[str, float] = {
        "codebook_dense_linear_kb": dense["linear_kb"],
        "codebook_dense_loss": dense["loss"],
        "codebook_dense_chain_acc": dense["chain_acc"],
        "codebook_dense_ms_tok": dense["ms_tok"],
    }
    for r in rows[1:]:
        tag = r["model"].replace("codebook ", "cb_").replace(" (", "_").replace(")", "").replace(" ", "_")
        tag = tag.removesuffix("_lut")
        metrics[f"{tag}_ms_tok_vs_dense"] = r["ms_tok"] / dense["ms_tok"]
        if "loss" not in r:
            continue
        metrics[f"{tag}_size_vs_dense"] = r["linear_kb"] / dense["linear_kb"]
        metrics[f"{tag}_loss"] = r["loss"]
        metrics[f"{tag}_chain_acc"] = r["chain_acc"]
    out_rows = [
        {"part": "codebook", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}} for r in rows
    ]
    notes = [
        "codebook: the shipped chain LM (d_model 64, 4 layers); every block linear (qkv, proj, fc1, fc2) replaced by a "
        "k-means codebook of k codewords over sub-vectors of d input weights (one uint8 code each); embedding, norms "
        f"and biases dense. loss/ppl/tok_acc: teacher-forced on {8 if quick else 256} held-out chains; chain_acc: greedy decodes through "
        f"the paged engine on {chains_n} held-out chains; ms_tok: one sequence, 32 greedy tokens, median of 5 rounds "
        "(1 round of 8 tokens quick) measured round-robin over all the models",
        "codebook modes: lut = lookup table + gather (never forms W), decode = W synthesised every call then GEMM, "
        "cached = decoded once (small only at rest); int8 rows = per-output-row symmetric int8, the peer at a "
        "similar size",
    ]
    return metrics, out_rows, notes


# -- router, attention ----------------------------------------------------------------------------


def _compare(quick: bool) -> tuple[dict[str, float], list[dict], list[str]]:
    import torch

    from spark import compare

    torch.set_num_threads(1)
    steps = 2 if quick else 200
    kw = {"batch": 4, "eval_batches": 1} if quick else {}
    key = f"compare-{quick}"
    if key not in _CACHE:
        _CACHE[key] = compare.router_rows(steps, **kw) + compare.attention_rows(steps, procedural_only=True, **kw)
    rows = _CACHE[key]
    by = {r["model"]: r for r in rows}
    dense = by["dense (1 expert wide)"]
    metrics = {}
    for name, tag in (
        ("content router", "router_content"),
        ("random router", "router_random"),
        ("learned router", "router_learned"),
        ("dense (1 expert wide)", "router_dense_active"),
        ("dense (all experts wide)", "router_dense_all"),
    ):
        metrics[f"{tag}_acc"] = by[name]["accuracy"]
        metrics[f"{tag}_balance_std"] = by[name]["balance_std"]
    metrics["router_content_acc_minus_dense_active"] = by["content router"]["accuracy"] - dense["accuracy"]
    learned = dense  # learned attention: the same model as the dense router peer
    for a in ("sinusoid", "legendre"):
        r = by[f"{a} attention"]
        metrics[f"attn_{a}_acc_minus_learned"] = r["accuracy"] - learned["accuracy"]
        metrics[f"attn_{a}_params_vs_learned"] = r["params"] / learned["params"]
    metrics["attn_learned_acc"] = learned["accuracy"]
    out_rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    notes = [
        f"router / attention: width-32 2-layer models trained {steps} steps (batch {kw.get('batch', 32)}, AdamW 3e-3, seed 0) on the "
        "chain task, scored on 8 held-out batches (answer-token accuracy); trained once per process, so the runs "
        "repeat the same figures; 4 experts of width 64, one active per token (active parameters equal to the "
        "dense 64-wide peer); balance_std = std over experts of their token share, averaged over layers"
    ]
    return metrics, out_rows, notes


# -- prefix cache ---------------------------------------------------------------------------------


def _prefix(quick: bool) -> tuple[dict[str, float], list[dict], list[str]]:
    import torch

    from lm import chains, tokenizer
    from lm.engine import Engine
    from lm.train import load
    from spark.prefix import PrefixCache

    torch.set_num_threads(1)
    model = load()
    rng = random.Random(11)
    n = 4 if quick else 60
    new_tokens = 4 if quick else 16
    shared = [chains.random_items(rng, 3) for _ in range(4)]  # four "system prompts" of three items
    prompts = []
    for i in range(n):
        items = shared[i % 4][: 1 + rng.randint(0, 2)] + chains.random_items(rng, rng.randint(1, 2))
        prompts.append(tokenizer.encode(chains.prompt(items)))
    prompts += prompts[: n // 4]  # repeated prompts
    results = {}
    for name, bound in (("no cache", None), ("prefix cache", 96), ("prefix cache, 12 blocks", 12)):
        engine = Engine(model, num_blocks=512, block_size=4)
        cache = PrefixCache(engine, max_blocks=bound) if bound is not None else None
        start = cache.start if cache is not None else engine.start
        outs, t0 = [], time.perf_counter()
        for p in prompts:
            sid = start(p)
            engine.generate(sid, new_tokens)
            outs.append(engine.tokens(sid))
            engine.free(sid)
        results[name] = (outs, time.perf_counter() - t0, engine.stats().prefilled, cache)
    base, cached, small = results["no cache"], results["prefix cache"], results["prefix cache, 12 blocks"]
    st = cached[3].stats
    same = sum(a == b for a, b in zip(base[0], cached[0])) / len(prompts)
    same_small = sum(a == b for a, b in zip(base[0], small[0])) / len(prompts)
    metrics = {
        "prefix_hit_rate": st.hit_rate,
        "prefix_prefill_saved_frac": 1 - cached[2] / base[2],
        "prefix_tokens_identical": min(same, same_small),
        "prefix_time_vs_no_cache": cached[1] / base[1],
        "prefix_small_hit_rate": small[3].stats.hit_rate,
        "prefix_small_prefill_saved_frac": 1 - small[2] / base[2],
        "prefix_small_evicted_blocks": float(small[3].stats.evicted_blocks),
    }
    rows = [{"part": "prefix", "model": k, "prefilled": v[2], "seconds": round(v[1], 3)} for k, v in results.items()]
    notes = [
        f"prefix: {len(prompts)} chain prompts, each starting with 1-3 items of one of 4 shared prefixes, "
        f"{n // 4} repeated; block 4 tokens; cache bound 96 blocks (and 12, to force eviction); "
        f"{new_tokens} greedy tokens each"
    ]
    return metrics, rows, notes


# -- hypernetwork LoRA ------------------------------------------------------------------------------


def _hyper(quick: bool) -> tuple[dict[str, float], list[dict], list[str]]:
    import torch

    from lm.train import load
    from spark import hyper

    torch.set_num_threads(1)
    s = hyper.Setup(steps=1, batch=4, eval_batches=1, greedy_n=0, eval_k=(1, 3)) if quick else hyper.Setup(steps=60)
    key = f"hyper-{quick}"
    if key not in _CACHE:
        _CACHE[key] = hyper.compare(load(), s)[0]
    rows = _CACHE[key]
    metrics = hyper.summary(rows)
    out_rows = [{"part": "hyper", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
                for r in rows]
    notes = [
        f"hyper: offset tasks k (the product step adds k), train k={list(hyper.TRAIN_K)}, held-out "
        f"k={list(hyper.HELDOUT_K)}; rank-{s.rank} deltas on qkv and fc1 of the 4 blocks of the frozen chain LM; "
        f"per-task LoRA {s.steps} Adam steps per task (batch {s.batch}), the hypernetwork the same number of steps "
        "in total on batches mixing the train tasks; a held-out task uses the nearest train task's LoRA, or the "
        f"hypernetwork's delta for its metadata; scored on {s.eval_batches} held-out batches (teacher-forced) and "
        f"{s.greedy_n} greedy answers per task (exact)"
    ]
    return metrics, out_rows, notes


# -- integration model ------------------------------------------------------------------------------


def _integration(quick: bool) -> tuple[dict[str, float], list[dict], list[str]]:
    import torch

    from lm.train import load
    from spark import codebook as cbk
    from spark import procedural

    torch.set_num_threads(1)
    dense, spark_lm = load(), procedural.load()
    batches, chains_n = (1, 1) if quick else (8, 30)
    rows = []
    for name, m, size in (
        ("dense chain LM", dense, cbk.model_bytes(dense)),
        ("spark integration", spark_lm, procedural.stored_bytes(spark_lm)),
    ):
        sc = cbk.heldout_score(m, batches=batches, batch_size=8 if quick else 32)
        rows.append({"part": "integration", "model": name, "kb": size / 1024, "loss": sc.loss,
                     "tok_acc": sc.token_accuracy, "chain_acc": cbk.chain_accuracy(m, chains_n)})
    ms = cbk.interleaved_ms_per_token({"dense": dense, "spark": spark_lm}, rounds=1 if quick else 5,
                                      tokens=4 if quick else 32)
    rows[0]["ms_tok"], rows[1]["ms_tok"] = ms["dense"], ms["spark"]
    d, p = rows
    metrics = {
        "integration_size_vs_dense": p["kb"] / d["kb"],
        "integration_loss": p["loss"],
        "integration_chain_acc": p["chain_acc"],
        "integration_chain_acc_vs_dense": p["chain_acc"] - d["chain_acc"],
        "integration_ms_tok_vs_dense": p["ms_tok"] / d["ms_tok"],
    }
    notes = [
        f"integration: spark/weights/procedural.pt (codebooks d2 k256 fine-tuned, sinusoid attention bias, 3 of 4 "
        f"hash-routed MLP groups per token, task-0 generated delta) vs the dense chain LM; loss on {(8 if quick else 32) * batches} "
        f"held-out chains, chain_acc on {chains_n} greedy decodes; kb = stored bytes of the whole model"
    ]
    return metrics, [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows], notes


# -- the benchmark --------------------------------------------------------------------------------


def run(quick: bool) -> Result:
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    samples: dict[str, int] = {}
    t0 = time.perf_counter()
    m, r, nt, s = _vm(quick)
    metrics.update(m)
    rows += r
    notes += nt
    samples.update(s)
    for part in (_codebook, _compare, _prefix, _hyper, _integration):
        m, r, nt = part(quick)
        metrics.update(m)
        rows += r
        notes += nt
    metrics["seconds"] = time.perf_counter() - t0
    cb = "cb_d4_k16" if quick else "cb_d2_k256"  # the smallest config a quick run fits
    if quick:
        notes.append(
            "quick run (a smoke test, figures not comparable): the codebook targets name cb_d4_k16, the one "
            "config it fits (a full run names cb_d2_k256); 40 vm tapes (8 kernel-only), 2 training steps (router, "
            "attention; 1 for hyper), 1 held-out batch and 1 chain decode per model"
        )
    targets = {
        "vm_tapes_past_budget": ("<=", 0.0),
        "vm_hostile_stopped_frac": (">=", 1.0),
        "vm_outcome_mismatch_vs_direct": ("<=", 0.0),
        "vm_billed_minus_steps_run": ("<=", 0.0),
        "vm_malformed_typed_frac": (">=", 1.0),
        "vm_kernel_only_billed_past_grant": ("<=", 0.0),
        # the seed's implied claims: smaller and as accurate / as good at equal cost
        f"{cb}_size_vs_dense": ("<=", 0.5),
        f"{cb}_chain_acc": (">=", 0.95 * metrics["codebook_dense_chain_acc"]),
        "router_content_acc_minus_dense_active": (">=", 0.0),
        "attn_sinusoid_acc_minus_learned": (">=", -0.01),
        "attn_legendre_acc_minus_learned": (">=", -0.01),
        "prefix_tokens_identical": (">=", 1.0),
        "prefix_prefill_saved_frac": (">=", 0.2),
        "hyper_params_vs_lora": ("<=", 1.0),
        "hyper_hyper_heldout_token_acc": (">=", metrics["hyper_lora_heldout_token_acc"]),
        "integration_size_vs_dense": ("<=", 0.5),
        "integration_chain_acc_vs_dense": (">=", -0.05),
    }
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes, samples=samples)
