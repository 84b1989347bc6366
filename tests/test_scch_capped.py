"""scch's client text: no attribute (hence no method) reachable, parsing in a memory-capped child.
Issue 23's hostile input, ``x.subs(y, x.name.center((3000000000).p))``, took the service to
2.95 GB; here it is refused before parsing, and -- sent to the child directly, past the check --
fails there at the child's ceiling while this process's memory stays where it was."""

from __future__ import annotations

import psutil
import pytest

from reason import canon as C
from reason.errors import ParseError
from services.scch import capped
from services.scch.logic import SubgoalCache
from services.scch.store import open_backend

ATTACK = "x.subs(y, x.name.center((3000000000).p))"


@pytest.fixture(scope="module")
def parser():
    p = capped.CappedParser(mem_bytes=256 << 20, seconds=30.0)  # generous bound: a busy machine
    yield p
    p.close()


@pytest.mark.parametrize("text", [ATTACK, "x.name", "(3).p", "x . subs(y, 1)", "sin(x).func", "x.__class__"])
def test_attribute_access_is_refused_before_parsing(text):
    with pytest.raises(capped.AttributeAccess):
        capped.check_text({"kind": "simplify", "expr": text})


@pytest.mark.parametrize("text", ["1.5*x + 2", "x**2 - 0.25", "y'' + 4*y = sin(x)", "3.0e2*x"])
def test_decimals_and_primes_pass_the_check(text):
    capped.check_text({"kind": "simplify", "expr": text, "var": "x"})


def test_the_child_gives_the_same_canonical_form_as_in_process(parser):
    subgoal = {"kind": "integrate", "expr": "sin(2*t + 1)*a", "var": "t"}
    here, there = C.canonicalise(subgoal), parser.canonicalise(subgoal)
    assert there.key == here.key and there.form == here.form
    assert parser.artifact_from_text("integrate", "-cos(x)/2") == C.artifact_from_text("integrate", "-cos(x)/2")


def test_the_attack_past_the_check_hits_the_childs_ceiling_not_ours(parser):
    rss = psutil.Process().memory_info().rss
    with pytest.raises(capped.MemoryExceeded):
        parser._call("canon", ({"kind": "simplify", "expr": ATTACK},))  # skips check_text on purpose
    assert psutil.Process().memory_info().rss - rss < 64 << 20
    # the child was replaced and serves the next request
    assert parser.canonicalise({"kind": "simplify", "expr": "x + x"}).form is not None
    assert parser.replaced >= 1


def test_bad_input_keeps_its_typed_error_through_the_child(parser):
    with pytest.raises(ParseError):
        parser.canonicalise({"kind": "simplify", "expr": "x +* 2"})
    with pytest.raises(ParseError):
        parser.canonicalise({"kind": "simplify", "expr": "__import__('os')"})


def test_the_cache_parses_client_text_only_through_the_parser(parser):
    cache = SubgoalCache(
        open_backend("sqlite", path=":memory:"),
        canonicalise=parser.canonicalise,
        parse_artifact=parser.artifact_from_text,
    )
    with pytest.raises(capped.AttributeAccess):
        cache.get({"kind": "simplify", "expr": ATTACK}, 0.0)
    with pytest.raises(capped.AttributeAccess):
        cache.offer({"kind": "integrate", "expr": "x", "var": "x"}, "x.name", 0.0)
    calls = parser.calls
    cn, answer, _ = cache.get({"kind": "integrate", "expr": "2*x", "var": "x"}, 0.0)
    assert answer is None and parser.calls == calls + 1
    cache.backend.close()
