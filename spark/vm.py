"""The opcode VM of reasoning tapes: a pure bytecode interpreter with a strict step budget.

A *tape* is a list of instructions, each ``[OPCODE, arg...]`` (or a bare ``"OPCODE"`` string):
a stack machine with reasoning opcodes (``PLAN``, ``CHECK``, ``EMIT``) and real operations
behind them (integer/float arithmetic, calls, a bounded heap, and ``SVC``: a call to another reca
service through the bus).  :func:`parse_tape` validates a whole tape before anything runs
(:class:`MalformedTape`, :class:`UnknownOpcode`); :class:`Machine` runs it.

The machine is a pure state machine like ``kernel/router.py``: no clock, no I/O.  ``run(n)``
executes until the tape halts, faults, asks for a service call (an :class:`Syscall` the caller
performs and answers with :meth:`Machine.resume`) or has spent ``n`` more steps (a slice: the
service shell reports spending to the kernel and offers a safe point between slices).

Invariants (checked by the tests on randomised and hostile tapes):

* ``steps <= max_steps`` at every moment: an instruction's cost is checked *before* it runs, and an
  instruction that does not fit ends the run with the fault ``step_budget``;
* no allocation happens before its bound is checked: the data stack (``max_stack``), the call
  stack (``max_depth``), heap cells (``max_cells``), integer magnitude (``max_int``), string length
  (``max_str``), registers (``max_regs``), trace and output (``max_trace``);
* the same tape with the same limits and the same service answers gives the same result
  (determinism: the outcome can be re-run from the log's inputs).

Costs: every instruction 1 step, ``ALLOC n`` 1 + n // 64 steps (touching memory is work),
``SVC`` ``svc_cost`` steps (the called service also charges the caller's job itself).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from typing import Any


class Op(enum.StrEnum):
    # data stack
    PUSH = "PUSH"  # PUSH v: push a literal (int, float, str, bool or null)
    POP = "POP"
    DUP = "DUP"
    SWAP = "SWAP"
    OVER = "OVER"
    # arithmetic and logic (operands popped: b = top, a = below; result a OP b)
    ADD = "ADD"
    SUB = "SUB"
    MUL = "MUL"
    DIV = "DIV"  # integer division for ints (floor), true division otherwise
    MOD = "MOD"
    NEG = "NEG"
    EQ = "EQ"
    LT = "LT"
    NOT = "NOT"
    # control
    JMP = "JMP"  # JMP t
    JZ = "JZ"  # JZ t: pop; jump if falsy
    CALL = "CALL"  # CALL t: push the return address on the call stack
    RET = "RET"
    HALT = "HALT"
    NOP = "NOP"
    # registers and heap
    LOAD = "LOAD"  # LOAD name
    STORE = "STORE"  # STORE name (pops)
    ALLOC = "ALLOC"  # pop n; push a handle to n zero cells
    GET = "GET"  # pop i, h; push heap[h][i]
    PUT = "PUT"  # pop v, i, h; heap[h][i] = v
    FIELD = "FIELD"  # FIELD key: pop a map (a service's answer), push map[key]
    # reasoning
    PLAN = "PLAN"  # PLAN text: a plan step in the trace
    CHECK = "CHECK"  # CHECK label: pop b, a; trace {check, ok: a == b}; push ok (1/0)
    ASSERT = "ASSERT"  # ASSERT label: pop v; fault check_failed if falsy
    EMIT = "EMIT"  # pop v; append to the output
    SVC = "SVC"  # SVC service payload: call a service through the bus, push its answer


#: Number of literal arguments each opcode takes.
ARITY: dict[Op, int] = {op: 0 for op in Op}
ARITY.update(
    {
        Op.PUSH: 1,
        Op.JMP: 1,
        Op.JZ: 1,
        Op.CALL: 1,
        Op.LOAD: 1,
        Op.STORE: 1,
        Op.FIELD: 1,
        Op.PLAN: 1,
        Op.CHECK: 1,
        Op.ASSERT: 1,
        Op.SVC: 2,
    }
)
#: Longest tape accepted (instructions).
MAX_TAPE = 4096
#: Longest name (register, service, field) and label / plan text, characters.
MAX_NAME = 64
MAX_TEXT = 256


class TapeError(ValueError):
    """A tape that cannot run: nothing was executed or allocated."""

    code = "malformed_tape"

    def __init__(self, message: str, *, pc: int | None = None) -> None:
        super().__init__(message if pc is None else f"instruction {pc}: {message}")
        self.pc = pc


class MalformedTape(TapeError):
    """Wrong shape: not a list, wrong argument count or type, jump target out of range."""


class UnknownOpcode(TapeError):
    """An opcode the VM does not have."""

    code = "unknown_opcode"


class Fault(enum.StrEnum):
    """Why a run stopped before ``HALT`` (or the end of the tape)."""

    STEP_BUDGET = "step_budget"  # the next instruction would take the run past max_steps
    STACK = "stack_overflow"  # data stack past max_stack
    DEPTH = "call_depth"  # call stack past max_depth (deep recursion)
    MEMORY = "memory"  # heap cells past max_cells (huge allocation)
    ARITHMETIC = "arithmetic"  # division by zero, integer past max_int, non-finite float
    TYPE = "type"  # an operand of the wrong type, a bad handle or index
    UNDERFLOW = "stack_underflow"
    CHECK = "check_failed"  # an ASSERT on a falsy value
    LIMIT = "limit"  # registers, strings, trace or output past their bound
    SERVICE = "service"  # a service call failed (its error is in the message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds of one run.  ``max_steps`` is the step budget (the service sets it to the kernel's
    grant); the others bound memory."""

    max_steps: int = 10_000
    max_stack: int = 1024
    max_depth: int = 256
    max_cells: int = 65_536
    max_int: int = 2**62
    max_str: int = 1024
    max_regs: int = 256
    max_trace: int = 1024
    svc_cost: int = 100

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MalformedTape(f"limit {f.name} must be a non-negative integer, got {v!r}")

    def tightened(self, asked: dict[str, Any] | None) -> "Limits":
        """These limits, lowered (never raised) by a tape's own ``asked`` bounds."""
        if not asked:
            return self
        if not isinstance(asked, dict):
            raise MalformedTape("limits must be a map")
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(asked) - known)
        if bad:
            raise MalformedTape(f"unknown limits {bad}; known: {sorted(known)}")
        for k, v in asked.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MalformedTape(f"limit {k} must be a non-negative integer, got {v!r}")
        return dataclasses.replace(self, **{k: min(v, getattr(self, k)) for k, v in asked.items()})


