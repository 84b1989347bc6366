"""Decoding the long-context model over tiered KV blocks with an explicit attention policy.

:class:`LongDecoder` owns one sequence: its prefill is the model's dense causal pass (keys and
values go to the tiers at once); each decode step runs the model layer by layer
(:meth:`lm.longmodel.LongLM.qkv` / ``finish``), writes the token's key and value to the tiers,
asks the policy which blocks to read, and attends to them chunk by chunk through the device
arena (:func:`lm.kvpolicy.attend`).  After the step the predictor sees the selections and the
prefetcher starts bringing in what the next step will read: layer 0's exact selection for the
greedy next token (its query depends only on that token and position), then the recent
selections of every layer and the blocks of highest structure score.

Outputs depend on the policy only: the same policy with every block resident and with a small
arena, a host pool and a disk tier gives the same logits bit for bit (tests/test_kvtp.py).

Precision control (POPB) swaps ``decoder.model`` for a copy on the plan's dequantised weights
(:meth:`lm.popb.PrecisionPlan.apply`, done by :class:`lm.longsession.LongSessions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from lm import varref
from lm.errors import ContextTooLongError, SpanError
from lm.kvpolicy import FullAttention, Policy, attend
from lm.kvpredict import Predictor, Prefetcher
from lm.kvtiers import BudgetTooSmallError, TieredKV
from lm.longmodel import LongLM

#: Longest context a decoder accepts (tokens); beyond it, ContextTooLongError.
MAX_CONTEXT = 1 << 20
#: Prefetch throttling: steps per accuracy window, prefetched blocks a window must see used, and
#: windows without prediction after a window that fell short.
THROTTLE_WINDOW = 32
THROTTLE_MIN_USED = 2
THROTTLE_OFF = 8


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """Sizes of the tiers (blocks) and the prefetch set-up of one decoder."""

    device_blocks: int
    host_blocks: int
    disk_blocks: int = 0
    block_size: int = 64
    prefetch: bool = True
    prefetch_threads: int = 1
    structure_weight: float = 64.0

    @classmethod
    def resident(cls, n_tokens: int, block_size: int = 64) -> TierSpec:
        """Every block of an ``n_tokens`` context on the device (``n_tokens`` counts the decode)."""
        n = -(-n_tokens // block_size)
        return cls(device_blocks=n, host_blocks=n, block_size=block_size, prefetch=False)


class LongDecoder:
    def __init__(self, model: LongLM, policy: Policy, spec: TierSpec, *, disk_dir=None):
        if spec.device_blocks < policy.working_set():
            raise BudgetTooSmallError(
                f"policy {policy.name} reads {policy.working_set()} blocks at once; "
                f"a device arena of {spec.device_blocks} blocks cannot hold one step's working set")
        cfg = model.cfg
        self.model, self.policy, self.spec = model, policy, spec
        self.tiers = TieredKV(n_layers=cfg.n_layers, n_heads=cfg.n_heads, head_dim=cfg.head_dim,
                              block_size=spec.block_size, device_blocks=spec.device_blocks,
                              host_blocks=spec.host_blocks, disk_blocks=spec.disk_blocks,
                              disk_dir=disk_dir, structure_weight=spec.structure_weight)
        self.predictor = Predictor()
        self.prefetcher = Prefetcher(self.tiers, spec.prefetch_threads) if spec.prefetch else None
        self.tokens: list[int] = []
        self.logits: torch.Tensor | None = None
        #: Seconds each decode step stalled on block moves.
        self.stalls: list[float] = []
        self.selections: list[list[list[int]]] = []
        self.keep_selections = False
        self._pf_resume = 0
        self._pf_used = 0
        #: Steps the throttle kept the predictor off.
        self.throttled_steps = 0

    # ------------------------------------------------------------------ prefill

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        tokens = varref.check_ids(tokens)
        if not tokens:
            raise SpanError("a prompt needs at least one token")
        if len(tokens) > MAX_CONTEXT:
            raise ContextTooLongError(f"{len(tokens)} tokens > {MAX_CONTEXT}")
        self.policy.check_context(len(tokens))
        with torch.no_grad():
            logits, keys, vals = self.model(torch.tensor([tokens]), return_kv=True)
        self.load(tokens, keys.numpy(), vals.numpy(), logits[0, -1])
        return self.logits

    def load(self, tokens: Sequence[int], keys: np.ndarray, vals: np.ndarray, last_logits: torch.Tensor) -> None:
        """Take a prefill computed elsewhere (the bench computes one and decodes it many ways)."""
        if self.tokens:
            raise SpanError("this decoder already holds a sequence")
        self.policy.check_context(len(tokens))
        self.tiers.load(keys, vals)
        self.tokens = list(tokens)
        self.logits = last_logits.clone()
        if self.prefetcher is not None:  # the sinks and the recent window come first
            n = self.tiers.num_blocks
            self.prefetcher.submit(sorted({0, *range(max(0, n - 2), n)}))

    # ------------------------------------------------------------------ decode

    def step(self, token: int | None = None) -> int:
        """Feed ``token`` (default: the greedy next token) and return it; the logits of its
        successor are in ``self.logits``."""
        if self.logits is None:
            raise SpanError("prefill first")
        if token is None:
            token = int(torch.argmax(self.logits))
        token = varref.check_ids([token])[0]
        if len(self.tokens) + 1 > MAX_CONTEXT:
            raise ContextTooLongError(f"context would exceed {MAX_CONTEXT} tokens")
        model, tiers = self.model, self.tiers
        pos = torch.tensor([len(self.tokens)])
        stall = 0.0
        chosen: list[list[int]] = []
        with torch.no_grad():
            x = model.embed(torch.tensor([token]), torch.tensor([self.tokens[-1]]))
            for layer in range(model.cfg.n_layers):
                q, k, v = self.model.qkv(layer, x, pos)
                tiers.append(layer, k[0].numpy(), v[0].numpy())
                blocks = self.policy.select(layer, q[0].numpy(), tiers)
                chosen.append(blocks)
                hook = self._stream_hook(blocks) if isinstance(self.policy, FullAttention) else None
                attn, s = attend(q[0], blocks, tiers, layer, self.policy.chunk_blocks, on_chunk=hook,
                                 keep=self.policy.keep(blocks, tiers))
                stall += s + self.policy.select_stall
                x = self.model.finish(layer, x, attn[None])
            self.logits = self.model.head(x)[0]
        self.tokens.append(token)
        self.stalls.append(stall)
        if self.keep_selections:
            self.selections.append(chosen)
        self.predictor.observe(chosen, tiers)
        if self.prefetcher is not None and self.policy.predictable and self._prefetch_pays():
            self.prefetcher.submit(self.predictor.predict(tiers, self._lookahead()), force=True)
        return token

    def _prefetch_pays(self) -> bool:
        """Accuracy-based throttling (as hardware prefetchers do): every :data:`THROTTLE_WINDOW`
        steps, if the prefetches of the last window were used fewer than
        :data:`THROTTLE_MIN_USED` times, predict nothing for the next ``THROTTLE_OFF`` windows
        (the lookahead costs a layer-0 pass per step), then try again."""
        n = len(self.stalls)
        if n < self._pf_resume:
            return False
        if n % THROTTLE_WINDOW == 0:
            used = self.tiers.stats.prefetch_used
            if n > 0 and used - self._pf_used < THROTTLE_MIN_USED:
                self._pf_resume = n + THROTTLE_OFF * THROTTLE_WINDOW
                self.throttled_steps += THROTTLE_OFF * THROTTLE_WINDOW
                self._pf_used = used
                return False
            self._pf_used = used
        return True

    def _lookahead(self) -> list[int]:
        """Layer 0's exact selection for the likely next token (the greedy one): its query depends
        only on that token and its position, so it is known before the next step starts."""
        guess = torch.argmax(self.logits).reshape(1)
        with torch.no_grad():
            x = self.model.embed(guess, torch.tensor([self.tokens[-1]]))
            q, _, _ = self.model.qkv(0, x, torch.tensor([len(self.tokens)]))
        return self.policy.select(0, q[0].numpy(), self.tiers)

    def _stream_hook(self, blocks: list[int]):
        """Full attention streamed: while chunk i is computed, chunk i + 1 is brought in."""
        if self.prefetcher is None:
            return None
        c = self.policy.chunk_blocks

        def on_chunk(i: int) -> None:
            nxt = blocks[(i + 1) * c:(i + 2) * c]
            if nxt:
                self.prefetcher.submit(nxt, force=True)
        return on_chunk

    def feed(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.step(t)

    def generate(self, n: int) -> list[int]:
        return [self.step() for _ in range(n)]

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.tiers.close()

    def __enter__(self) -> LongDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def answer_tokens(decoder: LongDecoder, query: Sequence[int]) -> list[int]:
    """The model's answer to ``query`` (``?k=``): its four digits and ``;``, all fed back."""
    decoder.feed(query)
    return decoder.generate(varref.ANSWER_LEN)
