"""RoI-S logic: verifier failure -> token span -> splice, repeated until the chain verifies.

Pure logic over an :class:`~lm.engine.Engine`; a service calls :func:`repair` (or
:func:`find_roi` plus ``Engine.splice`` itself, to put a safe point between repairs).
"""

from __future__ import annotations

import dataclasses
import time

from lm import tokenizer
from lm.engine import Engine, SpliceResult
from lm.verifier import Report, StepCheck, verify

#: failures a span re-decode can repair; ``missing`` / ``extra`` need a continuation / a cut
REPAIRABLE = ("mul", "add", "thunk")


@dataclasses.dataclass(frozen=True)
class RoI:
    """A region of interest: token span ``[start, end)`` and the failed step that produced it."""

    start: int
    end: int
    step: StepCheck


@dataclasses.dataclass(frozen=True)
class RepairReport:
    ok: bool
    rounds: int
    splices: tuple[SpliceResult, ...]
    decoded: int  # token forwards spent re-decoding spans (all beam hypotheses)
    seconds: float
    final: Report
    reason: str


def text_of(engine: Engine, seq_id: int) -> str:
    return tokenizer.decode(engine.tokens(seq_id))


def find_roi(report: Report) -> RoI | None:
    """The token span of the first failed step, or ``None`` when the chain verifies or its first
    failure is not one a span re-decode can fix."""
    bad = report.first_error
    if bad is None or bad.kind not in REPAIRABLE or bad.region[1] <= bad.region[0]:
        return None
    start, end = bad.region
    return RoI(tokenizer.char_to_token(start), tokenizer.char_to_token(end), bad)


def accept_for(text: str, roi: RoI):
    """Candidate filter: a re-decoded span is accepted when the verifier finds no failure in
    the chain up to the span's end (the suffix is kept as it is)."""
    cs, ce = roi.start - 1, roi.end - 1
    prefix, suffix = text[:cs], text[ce:]

    def accept(span_tokens: tuple[int, ...]) -> bool:
        try:
            span = tokenizer.decode(span_tokens)
        except Exception:
            return False
        repaired = prefix + span + suffix
        first = verify(repaired).first_error
        return first is None or first.start >= cs + len(span)

    return accept


def repair(
    engine: Engine, seq_id: int, *, width: int = 8, max_rounds: int = 8, mode: str = "exact",
    verify_candidates: bool = True,
) -> RepairReport:
    """Repair ``seq_id`` in place: while the verifier flags a repairable step, splice its region
    with a beam of ``width`` (choosing the best candidate the verifier accepts when
    ``verify_candidates``).  Stops when the chain verifies, after ``max_rounds`` splices, or
    when a region does not change (the beam found nothing better)."""
    t0 = time.perf_counter()
    splices: list[SpliceResult] = []
    reason = "verified"
    for _ in range(max_rounds):
        text = text_of(engine, seq_id)
        report = verify(text)
        if report.ok:
            break
        roi = find_roi(report)
        if roi is None:
            reason = f"unrepairable failure: {report.first_error.reason}"
            break
        res = engine.splice(
            seq_id, roi.start, roi.end, width=width, mode=mode,
            accept=accept_for(text, roi) if verify_candidates else None,
        )
        splices.append(res)
        if res.new_span == res.old_span:
            reason = "beam found no different span"
            break
    else:
        reason = "round limit"
    final = verify(text_of(engine, seq_id))
    if final.ok:
        reason = "verified"
    return RepairReport(
        ok=final.ok, rounds=len(splices), splices=tuple(splices),
        decoded=sum(s.decoded for s in splices), seconds=time.perf_counter() - t0, final=final,
        reason=reason,
    )
