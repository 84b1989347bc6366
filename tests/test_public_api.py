"""The kernel's marked public API: what services, clients and the libraries may use of it.

Only the modules in PUBLIC may be imported from outside kernel/ (bench and tests aside: they
measure and test internals), and only the names a module lists in ``__all__`` (for a module
without ``__all__``: its names without a leading underscore).  Both ``from kernel.m import name``
and ``alias.name`` after ``from kernel import m as alias`` are checked."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
#: The kernel modules that form its public API.
PUBLIC = {
    "kernel.protocol",
    "kernel.errors",
    "kernel.codec",
    "kernel.config",
    "kernel.gate",
    "kernel.aio",
    "kernel.worker",
    "kernel.auth",
    "kernel.principal",
    "kernel.replay",
    "kernel.enforce",  # the OS enforcement services apply to their own children (issue 23)
    "kernel.rayplace",  # starting/stopping a Ray node with token auth: ttc's Ray runner (issue 28)
}
#: The packages held to it (every package of the repository but the kernel, bench and tests).
USERS = ("services", "clients", "lm", "sims", "accel", "reason", "bklm", "planner", "spark")


def exported(module: str) -> set[str]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return set()
    names = getattr(mod, "__all__", None)
    return set(names) if names is not None else {n for n in vars(mod) if not n.startswith("_")}


def uses(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(line, kernel module, name or None) for every use of the kernel in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "kernel":
                for a in node.names:
                    aliases[a.asname or a.name] = f"kernel.{a.name}"
                    out.append((node.lineno, f"kernel.{a.name}", None))
            elif node.module.startswith("kernel."):
                for a in node.names:
                    out.append((node.lineno, node.module, a.name))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kernel."):
                    aliases[a.asname or a.name] = a.name
                    out.append((node.lineno, a.name, None))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            out.append((node.lineno, aliases[node.value.id], node.attr))
    return out


@pytest.mark.parametrize("package", USERS)
def test_the_kernel_is_used_only_through_its_public_api(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")) if (REPO / package).is_dir() else []:
        for line, module, name in uses(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if module not in PUBLIC:
                bad.append(f"{where} uses {module} (not public)")
            elif name is not None and name not in exported(module):
                bad.append(f"{where} uses {module}.{name} (not in its __all__)")
    assert bad == []


def test_the_checker_sees_a_private_use(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from kernel import codec as C\nfrom kernel.router import Router\nC._packer\n", encoding="utf-8")
    got = uses(probe)
    assert (
        (1, "kernel.codec", None) in got
        and (2, "kernel.router", "Router") in got
        and (3, "kernel.codec", "_packer") in got
    )
    assert "_packer" not in exported("kernel.codec") and "pack" in exported("kernel.codec")
