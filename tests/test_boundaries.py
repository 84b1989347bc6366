"""The layers and who may import whom (docs/architecture.md), enforced on every import statement
of the code, as trio's tests do for its ``_core``: the kernel imports nothing of the project; a
service never imports another service; the libraries (lm, sims, accel) never import services,
clients or bench; clients import only the kernel."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT = {
    "kernel",
    "services",
    "clients",
    "lm",
    "sims",
    "accel",
    "bench",
    "tests",
    "reason",
    "bklm",
    "planner",
    "spark",
    "tools",
}
#: package -> the project packages it may import (itself always).  Every package of the
#: repository has a row (test_every_package_has_a_row).
ALLOWED = {
    "kernel": set(),
    "clients": {"kernel"},
    "lm": {"accel", "kernel"},
    "sims": {"kernel"},
    "accel": {"kernel"},
    "reason": {"kernel"},
    "bklm": {"accel", "kernel", "lm"},
    "planner": {"kernel", "clients", "lm", "reason", "sims"},
    "spark": {"kernel", "clients", "lm", "accel"},
    "services": {"kernel", "clients", "lm", "sims", "accel", "reason", "bklm", "spark"},
    "bench": PROJECT - {"tests"},
    "tools": {"kernel"},
}
#: Top-level directories that are not Python packages of the project.
NOT_PACKAGES = {"docs", "cuda", "tests", ".ci", ".github", ".venv", "shared"}


def project_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of a project module in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in out if m.split(".")[0] in PROJECT]


def files(package: str) -> list[pathlib.Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_import_only_what_they_may(package):
    bad = []
    for path in files(package):
        for line, module in project_imports(path):
            top = module.split(".")[0]
            if top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert bad == []


def test_every_package_has_a_row():
    """A new top-level package gets a row in ALLOWED (and so its imports are checked)."""
    packages = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_PACKAGES and any(p.rglob("*.py"))
    }
    assert packages - set(ALLOWED) == set(), "add a row to ALLOWED (and docs/architecture.md) for each"
    assert set(ALLOWED) <= PROJECT


def service_of(path: pathlib.Path) -> str | None:
    """The service package a file of services/ belongs to (None: the shared runtime)."""
    rel = path.relative_to(REPO / "services").parts
    return rel[0] if len(rel) > 1 else None


def test_a_service_never_imports_another_service():
    shared = {"services", "services.base", "services.common"}
    bad = []
    for path in files("services"):
        own = service_of(path)
        for line, module in project_imports(path):
            parts = module.split(".")
            if parts[0] != "services" or module in shared or ".".join(parts[:2]) in shared:
                continue
            if own is None or parts[1] != own:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert bad == []


def test_the_service_runtime_imports_only_the_kernel():
    for name in ("base.py",):
        mods = {m.split(".")[0] for _, m in project_imports(REPO / "services" / name)}
        assert mods <= {"kernel"}, mods


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: imports are found at any depth, relative ones are not counted."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import numpy\ndef f():\n    from bench import experiments\n    import services.ttc\n    from . import x\n",
        encoding="utf-8",
    )
    assert project_imports(probe) == [(3, "bench"), (3, "bench.experiments"), (4, "services.ttc")]
