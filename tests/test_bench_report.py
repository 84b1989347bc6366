"""bench's result files and report: aggregation over runs, target judging, discovery, markdown."""

import json
import os

import pytest

from bench import __main__ as bench_main
from bench import _report
from bench._common import Result, cdf_plot, line_plot

ENV = {"commit": "abc", "dirty": False, "date": "2026-01-01 00:00 UTC", "machine": "test", "cpus": 2,
       "python": "3", "load_start": [1.0, 1.0, 1.0]}


def _result(x: float, plots=()) -> Result:
    return Result(metrics={"lat_p99_ms": x, "ratio": 2 * x}, targets={"ratio": ("<=", 3.0)},
                  table=[{"system": "reca", "ms": x}, {"system": "peer", "ms": 1.0}],
                  samples={"lat_p99_ms": 1000}, notes=["n"], plots=list(plots))


def test_aggregate_takes_medians_spread_and_judges_the_median():
    doc = _report.aggregate("demo", False, [_result(1.0), _result(2.0), _result(1.4)], ENV, 3.0)
    assert doc["runs"] == 3
    assert doc["metrics"]["lat_p99_ms"] == 1.4
    assert doc["spread"]["lat_p99_ms"] == [1.0, 2.0]
    assert doc["met"] == {"ratio": True}  # median 2.8 <= 3 although one run (4.0) missed
    assert doc["rows"][0]["ms"] == 1.4 and doc["rows"][1]["system"] == "peer"
    assert doc["samples"] == {"lat_p99_ms": 1000}


def test_a_missed_target_is_reported_missed():
    doc = _report.aggregate("demo", True, [_result(5.0)], ENV, 1.0)
    assert doc["met"] == {"ratio": False} and doc["spread"] == {}


def test_rows_of_different_shapes_fall_back_to_the_first_run():
    a, b = _result(1.0), _result(2.0)
    b.table = b.table[:1]
    assert _report.aggregate("demo", False, [a, b], ENV, 1.0)["rows"] == a.table


def test_every_module_not_starting_with_underscore_is_a_benchmark():
    names = bench_main.available()
    assert {"routing", "rois", "igms", "grbfn"} <= set(names)
    assert not any(n.startswith("_") for n in names) and "experiments" not in names


def test_report_renders_tables_targets_plots_and_failures(tmp_path):
    plots = [cdf_plot("cdf", "t", "ms", {"reca": [0.1 * i for i in range(1, 2000)]}),
             line_plot("curve", "t", "x", "y", {"a": ([1, 2], [3, 4])}, logx=True)]
    with open(tmp_path / "demo.json", "w") as fh:
        json.dump(_report.aggregate("demo", False, [_result(1.0, plots), _result(1.2, plots), _result(1.1, plots)],
                                    ENV, 2.0), fh)
    with open(tmp_path / "noplots.json", "w") as fh:  # a benchmark without plots, rows or targets
        json.dump({"bench": "noplots", "metrics": {"x": 1.0}}, fh)
    with open(tmp_path / "broken.json", "w") as fh:
        fh.write("{not json")
    with open(tmp_path / "missed.json", "w") as fh:
        json.dump(_report.aggregate("missed", True, [_result(5.0)], ENV, 1.0), fh)
    md = _report.write_report(str(tmp_path), str(tmp_path / "out.md"))
    text = open(md).read()
    assert "| demo | median of 3 | 1/1 |  |" in text
    assert "| ratio | 2.2 | 2 | 2.4 |  | <= 3 | **met** |" in text
    assert "| lat_p99_ms | 1.1 | 1 | 1.2 | 1000 |" in text
    assert "| missed (quick) | 1 run | 0/1 | `ratio` 10 vs <= 3 |" in text
    assert "## noplots" in text and "## broken" in text and "unreadable result file" in text
    assert os.path.getsize(tmp_path / "out" / "demo_cdf.png") > 1000
    assert os.path.getsize(tmp_path / "out" / "demo_curve.png") > 1000
    assert "![t](out/demo_cdf.png)" in text


