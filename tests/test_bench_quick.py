"""Every registered benchmark runs end to end in ``--quick`` mode: a broken benchmark fails CI.

Each benchmark runs through the real command line (``python -m bench NAME --quick --json PATH``,
:func:`bench.__main__.main`) in this process, so the interpreter and its imports (torch, SymPy,
NumPy) are paid once, not once per benchmark; benchmarks that start a kernel or services start
them as processes as always.  The exception is :data:`SUBPROCESS`: a benchmark that puts its own
process into an enforcer group (as the kernel does) runs as a child process, so the pytest
process never joins a cgroup.  Each must write a ``reca.bench/1`` document with figures.  Quick
modes are deliberately small (a few seconds of CPU each); nothing here judges a figure or a
target: a quick run's numbers on a busy machine mean little, only that the benchmark works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from bench import __main__ as bench_main
from bench._common import SCHEMA

pytestmark = pytest.mark.system

#: benchmarks another test runs through this same command line and whose document it checks the
#: same way (so the suite pays for them once): the soak, longer and with its assertions
ELSEWHERE = {"soak": "tests/test_soak.py"}
#: extra arguments for benchmarks whose quick run takes a duration (none left: see ELSEWHERE)
EXTRA: dict[str, list[str]] = {}
#: benchmarks that place their own process in an enforcer group (enter_kernel): run in a child
SUBPROCESS = {"enforce"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [n for n in bench_main.available() if n not in ELSEWHERE])
def test_benchmark_runs_in_quick_mode(name: str, tmp_path, capsys) -> None:
    out = tmp_path / f"{name}.json"
    argv = [name, "--quick", "--json", str(out), *EXTRA.get(name, [])]
    if name in SUBPROCESS:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        done = subprocess.run(
            [sys.executable, "-m", "bench", *argv], capture_output=True, text=True, env=env, timeout=540
        )
        rc, printed_out, printed_err = done.returncode, done.stdout, done.stderr
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # a library's warning in a benchmark is printed, not an error here
            rc = bench_main.main(argv)
        printed = capsys.readouterr()
        printed_out, printed_err = printed.out, printed.err
    assert rc == 0, f"bench {name} --quick returned {rc}:\n{printed_out[-3000:]}\n{printed_err[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["bench"] == name and doc["quick"] is True
    assert "error" not in doc
    assert doc["metrics"], f"bench {name} reported no figures"
    assert all(k in doc["metrics"] for k in doc["targets"]), "every target names a reported metric"
    assert doc["env"]["commit"] is not None and doc["env"]["load_start"]