@dataclasses.dataclass(frozen=True)
class Instr:
    op: Op
    args: tuple[Any, ...] = ()

    def as_list(self) -> list[Any]:
        return [self.op.value, *self.args]


@dataclasses.dataclass(frozen=True)
class Tape:
    code: tuple[Instr, ...]

    @property
    def digest(self) -> str:
        """A stable hash of the tape (what the audit records name)."""
        text = json.dumps([i.as_list() for i in self.code], separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.code)


def _literal_ok(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, str)):
        return not isinstance(v, str) or len(v) <= MAX_TEXT
    return isinstance(v, float) and math.isfinite(v)


def parse_tape(obj: Any) -> Tape:
    """Validate a whole tape; raises :class:`MalformedTape` or :class:`UnknownOpcode`."""
    if not isinstance(obj, (list, tuple)):
        raise MalformedTape(f"a tape is a list of instructions, got {type(obj).__name__}")
    if not obj:
        raise MalformedTape("empty tape")
    if len(obj) > MAX_TAPE:
        raise MalformedTape(f"tape of {len(obj)} instructions; at most {MAX_TAPE}")
    code = []
    for pc, raw in enumerate(obj):
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, (list, tuple)) or not raw or not isinstance(raw[0], str):
            raise MalformedTape("an instruction is [OPCODE, arg...] or 'OPCODE'", pc=pc)
        try:
            op = Op(raw[0].upper())
        except ValueError:
            raise UnknownOpcode(f"unknown opcode {raw[0][:MAX_NAME]!r}", pc=pc) from None
        args = tuple(raw[1:])
        if len(args) != ARITY[op]:
            raise MalformedTape(f"{op} takes {ARITY[op]} argument(s), got {len(args)}", pc=pc)
        if op is Op.PUSH and not _literal_ok(args[0]):
            raise MalformedTape("PUSH takes an int, a finite float, a short string, a bool or null", pc=pc)
        if op in (Op.JMP, Op.JZ, Op.CALL):
            t = args[0]
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < len(obj):
                raise MalformedTape(f"{op} target must be an instruction index in [0, {len(obj)})", pc=pc)
        if op in (Op.LOAD, Op.STORE, Op.FIELD):
            if not isinstance(args[0], str) or not 0 < len(args[0]) <= MAX_NAME:
                raise MalformedTape(f"{op} takes a name of 1..{MAX_NAME} characters", pc=pc)
        if op in (Op.PLAN, Op.CHECK, Op.ASSERT):
            if not isinstance(args[0], str) or len(args[0]) > MAX_TEXT:
                raise MalformedTape(f"{op} takes a text of at most {MAX_TEXT} characters", pc=pc)
        if op is Op.SVC:
            if not isinstance(args[0], str) or not 0 < len(args[0]) <= MAX_NAME:
                raise MalformedTape("SVC takes a service name", pc=pc)
            if not isinstance(args[1], dict) or len(json.dumps(args[1], default=str)) > 4 * MAX_TEXT:
                raise MalformedTape(f"SVC takes a payload map of at most {4 * MAX_TEXT} bytes as JSON", pc=pc)
        code.append(Instr(op, args))
    return Tape(tuple(code))


