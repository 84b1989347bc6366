"""CS-WIF service, pure part: parsing escalation requests and rendering the gate's ledger.

The gate itself is :class:`sims.whatif.WhatIfGate` over :class:`sims.whatif.RichardsonSurrogate`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kernel import errors
from sims.whatif import Decision, FinerRun, WhatIfGate

#: Default gate threshold: relative L1 error reduction per million extra cell updates
#: (docs/sims.md, chosen on bench/cswif.py's escalations).
DEFAULT_THRESHOLD = 5e-4
_ESC_KEYS = {f.name for f in dataclasses.fields(FinerRun)}


def parse_escalation(payload: Any) -> FinerRun:
    """``payload["escalation"]``: the :class:`FinerRun` fields.  :class:`BadRequest` if invalid."""
    esc = payload.get("escalation") if isinstance(payload, dict) else None
    if not isinstance(esc, dict):
        raise errors.BadRequest(f"an escalation request carries 'escalation': a map of {sorted(_ESC_KEYS)}")
    missing, unknown = _ESC_KEYS - set(esc) - {"params"}, set(esc) - _ESC_KEYS
    if missing or unknown:
        raise errors.BadRequest(f"escalation keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if not isinstance(esc["run_id"], str) or not isinstance(esc["case"], str):
        raise errors.BadRequest("run_id and case must be strings")
    params = esc.get("params") or {}
    if not isinstance(params, dict):
        raise errors.BadRequest("params must be a map")
    for key in ("blocks", "cells", "from_level", "to_level"):
        errors.require_int(esc, key)
    try:
        return FinerRun(esc["run_id"], esc["case"], dict(params), esc["blocks"], esc["cells"],
                        esc["from_level"], esc["to_level"])
    except ValueError as exc:
        raise errors.BadRequest(f"invalid escalation: {exc}") from None


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def decision_to_wire(d: Decision) -> dict[str, Any]:
    p = d.prediction
    return {"run_id": d.run_id, "approved": d.approved, "reason": d.reason, "threshold": d.threshold, "at": d.at,
            "prediction": {"gain": p.gain, "cost": p.cost, "surrogate_cost": p.surrogate_cost,
                           "order": _num(p.order), "horizon": p.horizon, "roi_per_m": _num(p.roi * 1e6)}}


def ledger_to_wire(gate: WhatIfGate) -> dict[str, Any]:
    """Every decision with its outcome (if recorded) and the gate's accuracy so far."""
    rows = []
    for run_id, d in gate.ledger.items():
        row = decision_to_wire(d)
        if run_id in gate.outcomes:
            gain, cost = gate.outcomes[run_id]
            row["outcome"] = {"gain": gain, "cost": cost, "would_have_approved": gate.would_have_approved(run_id)}
        rows.append(row)
    acc = {k: _num(v) for k, v in gate.accuracy().items()}
    return {"threshold": gate.threshold, "decisions": rows, "accuracy": acc}
