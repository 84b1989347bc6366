"""The decode engine: step-wise decoding over a paged KV cache, with pause / inject / rewind /
splice.  Pure Python + torch, no sockets: a service calls one method per safe point.

Sequence invariants (checked by :meth:`Engine.check_invariants`):

* ``len(seq.table) == ceil(len(seq.tokens) / block_size)`` and the KV of ``tokens[p]`` is at slot
  ``table[p // bs] * bs + p % bs``, computed with ``tokens[:p+1]`` as context;
* ``seq.logits[p]`` is the model's next-token logits after ``tokens[:p+1]``, so the next greedy
  token is always ``argmax(seq.logits[-1])`` — a step never has to re-run the context;
* a finished sequence ends with ``EOS``.

Every public method validates its arguments before it changes anything; a typed error from
:mod:`lm.errors` leaves the sequence, the block pool and the counters as they were.  Operations
that can fail part-way (splice, replace) work on a *fork* that shares the sequence's blocks
copy-on-write, and swap it in only when it is complete.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Sequence

import torch

from lm import tokenizer
from lm.errors import (
    ContextTooLongError,
    NotPausedError,
    OutOfBlocksError,
    SequenceFinishedError,
    SequencePausedError,
    SpanError,
    UnknownSequenceError,
)
from lm.kvcache import PagedKVCache
from lm.model import TinyLM, rope


class SeqState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclasses.dataclass
class _Seq:
    tokens: list[int]
    table: list[int]
    logits: list[torch.Tensor]
    state: SeqState
    generator: torch.Generator


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """A captured decode: what a pause hands to the runtime (and what a resume continues from)."""

    seq_id: int
    tokens: tuple[int, ...]
    position: int
    block_table: tuple[int, ...]
    state: str
    rng_state: bytes


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Token counters.  ``decoded``: token forwards in decode steps (greedy steps and every beam
    hypothesis' step).  ``repaired``: the part of ``decoded`` spent inside splices.
    ``prefilled``: tokens forwarded by prefill passes (start, inject, replace, suffix
    recomputation).  ``recomputed``: the part of ``prefilled`` that recomputed a kept suffix.
    ``reused``: suffix tokens whose KV was reused (approximate splices)."""

    decoded: int = 0
    prefilled: int = 0
    repaired: int = 0
    recomputed: int = 0
    reused: int = 0
    splices: int = 0


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A beam hypothesis: its new tokens, their total log-probability, whether it hit the stop."""

    tokens: tuple[int, ...]
    logprob: float
    complete: bool


@dataclasses.dataclass(frozen=True)
class SpliceResult:
    start: int
    old_span: tuple[int, ...]
    new_span: tuple[int, ...]
    suffix_len: int
    accepted: bool
    candidates: tuple[Candidate, ...]
    decoded: int
    mode: str


class Engine:
    """Decoding engine over one :class:`TinyLM` and one :class:`PagedKVCache`."""

    def __init__(
        self,
        model: TinyLM,
        *,
        num_blocks: int = 512,
        block_size: int = 16,
        max_len: int | None = None,
        intra_op_threads: int | None = 1,
    ):
        """``intra_op_threads``: if not ``None``, ``torch.set_num_threads`` (process-wide) is set
        to it.  One thread is the default because a decode step's matrices are tiny: on this
        2-core machine, shared with other processes, a step took 5.5 ms with one thread and
        110-160 ms with two (OpenMP threads spinning against each other)."""
        if intra_op_threads is not None:
            torch.set_num_threads(intra_op_threads)
        param = next(model.parameters())
        self.model = model.eval().requires_grad_(False)  # inference only
        self.cfg = model.cfg
        self.max_len = max_len if max_len is not None else self.cfg.max_len
        self.cache = PagedKVCache(
            n_layers=self.cfg.n_layers, n_heads=self.cfg.n_heads, head_dim=self.cfg.head_dim,
            num_blocks=num_blocks, block_size=block_size, dtype=param.dtype, device=param.device,
        )
        self._seqs: dict[int, _Seq] = {}
        self._ids = itertools.count(1)
        self._stats = EngineStats()

    # ------------------------------------------------------------------ public API

    @classmethod
    def load(cls, path=None, *, dtype: torch.dtype = torch.float32, **kwargs) -> Engine:
        """An engine over the shipped weights (``lm/weights/chain.pt`` unless ``path``)."""
        from lm.train import DEFAULT_WEIGHTS, load

        return cls(load(path or DEFAULT_WEIGHTS, dtype=dtype), **kwargs)

    def stats(self) -> EngineStats:
        return self._stats

    def start(self, prompt_tokens: Sequence[int], *, seed: int = 0) -> int:
        """Prefill ``prompt_tokens`` into a new sequence and return its id."""
        tokens = tokenizer.check_ids(prompt_tokens)
        if not tokens:
            raise SpanError("a prompt needs at least one token")
        self._check_len(len(tokens))
        gen = torch.Generator().manual_seed(seed)
        seq = _Seq(tokens=[], table=[], logits=[], state=SeqState.RUNNING, generator=gen)
        self._extend(seq, tokens)
        self._count(prefilled=len(tokens))
        seq_id = next(self._ids)
        self._seqs[seq_id] = seq
        if tokens[-1] == tokenizer.EOS:
            seq.state = SeqState.FINISHED
        return seq_id

    def tokens(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).tokens)

    def state(self, seq_id: int) -> SeqState:
        return self._get(seq_id).state

    def next_logits(self, seq_id: int) -> torch.Tensor:
        return self._get(seq_id).logits[-1].clone()

    def step(self, seq_id: int, *, temperature: float = 0.0) -> int:
        """Decode one token (greedy, or sampled from the sequence's RNG when ``temperature > 0``),
        append it and compute its KV.  This is the engine's safe point: between two calls the
        sequence is fully consistent and may be paused, injected into, rewound or spliced."""
        seq = self._get(seq_id)
        self._check_extendable(seq)
        self._check_len(len(seq.tokens) + 1)
        self._check_blocks(seq, len(seq.tokens) + 1)
        logits = seq.logits[-1]
        if temperature > 0:
            probs = torch.softmax(logits.double() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        else:
            token = int(torch.argmax(logits))
        self._extend(seq, [token])
        self._count(decoded=1)
        if token == tokenizer.EOS:
            seq.state = SeqState.FINISHED
        return token

    def generate(
        self, seq_id: int, max_new: int, *, stop_token: int | None = None, stop_count: int = 1
    ) -> list[int]:
        """Greedy steps until ``EOS``, ``stop_count`` occurrences of ``stop_token``, ``max_new``
        tokens or the context limit; returns the new tokens."""
        out: list[int] = []
        seen = 0
        seq = self._get(seq_id)
        while len(out) < max_new and seq.state is SeqState.RUNNING and len(seq.tokens) < self.max_len:
            tok = self.step(seq_id)
            out.append(tok)
            if stop_token is not None and tok == stop_token:
                seen += 1
                if seen >= stop_count:
                    break
        return out

    def pause(self, seq_id: int) -> DecodeState:
        """Mark a running sequence paused (steps refused until :meth:`resume`); return its state."""
        seq = self._get(seq_id)
        if seq.state is SeqState.FINISHED:
            raise SequenceFinishedError(f"sequence {seq_id} is finished; nothing to pause")
        seq.state = SeqState.PAUSED
        return self.snapshot(seq_id)

    def resume(self, seq_id: int) -> DecodeState:
        seq = self._get(seq_id)
        if seq.state is not SeqState.PAUSED:
            raise NotPausedError(f"sequence {seq_id} is {seq.state.value}, not paused")
        seq.state = SeqState.RUNNING
        return self.snapshot(seq_id)

    def snapshot(self, seq_id: int) -> DecodeState:
        seq = self._get(seq_id)
        return DecodeState(
            seq_id=seq_id, tokens=tuple(seq.tokens), position=len(seq.tokens),
            block_table=tuple(seq.table), state=seq.state.value,
            rng_state=bytes(seq.generator.get_state().numpy().tobytes()),
        )

    def inject(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` by one prefill pass over them only (the context's KV is reused).
        Allowed on running and paused sequences; a paused one stays paused."""
        seq = self._get(seq_id)
        toks = tokenizer.check_ids(tokens)
        if seq.state is SeqState.FINISHED:
            raise SequenceFinishedError(f"sequence {seq_id} is finished; cannot inject")
        if not toks:
            return
        self._check_len(len(seq.tokens) + len(toks))
        self._check_blocks(seq, len(seq.tokens) + len(toks))
        self._extend(seq, toks)
        self._count(prefilled=len(toks))
        if toks[-1] == tokenizer.EOS:
            seq.state = SeqState.FINISHED

    def rewind(self, seq_id: int, pos: int) -> None:
        """Truncate to ``tokens[:pos]`` (``1 <= pos <= len``), freeing blocks past ``pos``.  A
        finished sequence whose ``EOS`` is cut off becomes running again."""
        seq = self._get(seq_id)
        self._check_pos(seq, pos, lo=1)
        self._truncate(seq, pos)
        if seq.state is SeqState.FINISHED and seq.tokens[-1] != tokenizer.EOS:
            seq.state = SeqState.RUNNING

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all of ``seq_id``'s blocks copy-on-write."""
        child = self._fork(self._get(seq_id))
        cid = next(self._ids)
        self._seqs[cid] = child
        return cid

    def free(self, seq_id: int) -> None:
        seq = self._get(seq_id)
        self.cache.allocator.decref(seq.table)
        del self._seqs[seq_id]

    def beam(
        self, seq_id: int, width: int, max_new: int, *, stop_token: int | None = None,
        stop_count: int = 1,
    ) -> list[Candidate]:
        """Beam search from the sequence's current end; the sequence itself is not changed.
        Returns up to ``width`` candidates, best (highest log-probability) first."""
        seq = self._get(seq_id)
        self._check_beam_args(width, max_new)
        found, _ = self._beam(seq, width, max_new, stop_token, stop_count, repairing=False)
        for _, fork in found:
            self._release(fork)
        return [c for c, _ in found]

    def splice(
        self,
        seq_id: int,
        start: int,
        end: int,
        *,
        width: int = 4,
        max_new: int | None = None,
        accept: Callable[[tuple[int, ...]], bool] | None = None,
        mode: str = "exact",
        recompute: int = 4,
    ) -> SpliceResult:
        """RoI-S: re-decode ``tokens[start:end]`` with a beam of ``width`` and keep the suffix.

        The span is re-decoded from the prefix ``tokens[:start]`` until it contains as many of its
        last token (the span's stop token, e.g. ``;``) as the old span did, or ``EOS``.  The chosen
        candidate is the most probable one that ``accept`` (if given) approves, else the most
        probable.  The suffix ``tokens[end:]`` is kept.  ``mode="exact"``: the suffix KV is
        recomputed by one prefill pass, so the cache equals a from-scratch prefill of the repaired
        text (up to floating-point reassociation).  ``mode="approx"``: the suffix's old KV is reused
        with keys re-rotated to their new positions; only the first ``recompute`` suffix tokens
        and the last one are recomputed.  The sequence keeps its running/paused/finished state
        unless the repair changes whether it ends with ``EOS``.
        """
        seq = self._get(seq_id)
        self._check_span(seq, start, end)
        if mode not in ("exact", "approx"):
            raise ValueError(f"mode must be 'exact' or 'approx', got {mode!r}")
        if recompute < 0:
            raise ValueError(f"recompute must be >= 0, got {recompute}")
        old_span = tuple(seq.tokens[start:end])
        stop_token = old_span[-1]
        stop_count = old_span.count(stop_token)
        if max_new is None:
            max_new = 2 * len(old_span) + 8
        self._check_beam_args(width, max_new)
        suffix = seq.tokens[end:]

        work = self._fork(seq)
        found: list[tuple[Candidate, _Seq]] = []
        try:
            self._truncate(work, start)
            found, decoded = self._beam(work, width, max_new, stop_token, stop_count, repairing=True)
            chosen_i = 0
            accepted = accept is None
            if accept is not None:
                for i, (cand, _) in enumerate(found):
                    if accept(cand.tokens):
                        chosen_i, accepted = i, True
                        break
            cand, winner = found[chosen_i]
            new_len = start + len(cand.tokens) + len(suffix)
            self._check_len(new_len)
            self._attach_suffix(winner, seq, end, suffix, mode, recompute)
        except BaseException:
            self._release(work)
            for _, fork in found:
                self._release(fork)
            raise
        self._release(work)
        for i, (_, fork) in enumerate(found):
            if i != chosen_i:
                self._release(fork)
        self._adopt(seq, winner)
        self._count(splices=1)
        return SpliceResult(
            start=start, old_span=old_span, new_span=cand.tokens, suffix_len=len(suffix),
            accepted=accepted, candidates=tuple(c for c, _ in found), decoded=decoded, mode=mode,
        )

    def replace(self, seq_id: int, start: int, end: int, tokens: Sequence[int]) -> None:
        """Put ``tokens`` in place of ``tokens[start:end]`` (``start == end`` inserts) and
        recompute the suffix by one prefill pass over replacement plus suffix (exact mode).
        Used to force a thunk in place and to splice a tool's answer into a decode."""
        seq = self._get(seq_id)
        toks = tokenizer.check_ids(tokens)
        self._check_pos(seq, start, lo=1)
        self._check_pos(seq, end, lo=start)
        suffix = seq.tokens[end:]
        self._check_len(start + len(toks) + len(suffix))
        work = self._fork(seq)
        try:
            self._truncate(work, start)
            self._check_blocks(work, start + len(toks) + len(suffix))
            self._extend(work, toks + suffix)
        except BaseException:
            self._release(work)
            raise
        self._count(prefilled=len(toks) + len(suffix), recomputed=len(suffix))
        self._adopt(seq, work)

    def kv(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, len, H, D]`` of the sequence, read through its block table."""
        seq = self._get(seq_id)
        return self.cache.gather(seq.table, len(seq.tokens))

    def logits_history(self, seq_id: int) -> torch.Tensor:
        """``[len, V]``: row ``p`` is the next-token logits after ``tokens[:p+1]``."""
        return torch.stack(self._get(seq_id).logits)

    def check_invariants(self) -> None:
        """Raise unless every block is owned exactly as the live block tables say."""
        for sid, seq in self._seqs.items():
            n = len(seq.tokens)
            if len(seq.table) != self.cache.blocks_for(n) or len(seq.logits) != n:
                raise AssertionError(f"sequence {sid}: table/logits do not match {n} tokens")
        self.cache.allocator.check(seq.table for seq in self._seqs.values())

    @property
    def live_sequences(self) -> list[int]:
        return list(self._seqs)

    # ------------------------------------------------------------------ internals

    def _get(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"no live sequence {seq_id!r}") from None

    def _count(self, **delta: int) -> None:
        self._stats = dataclasses.replace(
            self._stats, **{k: getattr(self._stats, k) + v for k, v in delta.items()}
        )

    def _check_len(self, n: int) -> None:
        if n > self.max_len:
            raise ContextTooLongError(f"{n} tokens exceed the context limit {self.max_len}")

    def _check_pos(self, seq: _Seq, pos: int, *, lo: int) -> None:
        if not isinstance(pos, int) or isinstance(pos, bool) or not lo <= pos <= len(seq.tokens):
            raise SpanError(f"position {pos!r} outside [{lo}, {len(seq.tokens)}]")

    def _check_span(self, seq: _Seq, start: int, end: int) -> None:
        for x in (start, end):
            if not isinstance(x, int) or isinstance(x, bool):
                raise SpanError(f"span bounds must be ints, got {start!r}, {end!r}")
        if not 1 <= start < end <= len(seq.tokens):
            raise SpanError(
                f"span [{start}, {end}) is not a non-empty span inside [1, {len(seq.tokens)}]"
            )

    def _check_extendable(self, seq: _Seq) -> None:
        if seq.state is SeqState.PAUSED:
            raise SequencePausedError("the sequence is paused; resume it first")
        if seq.state is SeqState.FINISHED:
            raise SequenceFinishedError("the sequence is finished")

    def _check_beam_args(self, width: int, max_new: int) -> None:
        if width < 1 or max_new < 1:
            raise ValueError(f"width and max_new must be >= 1, got {width}, {max_new}")

    def _blocks_needed(self, seq: _Seq, new_len: int) -> int:
        """Fresh blocks a growth to ``new_len`` tokens takes, counting a copy-on-write."""
        bs = self.cache.block_size
        need = self.cache.blocks_for(new_len) - len(seq.table)
        n = len(seq.tokens)
        if new_len > n and n % bs and self.cache.allocator.refcount(seq.table[-1]) > 1:
            need += 1
        return need

    def _check_blocks(self, seq: _Seq, new_len: int) -> None:
        need = self._blocks_needed(seq, new_len)
        if need > self.cache.allocator.num_free:
            raise OutOfBlocksError(f"need {need} KV blocks, {self.cache.allocator.num_free} free")

    def _grow(self, seq: _Seq, new_len: int) -> None:
        """Make ``seq.table`` cover ``new_len`` tokens; copy a shared partial last block first."""
        alloc = self.cache.allocator
        self._check_blocks(seq, new_len)
        n = len(seq.tokens)
        if new_len > n and n % self.cache.block_size and alloc.refcount(seq.table[-1]) > 1:
            (fresh,) = alloc.allocate(1)
            self.cache.copy_blocks({seq.table[-1]: fresh})
            alloc.decref([seq.table[-1]])
            seq.table[-1] = fresh
        seq.table.extend(alloc.allocate(self.cache.blocks_for(new_len) - len(seq.table)))

    def _extend(self, seq: _Seq, toks: list[int]) -> None:
        """Prefill ``toks`` after the sequence's end (one forward pass; none for no tokens)."""
        if toks:
            self._forward([seq], [toks])

    def _forward(self, seqs: list[_Seq], new: list[list[int]]) -> None:
        """One forward pass appending ``new[i]`` (all the same length) to ``seqs[i]``."""
        T = len(new[0])
        need = sum(self._blocks_needed(s, len(s.tokens) + T) for s in seqs)  # an upper bound
        if need > self.cache.allocator.num_free:
            raise OutOfBlocksError(f"need {need} KV blocks, {self.cache.allocator.num_free} free")
        for seq in seqs:
            self._grow(seq, len(seq.tokens) + T)
        dev = self.cache.k.device
        starts = [len(s.tokens) for s in seqs]
        pos = torch.tensor([[p + t for t in range(T)] for p in starts], dtype=torch.long, device=dev)
        write = torch.tensor(
            [self.cache.slots(s.table, range(p, p + T)) for s, p in zip(seqs, starts)],
            dtype=torch.long, device=dev,
        )
        S = max(starts) + T
        read = torch.tensor(
            [self.cache.slots(s.table, range(p + T)) + [0] * (S - p - T) for s, p in zip(seqs, starts)],
            dtype=torch.long, device=dev,
        )
        idx = torch.tensor(new, dtype=torch.long, device=dev)
        logits = self.model.forward_paged(idx, pos, write, read, self.cache.k, self.cache.v)
        for b, (seq, toks) in enumerate(zip(seqs, new)):
            seq.tokens.extend(toks)
            seq.logits.extend(logits[b].unbind(0))

    def _truncate(self, seq: _Seq, pos: int) -> None:
        keep = self.cache.blocks_for(pos)
        self.cache.allocator.decref(seq.table[keep:])
        del seq.table[keep:], seq.tokens[pos:], seq.logits[pos:]

    def _fork(self, seq: _Seq) -> _Seq:
        self.cache.allocator.incref(seq.table)
        gen = torch.Generator().set_state(seq.generator.get_state())
        return _Seq(list(seq.tokens), list(seq.table), list(seq.logits), seq.state, gen)

    def _release(self, seq: _Seq) -> None:
        self.cache.allocator.decref(seq.table)
        seq.table = []

    def _adopt(self, seq: _Seq, new: _Seq) -> None:
        """Make ``seq`` (a live sequence object) take over ``new``'s tokens and blocks."""
        self.cache.allocator.decref(seq.table)
        seq.tokens, seq.table, seq.logits = new.tokens, new.table, new.logits
        new.table = []
        ends = bool(seq.tokens) and seq.tokens[-1] == tokenizer.EOS
        if ends:
            seq.state = SeqState.FINISHED
        elif seq.state is SeqState.FINISHED:
            seq.state = SeqState.RUNNING

    def _beam(
        self, root: _Seq, width: int, max_new: int, stop_token: int | None, stop_count: int,
        *, repairing: bool,
    ) -> tuple[list[tuple[Candidate, _Seq]], int]:
        """Beam search from ``root``'s end on forks of it; returns ((candidate, fork) best first,
        token forwards spent).  The caller owns (and must release) every returned fork."""
        done: list[tuple[Candidate, _Seq]] = []
        base = len(root.tokens)
        active: list[tuple[float, _Seq, int]] = [(0.0, self._fork(root), 0)]  # (logprob, seq, stops)
        decoded = 0
        try:
            for _ in range(max_new):
                room = width - len(done)
                if room <= 0 or not active or len(active[0][1].tokens) >= self.max_len:
                    break
                scores = torch.stack(
                    [lp + torch.log_softmax(s.logits[-1].double(), -1) for lp, s, _ in active]
                )
                top = torch.topk(scores.flatten(), min(room, scores.numel()))
                V = scores.shape[1]
                picks = [(float(v), int(i) // V, int(i) % V) for v, i in zip(top.values, top.indices)]
                uses = [sum(1 for _, p, _ in picks if p == a) for a in range(len(active))]
                children: list[tuple[float, _Seq, int, int]] = []
                for lp, parent_i, tok in picks:
                    _, parent, stops = active[parent_i]
                    uses[parent_i] -= 1
                    child = parent if uses[parent_i] == 0 else self._fork(parent)
                    children.append((lp, child, stops + (tok == stop_token), tok))
                for i, (_, parent, _) in enumerate(active):
                    if not any(c is parent for _, c, _, _ in children):
                        self._release(parent)
                active = [(lp, child, stops) for lp, child, stops, _ in children]  # owned
                self._forward([c for _, c, _, _ in children], [[t] for *_, t in children])
                decoded += len(children)
                active = []
                for lp, child, stops, tok in children:
                    cand_done = tok == tokenizer.EOS or (stop_token is not None and stops >= stop_count)
                    if cand_done:
                        done.append((Candidate(tuple(child.tokens[base:]), lp, True), child))
                    else:
                        active.append((lp, child, stops))
            for lp, s, _ in active:
                done.append((Candidate(tuple(s.tokens[base:]), lp, False), s))
            active = []
        except BaseException:
            for _, s, _ in active:
                self._release(s)
            for _, s in done:
                self._release(s)
            raise
        finally:
            self._count(decoded=decoded, **({"repaired": decoded} if repairing else {}))
        done.sort(key=lambda cs: (not cs[0].complete, -cs[0].logprob))
        return done, decoded

    def _attach_suffix(
        self, winner: _Seq, old: _Seq, end: int, suffix: list[int], mode: str, recompute: int
    ) -> None:
        """Append ``suffix`` (which followed ``old.tokens[:end]``) to ``winner``."""
        if not suffix:
            return
        new_end = len(winner.tokens)
        self._check_blocks(winner, new_end + len(suffix))
        if mode == "exact" or len(suffix) <= recompute + 1:
            self._extend(winner, suffix)
            self._count(prefilled=len(suffix), recomputed=len(suffix))
            return
        # approx: exact KV for suffix[:recompute]; reused, re-rotated KV for the middle;
        # the last token recomputed so that the next-token logits see the repaired context.
        head, middle, last = suffix[:recompute], suffix[recompute:-1], suffix[-1:]
        if head:
            self._extend(winner, head)
        old_pos = list(range(end + len(head), end + len(head) + len(middle)))
        at = len(winner.tokens)
        self._grow(winner, at + len(middle))
        src = torch.tensor(self.cache.slots(old.table, old_pos), dtype=torch.long)
        dst = torch.tensor(self.cache.slots(winner.table, range(at, at + len(middle))), dtype=torch.long)
        delta = torch.full((len(middle),), at - old_pos[0], dtype=torch.long)
        kc, vc = self.cache.k, self.cache.v
        (sb, so), (db, do) = self.cache.split(src), self.cache.split(dst)
        k_old = kc[:, sb, so]  # [L, n, H, D]
        kc[:, db, do] = rope(k_old, delta, self.cfg.rope_base)
        vc[:, db, do] = vc[:, sb, so]
        winner.tokens.extend(middle)
        old_logits = old.logits[end + len(head) : end + len(head) + len(middle)]
        winner.logits.extend(old_logits)  # stale: only the last row is used for decoding
        self._extend(winner, last)
        self._count(prefilled=len(head) + 1, recomputed=len(head) + 1, reused=len(middle))
