"""Typed errors of the decode engine, split by what the caller can do.

Every error raised for bad input is raised *before* any state is changed: the sequence, its block
table, its KV blocks and the engine's counters are exactly as they were.
"""

from __future__ import annotations


class LMError(Exception):
    """Base of every error raised by ``lm``."""


class UnknownSequenceError(LMError, LookupError):
    """The sequence id is not live (never started, or already freed)."""


class VocabularyError(LMError, ValueError):
    """A token id outside ``[0, vocab_size)`` or a character the tokenizer does not know."""


class SpanError(LMError, ValueError):
    """A position or ``(start, end)`` span that lies outside the sequence."""


class ContextTooLongError(LMError, ValueError):
    """The sequence would exceed the model's maximum context length."""


class SequenceStateError(LMError, ValueError):
    """The operation is not allowed in the sequence's current state."""


class SequenceFinishedError(SequenceStateError):
    """The sequence has produced its end-of-sequence token; it can no longer be extended."""


class SequencePausedError(SequenceStateError):
    """The sequence is paused; ``resume`` it before stepping."""


class NotPausedError(SequenceStateError):
    """``resume`` was called on a sequence that is not paused."""


class OutOfBlocksError(LMError, MemoryError):
    """The KV block pool has too few free blocks for the request (nothing was allocated)."""


class BlockAllocatorError(LMError, RuntimeError):
    """An allocator invariant would be broken (double free, freeing an unowned block): a bug."""
