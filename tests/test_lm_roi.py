"""RoI-S repair loop and Lazy-of-Thought forcing, on the shipped weights."""

from __future__ import annotations

import random

import pytest
import torch

from lm import chains, tokenizer
from lm.engine import Engine
from lm.roi import find_roi, repair, text_of
from lm.thunks import (
    DemandExecutor,
    ModelExpander,
    ThunkError,
    estimate_cost,
    exact_expander,
    find_thunks,
    place_thunks,
)
from lm.verifier import verify

TOL = dict(rtol=0, atol=1e-9)
ITEMS = [chains.Item(17, 25, 3), chains.Item(40, 12, 7), chains.Item(88, 31, 4)]
PROMPT = chains.prompt(ITEMS)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(dtype=torch.float64, num_blocks=256, block_size=16)


def assert_cache_is_from_scratch(eng: Engine, sid: int) -> None:
    ref = eng.start(eng.tokens(sid))
    for x, y in zip(eng.kv(sid), eng.kv(ref)):
        torch.testing.assert_close(x, y, **TOL)
    eng.free(ref)


def test_find_roi_maps_the_failed_region_to_its_tokens():
    text = PROMPT + "25*3=75;17+75=92;12*7=85;40+85=125;31*4=124;88+124=212;"
    roi = find_roi(verify(text))
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids[roi.start : roi.end]) == "12*7=85;40+85=125;"
    assert find_roi(verify(chains.chain(ITEMS))) is None


@pytest.mark.parametrize("wrong", ["12*7=85;40+85=125;", "12*7=84;40+84=128;"])
def test_repair_splices_only_the_flagged_region_and_keeps_the_suffix(engine, wrong):
    good = [it.expansion() for it in ITEMS]
    text = PROMPT + good[0] + wrong + good[2]
    sid = engine.start(tokenizer.encode(text, eos=True))
    before = engine.stats()
    rep = repair(engine, sid, width=8)
    assert rep.ok and rep.rounds == 1, rep.reason
    assert text_of(engine, sid) == chains.chain(ITEMS)
    after = engine.stats()
    assert after.repaired - before.repaired == rep.decoded
    # only the region was decoded: at most width hypotheses x (2 * region + 8) steps, far less
    # than the answer, and the kept suffix was prefilled, not decoded
    assert rep.decoded <= 8 * (2 * len(wrong) + 8)
    assert after.recomputed - before.recomputed == len(good[2]) + 1  # suffix + EOS
    assert_cache_is_from_scratch(engine, sid)
    engine.free(sid)
    engine.check_invariants()


def test_repair_reports_what_a_splice_cannot_fix(engine):
    sid = engine.start(tokenizer.encode(PROMPT + ITEMS[0].expansion(), eos=True))
    rep = repair(engine, sid)
    assert not rep.ok and rep.rounds == 0 and "ends early" in rep.reason
    engine.free(sid)


def test_place_thunks_then_force_restores_the_worked_chain(engine):
    text = chains.chain(ITEMS)
    lazy = place_thunks(text, {0, 2})
    assert lazy == PROMPT + ITEMS[0].thunk() + ITEMS[1].expansion() + ITEMS[2].thunk()
    sid = engine.start(tokenizer.encode(lazy, eos=True))
    ex = DemandExecutor(engine, sid, exact_expander)
    cost_before = ex.pending_cost()
    assert ex.demand(1) == ITEMS[1].value and ex.forced == []  # already worked: nothing forced
    assert ex.demand(2) == ITEMS[2].value
    assert [f.thunk.args for f in ex.forced] == [ITEMS[2].expr]
    assert ex.text() == PROMPT + ITEMS[0].thunk() + ITEMS[1].expansion() + ITEMS[2].expansion()
    assert ex.pending_cost() == cost_before - ex.forced[0].thunk.cost
    assert_cache_is_from_scratch(engine, sid)
    engine.free(sid)


def test_model_generates_thunks_lazily_and_forces_only_the_demanded_one(engine):
    sid = engine.start(tokenizer.encode(chains.prompt(ITEMS, lazy=True)))
    engine.generate(sid, 80)
    assert text_of(engine, sid) == chains.chain(ITEMS, lazy=True)  # the model emitted thunks
    before = engine.stats()
    ex = DemandExecutor(engine, sid, ModelExpander(engine))
    value = ex.demand(1)
    after = engine.stats()
    forced = ex.forced[0]
    assert engine.live_sequences == [sid]  # the side sequence was freed
    report = verify(ex.text())
    assert report.thunked == (0, 2)  # the other thunks stand unforced
    assert value == report.values.get(1)
    # the side decode took the expansion, its final ';' and EOS; the parent decoded nothing and
    # recomputed only its suffix (';', the later thunk and EOS) by prefill
    assert after.decoded - before.decoded == len(forced.expansion.tokens) + 2
    assert after.recomputed - before.recomputed == 1 + len(ITEMS[2].thunk()) + 1
    # the expansion is the model's own greedy answer to the one-item question
    side = engine.start(tokenizer.encode(f"Q:{ITEMS[1].expr};"))
    engine.generate(side, 40)
    assert tokenizer.decode(forced.expansion.tokens) + ";" == text_of(engine, side).split(";", 1)[1]
    engine.free(side)
    assert_cache_is_from_scratch(engine, sid)
    engine.free(sid)
    engine.check_invariants()


def test_cost_estimate_bounds_the_expansion_length():
    rng = random.Random(3)
    for _ in range(300):
        it = chains.random_item(rng)
        cost = estimate_cost("ev", it.expr)
        actual = len(it.expansion()) - 1
        # an upper bound, loose by at most one digit per number written
        assert actual <= cost <= actual + 4


def test_thunk_errors_are_typed(engine):
    sid = engine.start(tokenizer.encode(chains.chain(ITEMS, lazy=True), eos=True))
    ex = DemandExecutor(engine, sid, exact_expander)
    with pytest.raises(ThunkError):
        ex.demand(7)
    (t0, *_rest) = find_thunks(ex.text())
    ex.force(t0)
    with pytest.raises(ThunkError):
        ex.force(t0)  # no longer in the text
    with pytest.raises(ThunkError):
        estimate_cost("proveLemma", "x")
    engine.free(sid)