def test_cdf_plot_keeps_the_tail():
    p = cdf_plot("c", "t", "ms", {"a": list(range(10_000))}, points=50)
    xs = p["series"][0]["x"]
    assert len(xs) <= 50 and xs[-1] == 9999 and p["series"][0]["y"][-1] == 1.0


def test_bench_all_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        bench_main.main(["all", "--only", "nosuchbench", "--out", "/tmp/unused"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_headlines_name_their_peer_and_deterministic_runs_say_so(tmp_path):
    doc = _report.aggregate("demo", False, [_result(1.0), _result(1.2), _result(1.1)], ENV, 2.0,
                            headline={"ratio": "the strongest peer", "not_a_metric": "dropped"})
    assert doc["headline"] == {"ratio": "the strongest peer"} and doc["deterministic"] is False
    det = _report.aggregate("det", False, [_result(1.0)], dict(ENV, commit="def"), 1.0, deterministic=True)
    for d in (doc, det):
        with open(tmp_path / f"{d['bench']}.json", "w") as fh:
            json.dump(d, fh)
    text = open(_report.write_report(str(tmp_path), str(tmp_path / "out.md"), expected=["demo", "det", "gone"])).read()
    assert "| [demo](#demo) | `ratio` | 2.2 [2, 2.4] (median of 3) | the strongest peer | <= 3: met |" in text
    assert "| det | deterministic | 1/1 |  |" in text
    assert "**Not in this report** (no result file): gone." in text
    assert "**Mixed code**" in text  # commits abc and def, no code version: two versions


def test_commits_that_only_add_results_are_one_version_and_a_code_change_is_not(tmp_path):
    """A bench all continued in batches after committing its partial results reads as one
    version of the code; a batch after a code change is flagged."""
    for name, env in (("a", dict(ENV, commit="c1", code="v1")), ("b", dict(ENV, commit="c2", code="v1"))):
        with open(tmp_path / f"{name}.json", "w") as fh:
            json.dump(_report.aggregate(name, False, [_result(1.0)], env, 1.0), fh)
    text = open(_report.write_report(str(tmp_path), str(tmp_path / "out.md"))).read()
    assert "One version of the code across 2 commits" in text and "Mixed code" not in text
    with open(tmp_path / "b.json", "w") as fh:
        json.dump(_report.aggregate("b", False, [_result(1.0)], dict(ENV, commit="c2", code="v2"), 1.0), fh)
    text = open(_report.write_report(str(tmp_path), str(tmp_path / "out.md"))).read()
    assert "**Mixed code**: these results come from 2 versions" in text
    # One dirty result, or one whose version git could not give, is never "one version" with another.
    for env in (dict(ENV, commit="c2", code="v1", dirty=True), dict(ENV, commit="c2", code="?")):
        with open(tmp_path / "b.json", "w") as fh:
            json.dump(_report.aggregate("b", False, [_result(1.0)], env, 1.0), fh)
        assert "**Mixed code**" in open(_report.write_report(str(tmp_path), str(tmp_path / "out.md"))).read()
    # The real code version ignores documents and stored results, and is stable.
    assert _report.code_version() == _report.code_version() != "?"


def test_plan_prints_recorded_durations_and_the_known_total(tmp_path):
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"a": {"full_s": 90.0, "full_at": {"date": "d", "commit": "c", "runs": 3, "load": [1, 2]}},
                                "b": {"quick_s": 5.0}}))
    lines = _report.plan(["a", "b"], False, _report.load_durations(str(path)))
    assert "1m30s" in lines[1] and "commit c" in lines[1] and "never measured" in lines[2]
    assert lines[-1] == "  total of the known: 1m30s; unknown: b"
    assert _report.estimate("b", True, _report.load_durations(str(path))) == 5.0


def test_bench_all_plan_runs_nothing(capsys):
    assert bench_main.main(["all", "--plan", "--only", "kv_copy,igms"]) == 0
    out = capsys.readouterr().out
    assert "kv_copy" in out and "igms" in out and "total of the known" in out


