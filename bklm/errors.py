"""Typed errors of the ResNet-BK language model, split by what the caller can do.

Every error for bad input is raised before any state changes: a trainer that refused a budget,
a checkpoint or a corpus is exactly as it was.
"""

from __future__ import annotations


class BKLMError(Exception):
    """Base of every error raised by ``bklm``."""


class ConfigError(BKLMError, ValueError):
    """A model or training setting out of range, or an unknown key.  Fix the config."""


class CorpusError(BKLMError, OSError):
    """A corpus file could not be read (missing, unreadable, not a file), or the corpus is too
    small for one window.  ``path`` names the file."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CheckpointError(BKLMError, ValueError):
    """A checkpoint that is truncated, altered, of another format or of another config.  It is
    never half-loaded: the trainer keeps its state."""


class BudgetTooSmallError(BKLMError, ValueError):
    """The compute budget does not cover one training step.  ``needed`` and ``available`` are
    FLOPs."""

    def __init__(self, needed: float, available: float) -> None:
        super().__init__(f"budget of {available:.4g} FLOPs is too small for one training step "
                         f"(needs up to {needed:.4g})")
        self.needed = needed
        self.available = available
