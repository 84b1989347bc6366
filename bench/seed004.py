"""Seed 004's modules, each measured beside its peer in the place reca uses it (issue 31).

One benchmark, one section per seed item.  A section is a module ``bench/_s004_<name>.py`` with a
function ``run(quick: bool) -> bench._common.Result``; this file only lists the sections in
order, runs each and merges their figures (every metric, target and sample key is prefixed
``<name>.``, every table row gets a ``section`` column, every note is prefixed ``[<name>]``).
Adding a section is adding a module and a line in :data:`SECTIONS`; a listed section whose module
is not there yet is reported in a note (``not built``), never silently.

``--quick``: every section runs its quick mode; the whole benchmark stays well under 60 s.  Each
section sets ``torch.set_num_threads(1)`` for its run (this file restores the caller's count):
on the shared 2-core machine the figures are contended and comparable only within one run.

Sections (see docs/seeds.md for where each module lives in reca):

* ``routers``   — S-1: hash vs switch routing in an MoE FFN, balance and accuracy at equal
  active parameters (:mod:`lm.routers`);
* ``attention`` — S-2: the one attention entry point, fused SDPA vs the explicit-softmax
  reference, time and agreement (:mod:`lm.attention`);
* ``lora``      — S-4: int4 LoRA vs fp16 / int8 LoRA at equal rank, loss after the same
  training and bits billed (:mod:`accel.precision`);
* ``topk``      — C-5: per-query top-k keys vs Quest-style block-sparse selection at equal
  budget, accuracy and blocks touched (:mod:`lm.kvpolicy`);
* ``scaling``   — S-3 (s31b): breakpoint scaling law as a predictor;
* ``recurrent`` — C-1/C-2/C-6 (s31b): recurrent peers without a KV cache;
* ``memory``    — C-7 (s31b): streaming compression + vector store;
* ``hyena``     — C-3/C-4 (s31b): Hyena and MegaByte peers, or why not.
"""

from __future__ import annotations

import importlib
import time

import torch

from bench._common import Result, progress

#: Section name -> what it measures (order = the order they run and print in).
SECTIONS: dict[str, str] = {
    "routers": "S-1 MoE routing: hash vs switch, balance and accuracy at equal active parameters",
    "attention": "S-2 one attention entry point: fused vs explicit softmax",
    "lora": "S-4 int4 LoRA vs fp16/int8 at equal rank",
    "topk": "C-5 top-k keys vs block-sparse selection at equal budget",
    "scaling": "S-3 breakpoint scaling law as a predictor (s31b)",
    "recurrent": "C-1/C-2/C-6 recurrent peers without a KV cache (s31b)",
    "memory": "C-7 streaming compression + vector store (s31b)",
    "hyena": "C-3/C-4 Hyena and MegaByte peers (s31b)",
}
HEADLINE: dict[str, str] = {}
RUNS = 1


def _section_module(name: str):
    """The section's module, or None when it is not built yet (its absence is reported)."""
    try:
        return importlib.import_module(f"bench._s004_{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench._s004_{name}":
            raise  # a section that is there but imports something missing is an error, not absent
        return None


def merge(into: Result, name: str, part: Result, seconds: float) -> None:
    """Fold section ``name``'s result into the benchmark's (keys prefixed ``name.``)."""
    into.metrics.update({f"{name}.{k}": v for k, v in part.metrics.items()})
    into.targets.update({f"{name}.{k}": v for k, v in part.targets.items()})
    into.samples.update({f"{name}.{k}": v for k, v in part.samples.items()})
    into.table.extend({"section": name, **row} for row in part.table)
    into.notes.extend(f"[{name}] {n}" for n in part.notes)
    for plot in part.plots:
        into.plots.append({**plot, "name": f"seed004_{name}_{plot['name']}"})
    into.metrics[f"{name}.section_seconds"] = seconds


def run(quick: bool = False, sections: list[str] | None = None) -> Result:
    chosen = list(SECTIONS) if sections is None else sections
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown seed004 section(s) {unknown}; sections: {', '.join(SECTIONS)}")
    out = Result(metrics={})
    threads = torch.get_num_threads()
    try:
        for name in chosen:
            module = _section_module(name)
            if module is None:
                out.notes.append(f"[{name}] not built in this tree: {SECTIONS[name]}")
                continue
            progress("seed004", f"section {name}")
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            part = module.run(quick)
            merge(out, name, part, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    raise SystemExit(main(["seed004", *sys.argv[1:]]))
