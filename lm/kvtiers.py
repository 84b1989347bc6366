"""KV-cache tiers: a bounded device arena, a host pool and a disk tier, moved by ``accel.kv``.

One sequence's keys and values are cut into *logical blocks* of ``block_size`` tokens (block
``i`` holds positions ``[i * bs, (i + 1) * bs)``, every layer, K and V: the layout of
``accel.kv``, block-major ``[n, L, 2, bs, H, D]``).  Each logical block has exactly one *master* copy, in
the host pool or on disk, and at most one *device* copy in the arena:

* **device arena** — ``device_blocks`` slots, the only place attention reads from.  Its size is
  the ``kv_blocks`` a job holds through the kernel's gate; on a GPU it is HBM, here an array of
  that many blocks.  Device copies are clean (every write goes to the master as well), so an
  eviction is free: it forgets the copy.
* **host pool** — ``host_blocks`` slots of ordinary memory.
* **disk** — ``disk_blocks`` slots of a ``numpy.memmap`` file; the coldest host blocks are
  demoted there when the host pool is full.  A disk tier that would overflow raises
  :class:`DiskTierFullError` before anything changes.

Moves: host or disk -> device with :func:`accel.kv.swap_in` (one call per source tier per
request: gather, one transfer, scatter on a GPU), host -> disk with :func:`accel.kv.copy_between`.

Residency is decided under one lock; copies run outside it, so a prefetch thread
(:class:`lm.kvpredict.Prefetcher`) can move blocks while the decoder computes.  A slot being
filled is *in flight*: the decoder waits for it (a stall) instead of copying it twice.  The
decoder *pins* the blocks a layer attends to for the duration of that layer; pinned and
in-flight slots are never evicted.

Eviction is LRU weighted by structure: the victim is the unpinned resident block with the
smallest ``last_use + structure_weight * structure[b]``, where ``structure`` is an exponential
average of how often the policy selected the block (definition blocks, attention sinks) that
:meth:`TieredKV.observe_selection` keeps; ``structure_weight = 0`` is plain LRU.

Invariants (checked by :meth:`TieredKV.check`): every logical block below ``num_blocks`` has one
master slot and no master slot is named twice; ``_dev_of[b] == s`` iff ``_dev_owner[s] == b``;
a pinned block is resident; the summaries of block ``b`` are the element-wise min / max of its
written keys.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

from accel import kv as accel_kv
from lm.errors import LMError

HOST, DISK = 0, 1
#: Weight of the selection frequency in the eviction score (in decode steps).
STRUCTURE_WEIGHT = 64.0
#: Decay of the per-block selection average per observed step.
STRUCTURE_DECAY = 0.9
#: Bound on a wait for an in-flight block, seconds (a copy is microseconds; a longer wait is a
#: dead prefetch thread, raised as a TierError rather than a hang).
INFLIGHT_WAIT_S = 10.0


class TierError(LMError):
    """Base of the tiering errors."""


class BudgetTooSmallError(TierError, ValueError):
    """The device arena cannot hold one step's working set (refused up front, never thrashed)."""


class DiskTierFullError(TierError, MemoryError):
    """The host pool and the disk tier are both full; nothing was written."""


class FreedBlockError(TierError, LookupError):
    """A block table or request names a block that is freed or was never written."""


@dataclasses.dataclass
class TierStats:
    """Counters: ``hits`` / ``misses`` of the decoder's requests (a miss is copied synchronously),
    ``waits`` (requests that found the block in flight), ``prefetched`` (blocks a prefetch
    copied), ``prefetch_used`` (of those, requested before eviction), ``evictions``,
    ``demotions`` (host -> disk), bytes moved per direction, ``stall_s`` (decoder time spent
    copying or waiting)."""

    hits: int = 0
    misses: int = 0
    waits: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0
    demotions: int = 0
    bytes_host_to_device: int = 0
    bytes_disk_to_device: int = 0
    bytes_host_to_disk: int = 0
    stall_s: float = 0.0


