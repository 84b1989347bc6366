"""Engine exactness (splice-resume, RoI-S, beam) and bad input, on the shipped weights.

The engine runs in float64 here: a batched prefill and a token-by-token decode reassociate the
same sums differently, so in float32 they agree only to ~1e-6 and a near-tie could flip a greedy
token; in float64 the differences are ~1e-15, far below any logit gap.
"""

from __future__ import annotations

import pytest
import torch

from lm import chains, tokenizer
from lm.engine import Engine, SeqState
from lm.errors import (
    ContextTooLongError,
    NotPausedError,
    OutOfBlocksError,
    SequenceFinishedError,
    SequencePausedError,
    SpanError,
    UnknownSequenceError,
    VocabularyError,
)

TOL = dict(rtol=0, atol=1e-9)
ITEMS = [chains.Item(17, 25, 3), chains.Item(40, 12, 7), chains.Item(88, 31, 4)]
PROMPT = tokenizer.encode(chains.prompt(ITEMS))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(dtype=torch.float64, num_blocks=256, block_size=16)


def assert_same_cache(eng: Engine, a: int, b: int) -> None:
    assert eng.tokens(a) == eng.tokens(b)
    for x, y in zip(eng.kv(a), eng.kv(b)):
        torch.testing.assert_close(x, y, **TOL)
    torch.testing.assert_close(eng.logits_history(a), eng.logits_history(b), **TOL)


def test_paged_prefill_matches_dense_forward(engine):
    text = chains.chain(ITEMS)
    ids = tokenizer.encode(text)
    sid = engine.start(ids)
    dense = engine.model(torch.tensor([ids]))[0]
    torch.testing.assert_close(engine.logits_history(sid), dense, **TOL)
    engine.free(sid)


def test_stepwise_decode_cache_equals_prefill_of_its_output(engine):
    sid = engine.start(PROMPT)
    engine.generate(sid, 30)
    ref = engine.start(engine.tokens(sid))
    assert_same_cache(engine, sid, ref)
    engine.free(sid), engine.free(ref)


def test_pause_inject_resume_equals_from_scratch_greedy(engine):
    sid = engine.start(PROMPT)
    engine.generate(sid, 5)
    state = engine.pause(sid)
    assert state.state == "paused" and state.position == len(PROMPT) + 5
    with pytest.raises(SequencePausedError):
        engine.step(sid)
    tool = tokenizer.encode(ITEMS[0].expansion()[5:], bos=False)  # the tool's rest of item 0
    before = engine.stats()
    engine.inject(sid, tool)
    assert engine.stats().prefilled - before.prefilled == len(tool)  # only the injected tokens
    assert engine.stats().decoded == before.decoded
    engine.resume(sid)
    resumed = engine.generate(sid, 40)

    scratch = engine.start(engine.tokens(sid)[: state.position + len(tool)])
    fresh = engine.generate(scratch, 40)
    assert resumed == fresh
    assert_same_cache(engine, sid, scratch)
    engine.free(sid), engine.free(scratch)


def test_rewind_frees_blocks_and_decodes_as_if_never_extended(engine):
    free0 = engine.cache.allocator.num_free
    sid = engine.start(PROMPT)
    first = engine.generate(sid, 40)
    engine.rewind(sid, len(PROMPT))
    assert engine.cache.allocator.num_free == free0 - engine.cache.blocks_for(len(PROMPT))
    assert engine.generate(sid, 40) == first
    engine.free(sid)
    assert engine.cache.allocator.num_free == free0


@pytest.mark.parametrize("width", [1, 3])
def test_exact_splice_cache_equals_from_scratch_prefill(engine, width):
    text = chains.prompt(ITEMS) + "25*3=74;17+74=91;" + "".join(i.expansion() for i in ITEMS[1:])
    ids = tokenizer.encode(text, eos=True)
    sid = engine.start(ids)
    start = tokenizer.char_to_token(len(chains.prompt(ITEMS)))
    end = start + len("25*3=74;17+74=91;")
    res = engine.splice(sid, start, end, width=width)
    out = engine.tokens(sid)
    assert out[:start] == ids[:start]
    assert out[start : start + len(res.new_span)] == list(res.new_span)
    assert out[start + len(res.new_span) :] == ids[end:]  # suffix kept verbatim
    assert res.new_span.count(tokenizer.token_id(";")) == 2
    assert engine.state(sid) is SeqState.FINISHED
    scratch = engine.start(out)
    assert_same_cache(engine, sid, scratch)
    engine.free(sid), engine.free(scratch)
    engine.check_invariants()


