"""The task bodies Dask's workers run in ``bench cpcs`` (importable by worker processes): the
same work the reca workers do, one attempt after another on the worker that got the task."""

from __future__ import annotations

import time
from typing import Any

_ENGINE: Any = None


def hold(ms: float, steps: int, fail_attempts: int, *deps: Any) -> int:
    """What ``services.cpcs.work`` does for ``fail_attempts + 1`` attempts: hold the worker for
    ``ms`` per attempt in ``steps`` steps."""
    return hold_slow(ms, steps, fail_attempts, 1.0)


def hold_slow(ms: float, steps: int, fail_attempts: int, slow: float, *deps: Any) -> int:
    """:func:`hold` with the first attempt ``slow`` times longer (a straggling attempt); as in
    ``services.cpcs.work``, each sleeping step makes up for the oversleep of those before it."""
    for attempt in range(fail_attempts + 1):
        step_s = ms / 1000.0 / steps * (slow if attempt == 0 else 1.0)
        held = 0.0
        for i in range(steps):
            t0 = time.perf_counter()
            time.sleep(max(0.0, (i + 1) * step_s - held))
            held += time.perf_counter() - t0
    return 1


def _engine() -> Any:
    global _ENGINE
    if _ENGINE is None:
        from lm.engine import Engine

        _ENGINE = Engine.load()
    return _ENGINE


def warm_engine() -> int:
    _engine()
    return 1


def decode(prompt: str, max_new: int, *deps: Any) -> int:
    """What the decode worker does for ``generate {prompt, max_new, keep: false}``: greedy tokens
    until EOS or ``max_new``."""
    from lm import tokenizer
    from lm.engine import SeqState

    eng = _engine()
    seq = eng.start(tokenizer.encode(prompt))
    n = 0
    while n < max_new and eng.state(seq) is SeqState.RUNNING and len(eng.tokens(seq)) < eng.max_len:
        eng.step(seq)
        n += 1
    eng.free(seq)
    return n