class TieredKV:
    """The tiers of one sequence's KV cache (see the module docstring)."""

    def __init__(self, *, n_layers: int, n_heads: int, head_dim: int, block_size: int,
                 device_blocks: int, host_blocks: int, disk_blocks: int = 0,
                 disk_dir: str | os.PathLike | None = None, structure_weight: float = STRUCTURE_WEIGHT,
                 dtype: np.dtype = np.float32):
        for name, value in (("block_size", block_size), ("device_blocks", device_blocks), ("host_blocks", host_blocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(disk_blocks, int) or disk_blocks < 0:
            raise ValueError(f"disk_blocks must be a non-negative integer, got {disk_blocks!r}")
        self.block_size = block_size
        self.geometry = (n_layers, n_heads, head_dim)
        shape = lambda n: (n, n_layers, 2, block_size, n_heads, head_dim)  # noqa: E731  (block-major, accel.kv)
        self.device = np.zeros(shape(device_blocks), dtype)
        self.host = np.zeros(shape(host_blocks), dtype)
        self._disk_file = None
        if disk_blocks:
            fd, path = tempfile.mkstemp(prefix="reca-kv-", suffix=".bin", dir=disk_dir)
            os.close(fd)
            self._disk_file = path
            self.disk = np.memmap(path, dtype=dtype, mode="w+", shape=shape(disk_blocks))
        else:
            self.disk = None
        self.structure_weight = structure_weight
        self.block_bytes = int(np.prod(shape(1))) * np.dtype(dtype).itemsize
        self.lock = threading.Lock()
        self._ready = threading.Condition(self.lock)
        # Invariant: _master[b] = (tier, slot) for every written logical block b < num_blocks.
        self._master: list[tuple[int, int]] = []
        self._free = {HOST: list(range(host_blocks - 1, -1, -1)), DISK: list(range(disk_blocks - 1, -1, -1))}
        self._dev_of: dict[int, int] = {}  # logical block -> device slot (resident or in flight)
        self._dev_owner = [-1] * device_blocks  # device slot -> logical block, -1 free
        self._inflight: set[int] = set()  # logical blocks whose device copy is being made
        self._prefetched: set[int] = set()  # resident by prefetch, not requested since
        self._pins: dict[int, int] = {}
        self._last_use: dict[int, int] = {}
        self._host_use: dict[int, int] = {}  # logical block -> last step its master was read
        self.structure = np.zeros(0, np.float64)
        self.tick = 0
        self.n_tokens = 0
        self.kmin = np.zeros((n_layers, 0, n_heads, head_dim), dtype)
        self.kmax = np.zeros((n_layers, 0, n_heads, head_dim), dtype)
        self.stats = TierStats()
        self.closed = False

    # ------------------------------------------------------------------ properties

    @property
    def device_blocks(self) -> int:
        return self.device.shape[0]

    @property
    def num_blocks(self) -> int:
        return len(self._master)

    def device_bytes(self) -> int:
        """Bytes the device holds for this sequence: the arena plus the block summaries."""
        return int(self.device.nbytes + 2 * self.kmin[:, : self.num_blocks].nbytes)

    def resident(self) -> set[int]:
        with self.lock:
            return {b for b in self._dev_of if b not in self._inflight}

    def tier_of(self, block: int) -> str:
        self._check_block(block)
        return ("host", "disk")[self._master[block][0]]

    # ------------------------------------------------------------------ writes

    def load(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append many tokens at once (a prefill): ``keys``/``values`` ``[L, T, H, D]``."""
        keys, values = np.asarray(keys), np.asarray(values)
        L, T = keys.shape[:2]
        if keys.shape != values.shape or (L, *keys.shape[2:]) != (self.geometry[0], *self.geometry[1:]):
            raise ValueError(f"keys/values must be [L, T, H, D] = [{self.geometry[0]}, T, {self.geometry[1]}, {self.geometry[2]}]")
        pos = 0
        while pos < T:
            n = min(T - pos, self.block_size - self.n_tokens % self.block_size)
            self._write(keys[:, pos:pos + n], values[:, pos:pos + n])
            pos += n

    def append(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Write one layer's key and value ``[H, D]`` of the token at position ``n_tokens``.
        Layer 0 opens the position (and a new block at a block boundary); the other layers
        write into it."""
        if layer == 0:
            self._open_position()
        self._write_layer(layer, self.n_tokens - 1, key, value)

    def _open_position(self) -> None:
        if self.n_tokens % self.block_size == 0:
            self._new_block()
        self.n_tokens += 1

    def _write(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Keys/values ``[L, n, H, D]`` of positions that all fall in one block."""
        n = keys.shape[1]
        if self.n_tokens % self.block_size == 0:
            self._new_block()
        start = self.n_tokens
        self.n_tokens += n
        b, off = divmod(start, self.block_size)
        tier, slot = self._master[b]
        pool = self.host if tier == HOST else self.disk
        pool[slot, :, 0, off:off + n] = keys
        pool[slot, :, 1, off:off + n] = values
        with self.lock:
            ds = self._dev_of.get(b)
            if ds is not None and b not in self._inflight:
                self.device[ds, :, 0, off:off + n] = keys
                self.device[ds, :, 1, off:off + n] = values
        kmin, kmax = keys.min(axis=1), keys.max(axis=1)
        if off == 0:
            self.kmin[:, b], self.kmax[:, b] = kmin, kmax
        else:
            np.minimum(self.kmin[:, b], kmin, out=self.kmin[:, b])
            np.maximum(self.kmax[:, b], kmax, out=self.kmax[:, b])

    def _write_layer(self, layer: int, pos: int, key: np.ndarray, value: np.ndarray) -> None:
        b, off = divmod(pos, self.block_size)
        tier, slot = self._master[b]
        pool = self.host if tier == HOST else self.disk
        pool[slot, layer, 0, off] = key
        pool[slot, layer, 1, off] = value
        with self.lock:
            ds = self._dev_of.get(b)
            if ds is not None and b not in self._inflight:
                self.device[ds, layer, 0, off] = key
                self.device[ds, layer, 1, off] = value
        if off == 0:
            self.kmin[layer, b], self.kmax[layer, b] = key, key
        else:
            np.minimum(self.kmin[layer, b], key, out=self.kmin[layer, b])
            np.maximum(self.kmax[layer, b], key, out=self.kmax[layer, b])

    def _new_block(self) -> None:
        """A master slot for the next logical block (demoting the coldest host block to disk
        when the host pool is full); DiskTierFullError, changing nothing, when both are full.
        The new block also gets a device slot if one can be had without a copy."""
        with self.lock:
            if not self._free[HOST]:
                victim = self._host_victim()
                if victim is None or not self._free[DISK]:
                    raise DiskTierFullError(
                        f"KV tiers full: {self.host.shape[0]} host and "
                        f"{0 if self.disk is None else self.disk.shape[0]} disk blocks hold "
                        f"{self.num_blocks} blocks; block {self.num_blocks} does not fit")
                self._demote(victim)
            b = len(self._master)
            self._master.append((HOST, self._free[HOST].pop()))
            self._host_use[b] = self.tick
            self.structure = np.append(self.structure, 0.0)
            if b >= self.kmin.shape[1]:
                grow = max(16, self.kmin.shape[1])
                pad = np.zeros((self.kmin.shape[0], grow, *self.kmin.shape[2:]), self.kmin.dtype)
                self.kmin = np.concatenate([self.kmin, pad], axis=1)
                self.kmax = np.concatenate([self.kmax, pad.copy()], axis=1)
            slot = self._free_device_slot(frozenset())
            if slot is not None:  # write-allocate: the new block is written on the device too
                self._dev_of[b] = slot
                self._dev_owner[slot] = b
                self._last_use[b] = self.tick

    def _host_victim(self) -> int | None:
        """The host-mastered block to demote: the least recently read, not the newest block."""
        newest = len(self._master) - 1
        cands = [b for b, (t, _) in enumerate(self._master) if t == HOST and b != newest]
        if not cands:
            return None
        return min(cands, key=lambda b: (self._host_use.get(b, -1) + self.structure_weight * self.structure[b], b))

    def _demote(self, block: int) -> None:
        """Move ``block``'s master host -> disk (under the lock; the copy is short)."""
        _, hs = self._master[block]
        ds = self._free[DISK].pop()
        accel_kv.copy_between(self.host, self.disk, [hs], [ds], backend="reference")
        self._master[block] = (DISK, ds)
        self._free[HOST].append(hs)
        self.stats.demotions += 1
        self.stats.bytes_host_to_disk += self.block_bytes

    # ------------------------------------------------------------------ residency

    def slots(self, blocks: Sequence[int]) -> list[int]:
        """Device slots of resident ``blocks`` (call between :meth:`acquire` and :meth:`release`)."""
        with self.lock:
            return [self._dev_of[b] for b in blocks]

    def acquire(self, blocks: Sequence[int]) -> float:
        """Make ``blocks`` resident and pin them; returns the seconds the caller stalled.

        Hits cost nothing; blocks in flight (a prefetch) are waited for; misses are evicted for
        and copied now, one ``swap_in`` per source tier.  Raises :class:`BudgetTooSmallError`
        if more blocks are asked for than the arena has, :class:`FreedBlockError` for a block
        that does not exist; in both cases nothing changes.
        """
        blocks = list(blocks)
        for b in blocks:
            self._check_block(b)
        blocks = list(dict.fromkeys(int(b) for b in blocks))
        if len(blocks) > self.device_blocks:
            raise BudgetTooSmallError(
                f"one step needs {len(blocks)} KV blocks at once; the device arena holds {self.device_blocks}")
        t0 = time.perf_counter()
        stalled = False
        want = set(blocks)
        with self.lock:
            self.tick += 1
            if all(b in self._dev_of and b not in self._inflight for b in blocks):  # all hits
                for b in blocks:
                    self._pins[b] = self._pins.get(b, 0) + 1
                    self._touch(b)
                self.stats.hits += len(blocks)
                return 0.0
            deadline = time.monotonic() + INFLIGHT_WAIT_S
            while any(b in self._inflight for b in blocks):
                stalled = True
                self.stats.waits += sum(b in self._inflight for b in blocks)
                if not self._ready.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TierError("a prefetch copy did not finish within INFLIGHT_WAIT_S")
            while True:
                missing = [b for b in blocks if b not in self._dev_of]
                free = sum(o < 0 for o in self._dev_owner)
                evictable = sum(1 for b in self._dev_of
                                if b not in self._pins and b not in self._inflight and b not in want)
                if len(missing) <= free + evictable:
                    break
                if not self._inflight:  # only pins stand in the way: waiting cannot help
                    raise BudgetTooSmallError(
                        f"{len(missing)} KV blocks to bring in, {free} free and {evictable} evictable "
                        f"device slots of {self.device_blocks} ({len(self._pins)} pinned)")
                stalled = True  # prefetches hold the slots: they become evictable when done
                if not self._ready.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TierError("a prefetch copy did not finish within INFLIGHT_WAIT_S")
            for b in blocks:  # pin what is here first, so that no miss evicts it
                if b in self._dev_of:
                    self._pins[b] = self._pins.get(b, 0) + 1
            moves: dict[int, tuple[list[int], list[int]]] = {HOST: ([], []), DISK: ([], [])}
            for b in missing:
                slot = self._free_device_slot(want)
                assert slot is not None, "counted above"
                self._dev_of[b] = slot
                self._dev_owner[slot] = b
                self._pins[b] = self._pins.get(b, 0) + 1
                tier, ms = self._master[b]
                moves[tier][0].append(ms)
                moves[tier][1].append(slot)
            # copies under the lock: a miss is the decoder's own, nothing else may touch it
            if moves[HOST][0]:
                accel_kv.swap_in(self.host, self.device, moves[HOST][0], moves[HOST][1], backend="reference")
                self.stats.bytes_host_to_device += len(moves[HOST][0]) * self.block_bytes
            if moves[DISK][0]:
                accel_kv.swap_in(self.disk, self.device, moves[DISK][0], moves[DISK][1], backend="reference")
                self.stats.bytes_disk_to_device += len(moves[DISK][0]) * self.block_bytes
            self.stats.misses += len(missing)
            self.stats.hits += len(blocks) - len(missing)
            for b in blocks:
                self._touch(b)
        stall = time.perf_counter() - t0 if (missing or stalled) else 0.0
        self.stats.stall_s += stall
        return stall

    def _touch(self, b: int) -> None:
        self._last_use[b] = self.tick
        self._host_use[b] = self.tick
        if b in self._prefetched:
            self._prefetched.discard(b)
            self.stats.prefetch_used += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Unpin blocks :meth:`acquire` pinned."""
        with self.lock:
            self._unpin(blocks)

    def _unpin(self, blocks: Iterable[int]) -> None:
        for b in dict.fromkeys(blocks):
            n = self._pins.get(b, 0) - 1
            if n <= 0:
                self._pins.pop(b, None)
            else:
                self._pins[b] = n

    def prefetch_reserve(self, blocks: Sequence[int], protect: frozenset[int], *,
                         force: bool = False) -> list[tuple[int, int, int, int]]:
        """Claim device slots for ``blocks`` that are neither resident nor in flight, evicting only
        blocks outside ``protect`` whose eviction score is below the claimed block's (any
        unpinned one with ``force``: a stream knows the next chunk is read next).  Returns
        ``(block, tier, master slot, device slot)`` to copy with :meth:`prefetch_copy`."""
        out = []
        with self.lock:
            tail = len(self._master) - 1  # the block being written is never prefetched
            for b in blocks:
                if b in self._dev_of or not 0 <= b < tail:
                    continue
                slot = self._free_device_slot(protect, better_than=None if force else self._score(b))
                if slot is None:
                    break
                self._dev_of[b] = slot
                self._dev_owner[slot] = b
                self._inflight.add(b)
                tier, ms = self._master[b]
                out.append((b, tier, ms, slot))
        return out

    def prefetch_copy(self, claims: list[tuple[int, int, int, int]]) -> None:
        """Copy claimed blocks (outside the lock: the decoder keeps computing) and publish them."""
        try:
            for tier in (HOST, DISK):
                part = [c for c in claims if c[1] == tier]
                if part:
                    accel_kv.swap_in(self.host if tier == HOST else self.disk, self.device,
                                     [c[2] for c in part], [c[3] for c in part], backend="reference")
        finally:
            with self.lock:
                for b, tier, _, _ in claims:
                    self._inflight.discard(b)
                    self._prefetched.add(b)
                    self._last_use[b] = self.tick
                    if tier == HOST:
                        self.stats.bytes_host_to_device += self.block_bytes
                    else:
                        self.stats.bytes_disk_to_device += self.block_bytes
                self.stats.prefetched += len(claims)
                self._ready.notify_all()

    def _score(self, b: int) -> float:
        """Eviction score: smaller goes first (LRU weighted by structure)."""
        return self._last_use.get(b, -1) + self.structure_weight * float(self.structure[b])

    def _free_device_slot(self, protect: Iterable[int], better_than: float | None = None) -> int | None:
        """A free device slot, else the slot of the lowest-scoring evictable block (not pinned,
        not in flight, not in ``protect``; with ``better_than``, only one scoring below it)."""
        for s, owner in enumerate(self._dev_owner):
            if owner < 0:
                return s
        protect = set(protect)
        cands = [b for b in self._dev_of if b not in self._pins and b not in self._inflight and b not in protect]
        if not cands:
            return None
        victim = min(cands, key=lambda b: (self._score(b), b))
        if better_than is not None and self._score(victim) >= better_than:
            return None
        slot = self._dev_of.pop(victim)
        self._dev_owner[slot] = -1
        self._prefetched.discard(victim)
        self.stats.evictions += 1
        return slot

    # ------------------------------------------------------------------ structure, checks

    def observe_selection(self, counts: np.ndarray) -> None:
        """Fold one step's selection counts per block (``[num_blocks]``) into ``structure``."""
        with self.lock:
            n = min(len(counts), len(self.structure))
            self.structure *= STRUCTURE_DECAY
            self.structure[:n] += (1 - STRUCTURE_DECAY) * counts[:n]

    def read_block(self, block: int) -> np.ndarray:
        """The master copy of ``block`` ``[L, 2, bs, H, D]`` (tests, the plain reference)."""
        self._check_block(block)
        tier, slot = self._master[block]
        return np.array((self.host if tier == HOST else self.disk)[slot])

    def _check_block(self, b: int) -> None:
        if self.closed:
            raise FreedBlockError("the KV tiers were freed")
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < len(self._master):
            raise FreedBlockError(f"block {b!r} is not a written block of this sequence (0..{len(self._master) - 1})")

    def check(self) -> None:
        """Raise AssertionError unless the invariants of the module docstring hold."""
        with self.lock:
            seen = set()
            for b, (tier, slot) in enumerate(self._master):
                assert (tier, slot) not in seen, f"master slot {(tier, slot)} named twice"
                seen.add((tier, slot))
                assert slot not in self._free[tier], f"block {b}'s master slot is on the free list"
            for b, s in self._dev_of.items():
                assert self._dev_owner[s] == b
            assert sum(o >= 0 for o in self._dev_owner) == len(self._dev_of)
            for b in self._pins:
                assert b in self._dev_of and b not in self._inflight

    def close(self) -> None:
        """Free every tier (the disk file is deleted); later requests raise FreedBlockError."""
        self.closed = True
        if self.disk is not None:
            del self.disk
            self.disk = None
        if self._disk_file and os.path.exists(self._disk_file):
            os.unlink(self._disk_file)
        self._disk_file = None
