"""``python -m spark eval|chat``: the seed's command line, as reca clients under a job budget.

``python -m spark eval --batch-size 8 --runs 3 --output results.json``
    Each run: ``batch-size`` held-out chain questions decoded greedily through the ``decode``
    service by the procedural integration model (``model="spark"``, :mod:`spark.procedural`) and by
    the dense chain LM (``model="chain"``, the baseline): chains that verify, ms per token, prefix
    cache hits; the same questions as tapes through ``sparkvm`` with a ``vm_steps`` budget (tapes
    verified, steps billed, per-tape latency) beside the in-process interpreter; and, in process,
    held-out loss / perplexity / token accuracy and stored bytes of the integration model, of the
    codebook-only model and of the dense one.  Writes JSON: every run's figures and the median /
    min / max over the runs.
``python -m spark chat --show-trace``
    Reads questions (``17+25*3, 40+12*7``) or raw JSON tapes (``[["PUSH", 1], ...]``) line by line.
    A question runs as a tape on ``sparkvm`` (``--show-trace``: the opcode trace, PLAN and CHECK
    lines) and is answered by the integration model through ``decode`` (``--model``), whose worked
    answer is checked by the verifier; a tape runs on ``sparkvm``.  ``/exit`` quits.

Both are reca clients in one job with ``vm_steps``, ``tokens`` and ``wall_ms`` budgets, on the
kernel at ``--endpoint`` (default: ``$RECA_ENDPOINT`` or the runtime directory's socket);
``--launch`` starts a private kernel with ``sparkvm``, ``decode`` and ``echo`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from kernel import errors

ITEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*\*\s*(\d+)\s*$")


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Any]:
    import os

    from clients import Client
    from kernel import protocol as P

    kern = None
    endpoint = args.endpoint or os.environ.get(P.ENV_ENDPOINT)
    if args.launch:
        from clients.launch import LocalKernel, kernel_config, service_block

        kern = LocalKernel(
            kernel_config(
                service_block("sparkvm", "services.sparkvm")
                + service_block("decode", "services.decode")
                + service_block("echo", "services.echo"),
                heartbeat=0.5,
                liveness=10,
            )
        )
        endpoint = kern.endpoint
    try:
        with Client(endpoint, timeout=args.timeout, retries=0) as c:
            c.wait_for_service("sparkvm", args.timeout)
            c.wait_for_service("decode", args.timeout)
            job = f"spark-{args.command}-{time.time_ns()}"
            c.open_job(
                job, {"vm_steps": float(args.vm_steps), "tokens": float(args.tokens), "wall_ms": float(args.wall_ms)}
            )
            try:
                yield c, job
            finally:
                with contextlib.suppress(errors.RecaError):
                    c.close_job(job)
    finally:
        if kern is not None:
            kern.stop()


def parse_items(line: str) -> list[Any]:
    """The items of a chain question ``a+b*c, ...``; ValueError otherwise."""
    from lm import chains

    items = []
    for part in line.split(","):
        m = ITEM.match(part)
        if m is None:
            raise ValueError(f"{part.strip()!r} is not of the form a+b*c")
        items.append(chains.Item(*map(int, m.groups())))
    if not 1 <= len(items) <= chains.MAX_ITEMS:
        raise ValueError(f"1..{chains.MAX_ITEMS} items")
    return items


def parse_question(line: str) -> Any:
    """A chain question ``a+b*c, ...`` as a tape, or a JSON tape; ValueError otherwise."""
    from spark import tapes

    line = line.strip()
    if line.startswith("["):
        return json.loads(line)
    return tapes.chain_tape(parse_items(line))


def model_answer(c: Any, job: str, model: str, items: list[Any]) -> dict[str, Any]:
    """The model's greedy worked answer through the decode service, verified."""
    from lm import chains
    from lm.evaluate import answer_budget
    from lm.verifier import verify

    prompt = chains.prompt(items)
    res = c.call(
        "decode",
        {"op": "generate", "prompt": prompt, "max_new": answer_budget(items), "model": model, "keep": False},
        job=job,
    )
    report = verify(res["text"])
    values = [report.values.get(i) for i in range(len(items))]
    ok = report.ok and values == [it.value for it in items]
    return {
        "answer": res["text"][len(prompt) :],
        "ok": ok,
        "values": values,
        "new": len(res["new"]),
        "reused": res.get("prefix_reused", 0),
    }


def chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    with connect(args) as (c, job):
        print(
            f"spark chat: job {job}, {args.vm_steps:g} vm_steps; a+b*c[, ...] or a JSON tape; /exit to quit",
            file=out,
            flush=True,
        )
        for line in stdin:
            line = line.strip()
            if not line:
                continue
            if line == "/exit":
                break
            try:
                tape = parse_question(line)
                items = None if line.startswith("[") else parse_items(line)
                res = c.call("sparkvm", {"tape": tape}, job=job, budget={"vm_steps": args.tape_steps})
            except (ValueError, json.JSONDecodeError) as exc:
                print(f"error: {exc}", file=out, flush=True)
                continue
            except errors.RecaError as exc:
                res = {"status": "stopped", "error": exc.code, "message": exc.message, **exc.detail}
            if args.show_trace:
                for t in res.get("trace", []):
                    if t["op"] == "PLAN":
                        print(f"  [{t['step']:>5}] PLAN  {t['text']}", file=out)
                    elif t["op"] == "CHECK":
                        print(f"  [{t['step']:>5}] CHECK {t['label']}: {'ok' if t['ok'] else 'FAILED'}", file=out)
                    else:
                        print(f"  [{t['step']:>5}] {t['op']} {t.get('service', '')}", file=out)
            if res.get("status") == "halted":
                print(f"answer: {res['output']}  ({res['steps']} steps)", file=out, flush=True)
            else:
                print(
                    f"stopped: {res.get('error')} {res.get('fault')}: {res.get('message')} ({res.get('steps')} steps)",
                    file=out,
                    flush=True,
                )
            if items is not None:
                try:
                    m = model_answer(c, job, args.model, items)
                except errors.RecaError as exc:
                    print(f"{args.model}: {exc.code}: {exc.message}", file=out, flush=True)
                else:
                    verdict = "verified" if m["ok"] else f"wrong (values {m['values']})"
                    print(f"{args.model}: {m['answer']}  {verdict}", file=out, flush=True)
    return 0


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
    return {
        k: {
            "median": statistics.median(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from lm import chains, tokenizer
    from lm.train import load
    from spark import codebook as cbk
    from spark import procedural, tapes, vm

    torch.set_num_threads(1)
    dense = load()
    coded = cbk.codebook_model(dense, args.dim, args.codewords, mode="lut", seed=0)
    spark_lm = procedural.load()
    runs: list[dict[str, float]] = []
    with connect(args) as (c, job):
        for run in range(args.runs):
            rng = random.Random(1000 + run)
            batch = [chains.random_items(rng, rng.randint(1, chains.MAX_ITEMS)) for _ in range(args.batch_size)]
            lat, lat_direct, correct, steps = [], [], 0, 0
            for items in batch:
                tape = tapes.chain_tape(items)
                t0 = time.perf_counter()
                res = c.call("sparkvm", {"tape": tape}, job=job, budget={"vm_steps": args.tape_steps})
                lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                direct = vm.run_local(vm.parse_tape(tape), vm.Limits(max_steps=args.tape_steps))
                lat_direct.append(time.perf_counter() - t0)
                correct += res["output"] == [it.value for it in items] == direct.output
                steps += res["steps"]
            served: dict[str, dict[str, float]] = {}
            for model in ("chain", args.model):
                ok = new = 0
                t0 = time.perf_counter()
                for items in batch:
                    m = model_answer(c, job, model, items)
                    ok += m["ok"]
                    new += m["new"]
                served[model] = {"ok": ok, "ms": 1e3 * (time.perf_counter() - t0) / max(1, new)}
            # a repeated question: its prompt's whole KV blocks come from the prefix cache
            longest = max(batch, key=len)
            again = model_answer(c, job, args.model, longest)
            repeat_saved = again["reused"] / len(tokenizer.encode(chains.prompt(longest)))
            prefix = c.call("decode", {"op": "stats", "model": args.model}, job=job)["prefix"]
            s = cbk.heldout_score(spark_lm, batches=2, batch_size=args.batch_size, seed=77 + run)
            d, q = (
                cbk.heldout_score(dense, batches=2, batch_size=args.batch_size, seed=77 + run),
                cbk.heldout_score(coded, batches=2, batch_size=args.batch_size, seed=77 + run),
            )
            runs.append(
                {
                    "dense_chains_verified": served["chain"]["ok"],
                    "spark_chains_verified": served[args.model]["ok"],
                    "dense_served_ms_per_token": served["chain"]["ms"],
                    "spark_served_ms_per_token": served[args.model]["ms"],
                    "spark_prefix_hit_rate": prefix.get("hit_rate", 0.0),
                    "spark_prefix_saved_fraction": prefix.get("saved_fraction", 0.0),
                    "spark_repeat_prompt_saved_fraction": repeat_saved,
                    "spark_loss": s.loss,
                    "spark_ppl": s.perplexity,
                    "spark_token_acc": s.token_accuracy,
                    "spark_bytes": procedural.stored_bytes(spark_lm),
                    "dense_bytes": cbk.model_bytes(dense),
                    "vm_tapes": len(batch),
                    "vm_correct": correct,
                    "vm_steps": steps,
                    "vm_ms_per_tape": 1e3 * statistics.median(lat),
                    "direct_ms_per_tape": 1e3 * statistics.median(lat_direct),
                    "dense_loss": d.loss,
                    "dense_ppl": d.perplexity,
                    "dense_token_acc": d.token_accuracy,
                    "codebook_loss": q.loss,
                    "codebook_ppl": q.perplexity,
                    "codebook_token_acc": q.token_accuracy,
                    "dense_linear_bytes": cbk.linear_weight_bytes(dense),
                    "codebook_linear_bytes": cbk.linear_weight_bytes(coded),
                    "dense_ms_per_token": cbk.ms_per_token(dense, tokens=16, repeats=1),
                    "codebook_ms_per_token": cbk.ms_per_token(coded, tokens=16, repeats=1),
                }
            )
        billed = c.call("mmi.job.stats", {"job": job})["spent"].get("vm_steps", 0.0)
    out = {
        "schema": "spark.eval/1",
        "batch_size": args.batch_size,
        "runs": runs,
        "summary": _summary(runs),
        "codebook": {"dim": args.dim, "codewords": args.codewords},
        "model": args.model,
        "baseline": "chain (the dense chain LM)",
        "vm_steps_billed": billed,
        "vm_steps_run": sum(r["vm_steps"] for r in runs),
    }
    text = json.dumps(out, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("eval", "chat"):
        s = sub.add_parser(name)
        s.add_argument("--endpoint", default=None, help="the kernel (default $RECA_ENDPOINT or the runtime socket)")
        s.add_argument("--launch", action="store_true", help="start a private kernel with sparkvm and echo")
        s.add_argument("--timeout", type=float, default=60.0, help="bound on each call, seconds")
        s.add_argument("--vm-steps", type=float, default=1e6, help="the job's vm_steps budget")
        s.add_argument("--wall-ms", type=float, default=600_000, help="the job's wall_ms budget")
        s.add_argument("--tape-steps", type=int, default=20_000, help="vm_steps asked for per tape")
        s.add_argument("--tokens", type=float, default=1e6, help="the job's tokens budget (decode)")
        s.add_argument("--model", default="spark", help="the decode service's model to answer with")
    e = sub.choices["eval"]
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--runs", type=int, default=3)
    e.add_argument("--output", default=None)
    e.add_argument("--dim", type=int, default=2, help="codebook sub-vector length")
    e.add_argument("--codewords", type=int, default=256, help="codewords per matrix (<= 256)")
    sub.choices["chat"].add_argument("--show-trace", action="store_true")
    args = p.parse_args(argv)
    if args.command == "eval":
        if args.batch_size < 1 or args.runs < 1:
            p.error("--batch-size and --runs must be >= 1")
        return evaluate(args)
    return chat(args)


if __name__ == "__main__":
    raise SystemExit(main())
