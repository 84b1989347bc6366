"""The one msgpack codec of reca.

Every frame reca itself encodes goes through :func:`pack`; every frame it decodes through
:func:`unpack`, which bounds what a hostile peer can make it allocate: msgpack >= 1.0 derives its
container and string limits from the input length, the C unpacker refuses nesting deeper than
its fixed stack, and :func:`unpack` additionally caps the input size and the nesting depth
(:data:`MAX_DEPTH`, well under the encoder's own limit, so whatever was accepted can be encoded
again -- in a reply, a decision-log record -- without a ``RecursionError``).  Any decoding
failure is raised as :class:`kernel.errors.BadRequest`, never as a msgpack internal exception.

NumPy arrays travel inline as ``{"__nd__": [dtype, shape], "b": bytes}`` (:func:`unpack_array`
turns one back).  No message of reca carries arrays large enough to need a separate zero-copy
frame today, so there is no such path (a helper for it had no caller and was removed).
"""

from __future__ import annotations

from typing import Any

import msgpack

from kernel.errors import BadRequest
from kernel.protocol import MAX_FRAME_SIZE

__all__ = ["pack", "reca_header", "unpack", "unpack_array"]

#: Deepest nesting of maps and arrays :func:`unpack` accepts (the Packer's limit is 511; JSON's
#: encoder, which writes the decision log, takes about 1,000).
MAX_DEPTH = 100

_packer = msgpack.Packer(use_bin_type=True, datetime=False)

#: The bytes that can start a msgpack map or array (fixmap, fixarray, array16/32, map16/32).
_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + bytes((0xDC, 0xDD, 0xDE, 0xDF))


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests maps and arrays deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if depth > limit:
            return True
        items = o.values() if type(o) is dict else o
        for v in items:
            if type(v) is dict or type(v) is list:
                stack.append((v, depth + 1))
    return False


def _default(obj: Any) -> Any:
    # numpy is optional for the kernel; only touched when an array is actually encoded.
    tolist = getattr(obj, "tolist", None)
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and hasattr(obj, "tobytes"):
        if obj.shape == ():
            return obj.item()
        return {"__nd__": [str(obj.dtype), list(obj.shape)], "b": obj.tobytes()}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if tolist is not None:
        return tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as one msgpack frame (bytes stay bytes, str stays str)."""
    try:
        return bytes(_packer.pack(obj))
    except TypeError:
        # Unknown types: one more attempt through the converter (slow path, rare).
        return bytes(msgpack.packb(obj, use_bin_type=True, default=_default))


def unpack(frame: bytes, *, limit: int = MAX_FRAME_SIZE) -> Any:
    """Decode one msgpack frame; :class:`BadRequest` on anything that is not exactly one value."""
    if len(frame) > limit:
        raise BadRequest(f"frame of {len(frame)} bytes exceeds the {limit}-byte limit")
    if not isinstance(frame, (bytes, bytearray)):
        frame = bytes(frame)
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, StackError, TypeError, ...
        raise BadRequest(f"undecodable msgpack frame: {type(exc).__name__}: {exc}") from exc
    # Depth can only pass MAX_DEPTH when that many bytes could start a container: skip the walk
    # for the common frame (a C-speed count), walk the containers only otherwise.
    if (type(obj) is dict or type(obj) is list) and len(frame) > MAX_DEPTH and \
            len(frame) - len(frame.translate(None, _CONTAINER_BYTES)) > MAX_DEPTH and _too_deep(obj, MAX_DEPTH):
        raise BadRequest(f"msgpack frame nested deeper than {MAX_DEPTH} levels")
    return obj


def reca_header(body: list[bytes]) -> dict[str, Any] | None:
    """The reca header of a request body, or None for an opaque MDP body.

    A body is a reca request when its first frame decodes as a msgpack map carrying ``"v"``;
    anything else, including bytes that merely start like a map, is opaque.
    """
    if not body:
        return None
    first = body[0][:1]
    if not first or not (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF)):
        return None
    try:
        decoded = unpack(body[0])
    except BadRequest:
        return None
    return decoded if isinstance(decoded, dict) and "v" in decoded else None


def unpack_array(obj: Any) -> Any:
    """Turn an encoded ``{"__nd__": ...}`` map back into a NumPy array (imports numpy lazily)."""
    import numpy as np

    try:
        dtype, shape = obj["__nd__"]
        return np.frombuffer(obj["b"], dtype=np.dtype(dtype)).reshape(shape)
    except Exception as exc:
        raise BadRequest(f"malformed array: {exc}") from exc
