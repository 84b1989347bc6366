"""Which blocks the next decode steps will read, and the threads that bring them in early.

:class:`Predictor` combines three signals: *recency* (the recent window moves with the decode, so
the next step reads the blocks this one read at its end), *lookahead* (what the decoder can compute
of the next step's selection in advance, :meth:`lm.longdecode.LongDecoder._lookahead`),
*structure* (the attention sinks and the blocks the policy keeps selecting — definitions, headers — whose selection average
:meth:`lm.kvtiers.TieredKV.observe_selection` keeps and eviction also weights) and *selection
history* (consecutive steps select nearly the same blocks: the union of the last ``history``
steps' selections, over every layer).  Its prediction is ordered: what the next step is most
likely to read first.  The decoder submits it with ``force``: predicted blocks may evict any
unpinned block outside the prediction, lowest eviction score first.

:class:`Prefetcher` runs ``threads`` background threads.  ``submit`` hands them the newest
prediction (an older one not yet started is dropped: only the next step matters); a thread claims
device slots for the predicted blocks that are not resident (:meth:`TieredKV.prefetch_reserve`,
which evicts only blocks that score below them) and copies them outside the lock, so the
decoder computes meanwhile and blocks only on a miss or on a block still in flight.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Sequence

import numpy as np

from lm.kvtiers import TieredKV

#: Bound on joining a prefetch thread at close, seconds.
JOIN_TIMEOUT_S = 5.0


class Predictor:
    def __init__(self, *, history: int = 2, structure_top: int = 4):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.history = history
        self.structure_top = structure_top
        self._past: collections.deque[list[list[int]]] = collections.deque(maxlen=history)

    def observe(self, selections: Sequence[Sequence[int]], tiers: TieredKV) -> None:
        """Record one step's selection per layer and fold it into the tiers' structure scores."""
        self._past.append([list(s) for s in selections])
        counts = np.zeros(tiers.num_blocks)
        for sel in selections:
            counts[list(sel)] += 1
        tiers.observe_selection(counts)

    def predict(self, tiers: TieredKV, lookahead: Sequence[int] = ()) -> list[int]:
        """Blocks in priority order: ``lookahead`` (blocks known to be read next), then history
        (newest step first), then the highest structure scores."""
        out: dict[int, None] = dict.fromkeys(lookahead)
        for step in reversed(self._past):  # newest first: recency and history
            for sel in step:
                out.update(dict.fromkeys(sel))
        if tiers.num_blocks:
            top = np.argsort(-tiers.structure, kind="stable")[: self.structure_top]
            out.update(dict.fromkeys(int(b) for b in top if tiers.structure[b] > 0))
        return list(out)


class Prefetcher:
    def __init__(self, tiers: TieredKV, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.tiers = tiers
        self._queue: queue.Queue[tuple[list[int], bool] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"kv-prefetch-{i}", daemon=True)
                         for i in range(threads)]
        self.errors: list[BaseException] = []
        self._idle = threading.Condition()
        self._busy = 0
        for t in self._threads:
            t.start()

    def submit(self, blocks: Sequence[int], *, force: bool = False) -> None:
        """Prefetch ``blocks`` (in priority order), replacing any prediction not yet started;
        ``force``: evict any unpinned block for them (a stream's next chunk)."""
        try:
            while True:
                if self._queue.get_nowait() is not None:
                    self._done()
        except queue.Empty:
            pass
        with self._idle:
            self._busy += 1
        self._queue.put((list(blocks), force))

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            blocks, force = item
            try:
                claims = self.tiers.prefetch_reserve(blocks, frozenset(blocks), force=force)
                if claims:
                    self.tiers.prefetch_copy(claims)
            except BaseException as exc:  # noqa: BLE001 - kept for the owner; the decoder copies on a miss
                self.errors.append(exc)
            finally:
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Wait (bounded) until every submitted prediction is handled or dropped."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def close(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
