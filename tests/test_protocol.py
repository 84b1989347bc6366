"""The protocol in one module: kernel/protocol.py is the only place that names a management
operation, docs/protocol.md lists exactly its operations and error codes, every operation has a
handler, and arguments are validated from the table's schemas."""

from __future__ import annotations

import pathlib
import re

import pytest

from kernel import errors
from kernel import protocol as P
from kernel.ledger import Ledger
from kernel.mmi import Management, handler_name
from kernel.router import Router

REPO = pathlib.Path(__file__).resolve().parent.parent
#: Code packages (tests and docs aside).
CODE = ("kernel", "services", "clients", "bench", "lm", "sims", "accel")


def _doc_section(title: str) -> str:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_no_mmi_literal_outside_the_protocol_module():
    offenders = []
    for package in CODE:
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "kernel" / "protocol.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"""(?<![A-Za-z0-9_])[bfrBFR]?["']mmi\.""", line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == [], "use kernel.protocol's MMI_* constants:\n" + "\n".join(offenders)


def test_docs_list_exactly_the_operations_of_the_table():
    section = _doc_section("## MMI (RFC 8/MMI)")
    documented = set(re.findall(r"`(mmi\.[a-z.]+)`", section))
    assert documented == set(P.MMI_OPS)


def test_docs_list_exactly_the_error_codes():
    section = _doc_section("## Error codes")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == {c.value for c in P.ErrorCode}


def test_every_error_code_has_its_exception_and_round_trips():
    for code in P.ErrorCode:
        exc = errors.from_wire({"code": code.value, "message": "m"})
        assert type(exc) is not errors.RecaError and exc.code == code
        assert exc.to_wire()["code"] == code.value


def test_every_operation_has_one_handler_and_a_known_authority():
    m = Management()
    assert set(m.handlers) == set(P.MMI_OPS)
    for name, spec in P.MMI_OPS.items():
        assert name.startswith(P.MMI_PREFIX) and spec.name == name
        assert callable(getattr(Management, handler_name(name)))
        assert spec.authority in P.Role and spec.scope in P.Scope
        for arg in spec.args:
            assert arg.kind in P.KINDS and (arg.items is None or arg.items in P.KINDS)
    # process control and control orders are the operator's; audits a service's
    assert {n for n, s in P.MMI_OPS.items() if s.authority is P.Role.OPERATOR} == {
        P.MMI_CONTROL, P.MMI_PROC_STOP, P.MMI_PROC_CONT, P.MMI_PROC_NICE, P.MMI_PROC_AFFINITY}
    assert P.MMI_OPS[P.MMI_AUDIT].authority is P.Role.SERVICE
    assert P.Role.CLIENT.rank < P.Role.SERVICE.rank < P.Role.OPERATOR.rank


def test_ledger_operations_of_the_table_exist_on_the_ledger():
    for spec in P.MMI_OPS.values():
        if spec.ledger_op is not None:
            assert callable(getattr(Ledger, spec.ledger_op))


@pytest.mark.parametrize("op, arg, field", [
    (P.MMI_GATE_RESERVE, {"job": "j"}, "resource"),
    (P.MMI_GATE_RESERVE, {"resource": "r", "amount": True}, "amount"),
    (P.MMI_GATE_RESERVE, {"resource": "r", "commit": 1}, "commit"),
    (P.MMI_GATE_RENEW, {"reservations": "r1"}, "reservations"),
    (P.MMI_AUDIT, {"source": "", "events": [{}]}, "source"),
    (P.MMI_AUDIT, {"source": "s", "events": [1]}, "events"),
    (P.MMI_AUDIT, {"source": "s", "events": [{}] * (P.MAX_AUDIT_EVENTS + 1)}, "events"),
    (P.MMI_CONTROL, {"op": "preempt", "message": {}}, "op"),
    (P.MMI_PROC_AFFINITY, {"child": "c", "cpus": ["0"]}, "cpus"),
    (P.MMI_JOB_OPEN, {"job": "j", "budget": [1]}, "budget"),
])
def test_schema_refuses_bad_arguments_naming_the_field(op, arg, field):
    with pytest.raises(errors.BadRequest, match=field):
        P.check_args(P.MMI_OPS[op], arg)


def test_schema_fills_defaults_and_needs_exactly_one_target():
    got = P.check_args(P.MMI_OPS[P.MMI_GATE_RESERVE], {"resource": "r", "extra": object()})
    assert got == {"job": "default", "resource": "r", "amount": 1, "commit": False, "up_to": False}
    assert P.check_args(P.MMI_OPS[P.MMI_JOB_OPEN], {"job": "j", "parent": None}) == {"job": "j", "priority": 0}
    spec = P.MMI_OPS[P.MMI_PREEMPT]
    assert P.check_args(spec, {"id": 3}) == {"id": 3, "service": P.CTL_ALL}
    for bad in ({}, {"id": 3, "job": "j"}, {"token": 5}):
        with pytest.raises(errors.BadRequest):
            P.check_args(spec, bad)


def _management_call(router: Router, name: str, arg) -> object:
    return router.management.handle(router, name, arg, 0.0, caller=b"C")


def test_a_router_without_a_ledger_answers_501_for_ledger_operations_and_validates_first():
    router = Router(lambda frames: None)
    assert _management_call(router, P.MMI_JOB_OPEN, {"job": "j"}) is None  # the router answers 501
    assert _management_call(router, "mmi.nonesuch", {}) is None
    assert isinstance(_management_call(router, P.MMI_GATE_COMMIT, {}), errors.BadRequest)
    assert _management_call(router, P.MMI_SERVICE, "echo") == P.MMI_NOT_FOUND
    assert "services" in _management_call(router, P.MMI_STATS, None)


def test_child_environment_names_are_the_protocols():
    from kernel import supervisor

    assert supervisor.ENV_ENDPOINT == P.ENV_ENDPOINT and set(P.CHILD_ENV) >= {
        supervisor.ENV_CONTROL, supervisor.ENV_HEARTBEAT, supervisor.ENV_LIVENESS, supervisor.ENV_PARENT}
