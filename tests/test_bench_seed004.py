"""bench/seed004.py's section machinery: prefixes, the section column, absent sections said so."""

from __future__ import annotations

import pytest

from bench import seed004
from bench._common import Result


def test_merge_prefixes_every_key_and_tags_rows():
    out = Result(metrics={})
    part = Result(metrics={"a": 1.0}, targets={"a": ("<=", 2.0)}, table=[{"x": 1}], notes=["hi"], samples={"a": 3})
    part.plots.append({"name": "p", "series": []})
    seed004.merge(out, "demo", part, 0.5)
    assert out.metrics == {"demo.a": 1.0, "demo.section_seconds": 0.5}
    assert out.targets == {"demo.a": ("<=", 2.0)} and out.samples == {"demo.a": 3}
    assert out.table == [{"section": "demo", "x": 1}] and out.notes == ["[demo] hi"]
    assert out.plots[0]["name"] == "seed004_demo_p"
    assert out.met() == {"demo.a": True}


def test_an_absent_section_is_reported_not_skipped_silently(monkeypatch):
    monkeypatch.setitem(seed004.SECTIONS, "absent_for_test", "a section nobody wrote")
    res = seed004.run(quick=True, sections=["absent_for_test"])
    assert res.metrics == {}
    assert res.notes == ["[absent_for_test] not built in this tree: a section nobody wrote"]


def test_unknown_sections_are_refused():
    with pytest.raises(ValueError, match="unknown seed004 section"):
        seed004.run(quick=True, sections=["nope"])


def test_every_listed_section_module_has_run():
    for name in seed004.SECTIONS:
        module = seed004._section_module(name)
        assert module is None or callable(module.run)
