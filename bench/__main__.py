"""``python -m bench NAME [--quick] [--json PATH]`` — run one benchmark and print its figures."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys

import bench
from bench._common import print_table


#: Modules of bench/ that are not benchmarks (experiments with their own command line).
NOT_BENCHMARKS = {"experiments"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", nargs="?", help="benchmark name; omit to list them")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
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
    result = module.run(quick=args.quick, **extra)
    print(f"\n== bench {args.name}{' (quick)' if args.quick else ''} ==")
    print_table(result.table)
    for note in result.notes:
        print("note:", note)
    met = result.met()
    print()
    for key, value in result.metrics.items():
        target = result.targets.get(key)
        tail = f"   target {target[0]} {target[1]:g}: {'met' if met[key] else 'NOT met'}" if target else ""
        print(f"{key:40s} {value:12.6g}{tail}")
    if args.json:
        doc = {
            "bench": args.name,
            "quick": args.quick,
            "metrics": result.metrics,
            "targets": {k: list(v) for k, v in result.targets.items()},
            "met": met,
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
