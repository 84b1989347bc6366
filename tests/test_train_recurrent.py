"""lm.train_recurrent: the first-query loss draws the same examples as lm.varref's, a run stopped
and resumed from its checkpoints trains to the same weights as one run straight through, and
--export-only writes the checkpoints' weights."""

from __future__ import annotations

import random

import torch

from lm import recurrent, varref
from lm.train_recurrent import example, main


def test_examples_are_varrefs_with_the_loss_on_first_queries():
    for seed in range(5):
        full = example(random.Random(seed), 300, 16, False)
        assert full == varref.training_example(random.Random(seed), 300, 16)
        tokens, mask = example(random.Random(seed), 300, 16, True)
        assert tokens == full[0] and all(m <= f for m, f in zip(mask, full[1]))
        # a marked position is a query's name (its next token the value): each variable once, first
        named = [tokens[i] for i, m in enumerate(full[1]) if m]
        firsts = [tokens[i] for i, m in enumerate(mask) if m]
        assert firsts == list(dict.fromkeys(named)) and len(named) == 16


def _args(tmp, steps, *extra):
    return [
        "rwkv",
        "--steps",
        str(steps),
        "--max-len",
        "200",
        "--batch",
        "2",
        "--log-every",
        "1",
        "--save-every",
        "1",
        "--checkpoint-dir",
        str(tmp / "ck"),
        "--out-dir",
        str(tmp),
        "--minutes",
        "5",
        *extra,
    ]


def test_resume_trains_to_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(a, 4)) == 0
    assert main(_args(b, 4, "--rounds", "2")) == 0  # stopped after 2 steps ...
    assert main(_args(b, 4)) == 0  # ... and resumed from the checkpoint to 4
    wa = torch.load(a / "recurrent_rwkv.pt", weights_only=True)
    wb = torch.load(b / "recurrent_rwkv.pt", weights_only=True)
    assert wa["meta"]["steps"] == wb["meta"]["steps"] == 4
    assert [c[0] for c in wb["meta"]["curve"]] == [1, 2, 3, 4]
    for k, v in wa["state_dict"].items():
        assert torch.equal(v, wb["state_dict"][k]), k
    # --export-only writes the checkpoint's weights and trains nothing
    (b / "recurrent_rwkv.pt").unlink()
    assert main(_args(b, 9, "--export-only")) == 0
    again = recurrent.load(b / "recurrent_rwkv.pt")
    assert recurrent.load_meta(b / "recurrent_rwkv.pt")["steps"] == 4
    for k, v in again.state_dict().items():
        assert torch.equal(v, wa["state_dict"][k]), k