def test_width_one_splice_redecodes_the_greedy_span(engine):
    sid = engine.start(PROMPT)
    engine.generate(sid, 34)
    greedy = engine.tokens(sid)
    span = (len(PROMPT), len(PROMPT) + 8)
    other = engine.start(greedy[: span[0]] + tokenizer.encode("99*9=1;", bos=False) + greedy[span[1] :])
    res = engine.splice(other, span[0], span[0] + 7, width=1)
    assert list(res.new_span) == greedy[span[0] : span[0] + len(res.new_span)]
    engine.free(sid), engine.free(other)


def test_beam_scores_are_exact_log_probabilities(engine):
    sid = engine.start(PROMPT)
    before = engine.snapshot(sid)
    cands = engine.beam(sid, 4, 12, stop_token=tokenizer.token_id(";"))
    assert engine.snapshot(sid) == before  # beam search leaves the sequence as it was
    assert [c.logprob for c in cands] == sorted((c.logprob for c in cands), reverse=True)
    greedy = engine.fork(sid)
    g = engine.generate(greedy, 12, stop_token=tokenizer.token_id(";"))
    assert cands[0].logprob >= _score(engine, PROMPT, g) - 1e-9  # beam is at least as good
    for c in cands:
        assert c.logprob == pytest.approx(_score(engine, PROMPT, list(c.tokens)), abs=1e-9)
    engine.free(sid), engine.free(greedy)
    engine.check_invariants()


def _score(engine: Engine, prompt: list[int], new: list[int]) -> float:
    ids = prompt + new
    logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0], -1)
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)))


def test_approx_splice_reuses_suffix_kv_with_bounded_deviation(engine):
    wrong = chains.prompt(ITEMS) + "25*3=7;17+7=24;" + "".join(i.expansion() for i in ITEMS[1:])
    ids = tokenizer.encode(wrong)
    start = tokenizer.char_to_token(len(chains.prompt(ITEMS)))
    end = start + len("25*3=7;17+7=24;")
    exact, approx = engine.start(ids), engine.start(ids)
    engine.splice(exact, start, end, width=2, mode="exact")
    before = engine.stats()
    res = engine.splice(approx, start, end, width=2, mode="approx", recompute=2)
    stats = engine.stats()
    suffix = len(ids) - end
    assert stats.reused - before.reused == suffix - 3  # all but 2 head tokens and the last one
    assert engine.tokens(exact) == engine.tokens(approx)
    new_end = start + len(res.new_span)
    k_e, v_e = engine.kv(exact)
    k_a, v_a = engine.kv(approx)
    # the prefix, the span and the recomputed head tokens are exact
    torch.testing.assert_close(k_a[:, : new_end + 2], k_e[:, : new_end + 2], **TOL)
    # layer 0 depends on the token and its position only: the re-rotated reused keys are exact
    torch.testing.assert_close(k_a[0], k_e[0], **TOL)
    torch.testing.assert_close(v_a[0], v_e[0], **TOL)
    # deeper layers of the reused tokens saw the old span: they deviate, and only a little
    dev = (k_a[1:, new_end + 2 : -1] - k_e[1:, new_end + 2 : -1]).abs().max().item()
    assert 0 < dev < 0.5 * k_e[1:].abs().max().item()
    engine.free(exact), engine.free(approx)


