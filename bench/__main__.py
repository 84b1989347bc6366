"""``python -m bench NAME [--quick] [--runs K] [--json PATH]`` — run one benchmark and print it.

``python -m bench all [--quick] [--runs K] [--only A,B] [--skip A,B] --out DIR`` runs every
registered benchmark (each module of this package whose name does not start with ``_``), each in
its own process, writing ``DIR/NAME.json`` (the ``reca.bench/1`` shape, see bench/_common.py) and
``DIR/NAME.log``; before each benchmark it prints the duration recorded in bench/durations.json,
after it the measured one (kept in ``DIR/durations.json``); ``--plan`` prints the estimates only.
``python -m bench durations DIR`` copies a run's measured durations into bench/durations.json.
``python -m bench report DIR [--md PATH]`` writes docs/benchmarks.md (and PNG plots in
docs/benchmarks/) from those files; ``--update`` replaces (or adds) only the benchmarks in DIR.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time

import bench
from bench import _report
from bench._common import print_table

#: how many runs a full (non-quick) run aggregates unless the module sets ``RUNS``
DEFAULT_RUNS = 3


#: Modules of bench/ that are not benchmarks (experiments with their own command line).
NOT_BENCHMARKS = {"experiments"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS)


def _names(spec: str | None) -> list[str]:
    return [s for s in (spec or "").split(",") if s]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["all"]:
        return _main_all(argv[1:])
    if argv[:1] == ["report"]:
        return _main_report(argv[1:])
    if argv[:1] == ["durations"]:
        return _main_durations(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="benchmark name; omit to list them")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"runs to aggregate (median, min, max); default 1 with --quick, else the "
                             f"module's RUNS or {DEFAULT_RUNS}")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    parser.add_argument("--minutes", type=float, help="duration, for benchmarks that take one (soak)")
    parser.add_argument("--seed", type=int, help="random seed, for benchmarks that take one (soak)")
    args = parser.parse_args(argv)
    names = available()
    if args.name is None:
        print("benchmarks:", " ".join(names))
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {' '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{args.name}")
    extra = {k: v for k, v in (("minutes", args.minutes), ("seed", args.seed)) if v is not None}
    params = inspect.signature(module.run).parameters
    unknown = [k for k in extra if k not in params]
    if unknown:
        print(f"bench {args.name} takes no {', '.join('--' + k for k in unknown)}", file=sys.stderr)
        return 2
    runs = args.runs if args.runs is not None else (1 if args.quick else getattr(module, "RUNS", DEFAULT_RUNS))
    if runs < 1:
        parser.error("--runs must be >= 1")
    env = _report.environment()
    t0 = time.monotonic()
    results = []
    for i in range(runs):
        if runs > 1:
            print(f"[bench {args.name}] run {i + 1}/{runs}", file=sys.stderr, flush=True)
        results.append(module.run(quick=args.quick, **extra))
    doc = _report.aggregate(args.name, args.quick, results, env, time.monotonic() - t0,
                            headline=getattr(module, "HEADLINE", None),
                            deterministic=getattr(module, "DETERMINISTIC", False))
    print(f"\n== bench {args.name}{' (quick)' if args.quick else ''}, {runs} run(s) ==")
    print_table(doc["rows"])
    for note in doc["notes"]:
        print("note:", note)
    print()
    for key, value in doc["metrics"].items():
        target = doc["targets"].get(key)
        sp = doc["spread"].get(key)
        spread = f" [{sp[0]:.4g}, {sp[1]:.4g}]" if sp else ""
        n = doc["samples"].get(key)
        tail = f"   target {target[0]} {target[1]:g}: {'met' if doc['met'][key] else 'NOT met'}" if target else ""
        print(f"{key:44s} {value:12.6g}{spread}{f' (n={n})' if n else ''}{tail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


def _main_all(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench all", description="run every registered benchmark")
    p.add_argument("--out", metavar="DIR", help="where NAME.json, NAME.log and durations.json go")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--only", help="comma-separated benchmark names")
    p.add_argument("--skip", help="comma-separated benchmark names")
    p.add_argument("--soak-minutes", type=float, help="the soak's duration (default: its own, 10 min full)")
    p.add_argument("--plan", action="store_true", help="print each benchmark's estimated duration; run nothing")
    args = p.parse_args(argv)
    names = available()
    unknown = [n for n in _names(args.only) + _names(args.skip) if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; available: {' '.join(names)}")
    chosen = [n for n in (_names(args.only) or names) if n not in _names(args.skip)]
    if args.plan:
        print("\n".join(_report.plan(chosen, args.quick, _report.load_durations())))
        return 0
    if not args.out:
        p.error("--out DIR is required (except with --plan)")
    extra = {"soak": ["--minutes", str(args.soak_minutes)]} if args.soak_minutes is not None else None
    failed = _report.run_all(chosen, args.out, args.quick, args.runs, extra)
    print(f"{len(chosen) - failed}/{len(chosen)} benchmarks ran; results in {args.out}; "
          f"next: python -m bench report {args.out}")
    return 1 if failed else 0


def _main_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description="docs/benchmarks.md from result files")
    p.add_argument("dir", help="a directory of NAME.json result files (from bench all)")
    p.add_argument("--md", default=f"{_report.ROOT}/docs/benchmarks.md", help="the markdown file to write")
    p.add_argument("--command", default="", help="the command that produced the results (quoted in the report)")
    p.add_argument("--update", action="store_true",
                   help="keep the report at --md and replace (or add) only the benchmarks with a result file in DIR")
    args = p.parse_args(argv)
    print(_report.write_report(args.dir, args.md, args.command, expected=None if args.update else available(),
                               update=args.update))
    return 0


def _main_durations(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench durations",
                                description="copy a bench all run's measured durations into bench/durations.json")
    p.add_argument("dir", help="the --out directory of a bench all run (its durations.json)")
    args = p.parse_args(argv)
    done = _report.record_durations(args.dir)
    print(f"recorded {len(done)} duration(s) in {_report.DURATIONS_FILE}: {' '.join(done)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
