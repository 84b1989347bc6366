"""Tokenizer, chain generation and the exact step verifier."""

from __future__ import annotations

import random

import pytest

from lm import chains, tokenizer
from lm.errors import VocabularyError
from lm.verifier import VerifierInputError, verify

ITEMS = [chains.Item(17, 25, 3), chains.Item(40, 12, 7)]
PROMPT = chains.prompt(ITEMS)  # "Q:17+25*3,40+12*7;"


def test_tokenizer_round_trips_and_maps_chars_to_tokens():
    text = chains.chain(ITEMS) + chains.chain(ITEMS, lazy=True)
    ids = tokenizer.encode(text, eos=True)
    assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS
    assert tokenizer.decode(ids) == text
    for offset in (0, 5, len(text) - 1):
        assert tokenizer.decode([ids[tokenizer.char_to_token(offset)]]) == text[offset]
    assert tokenizer.token_id("⟦") != tokenizer.token_id("⟧")


@pytest.mark.parametrize("bad", ["Q:1 +2", "é", "\n"])
def test_tokenizer_rejects_unknown_characters(bad):
    with pytest.raises(VocabularyError):
        tokenizer.encode(bad)


@pytest.mark.parametrize("bad", [[-1], [tokenizer.VOCAB_SIZE], [1.5], [True]])
def test_tokenizer_rejects_ids_outside_the_vocabulary(bad):
    with pytest.raises(VocabularyError):
        tokenizer.decode(bad)


def test_generated_chains_verify():
    rng = random.Random(5)
    for n in range(1, chains.MAX_ITEMS + 1):
        items = chains.random_items(rng, n)
        rep = verify(chains.chain(items))
        assert rep.ok and rep.n_checked == 2 * n
        assert rep.values == {i: it.value for i, it in enumerate(items)}
        lazy = verify(chains.chain(items, lazy=True))
        assert lazy.ok and lazy.thunked == tuple(range(n)) and lazy.values == {}


def test_wrong_product_flags_the_step_and_its_dependent_sum():
    text = PROMPT + "25*3=74;17+74=91;12*7=84;40+84=124;"
    rep = verify(text)
    bad = rep.first_error
    assert (bad.kind, bad.item, bad.text) == ("mul", 0, "25*3=74")
    assert text[bad.start : bad.end] == "25*3=74;"
    assert text[slice(*bad.region)] == "25*3=74;17+74=91;"  # the sum restates 74: same region
    assert rep.values == {1: 124} and rep.n_correct == 3


def test_wrong_sum_flags_only_that_step():
    text = PROMPT + "25*3=75;17+75=92;12*7=84;40+84=125;"
    bad = verify(text).first_error
    assert (bad.kind, bad.item) == ("add", 1)
    assert text[slice(*bad.region)] == "40+84=125;"


def test_sum_must_restate_the_product_result():
    bad = verify(PROMPT + "25*3=75;17+76=93;12*7=84;40+84=124;").first_error
    assert bad.kind == "add" and "not the product step's result" in bad.reason


@pytest.mark.parametrize(
    "answer, kind, reason",
    [
        ("25*4=100;17+100=117;12*7=84;40+84=124;", "mul", "operands"),
        ("25*3=75;18+75=93;12*7=84;40+84=124;", "add", "first operand"),
        ("25*3=7x;", "mul", "malformed"),
        ("25*3=75;17+75=92;12*7=84;40+84=124", "add", "terminated"),
        ("25*3=75;17+75=92;", "missing", "ends early"),
        ("25*3=75;", "missing", "ends early"),
        ("25*3=75;17+75=92;12*7=84;40+84=124;1*1=1;", "extra", "past the last"),
    ],
)
def test_every_failure_kind_is_reported(answer, kind, reason):
    bad = verify(PROMPT + answer).first_error
    assert bad is not None and bad.kind == kind and reason in bad.reason


def test_thunks_and_worked_items_mix():
    text = PROMPT + "⟦ev(17+25*3)⟧;12*7=84;40+84=124;"
    rep = verify(text)
    assert rep.ok and rep.thunked == (0,) and rep.values == {1: 124}
    assert not verify(PROMPT + "⟦ev(17+25*4)⟧;12*7=84;40+84=124;").ok  # not the item's thunk


@pytest.mark.parametrize("text", ["", "17+25*3;", "Q:17+25*3", "Q:;", "X:1+2*3;"])
def test_header_errors_are_typed(text):
    with pytest.raises(VerifierInputError):
        verify(text)
