"""Typed errors of :mod:`reason`, split by what the caller can do.  Every one is bad input: the
subgoal or artifact must change before the same call can succeed."""

from __future__ import annotations


class ReasonError(Exception):
    """Base of every error raised by ``reason``."""


class ParseError(ReasonError, ValueError):
    """Text that is not an expression of the accepted language (characters, names, syntax)."""


class TooLarge(ReasonError, ValueError):
    """An expression past a size bound (characters, nodes, depth, integer digits, exponent,
    expanded terms, symbols): refused before any expensive step runs."""


class TimeLimit(ReasonError, TimeoutError):
    """A bounded step (canonicalisation, verification, a solver call) ran out of its time."""


class Unsupported(ReasonError, ValueError):
    """A well-formed subgoal of a kind, or with a result, that this library does not handle."""


class VerifierRejected(ReasonError, ValueError):
    """The verifier did not accept the artifact for the subgoal."""
