"""IDS, engine level: per-step decode time, and the compute saved when a tool's early answer is
spliced into a decode instead of decoding on.

Scenario per held-out question (4-5 items): the model decodes greedily; while it is inside item
``k`` (``INTO`` tokens after the item's start) an exact tool answers item ``k``.  IDS pauses at
the token boundary, replaces the partial item by the tool's text (``Engine.replace``: one prefill
of the injected tokens) and resumes.  The baseline decodes on to the end.  Reported: decode steps
and wall time of the rest of the decode for both, tokens prefilled instead of decoded, chain
accuracy of both, and pause/resume cost.  Preempt latency through the kernel is measured by the
service benchmark, not here.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from bench._common import Result, percentile
from lm import chains, tokenizer
from lm.engine import Engine
from lm.evaluate import answer_budget, heldout
from lm.verifier import verify

INTO = 3  # tokens of item k already decoded when the tool answers


def _decode_to_end(engine: Engine, sid: int, budget: int) -> tuple[int, float]:
    before = engine.stats().decoded
    t0 = time.perf_counter()
    engine.generate(sid, budget)
    return engine.stats().decoded - before, time.perf_counter() - t0


def run(quick: bool) -> Result:
    engine = Engine.load(num_blocks=1024)
    rng = random.Random(11)
    questions = heldout(30 if quick else 150, items=(4, 5), seed=9_000)
    step_times: list[float] = []
    pause_times: list[float] = []
    steps_on, steps_ids, secs_on, secs_ids, prefilled = [], [], [], [], []
    ok_on = ok_ids = 0
    for items in questions:
        prompt = tokenizer.encode(chains.prompt(items))
        budget = answer_budget(items)
        k = rng.randrange(len(items) - 1)  # an item with work after it
        item_start = len(prompt) + sum(len(it.expansion()) for it in items[:k])
        sid = engine.start(prompt)
        while len(engine.tokens(sid)) < item_start + INTO:
            t0 = time.perf_counter()
            engine.step(sid)
            step_times.append(time.perf_counter() - t0)
        on = engine.fork(sid)
        n_on, s_on = _decode_to_end(engine, on, budget)
        ok_on += verify(tokenizer.decode(engine.tokens(on))).ok

        t0 = time.perf_counter()
        engine.pause(sid)
        pause_times.append(time.perf_counter() - t0)
        tool = tokenizer.encode(items[k].expansion(), bos=False)
        t0 = time.perf_counter()
        # the decoded tokens of item k may have drifted from the item layout; replace from the
        # item's start to the current end (an insertion when nothing of it is wrong)
        engine.replace(sid, item_start, len(engine.tokens(sid)), tool)
        engine.resume(sid)
        splice_s = time.perf_counter() - t0
        n_ids, s_ids = _decode_to_end(engine, sid, budget)
        ok_ids += verify(tokenizer.decode(engine.tokens(sid))).ok
        steps_on.append(n_on), secs_on.append(s_on)
        steps_ids.append(n_ids), secs_ids.append(s_ids + splice_s)
        prefilled.append(len(tool))
        engine.free(sid), engine.free(on)
    mean = statistics.fmean
    metrics = {
        "chains": len(questions),
        "decode_step_p50_ms": 1e3 * percentile(step_times, 50),
        "decode_step_p99_ms": 1e3 * percentile(step_times, 99),
        "pause_call_p99_us": 1e6 * percentile(pause_times, 99),
        "decode_steps_decode_on": mean(steps_on),
        "decode_steps_with_splice": mean(steps_ids),
        "decode_steps_saved_fraction": 1 - mean(steps_ids) / mean(steps_on),
        "tool_tokens_prefilled": mean(prefilled),
        "rest_ms_decode_on": 1e3 * mean(secs_on),
        "rest_ms_with_splice": 1e3 * mean(secs_ids),
        "time_saved_fraction": 1 - mean(secs_ids) / mean(secs_on),
        "chain_accuracy_decode_on": ok_on / len(questions),
        "chain_accuracy_with_splice": ok_ids / len(questions),
    }
    targets = {"time_saved_fraction": (">=", 0.0)}
    notes = [
        f"torch {torch.__version__}, float32, 1 intra-op thread, engine only (no sockets)",
        f"tool answers item k after {INTO} of its tokens were decoded; rest-of-decode figures "
        "include the splice (prefill of the tool's text) for IDS",
    ]
    return Result(metrics=metrics, targets=targets, notes=notes)
