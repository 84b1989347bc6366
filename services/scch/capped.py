"""Client text is parsed and evaluated only in a memory-capped child, and never reaches a method.

SymPy's parser evaluates the text it is given as Python.  Two defences, each enough for issue
23's attack (``x.subs(y, x.name.center((3000000000).p))`` took scch to 2.95 GB):

1. **No attribute access is reachable from client text.**  :func:`check_text` tokenizes every
   string of a subgoal or an answer as Python and refuses a ``.`` operator token (a decimal point
   is part of a NUMBER token, so ``1.5`` passes and ``x.subs`` / ``(3).p`` do not) -- with no
   attribute there is no method to call.  Refusal: :class:`AttributeAccess` (a ``ParseError``).
2. **Parsing and evaluation run in a child process with a memory ceiling.**  :class:`CappedParser`
   keeps one child (``forkserver``, SymPy preloaded) whose address space is capped at its loaded
   size plus ``mem_bytes`` (``RLIMIT_AS``: an allocation past it fails with ``MemoryError``
   there), which also joins the helper group ``parser`` of scch's enforcer group where there is
   one (its CPU is the service's).  A child that runs out of memory, dies, or exceeds the time
   bound is killed and replaced; the caller gets :class:`MemoryExceeded` or ``TimeLimit`` and the
   service keeps serving with its own memory untouched.

The child returns the canonical form (:class:`reason.canon.Canon`) or the parsed artifact,
pickled; the parent never parses client text itself.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.connection
import threading
import tokenize
from typing import Any

from reason.errors import ParseError, ReasonError, TimeLimit, TooLarge, Unsupported, VerifierRejected

#: Memory the parser child may take beyond its loaded size (bytes).
PARSER_MEM_BYTES = 512 << 20
#: Bound of one parse in the child, seconds (canonicalisation bounds itself at 1 s inside; the
#: service waits on its loop thread, so this stays below the default liveness window of 3 s).
PARSER_SECONDS = 2.0
#: Longest a fresh child may take to start (forkserver, SymPy preloaded), seconds.
START_SECONDS = 60.0


class AttributeAccess(ParseError):
    """Client text tried to reach an attribute (and through it, a method)."""


class MemoryExceeded(ReasonError, MemoryError):
    """The parse needed more memory than the parser's ceiling; its process was replaced."""


def check_text(text: Any) -> None:
    """Refuse a ``.`` operator in ``text`` (strings only; nested lists and maps are walked)."""
    if isinstance(text, dict):
        for value in text.values():
            check_text(value)
        return
    if isinstance(text, (list, tuple)):
        for value in text:
            check_text(value)
        return
    if not isinstance(text, str) or "." not in text:
        return
    probe = text.replace("'", " ")  # ODE primes (y'') are not Python; they never carry a dot
    try:
        for tok in tokenize.generate_tokens(io.StringIO(probe).readline):
            if tok.type == tokenize.OP and tok.string == ".":
                raise AttributeAccess(f"attribute access is not accepted: {text[:60]!r}")
    except (tokenize.TokenError, IndentationError, SyntaxError):
        raise ParseError(f"cannot tokenize {text[:60]!r}") from None


_ERRORS = {
    cls.__name__: cls
    for cls in (ParseError, TooLarge, TimeLimit, Unsupported, VerifierRejected, AttributeAccess, MemoryExceeded)
}


def _child_main(conn: multiprocessing.connection.Connection, headroom: int) -> None:
    """The parser child: cap, then answer ``(op, args)`` requests until the pipe closes."""
    from kernel import enforce
    from reason import canon as C

    try:
        enforce.join_group("parser")
    except (enforce.EnforcerError, OSError):
        pass  # accounting only; the ceiling below holds anyway
    for warm in (
        {"kind": "simplify", "expr": "x + 1"},
        {"kind": "integrate", "expr": "sin(2*t + 1)*a", "var": "t"},
        {"kind": "solve", "expr": "x**2 = 4", "var": "x"},
    ):
        try:  # SymPy's first calls fill its caches: here, not inside a request's 1 s bound
            C.canonicalise(warm, seconds=30.0)
        except ReasonError:
            pass
    enforce.limit_address_space(headroom)
    conn.send(("ready", None))
    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            return
        try:
            if op == "canon":
                out: Any = C.canonicalise(args[0])
            elif op == "artifact":
                out = C.artifact_from_text(args[0], args[1])
            else:
                raise ParseError(f"unknown parser op {op!r}")
            conn.send(("ok", out))
        except MemoryError:
            conn.send(("error", ("MemoryExceeded", "the parse exceeded the parser's memory ceiling")))
            return  # a process that ran out of memory is replaced
        except ReasonError as exc:
            conn.send(("error", (type(exc).__name__, str(exc))))
        except Exception as exc:  # noqa: BLE001 - SymPy raises many kinds; report, never crash
            conn.send(("error", ("ParseError", f"{type(exc).__name__}: {str(exc)[:200]}")))


class CappedParser:
    """One parser child at a time (thread-safe: callers queue on a lock)."""

    def __init__(self, mem_bytes: int = PARSER_MEM_BYTES, seconds: float = PARSER_SECONDS) -> None:
        self.mem_bytes = mem_bytes
        self.seconds = seconds
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["sympy", "reason.canon", "kernel.enforce"])
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()
        self.replaced = 0
        self.calls = 0

    def _start(self) -> multiprocessing.connection.Connection:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        self._kill()
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child, self.mem_bytes), daemon=True)
        self._proc.start()
        child.close()
        if not parent.poll(START_SECONDS):
            self._kill()
            raise TimeLimit(f"the parser process did not start within {START_SECONDS:g} s")
        parent.recv()
        self._conn = parent
        return parent

    def _kill(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            proc.close()

    def _call(self, op: str, args: tuple) -> Any:
        with self._lock:
            self.calls += 1
            conn = self._start()
            conn.send((op, args))
            try:
                ready = conn.poll(self.seconds)
                status, out = conn.recv() if ready else (None, None)
            except (EOFError, OSError):  # the child died: killed at the memory ceiling (cgroup OOM)
                self.replaced += 1
                self._kill()
                raise MemoryExceeded("the parser process died (memory ceiling); it was replaced") from None
            if not ready:
                self.replaced += 1
                self._kill()
                raise TimeLimit(f"parse exceeded {self.seconds:g} s; its process was replaced")
            if status == "error":
                name, message = out
                if name == "MemoryExceeded":
                    self.replaced += 1
                    self._kill()
                raise _ERRORS.get(name, ParseError)(message)
            return out

    def canonicalise(self, subgoal: Any) -> Any:
        """:func:`reason.canon.canonicalise` of ``subgoal``, checked, in the child."""
        check_text(subgoal)
        return self._call("canon", (subgoal,))

    def artifact_from_text(self, kind: str, text: Any) -> Any:
        """:func:`reason.canon.artifact_from_text`, checked, in the child."""
        check_text(text)
        return self._call("artifact", (kind, text))

    def close(self) -> None:
        with self._lock:
            self._kill()
