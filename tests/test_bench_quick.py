"""Every registered benchmark runs end to end in ``--quick`` mode: a broken benchmark fails CI.

Each benchmark runs through the real command line (``python -m bench NAME --quick --json PATH``,
:func:`bench.__main__.main`) in this process, so the interpreter and its imports (torch, SymPy,
NumPy) are paid once, not once per benchmark; benchmarks that start a kernel or services start
them as processes as always.  Each must write a ``reca.bench/1`` document with figures.  Quick
modes are deliberately small (a few seconds of CPU each); nothing here judges a figure or a
target: a quick run's numbers on a busy machine mean little, only that the benchmark works.
"""

from __future__ import annotations

import json
import warnings

import pytest

from bench import __main__ as bench_main
from bench._common import SCHEMA

pytestmark = pytest.mark.system

#: extra arguments for benchmarks whose quick run takes a duration: the soak's quick default (30 s
#: of hostile load) is shortened to 6 s here
EXTRA = {"soak": ["--minutes", "0.1"]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", bench_main.available())
def test_benchmark_runs_in_quick_mode(name: str, tmp_path, capsys) -> None:
    out = tmp_path / f"{name}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # a library's warning in a benchmark is printed, not an error here
        rc = bench_main.main([name, "--quick", "--json", str(out), *EXTRA.get(name, [])])
    printed = capsys.readouterr()
    assert rc == 0, f"bench {name} --quick returned {rc}:\n{printed.out[-3000:]}\n{printed.err[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["bench"] == name and doc["quick"] is True
    assert "error" not in doc
    assert doc["metrics"], f"bench {name} reported no figures"
    assert all(k in doc["metrics"] for k in doc["targets"]), "every target names a reported metric"
    assert doc["env"]["commit"] is not None and doc["env"]["load_start"]
