"""The docs a newcomer follows are checked: docs/services.md's files run as written (its own test
against a real kernel), and docs/config.md is exactly what the config schema generates."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kernel import config
from tests.support import REPO, short_tmpdir

FENCE = re.compile(r"^```(\w+) file=(\S+)\n(.*?)^```", re.M | re.S)


def doc_files(name: str) -> dict[str, str]:
    with open(os.path.join(REPO, "docs", name), encoding="utf-8") as fh:
        return {path: body for _, path, body in FENCE.findall(fh.read())}


def test_services_md_has_the_files_it_promises():
    files = doc_files("services.md")
    assert set(files) == {"hello_service.py", "reca.toml", "test_hello.py"}


def test_services_md_config_is_valid():
    path = os.path.join(short_tmpdir(), "reca.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(doc_files("services.md")["reca.toml"])
    cfg = config.load(path, runtime="/tmp/x")
    assert [s.name for s in cfg.services] == ["hello#0", "hello#1", "view"]


@pytest.mark.system
def test_services_md_example_runs_as_written():
    """The page's service and its test, in a fresh directory on PYTHONPATH, as the page says."""
    work = short_tmpdir()
    for name, body in doc_files("services.md").items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as fh:
            fh.write(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([work, REPO]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hello.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 passed" in out.stdout


@pytest.mark.skipif(
    not hasattr(config, "SCHEMA"),
    reason="needs kernel/config.py's declarative SCHEMA "
    "(issue 25, branch integrity); docs/config.md was generated from it",
)
def test_config_md_is_generated_from_the_schema():
    from kernel.__main__ import config_doc

    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as fh:
        assert fh.read() == config_doc(), "docs/config.md is stale: python -m kernel config-doc > docs/config.md"


def test_config_md_names_every_key_of_the_default_config():
    import tomllib

    with open(os.path.join(REPO, "kernel", "default.toml"), "rb") as fh:
        default = tomllib.load(fh)
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as fh:
        text = fh.read()
    for table, keys in default.items():
        for entry in keys if isinstance(keys, list) else [keys]:
            for key in entry:
                assert f"| `{key}` |" in text, f"[{table}] {key} is not in docs/config.md"
