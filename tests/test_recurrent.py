"""lm.recurrent: the chunked parallel form, the token-by-token recurrence and any chunking agree;
the state does not grow with the context; bad configs and inputs are typed errors."""

import pytest
import torch

from lm import recurrent


@pytest.mark.parametrize("kind", recurrent.KINDS)
def test_chunked_equals_recurrent(kind):
    torch.manual_seed(0)
    model = recurrent.RecurrentLM(recurrent.RecurrentConfig(kind, 30, d_model=16, n_heads=2, d_ff=32, d_state=4)).eval()
    idx = torch.randint(0, 30, (2, 23))
    with torch.no_grad():
        whole = model(idx, chunk=64)
        chunked = model(idx, chunk=5)
        st, outs = model.init_state(2), []
        for t in range(idx.shape[1]):
            logits, st = model.step_chunk(idx[:, t : t + 1], st)
            outs.append(logits)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(whole, torch.cat(outs, 1), atol=1e-5)


def test_decay_scan_matches_naive_recurrence():
    torch.manual_seed(1)
    B, H, T, D = 1, 2, 9, 3
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    ld = -torch.rand(B, H, T)
    s0 = torch.randn(B, H, D, D)
    for current in (True, False):
        bonus = torch.randn(H, D)
        out, s_end = recurrent.decay_scan(q, k, v, ld, s0, current=current, bonus=None if current else bonus)
        S, ref = s0.clone(), []
        for t in range(T):
            before = S
            S = torch.exp(ld[..., t])[..., None, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
            if current:
                ref.append((q[:, :, t, None, :] @ S)[:, :, 0])
            else:
                # RWKV reads the state before this token (S_{t-1}), plus the bonus term
                o = (q[:, :, t, None, :] @ before)[:, :, 0]
                o = o + (q[:, :, t] * bonus * k[:, :, t]).sum(-1, keepdim=True) * v[:, :, t]
                ref.append(o)
        assert torch.allclose(out, torch.stack(ref, 2), atol=1e-5), current
        assert torch.allclose(s_end, S, atol=1e-5)


def test_state_is_constant_in_context_length():
    model = recurrent.RecurrentLM(recurrent.RecurrentConfig("mamba", 30, d_model=16, n_heads=2, d_ff=32, d_state=4))
    with torch.no_grad():
        _, short = model(torch.zeros(1, 10, dtype=torch.long), return_state=True)
        _, long = model(torch.zeros(1, 700, dtype=torch.long), return_state=True)
    sizes = lambda st: [t.shape for layer in st["layers"] for t in layer.values()]  # noqa: E731
    assert sizes(short) == sizes(long)


def test_equal_parameters():
    cfg = recurrent.config_for_params("retnet", 74, 108_416)
    assert abs(recurrent.n_params(recurrent.RecurrentLM(cfg)) - 108_416) < 0.02 * 108_416


def test_bad_input():
    with pytest.raises(recurrent.ModelError):
        recurrent.RecurrentConfig("lstm", 10)
    with pytest.raises(recurrent.ModelError):
        recurrent.RecurrentConfig("rwkv", 10, d_model=10, n_heads=3)
    model = recurrent.RecurrentLM(recurrent.RecurrentConfig("rwkv", 10, d_model=8, n_heads=2, d_ff=8))
    with pytest.raises(recurrent.ModelError):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(recurrent.ModelError):
        recurrent.load("/nonexistent/recurrent.pt")


def test_recurrent_decoder_steps_like_long_decoder():
    from lm import varref
    from lm.recurrent_decode import RecurrentDecoder

    model = recurrent.RecurrentLM(recurrent.RecurrentConfig("rwkv", varref.VOCAB_SIZE, d_model=16, n_heads=2, d_ff=16))
    model.eval()
    toks = varref.encode("=aB;!!!!?a", bos=True)
    dec = RecurrentDecoder(model)
    dec.prefill(toks)
    greedy = dec.step()
    with torch.no_grad():
        dense = model(torch.tensor([toks]))[0, -1]
    assert greedy == int(dense.argmax())
    assert len(dec.tokens) == len(toks) + 1 and dec.state_bytes() == model.state_bytes()
    with pytest.raises(varref.VocabularyError):
        dec.feed([10_000])


def test_long_sessions_serve_a_recurrent_peer():
    from lm.errors import LMError
    from lm.longmodel import load as load_transformer
    from lm.longsession import LongSessions

    torch.set_num_threads(1)
    sessions = LongSessions(load_transformer())
    req = {
        "varref": {"length": 300, "vars": 2, "seed": 3},
        "policy": {"name": "recurrent", "kind": "rwkv"},
        "tiers": {"device_blocks": 1, "host_blocks": 4},
    }
    sid = sessions.open(req)
    dec = sessions.get(sid)
    for tok in sessions.query_tokens(sid, next(iter(sessions.values[sid]))):
        dec.step(tok)
    dec.step(None)
    st = sessions.stats(sid)
    assert st["tokens"] == 303 and st["state_bytes"] == dec.state_bytes() < 20_000
    sessions.set_precision({"reset": True})  # leaves the recurrent peer's weights alone
    assert dec.model is sessions.recurrent_models["rwkv"]
    sessions.free(sid)
    with pytest.raises(LMError):
        sessions.open({**req, "policy": {"name": "recurrent", "kind": "lstm"}})
