"""The codec's depth cap (issue 24): whatever :func:`kernel.codec.unpack` accepts, :func:`pack`
and the decision log's JSON encoder take again (an audit event nested 980 deep used to go
unanswered: the encoder raised)."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import codec
from kernel.errors import BadRequest
from kernel.logstore import decode_record, encode_record


def _nested(depth: int, leaf=1, as_map: bool = False):
    obj = leaf
    for _ in range(depth - 1):
        obj = {"k": obj} if as_map else [obj]
    return {"k": obj} if as_map else [obj]


@pytest.mark.parametrize("as_map", [False, True])
def test_the_cap_refuses_deeper_and_everything_accepted_encodes_again(as_map):
    ok = codec.unpack(msgpack.packb(_nested(codec.MAX_DEPTH, as_map=as_map)))
    assert codec.unpack(codec.pack(ok)) == ok
    line = encode_record({"seq": 1, "op": "audit", "in": {"event": ok}})  # the log takes it too
    assert decode_record(line)["in"]["event"] == ok
    for depth in (codec.MAX_DEPTH + 1, 980):
        with pytest.raises(BadRequest, match="nested deeper"):
            codec.unpack(msgpack.packb(_nested(depth, as_map=as_map)))


def test_wide_and_binary_frames_pass():
    wide = {"xs": list(range(100_000)), "blob": bytes(range(256)) * 4000, "m": [{"a": [1, 2]}] * 1000}
    assert codec.unpack(codec.pack(wide)) == wide


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.binary(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=400,
)


@settings(max_examples=200, deadline=None)
@given(_json, st.integers(0, 300))
def test_anything_unpack_accepts_packs_again(obj, wrap):
    for _ in range(wrap):
        obj = [obj]
    try:
        got = codec.unpack(msgpack.packb(obj, use_bin_type=True))
    except BadRequest:
        return
    assert codec.unpack(codec.pack(got)) == got
    json.dumps(got, default=str)
