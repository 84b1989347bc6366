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
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from bench._common import Result, percentile

HEADLINE = ["vm_tapes_past_budget", "vm_hostile_stopped_frac", "vm_kernel_only_billed_past_grant"]


# -- vm -----------------------------------------------------------------------------------------


def _outcome(res: dict) -> tuple:
    return res.get("status"), res.get("fault"), res.get("steps")


def _vm(quick: bool) -> tuple[dict[str, float], list[dict], list[str], dict[str, int]]:
    import zmq

    from clients import Client
    from clients.launch import LocalKernel, kernel_config, service_block
    from kernel import errors
    from spark import tapes, vm

    n = 200 if quick else 1000
    n_kernel = 40 if quick else 200
    rng = random.Random(30)
    drawn = [tapes.random_tape(rng) for _ in range(n)]
    grants = [rng.randint(100, 8000) for _ in range(n)]
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
            billed = c.call("mmi.job.stats", {"job": job})["spent"].get("vm_steps", 0.0)
            c.call("mmi.job.close", {"job": job})
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
                grant = rng.randint(100, 8000)
                kjob = f"bench-vmk-{i}-{time.monotonic_ns()}"
                c.open_job(kjob, {"vm_steps": float(10 * grant)})
                try:
                    c.call("sparkvmk", {"tape": raw}, job=kjob, budget={"vm_steps": grant})
                except errors.BudgetExceeded:
                    kernel_stopped += 1
                except errors.RecaError:
                    pass  # a fault of its own (memory, arithmetic) before the grant
                spent = c.call("mmi.job.stats", {"job": kjob})["spent"].get("vm_steps", 0.0)
                over_billed += spent > grant
                c.call("mmi.job.close", {"job": kjob})
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
        "[100, 8000] vm_steps; the peer is the same interpreter in-process with no kernel (no enforcement "
        "across a process boundary, no billing)",
        f"vm kernel-only: {n_kernel} tapes on a worker started with --enforce kernel (it ignores its grant), one job "
        "each; billed = the job's vm_steps after the call",
    ]
    samples = {k: n for k in ("vm_reca_p50_ms", "vm_reca_p99_ms", "vm_direct_p50_ms", "vm_direct_p99_ms")}
    return metrics, rows, notes, samples


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
    metrics["seconds"] = time.perf_counter() - t0
    targets = {
        "vm_tapes_past_budget": ("<=", 0.0),
        "vm_hostile_stopped_frac": (">=", 1.0),
        "vm_outcome_mismatch_vs_direct": ("<=", 0.0),
        "vm_billed_minus_steps_run": ("<=", 0.0),
        "vm_malformed_typed_frac": (">=", 1.0),
        "vm_kernel_only_billed_past_grant": ("<=", 0.0),
    }
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes, samples=samples)
