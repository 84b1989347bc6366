"""A decoder over a :class:`lm.recurrent.RecurrentLM`: the constant-state peer of
:class:`lm.longdecode.LongDecoder` (same ``feed`` / ``generate`` / ``load`` shape, so the kvtp
workload drives both), and nothing like a KV cache: the whole context lives in
``model.state_bytes()`` bytes.

Safe points are token boundaries, as in the transformer's decoder; the state after each
:meth:`RecurrentDecoder.feed` or generated token is complete (pausing a decode keeps it as is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm import varref
from lm.errors import SequenceStateError
from lm.recurrent import RecurrentLM


class RecurrentDecoder:
    """One sequence's state.  Invariant: ``state`` summarises exactly ``tokens`` and
    ``last_logits`` are the logits after the last of them."""

    def __init__(self, model: RecurrentLM) -> None:
        self.model = model
        self.state = model.init_state(1)
        #: token ids so far: bookkeeping for the service (its length), never read by the model
        self.tokens: list[int] = []
        self.last_logits: torch.Tensor | None = None
        self.steps = 0  # decode steps (fed or generated tokens after the prefill)

    def load(self, tokens: Sequence[int]) -> None:
        """Prefill (chunked parallel form)."""
        ids = varref.check_ids(tokens)
        if not ids:
            raise SequenceStateError("a prefill needs at least one token")
        with torch.no_grad():
            logits, self.state = self.model(torch.tensor([ids]), self.state, return_state=True)
        self.tokens += ids
        self.last_logits = logits[0, -1]

    def _step(self, tok: int) -> None:
        with torch.no_grad():
            logits, self.state = self.model.step_chunk(torch.tensor([[tok]]), self.state)
        self.tokens.append(tok)
        self.steps += 1
        self.last_logits = logits[0, -1]

    def feed(self, tokens: Sequence[int]) -> None:
        for tok in varref.check_ids(tokens):
            self._step(tok)

    def generate(self, n: int) -> list[int]:
        """``n`` greedy tokens, each fed back."""
        if self.last_logits is None:
            raise SequenceStateError("generate needs a prefill or fed tokens first")
        out = []
        for _ in range(n):
            tok = int(self.last_logits.argmax())
            out.append(tok)
            self._step(tok)
        return out

    def step(self, token: int | None = None) -> int:
        """One decode step in :class:`lm.longdecode.LongDecoder`'s shape: feed ``token``, or the
        greedy next token when None; returns the token fed."""
        if token is None:
            if self.last_logits is None:
                raise SequenceStateError("a greedy step needs a prefill or fed tokens first")
            token = int(self.last_logits.argmax())
        self.feed([token])
        return token

    def prefill(self, tokens: Sequence[int]) -> None:
        self.load(tokens)

    def close(self) -> None:
        """Nothing to give back: no cache, no tiers (the shape of ``LongDecoder.close``)."""

    def state_bytes(self) -> int:
        return self.model.state_bytes()
