"""decode's bounds and kept-state answers without a kernel (issue 23): a beam over the worker's
bounds is refused naming the bound, and a decode id of an earlier run of the worker answers
``session_lost`` (its state died with that run), never "no decode"; the supervisor's declarations
that go with them (decode keeps state, declares a CPU grace; incarnations only grow)."""

from __future__ import annotations

import pytest

from kernel import errors
from kernel.supervisor import ChildSpec, incarnation_now, python_module_argv
from services.decode.worker import ID_SPAN, MAX_BEAM_TOKENS, MAX_BEAM_WIDTH, DecodeService


def test_a_beam_over_the_bounds_is_refused_naming_the_bound():
    svc = DecodeService()
    svc._check_beam(MAX_BEAM_WIDTH, MAX_BEAM_TOKENS // MAX_BEAM_WIDTH)  # at the bounds: fine
    with pytest.raises(errors.BadRequest) as info:
        svc._check_beam(MAX_BEAM_WIDTH + 1)
    assert info.value.detail == {
        "kind": "limit",
        "limit": "max_beam_width",
        "max": MAX_BEAM_WIDTH,
        "got": MAX_BEAM_WIDTH + 1,
    }
    with pytest.raises(errors.BadRequest) as info:
        svc._check_beam(4, MAX_BEAM_TOKENS // 4 + 1)
    assert info.value.detail["limit"] == "max_beam_tokens" and info.value.detail["max"] == MAX_BEAM_TOKENS
    svc._check_beam(1, 10 * MAX_BEAM_TOKENS)  # greedy: safe points at every token, no beam bound


def test_an_id_of_an_earlier_run_answers_session_lost():
    svc = DecodeService()
    svc.incarnation = 7
    with pytest.raises(errors.SessionLost) as info:
        svc._decode(None, {"decode": 6 * ID_SPAN + 1})
    assert info.value.code == "session_lost" and info.value.detail["decode"] == 6 * ID_SPAN + 1
    for unknown in (7 * ID_SPAN + 3, 8 * ID_SPAN + 1, 1, "x"):  # this run's (freed or never made), or not one
        with pytest.raises(errors.BadRequest):
            svc._decode(None, {"decode": unknown})


def test_decode_keeps_state_and_declares_a_cpu_grace():
    dec = ChildSpec("decode", python_module_argv("services.decode"))
    assert dec.keeps_state is True and dec.grace_ms == 2000.0
    echo = ChildSpec("echo", python_module_argv("services.echo"))
    assert echo.keeps_state is False and echo.grace_ms == 0.0
    assert ChildSpec("d", python_module_argv("services.decode"), keeps_state=False).keeps_state is False


def test_incarnations_only_grow():
    a = incarnation_now()
    assert incarnation_now(a) > a
    assert incarnation_now(10**12) == 10**12 + 1  # a clock set back never reuses one
    assert a * ID_SPAN < 2**53  # a decode id stays exact in a JSON double