@dataclasses.dataclass(frozen=True)
class Syscall:
    """The machine asks its host to call ``service`` with ``payload``."""

    service: str
    payload: dict


class VMError(Exception):
    """A fault raised inside one instruction (internal: ends the run as a :class:`Fault`)."""

    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


class Status(enum.StrEnum):
    READY = "ready"  # more to run
    SYSCALL = "syscall"  # waiting for resume(answer)
    HALTED = "halted"
    FAULTED = "faulted"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Machine:
    """One run of a tape.  Drive it with :meth:`run` (and :meth:`resume` after a syscall)."""

    def __init__(self, tape: Tape, limits: Limits | None = None) -> None:
        self.tape = tape
        self.limits = limits or Limits()
        self.pc = 0
        self.steps = 0
        self.stack: list[Any] = []
        self.frames: list[int] = []
        self.regs: dict[str, Any] = {}
        self.heap: list[list[Any]] = []
        self.cells = 0
        self.trace: list[dict] = []
        self.output: list[Any] = []
        self.status = Status.READY
        self.fault: Fault | None = None
        self.message = ""
        self.syscall: Syscall | None = None
        self.syscalls = 0

    # -- driving ----------------------------------------------------------------------------------

    def run(self, slice_steps: int) -> Status:
        """Execute at most ``slice_steps`` more steps; returns the status after."""
        if self.status is not Status.READY:
            return self.status
        stop_at = self.steps + max(0, slice_steps)
        code, lim = self.tape.code, self.limits
        while self.status is Status.READY:
            if self.pc >= len(code):
                self.status = Status.HALTED
                break
            if self.steps >= stop_at:
                break  # the slice ends here; the next run continues
            ins = code[self.pc]
            cost = self._cost(ins)
            if self.steps + cost > lim.max_steps:
                self._stop(
                    Fault.STEP_BUDGET,
                    f"{ins.op} at {self.pc} needs {cost} step(s); {lim.max_steps - self.steps} left of {lim.max_steps}",
                )
                break
            self.steps += cost
            try:
                self._exec(ins)
            except VMError as exc:
                self._stop(exc.fault, f"{ins.op} at {self.pc}: {exc}")
        return self.status

    def resume(self, answer: Any = None, error: str | None = None) -> None:
        """Answer the pending syscall: push ``answer``, or fault with ``error``."""
        if self.status is not Status.SYSCALL:
            raise RuntimeError("no syscall is pending")
        self.syscall = None
        self.status = Status.READY
        if error is not None:
            self._stop(Fault.SERVICE, error[:MAX_TEXT])
            return
        try:
            self._push(self._bounded(answer))
        except VMError as exc:
            self._stop(exc.fault, str(exc))
            return
        self.pc += 1

    def result(self) -> dict:
        """What a run produced (the service's answer)."""
        out: dict[str, Any] = {
            "status": self.status.value,
            "steps": self.steps,
            "pc": self.pc,
            "stack": self.stack[-16:],
            "output": self.output,
            "trace": self.trace,
            "syscalls": self.syscalls,
            "cells": self.cells,
        }
        if self.fault is not None:
            out["fault"] = self.fault.value
            out["message"] = self.message
        return out

    # -- internals --------------------------------------------------------------------------------

    def _cost(self, ins: Instr) -> int:
        if ins.op is Op.SVC:
            return 1 + self.limits.svc_cost
        if ins.op is Op.ALLOC and self.stack and isinstance(self.stack[-1], int) and self.stack[-1] > 0:
            # The cost is paid only for what fits the memory bound (a larger ask faults on memory).
            return 1 + min(self.stack[-1], self.limits.max_cells) // 64
        return 1

    def _stop(self, fault: Fault, message: str) -> None:
        self.status = Status.FAULTED
        self.fault = fault
        self.message = message

    def _push(self, v: Any) -> None:
        if len(self.stack) >= self.limits.max_stack:
            raise VMError(Fault.STACK, f"data stack past {self.limits.max_stack}")
        self.stack.append(v)

    def _pop(self, n: int = 1) -> list[Any]:
        if len(self.stack) < n:
            raise VMError(Fault.UNDERFLOW, f"needs {n} operand(s), stack holds {len(self.stack)}")
        out = self.stack[-n:]
        del self.stack[-n:]
        return out

    def _int(self, v: Any) -> Any:
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            if abs(v) > self.limits.max_int:
                raise VMError(Fault.ARITHMETIC, f"integer past {self.limits.max_int}")
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise VMError(Fault.ARITHMETIC, "non-finite float")
        return v

    def _bounded(self, v: Any, depth: int = 0) -> Any:
        """A service answer or value, checked against the bounds (no unbounded value enters)."""
        if depth > 8:
            raise VMError(Fault.LIMIT, "value nested too deeply")
        if isinstance(v, str):
            if len(v) > self.limits.max_str:
                raise VMError(Fault.LIMIT, f"string past {self.limits.max_str} characters")
            return v
        if isinstance(v, (list, tuple)):
            if len(v) > self.limits.max_str:
                raise VMError(Fault.LIMIT, "list too long")
            return [self._bounded(x, depth + 1) for x in v]
        if isinstance(v, dict):
            if len(v) > self.limits.max_str:
                raise VMError(Fault.LIMIT, "map too large")
            return {str(k)[:MAX_NAME]: self._bounded(x, depth + 1) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float)):
            return self._int(v)
        return str(v)[: self.limits.max_str]

    def _record(self, entry: dict) -> None:
        if len(self.trace) >= self.limits.max_trace:
            raise VMError(Fault.LIMIT, f"trace past {self.limits.max_trace} entries")
        self.trace.append(entry)

    def _arith(self, op: Op, a: Any, b: Any) -> Any:
        if op is Op.EQ:
            return int(a == b)
        if op is Op.ADD and isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > self.limits.max_str:
                raise VMError(Fault.LIMIT, f"string past {self.limits.max_str} characters")
            return a + b
        if not (_num(a) or isinstance(a, bool)) or not (_num(b) or isinstance(b, bool)):
            raise VMError(Fault.TYPE, f"{op} needs numbers, got {type(a).__name__} and {type(b).__name__}")
        a, b = self._int(a), self._int(b)
        if op is Op.LT:
            return int(a < b)
        if op in (Op.DIV, Op.MOD) and b == 0:
            raise VMError(Fault.ARITHMETIC, "division by zero")
        if (
            op is Op.MUL
            and isinstance(a, int)
            and isinstance(b, int)
            and a
            and b
            and a.bit_length() + b.bit_length() > self.limits.max_int.bit_length() + 1
        ):
            raise VMError(Fault.ARITHMETIC, f"integer past {self.limits.max_int}")  # checked before computing
        if op is Op.ADD:
            r = a + b
        elif op is Op.SUB:
            r = a - b
        elif op is Op.MUL:
            r = a * b
        elif op is Op.DIV:
            r = a // b if isinstance(a, int) and isinstance(b, int) else a / b
        else:
            r = a % b
        return self._int(r)

    def _exec(self, ins: Instr) -> None:
        op, args, lim = ins.op, ins.args, self.limits
        nxt = self.pc + 1
        if op is Op.PUSH:
            v = args[0]
            if isinstance(v, str) and len(v) > lim.max_str:
                raise VMError(Fault.LIMIT, f"string past {lim.max_str} characters")
            self._push(self._int(v))
        elif op is Op.POP:
            self._pop()
        elif op is Op.DUP:
            (a,) = self._pop()
            self._push(a)
            self._push(a)
        elif op is Op.SWAP:
            a, b = self._pop(2)
            self._push(b)
            self._push(a)
        elif op is Op.OVER:
            a, b = self._pop(2)
            self._push(a)
            self._push(b)
            self._push(a)
        elif op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MOD, Op.EQ, Op.LT):
            a, b = self._pop(2)
            self._push(self._arith(op, a, b))
        elif op is Op.NEG:
            (a,) = self._pop()
            if not _num(a):
                raise VMError(Fault.TYPE, f"NEG needs a number, got {type(a).__name__}")
            self._push(-a)
        elif op is Op.NOT:
            (a,) = self._pop()
            self._push(int(not a))
        elif op is Op.JMP:
            nxt = args[0]
        elif op is Op.JZ:
            (a,) = self._pop()
            if not a:
                nxt = args[0]
        elif op is Op.CALL:
            if len(self.frames) >= lim.max_depth:
                raise VMError(Fault.DEPTH, f"call depth past {lim.max_depth}")
            self.frames.append(nxt)
            nxt = args[0]
        elif op is Op.RET:
            if not self.frames:
                self.status = Status.HALTED  # RET from the top level ends the tape
                return
            nxt = self.frames.pop()
        elif op is Op.HALT:
            self.status = Status.HALTED
            return
        elif op is Op.NOP:
            pass
        elif op is Op.LOAD:
            if args[0] not in self.regs:
                raise VMError(Fault.TYPE, f"register {args[0]!r} never stored")
            self._push(self.regs[args[0]])
        elif op is Op.STORE:
            (a,) = self._pop()
            if args[0] not in self.regs and len(self.regs) >= lim.max_regs:
                raise VMError(Fault.LIMIT, f"more than {lim.max_regs} registers")
            self.regs[args[0]] = a
        elif op is Op.ALLOC:
            (n,) = self._pop()
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise VMError(Fault.TYPE, "ALLOC needs a non-negative integer size")
            if self.cells + n > lim.max_cells:  # checked before a single cell exists
                raise VMError(Fault.MEMORY, f"ALLOC {n}: {self.cells} of {lim.max_cells} cells in use")
            self.cells += n
            self.heap.append([0] * n)
            self._push(len(self.heap) - 1)
        elif op in (Op.GET, Op.PUT):
            if op is Op.PUT:
                h, i, v = self._pop(3)
            else:
                h, i = self._pop(2)
            if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < len(self.heap):
                raise VMError(Fault.TYPE, f"bad heap handle {h!r}")
            cells = self.heap[h]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(cells):
                raise VMError(Fault.TYPE, f"index {i!r} outside a block of {len(cells)} cells")
            if op is Op.PUT:
                cells[i] = v
            else:
                self._push(cells[i])
        elif op is Op.FIELD:
            (m,) = self._pop()
            if not isinstance(m, dict) or args[0] not in m:
                raise VMError(Fault.TYPE, f"FIELD {args[0]!r} of a {type(m).__name__} without it")
            self._push(m[args[0]])
        elif op is Op.PLAN:
            self._record({"op": "PLAN", "text": args[0], "step": self.steps})
        elif op is Op.CHECK:
            a, b = self._pop(2)
            ok = a == b
            self._record({"op": "CHECK", "label": args[0], "ok": ok, "got": a, "want": b, "step": self.steps})
            self._push(int(ok))
        elif op is Op.ASSERT:
            (a,) = self._pop()
            if not a:
                raise VMError(Fault.CHECK, f"assertion {args[0]!r} failed")
        elif op is Op.EMIT:
            (a,) = self._pop()
            if len(self.output) >= lim.max_trace:
                raise VMError(Fault.LIMIT, f"output past {lim.max_trace} values")
            self.output.append(a)
        elif op is Op.SVC:
            self.syscalls += 1
            self._record({"op": "SVC", "service": args[0], "step": self.steps})
            self.syscall = Syscall(args[0], dict(args[1]))
            self.status = Status.SYSCALL
            return  # pc advances in resume()
        self.pc = nxt


def run_local(tape: Tape, limits: Limits, answer=None) -> Machine:
    """Run a tape to the end in-process; ``answer(syscall) -> value`` serves SVC (else each SVC
    faults).  For tests and the pure-interpreter part of the benchmark."""
    m = Machine(tape, limits)
    while True:
        status = m.run(limits.max_steps + 1)
        if status is Status.SYSCALL:
            assert m.syscall is not None
            if answer is None:
                m.resume(error=f"no bus: cannot call {m.syscall.service}")
            else:
                m.resume(answer(m.syscall))
            continue
        if status is not Status.READY:
            return m
