"""KV patcher (seed 003): a prefix cache over the paged KV pool of :class:`lm.engine.Engine`.

A radix tree whose edges are *full* KV blocks of tokens (``block_size`` token ids each): the path
from the root spells a token prefix, and each node holds the KV block of its last ``block_size``
positions (one reference on the engine's block allocator) and their logits.  A new prompt walks
the tree as far as whole blocks match, starts its sequence on those blocks (shared, reference
counted, never written: the engine copies a shared block before writing into it) and prefills
only the rest.  After a prefill the prompt's full blocks are inserted.

Bound: the cache holds at most ``max_blocks`` blocks (the ``kv_blocks`` budget it is given).
Inserting past it evicts least-recently-used *leaves* first; a node with children is never evicted
before them, so every cached path stays whole.  A block a live sequence still uses is only
released by the cache (its refcount drops), never freed under the sequence.

Invariants (:meth:`PrefixCache.check`): every node holds one allocator reference on its block;
``len(nodes) <= max_blocks``; a node's key is the ``block_size`` tokens of its block.

Correctness target: greedy tokens with the cache identical to decoding without it (the cached
keys/values are the ones the same prefix at the same positions computes).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from lm import tokenizer
from lm.engine import Engine, SeqState, _Seq
from lm.errors import SpanError


@dataclasses.dataclass
class _Node:
    key: tuple[int, ...]
    block: int
    logits: list[torch.Tensor]
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = dataclasses.field(default_factory=dict)
    used: int = 0


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prefill tokens saved
    inserted_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def saved_fraction(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixCache:
    """Prefix cache of one engine, bounded to ``max_blocks`` KV blocks."""

    def __init__(self, engine: Engine, max_blocks: int) -> None:
        if not isinstance(max_blocks, int) or max_blocks < 0:
            raise ValueError(f"max_blocks must be a non-negative integer, got {max_blocks!r}")
        self.engine = engine
        self.bs = engine.cache.block_size
        self.max_blocks = max_blocks
        self.root = _Node((), -1, [], None)  # the default namespace's root
        self._roots: dict[str, _Node] = {"": self.root}
        self.size = 0
        self.stats = PrefixStats()
        self._clock = itertools.count(1)

    def _root(self, ns: str) -> _Node:
        """The tree of namespace ``ns``: prompts of one namespace never reuse another's blocks (the
        decode service keys it by principal, so a hit tells nothing about another principal)."""
        root = self._roots.get(ns)
        if root is None:
            root = self._roots[ns] = _Node((), -1, [], None)
        return root

    def _walk(self, tokens: Sequence[int], ns: str = "") -> list[_Node]:
        """The cached nodes matching whole leading blocks of ``tokens``, keeping at least one
        token to prefill (its logits start the decode)."""
        path, node = [], self._root(ns)
        usable = (len(tokens) - 1) // self.bs
        for i in range(usable):
            child = node.children.get(tuple(tokens[i * self.bs : (i + 1) * self.bs]))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def start(self, prompt: Sequence[int], *, seed: int = 0, ns: str = "") -> int:
        """Like :meth:`Engine.start`, reusing the cached prefix; inserts the prompt's blocks."""
        eng = self.engine
        tokens = tokenizer.check_ids(prompt)
        if not tokens:
            raise SpanError("a prompt needs at least one token")
        eng._check_len(len(tokens))
        path = self._walk(tokens, ns)
        now = next(self._clock)
        for n in path:
            n.used = now
        reused = len(path) * self.bs
        table = [n.block for n in path]
        eng.cache.allocator.incref(table)
        seq = _Seq(
            tokens=list(tokens[:reused]),
            table=table,
            logits=[lg for n in path for lg in n.logits],
            state=SeqState.RUNNING,
            generator=torch.Generator().manual_seed(seed),
        )
        try:
            eng._extend(seq, list(tokens[reused:]))
        except Exception:
            eng.cache.allocator.decref(seq.table)
            raise
        eng._count(prefilled=len(tokens) - reused)
        sid = next(eng._ids)
        eng._seqs[sid] = seq
        if tokens[-1] == tokenizer.EOS:
            seq.state = SeqState.FINISHED
        st = self.stats
        st.lookups += 1
        st.hits += bool(path)
        st.prompt_tokens += len(tokens)
        st.reused_tokens += reused
        self._insert(seq, len(tokens), now, ns)
        return sid

    def insert(self, seq_id: int, ns: str = "") -> int:
        """Insert the full blocks of a live sequence (prompt and decoded tokens: a later prompt
        that continues it, or repeats a spliced text, reuses them); returns the blocks cached
        along its path."""
        seq = self.engine._get(seq_id)
        now = next(self._clock)
        self._insert(seq, len(seq.tokens), now, ns)
        return len(self._walk(seq.tokens + [tokenizer.PAD], ns))

    def evict(self, n: int) -> int:
        """Release up to ``n`` least recently used leaves (pressure on the KV pool); returns
        how many were released."""
        done = 0
        while done < n and self._evict(keep=self.root):
            done += 1
        return done

    def _insert(self, seq: _Seq, n_tokens: int, now: int, ns: str = "") -> None:
        node = self._root(ns)
        for i in range(n_tokens // self.bs):
            key = tuple(seq.tokens[i * self.bs : (i + 1) * self.bs])
            child = node.children.get(key)
            if child is None:
                if self.size >= self.max_blocks and not self._evict(keep=node):
                    return
                block = seq.table[i]
                self.engine.cache.allocator.incref([block])
                child = _Node(key, block, seq.logits[i * self.bs : (i + 1) * self.bs], node)
                node.children[key] = child
                self.size += 1
                self.stats.inserted_blocks += 1
            child.used = now
            node = child

    def _evict(self, keep: _Node) -> bool:
        """Drop the least recently used leaf that is not on ``keep``'s path; False if none."""
        protected = set()
        n: _Node | None = keep
        while n is not None:
            protected.add(id(n))
            n = n.parent
        leaves = [x for x in self._nodes() if not x.children and id(x) not in protected]
        if not leaves:
            return False
        victim = min(leaves, key=lambda x: x.used)
        assert victim.parent is not None
        del victim.parent.children[victim.key]
        self.engine.cache.allocator.decref([victim.block])
        self.size -= 1
        self.stats.evicted_blocks += 1
        return True

    def _nodes(self) -> list[_Node]:
        out: list[_Node] = []
        stack = [c for root in self._roots.values() for c in root.children.values()]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def clear(self) -> None:
        """Release every cached block."""
        for n in self._nodes():
            self.engine.cache.allocator.decref([n.block])
        for root in self._roots.values():
            root.children.clear()
        self.size = 0

    def check(self) -> None:
        nodes = self._nodes()
        assert len(nodes) == self.size <= self.max_blocks
        for n in nodes:
            assert len(n.key) == self.bs and len(n.logits) == self.bs
        # every reference is a live sequence's table entry or a cache node's
        eng = self.engine
        eng.cache.allocator.check([s.table for s in eng._seqs.values()] + [[n.block] for n in nodes])