def test_sampling_rng_state_survives_pause_and_is_captured(engine):
    a = engine.start(PROMPT, seed=7)
    b = engine.start(PROMPT, seed=7)
    out_a = [engine.step(a, temperature=1.5) for _ in range(6)]
    out_b = [engine.step(b, temperature=1.5) for _ in range(3)]
    snap = engine.pause(b)
    assert snap.rng_state != engine.snapshot(a).rng_state  # three draws apart
    engine.resume(b)
    out_b += [engine.step(b, temperature=1.5) for _ in range(3)]
    assert out_a == out_b
    assert engine.snapshot(a).rng_state == engine.snapshot(b).rng_state
    engine.free(a), engine.free(b)


def test_counters_count_exactly(engine):
    s0 = engine.stats()
    sid = engine.start(PROMPT)
    engine.generate(sid, 4)
    engine.inject(sid, tokenizer.encode("1;", bos=False))
    s1 = engine.stats()
    assert (s1.prefilled - s0.prefilled, s1.decoded - s0.decoded) == (len(PROMPT) + 2, 4)
    engine.free(sid)


# ---------------------------------------------------------------- bad input: typed, no change


def _fingerprint(engine: Engine, sid: int):
    return engine.snapshot(sid), engine.stats(), engine.cache.allocator.num_free


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda e, s: e.step(10_000), UnknownSequenceError),
        (lambda e, s: e.inject(10_000, [5]), UnknownSequenceError),
        (lambda e, s: e.free(10_000), UnknownSequenceError),
        (lambda e, s: e.inject(s, [tokenizer.VOCAB_SIZE]), VocabularyError),
        (lambda e, s: e.inject(s, [5, -1]), VocabularyError),
        (lambda e, s: e.start([1, 999]), VocabularyError),
        (lambda e, s: e.start([]), SpanError),
        (lambda e, s: e.splice(s, 0, 3), SpanError),
        (lambda e, s: e.splice(s, 4, 4), SpanError),
        (lambda e, s: e.splice(s, 3, len(PROMPT) + 1), SpanError),
        (lambda e, s: e.splice(s, 2, 5, mode="fast"), ValueError),
        (lambda e, s: e.replace(s, 3, 2, [5]), SpanError),
        (lambda e, s: e.replace(s, 2, 3, [10**6]), VocabularyError),
        (lambda e, s: e.rewind(s, 0), SpanError),
        (lambda e, s: e.rewind(s, len(PROMPT) + 1), SpanError),
        (lambda e, s: e.resume(s), NotPausedError),
        (lambda e, s: e.inject(s, [5] * e.max_len), ContextTooLongError),
        (lambda e, s: e.beam(s, 0, 5), ValueError),
    ],
)
def test_bad_input_raises_typed_error_and_changes_nothing(engine, call, error):
    sid = engine.start(PROMPT)
    before = _fingerprint(engine, sid)
    with pytest.raises(error):
        call(engine, sid)
    assert _fingerprint(engine, sid) == before
    engine.free(sid)


def test_finished_sequence_refuses_steps_and_injects_but_can_be_spliced(engine):
    sid = engine.start(tokenizer.encode(chains.chain(ITEMS[:1]), eos=True))
    before = _fingerprint(engine, sid)
    for call in (lambda: engine.step(sid), lambda: engine.inject(sid, [5]), lambda: engine.pause(sid)):
        with pytest.raises(SequenceFinishedError):
            call()
    assert _fingerprint(engine, sid) == before
    engine.rewind(sid, len(engine.tokens(sid)) - 1)  # cutting the EOS reopens it
    assert engine.state(sid) is SeqState.RUNNING
    engine.free(sid)
    with pytest.raises(UnknownSequenceError):
        engine.step(sid)


def test_out_of_blocks_is_refused_before_anything_changes():
    eng = Engine.load(dtype=torch.float64, num_blocks=2, block_size=4)
    sid = eng.start(PROMPT[:8])  # two full blocks
    before = _fingerprint(eng, sid)
    with pytest.raises(OutOfBlocksError):
        eng.step(sid)
    with pytest.raises(OutOfBlocksError):
        eng.start(PROMPT[:2])
    assert _fingerprint(eng, sid) == before
    eng.check_invariants()
