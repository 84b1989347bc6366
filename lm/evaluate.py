"""Held-out accuracy of the shipped model: ``python -m lm.evaluate [--chains N] [--width W ...]``.

Held-out chains come from a seed the training never uses (training draws from
``lm.train.TRAIN_SEED``; a collision of a whole random chain is possible but vanishingly rare).
Step accuracy = correct worked steps / checked steps; chain accuracy = chains that verify.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from lm import chains, tokenizer
from lm.engine import Engine
from lm.verifier import Report, verify

HELDOUT_SEED = 20_251_124


def answer_budget(items: list[chains.Item]) -> int:
    """Tokens a decode of these items may take: the correct answer's length plus slack."""
    return len(chains.answer(items)) + 12


def heldout(n_chains: int, *, items: tuple[int, int] = (1, chains.MAX_ITEMS), seed: int = HELDOUT_SEED):
    rng = random.Random(seed)
    return [chains.random_items(rng, rng.randint(*items)) for _ in range(n_chains)]


def decode_greedy(engine: Engine, items: list[chains.Item], *, lazy: bool = False) -> int:
    """A new sequence holding the greedy decode of the question (caller frees it)."""
    sid = engine.start(tokenizer.encode(chains.prompt(items, lazy=lazy)))
    engine.generate(sid, answer_budget(items))
    return sid


def decode_beam(engine: Engine, items: list[chains.Item], width: int, *, accept=None):
    """Full-answer beam search; returns (text, candidates, token forwards).  With ``accept`` the
    most probable candidate it approves is chosen, else the most probable."""
    prompt = tokenizer.encode(chains.prompt(items))
    sid = engine.start(prompt)
    before = engine.stats().decoded
    try:
        cands = engine.beam(sid, width, answer_budget(items))
    finally:
        engine.free(sid)
    spent = engine.stats().decoded - before
    chosen = cands[0]
    if accept is not None:
        chosen = next((c for c in cands if accept(c.tokens)), cands[0])
    return tokenizer.decode(prompt + list(chosen.tokens)), cands, spent


@dataclasses.dataclass(frozen=True)
class Accuracy:
    chains: int
    steps: int
    step_accuracy: float
    chain_accuracy: float
    seconds: float


def score(reports: list[Report], seconds: float) -> Accuracy:
    steps = sum(r.n_checked for r in reports)
    correct = sum(r.n_correct for r in reports)
    return Accuracy(len(reports), steps, correct / max(steps, 1),
                    sum(r.ok for r in reports) / max(len(reports), 1), seconds)


def evaluate(engine: Engine, questions: list[list[chains.Item]], width: int = 1) -> Accuracy:
    t0 = time.perf_counter()
    reports = []
    for items in questions:
        if width == 1:
            sid = decode_greedy(engine, items)
            reports.append(verify(tokenizer.decode(engine.tokens(sid))))
            engine.free(sid)
        else:
            text, _, _ = decode_beam(engine, items, width)
            reports.append(verify(text))
    return score(reports, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.evaluate", description=__doc__)
    p.add_argument("--chains", type=int, default=200)
    p.add_argument("--width", type=int, nargs="+", default=[1, 4])
    p.add_argument("--weights", default=None)
    args = p.parse_args(argv)
    engine = Engine.load(args.weights)
    questions = heldout(args.chains)
    for w in args.width:
        acc = evaluate(engine, questions, w)
        print(f"width {w}: {acc.chains} chains, {acc.steps} steps: step accuracy "
              f"{acc.step_accuracy:.4f}, chain accuracy {acc.chain_accuracy:.4f} ({acc.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
