"""The corpus: the Python standard library's own source on this machine, as a code LM.

No download: the text is the top-level ``*.py`` modules of the running interpreter's stdlib
(``sysconfig.get_paths()["stdlib"]``), read as bytes in sorted name order. Bytes are the tokens:
ids 1..126 are the ASCII bytes themselves, 127 stands for every non-ASCII byte (and DEL), and 0
separates two files (NUL never occurs in source), so the vocabulary is 128.

Split by module, not by position: a module goes to the held-out set when
``zlib.crc32(name) % HELDOUT_MOD == 0`` (about 10 %), so no held-out file shares text with a
training file except what the stdlib itself repeats. The split depends only on the names; the
``digest`` (sha256 of the token stream) says whether two machines hold the same text — CI runs
the same CPython 3.11 stdlib, and a different patch release changes a few files (and the digest),
not the split rule.

Examples are non-overlapping windows of ``n_seq + 1`` tokens of the training stream; held-out
windows are taken the same way from the held-out stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys
import sysconfig
import zlib
from typing import Iterable

import numpy as np

from bklm.errors import CorpusError

VOCAB = 128
SEPARATOR = 0
UNKNOWN = 127
HELDOUT_MOD = 10


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_heldout(module: str) -> bool:
    return zlib.crc32(module.encode()) % HELDOUT_MOD == 0


def encode(data: bytes) -> np.ndarray:
    """Bytes -> token ids (uint8): ASCII kept, everything else UNKNOWN, NUL kept as SEPARATOR."""
    ids = np.frombuffer(data, np.uint8).copy()
    ids[ids >= UNKNOWN] = UNKNOWN
    return ids


def decode(ids: Iterable[int]) -> str:
    return "".join("\u00bf" if i == UNKNOWN else "\n<|file|>\n" if i == SEPARATOR else chr(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of the two splits and what they were made from.

    Invariant: ``train_modules`` and ``heldout_modules`` are disjoint and sorted.
    """

    train: np.ndarray  # uint8 ids
    heldout: np.ndarray
    train_modules: tuple[str, ...]
    heldout_modules: tuple[str, ...]
    source: str
    digest: str

    def windows(self, split: str, n_seq: int) -> np.ndarray:
        """Non-overlapping windows (W, n_seq + 1) of a split, as int64."""
        stream = self.train if split == "train" else self.heldout
        w = len(stream) // (n_seq + 1)
        if w < 1:
            raise CorpusError(f"the {split} split ({len(stream)} tokens) is shorter than one window of {n_seq + 1}")
        return stream[: w * (n_seq + 1)].reshape(w, n_seq + 1).astype(np.int64)

    def summary(self) -> dict:
        return {"source": self.source, "digest": self.digest[:16], "train_tokens": int(len(self.train)),
                "heldout_tokens": int(len(self.heldout)), "train_modules": len(self.train_modules),
                "heldout_modules": len(self.heldout_modules), "python": sys.version.split()[0]}


def _read(path: pathlib.Path) -> bytes:
    try:
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} is not a readable file", str(path))
        return path.read_bytes()
    except OSError as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {exc.strerror or exc}", str(path)) from exc


def load(root: str | pathlib.Path | None = None, *, limit_bytes: int | None = None) -> Corpus:
    """The corpus of every top-level ``*.py`` in ``root`` (default: this interpreter's stdlib).

    ``limit_bytes`` keeps only the first files (in name order) until that many bytes per split —
    for tests. :class:`CorpusError` when a file cannot be read or a split comes out empty.
    """
    root = pathlib.Path(root) if root is not None else stdlib_dir()
    try:
        paths = sorted(root.glob("*.py"))
    except OSError as exc:
        raise CorpusError(f"cannot list corpus directory {str(root)!r}: {exc}", str(root)) from exc
    if not paths:
        raise CorpusError(f"no *.py files in {str(root)!r}", str(root))
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    for path in paths:
        held = is_heldout(path.stem)
        if limit_bytes is not None and sizes[held] >= limit_bytes:
            continue
        data = _read(path)
        parts[held].append(data)
        names[held].append(path.stem)
        sizes[held] += len(data) + 1
    for held, label in ((False, "training"), (True, "held-out")):
        if not parts[held]:
            raise CorpusError(f"the {label} split of {str(root)!r} is empty", str(root))
    sep = bytes([SEPARATOR])
    train, heldout = sep.join(parts[False]), sep.join(parts[True])
    digest = hashlib.sha256(train + b"\xff" + heldout).hexdigest()
    return Corpus(encode(train), encode(heldout), tuple(names[False]), tuple(names[True]), str(root), digest)
