"""The integration model (spark/procedural.py): codebook weights, procedural attention bias, a
hash-routed MLP and hypernetwork deltas behind TinyLM's interface, run by the paged engine."""

from __future__ import annotations

import pytest
import torch

from lm import chains, tokenizer
from lm.engine import Engine
from lm.model import TinyLM
from spark import procedural
from spark.codebook import model_bytes


@pytest.fixture(scope="module")
def spark64():
    torch.set_num_threads(1)
    return procedural.load(dtype=torch.float64)


def test_the_paged_engine_computes_the_dense_forward(spark64):
    """Greedy tokens through the engine (paged KV, one token a step) are the argmax of one full
    forward pass over the result: forward and forward_paged are the same function."""
    eng = Engine(spark64, num_blocks=64, block_size=4)
    prompt = tokenizer.encode(chains.prompt([chains.Item(17, 25, 3), chains.Item(40, 12, 7)]))
    sid = eng.start(prompt)
    eng.generate(sid, 30)
    toks = eng.tokens(sid)
    with torch.no_grad():
        full = spark64(torch.tensor([toks]))[0]
    assert full[len(prompt) - 1 : -1].argmax(-1).tolist() == toks[len(prompt) :]
    logits = eng.logits_history(sid)
    assert torch.allclose(logits, full[: len(toks)], atol=1e-9)
    eng.free(sid)
    eng.check_invariants()


def test_the_shared_attention_path_is_the_explicit_biased_softmax(spark64, monkeypatch):
    """SparkLM runs TinyLM's forward and forward_paged (lm.attention.attention with its procedural
    bias): logits equal those with the explicit softmax (score matrix + bias, masked) swapped in,
    and the bias is the procedural one of the query-key distance."""
    from lm.attention import reference_attention

    assert isinstance(spark64, TinyLM) and "forward_paged" not in vars(procedural.SparkLM)
    idx = torch.randint(0, spark64.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = spark64(idx)
        monkeypatch.setattr("lm.model.attention", reference_attention)
        ref = spark64(idx)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-9)
    blk = spark64.blocks[0]
    pos = torch.arange(5)[None]
    dist = (pos[:, :, None] - torch.arange(5)[None, None, :]).to(torch.float64)
    want = torch.einsum("hm,mbts->bhts", blk.coef, procedural.atoms(dist, spark64.sc.atoms))
    torch.testing.assert_close(blk.attn_bias(pos, 5), want, rtol=0, atol=1e-12)
    assert blk.coef.abs().sum() > 0  # a trained, non-zero bias


def test_the_parts_are_there_and_the_model_is_smaller():
    from lm.train import load

    m = procedural.load()
    blk = m.blocks[0]
    assert isinstance(blk.qkv, procedural.CodebookWeight) and blk.qkv.codes.dtype == torch.uint8
    assert blk.coef.abs().sum() > 0  # fine-tuned atom coefficients: the bias is in use
    assert blk.qkv.delta.shape == (blk.qkv.rows, blk.qkv.cols)  # task 0's generated delta
    assert procedural.stored_bytes(m) < 0.5 * model_bytes(load())
    # the router: a content hash, the same group for the same token, every group used
    ids = torch.arange(tokenizer.VOCAB_SIZE)
    groups = procedural.route(ids, m.sc.groups)
    assert torch.equal(groups, procedural.route(ids.clone(), m.sc.groups))
    assert set(groups.tolist()) == set(range(m.sc.groups))


def test_task_deltas_come_from_metadata():
    m0, m3 = procedural.load(task=0), procedural.load(task=3)
    assert not torch.equal(m0.blocks[0].fc1.delta, m3.blocks[0].fc1.delta)
    procedural.with_task(m3, None, 0)
    assert m3.blocks[0].fc1.delta.numel() == 0
    from spark.hyper import TaskError

    with pytest.raises(TaskError):
        procedural.load(task=-1)


def test_atoms_are_sinusoids_of_the_distance():
    d = torch.tensor([0, 1, 2, 3])
    a = procedural.atoms(d, 4)
    assert a.shape == (4, 4)
    assert torch.allclose(a[0], torch.cos(torch.pi * d.double()))
    assert torch.allclose(a[3], torch.sin(torch.pi / 2 * d.double()), atol=1e-12)
