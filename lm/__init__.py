"""A small trained language model with a paged KV cache, as pure (socket-free) Python.

The public API a service uses:

- :class:`lm.engine.Engine` — ``start / step / generate / beam / pause / resume / snapshot /
  inject / rewind / splice / replace / fork / free`` plus ``stats()`` (token counters);
- :func:`lm.verifier.verify` — exact checker of arithmetic chains (first wrong step, its span);
- :func:`lm.roi.repair` / :func:`lm.roi.find_roi` — RoI-S: verifier failure -> token span -> splice;
- :class:`lm.thunks.DemandExecutor` — Lazy-of-Thought: force thunks only on demand;
- :mod:`lm.errors` — the typed errors.

See docs/decode.md.
"""

from lm.engine import Candidate, DecodeState, Engine, EngineStats, SeqState, SpliceResult

__all__ = ["Candidate", "DecodeState", "Engine", "EngineStats", "SeqState", "SpliceResult"]