def test_record_durations_keeps_successful_runs_by_mode(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "durations.json").write_text(json.dumps({
        "ok": {"wall_s": 12.5, "quick": False, "rc": 0, "commit": "c", "date": "d", "load": [3, 4], "runs": None},
        "q": {"wall_s": 2.0, "quick": True, "rc": 0, "commit": "c", "date": "d", "load": [3, 4], "runs": None},
        "bad": {"wall_s": 1.0, "quick": False, "rc": 1}}))
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"ok": {"quick_s": 1.0}}))
    assert sorted(_report.record_durations(str(run), str(path))) == ["ok", "q"]
    got = json.loads(path.read_text())
    assert got["ok"]["full_s"] == 12.5 and got["ok"]["quick_s"] == 1.0 and got["ok"]["full_at"]["load"] == [3, 4]
    assert got["q"] == {"quick_s": 2.0, "quick_at": {"commit": "c", "date": "d", "load": [3, 4], "runs": None,
                                                    "args": None}}
    assert "bad" not in got


def test_report_has_a_wall_time_section(tmp_path):
    with open(tmp_path / "demo.json", "w") as fh:
        json.dump(_report.aggregate("demo", True, [_result(1.0)], ENV, 75.0), fh)
    text = open(_report.write_report(str(tmp_path), str(tmp_path / "out.md"))).read()
    assert "## Wall time" in text and "| demo | quick | 1 | 1m15s | 1.0 -> " in text


def test_bench_all_records_each_benchmark_duration_and_keeps_earlier_batches(tmp_path, capsys):
    (tmp_path / "durations.json").write_text(json.dumps({"earlier": {"wall_s": 3.0, "quick": True, "rc": 0}}))
    assert _report.run_all(["cswif"], str(tmp_path), True, None) == 0  # a real benchmark, quick (seconds)
    rec = json.loads((tmp_path / "durations.json").read_text())
    assert set(rec) == {"earlier", "cswif"}
    assert rec["cswif"]["rc"] == 0 and rec["cswif"]["quick"] is True and rec["cswif"]["wall_s"] > 0
    assert len(rec["cswif"]["load"]) == 2 and rec["cswif"]["commit"]
    assert json.loads((tmp_path / "cswif.json").read_text())["bench"] == "cswif"
    err = capsys.readouterr().err
    assert "cswif ... estimated" in err and "cswif done in" in err and "wall time per benchmark" in err


def test_update_replaces_only_the_benchmarks_given_and_keeps_the_rest(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for name, x in (("alpha", 1.0), ("beta", 5.0)):
        with open(first / f"{name}.json", "w") as fh:
            json.dump(_report.aggregate(name, False, [_result(x)], ENV, 1.0, headline={"ratio": "old peer"}), fh)
    md = str(tmp_path / "out.md")
    _report.write_report(str(first), md)
    assert "| beta | 1 run | 0/1 | `ratio` 10 vs <= 3 |" in open(md).read()
    # a later run of beta alone, at another commit, and a new benchmark gamma
    for name, x in (("beta", 1.2), ("gamma", 0.5)):
        with open(second / f"{name}.json", "w") as fh:
            json.dump(_report.aggregate(name, False, [_result(x)], dict(ENV, commit="new"), 1.0,
                                        headline={"ratio": "new peer"}), fh)
    _report.write_report(str(second), md, update=True)
    text = open(md).read()
    assert "| alpha | 1 run | 1/1 |  |" in text and "| beta | 1 run | 1/1 |  |" in text and "| gamma | 1 run | 1/1 |  |" in text
    assert "`ratio` 10 vs <= 3" not in text  # beta's old, missed row is gone
    assert text.count("## beta") == 1 and "| ratio | 2.4 |" in text  # beta's section is the new run's
    assert "| [alpha](#alpha) | `ratio` | 2 (1 run) | old peer |" in text  # alpha's headline kept
    assert "| [beta](#beta) | `ratio` | 2.4 (1 run) | new peer |" in text and "| [beta](#beta) | `ratio` | 10" not in text
    assert "**updated**" in text and "`beta` (commit new" in text and "`gamma` (commit new" in text
    # updating beta again replaces the header note about beta instead of adding a second one
    _report.write_report(str(second), md, update=True)
    assert open(md).read().count("**updated**") == 1
