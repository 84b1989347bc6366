"""lm.vectorstore: exact top-k (FAISS and NumPy agree), persistence, the async wrapper's task group,
the reservoir and the autoencoder; bad input is typed."""

import numpy as np
import pytest
import torch

from lm import vectorstore as vs


def _data(n=200, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return [f"k{i}" for i in range(n)], rng.standard_normal((n, d)).astype(np.float32)


def test_search_is_exact_against_brute_force():
    keys, x = _data()
    store = vs.VectorStore(12, "cosine", use_faiss=False)
    store.add(keys, x)
    q = np.random.default_rng(1).standard_normal((5, 12))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for row, hits in zip(q, store.search(q, 4)):
        brute = np.argsort(-(unit @ (row / np.linalg.norm(row))))[:4]
        assert [k for k, _ in hits] == [keys[i] for i in brute]
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


@pytest.mark.skipif(vs.faiss is None, reason="faiss does not import here")
def test_faiss_and_numpy_agree():
    keys, x = _data()
    a, b = vs.VectorStore(12, "ip", use_faiss=True), vs.VectorStore(12, "ip", use_faiss=False)
    a.add(keys, x)
    b.add(keys, x)
    q = np.random.default_rng(2).standard_normal((3, 12))
    for ra, rb in zip(a.search(q, 5), b.search(q, 5)):
        assert [k for k, _ in ra] == [k for k, _ in rb]
        assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-4)


def test_persistence_round_trip_and_damage(tmp_path):
    keys, x = _data(30)
    store = vs.VectorStore(12)
    store.add(keys, x)
    store.save(tmp_path / "mem")
    back = vs.VectorStore.load(tmp_path / "mem")
    assert back.keys == keys and np.allclose(back.vectors, store.vectors)
    assert back.search(x[7], 1)[0][0][0] == "k7"
    (tmp_path / "mem.json").write_text('{"dim": 12, "metric": "cosine", "keys": ["only-one"]}')
    with pytest.raises(vs.StoreFileError):
        vs.VectorStore.load(tmp_path / "mem")
    with pytest.raises(vs.StoreFileError):
        vs.VectorStore.load(tmp_path / "absent")


def test_bad_input_is_typed():
    store = vs.VectorStore(4)
    with pytest.raises(vs.DimensionError):
        store.add(["a"], np.ones((1, 5)))
    with pytest.raises(vs.DimensionError):
        store.add(["a"], np.zeros((1, 4)))  # no direction under cosine
    with pytest.raises(vs.DimensionError):
        store.add(["a"], [[1, 2, float("nan"), 4]])
    store.add(["a"], np.ones((1, 4)))
    with pytest.raises(vs.DuplicateKeyError):
        store.add(["a"], np.ones((1, 4)))
    with pytest.raises(vs.VectorStoreError):
        store.search(np.ones(4), 0)
    with pytest.raises(vs.VectorStoreError):
        vs.VectorStore(0)
    with pytest.raises(vs.VectorStoreError):
        vs.VectorStore(4, "l3")
    assert len(store) == 1  # the refused adds changed nothing


@pytest.mark.anyio
async def test_async_store_writes_belong_to_the_group(tmp_path):
    keys, x = _data(50)
    store = vs.VectorStore(12, use_faiss=False)
    async with vs.AsyncVectorStore(store) as s:
        s.add_soon(keys[:25], x[:25])
        s.add_soon(keys[25:], x[25:])
    assert len(store) == 50  # leaving the block waited for both writes
    async with vs.AsyncVectorStore(store) as s:
        hits = await s.search(x[3], 1)
        s.save_soon(tmp_path / "m")
    assert hits[0][0][0] == "k3"
    assert vs.VectorStore.load(tmp_path / "m").keys == store.keys
    with pytest.raises(vs.VectorStoreError):
        vs.AsyncVectorStore(store).add_soon(["z"], x[:1])  # not open


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_reservoir_is_uniform_and_bounded():
    res = vs.Reservoir(100, 1, seed=3)
    res.add(np.arange(10_000, dtype=np.float32)[:, None])
    s = res.sample()
    assert s.shape == (100, 1) and res.seen == 10_000
    assert 3000 < s.mean() < 7000  # a uniform sample of 0..9999, not the first 100


def test_autoencoder_compresses_low_rank_data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 4)) @ rng.standard_normal((4, 32))).astype(np.float32)
    torch.set_num_threads(1)
    ae = vs.Autoencoder(32, 8, seed=0)
    err = ae.fit(x, steps=120)
    assert err < 0.5  # from 1.0 (codes of zeros) on rank-4 data
    held = (rng.standard_normal((50, 4)) @ np.zeros((4, 32))).astype(np.float32) + x[:50]
    assert ae.encode(held).dtype == np.float16
    with pytest.raises(vs.VectorStoreError):
        vs.Autoencoder(8, 9)
