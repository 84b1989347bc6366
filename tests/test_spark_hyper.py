"""The layer generator (spark/hyper.py): LoRA deltas from task metadata, at equal trainable
parameters with per-task LoRA, on the shipped chain LM."""

from __future__ import annotations

import random

import pytest
import torch

from lm import chains, tokenizer
from spark import hyper


@pytest.fixture(scope="module")
def model():
    from lm.train import load

    torch.set_num_threads(1)
    return load()


def test_task_text_and_metadata():
    items = [chains.Item(17, 25, 3)]
    assert hyper.answer(items, 0) == chains.answer(items)
    assert hyper.answer(items, 2) == "25*3=77;17+77=94;"
    assert hyper.meta(5).tolist() == pytest.approx([1.0, 0.5, 0.25, 1.0])
    for bad in (-1, hyper.MAX_K + 1, 2.5, True, "3"):
        with pytest.raises(hyper.TaskError):
            hyper.meta(bad)
    ids, at = hyper.example(random.Random(0), 3)
    assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS and tokenizer.decode(ids[:at]).startswith("Q:")


def test_zero_delta_is_the_base_model_and_params_are_equal(model):
    adapted, slots = hyper.adapt(model)
    s = hyper.Setup()
    assert len(slots) == len(model.blocks) * len(hyper.TARGETS)
    pt = hyper.PerTask(slots, s.rank, hyper.TRAIN_K)
    hy = hyper.Hyper(slots, s.rank, hyper.hidden_for_equal_params(slots, s.rank, len(hyper.TRAIN_K)))
    total = len(hyper.TRAIN_K) * hyper.lora_params(slots, s.rank)
    assert hyper.n_params(pt) == total and 0.75 * total <= hyper.n_params(hy) <= total
    inputs, _ = hyper.batch(random.Random(1), [0, 1, 2])
    with torch.no_grad():
        want = model(inputs)
        for flat in (pt.factors(1), pt.factors(3)):  # B starts at zero: no delta
            hyper._apply(slots, flat.detach(), s.rank)
            assert torch.equal(adapted(inputs), want)
        hyper._apply(slots, None, s.rank)
        assert torch.equal(adapted(inputs), want)
    assert not any(p.requires_grad for p in adapted.parameters())  # the base stays frozen


def test_the_generator_learns_a_task_the_base_gets_wrong(model):
    adapted, slots = hyper.adapt(model)
    s = hyper.Setup(steps=3, batch=8, eval_batches=1, greedy_n=1)
    base = hyper.score(adapted, slots, None, 4, s)
    hy = hyper.train_hyper(adapted, slots, s)
    tuned = hyper.score(adapted, slots, hy.factors(4).detach(), 4, s)
    assert tuned["loss"] < base["loss"]
