"""Thresholds and tolerances, chosen on training tasks only.

* The physics tolerance: the finest level a plan can reach must answer every training task, with
  a margin: ``tol = TOL_MARGIN x max(error at the escalation's level)`` over training tasks.
* cswif's gate threshold (relative gain per million extra cell updates, the service's
  ``--threshold``): among the training tasks' own predicted ROIs (the same surrogate the service
  runs, :class:`sims.whatif.RichardsonSurrogate`, here in-process), the one whose decisions make the
  most training answers correct, ties broken by the fewest escalations.
"""

from __future__ import annotations

import dataclasses

from planner import verify as V
from planner.tasks import Task

TOL_MARGIN = 1.25


@dataclasses.dataclass(frozen=True)
class Calibration:
    tol: float
    threshold: float
    train_tasks: int
    train_accuracy: float
    train_escalations: int


def predicted_roi_per_m(task: Task) -> float:
    from sims.whatif import FinerRun, RichardsonSurrogate

    s = task.spec
    pred = RichardsonSurrogate().predict(
        FinerRun(task.id, s["case"], s["params"], s["blocks"], s["cells"], s["from_level"], s["to_level"])
    )
    return pred.roi * 1e6 if pred.gain > 0 else -1.0


def calibrate(train: list[Task]) -> Calibration:
    phys = [t for t in train if t.family == "physics"]
    if not phys:
        raise ValueError("calibration needs physics training tasks")
    errs = {t.id: V.level_errors(t) for t in phys}
    tol = TOL_MARGIN * max(errs[t.id][t.spec["to_level"]] for t in phys)
    rois = {t.id: predicted_roi_per_m(t) for t in phys}
    best: tuple[int, int, float] | None = None
    for thr in sorted({0.0, *(r for r in rois.values() if r > 0), float("inf")}):
        correct = esc = 0
        for t in phys:
            up = rois[t.id] >= thr and rois[t.id] > 0
            esc += up
            level = t.spec["to_level"] if up else t.spec["from_level"]
            correct += errs[t.id][level] <= tol
        key = (correct, -esc, thr)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return Calibration(tol, best[2] if best[2] != float("inf") else 1e12, len(phys), best[0] / len(phys), -best[1])
