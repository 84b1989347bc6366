"""The opt-in compiled core: ``RECA_COMPILED=<dir>`` (built by ``./dev build``) makes the
modules in :data:`CORE` load from the mypyc build in ``<dir>``; every other kernel module still
comes from the source tree.

Pure Python stays the default and the reference the tests run.  A stale build (a core source
edited since, another interpreter) is refused with an ImportError that names the module, never
skipped silently: a silent fallback would publish "compiled" figures from the pure path.  This
module is never compiled itself and imports only the standard library, because it runs inside
``import kernel`` before any core module is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig

#: The compiled modules, one mypyc group (``reca_core``).  policy and admission must be in the same
#: group (an interpreted ``BudgetAdmission`` cannot subclass a compiled ``Admission``) and so must
#: router (alone, its calls into interpreted modules go through generic paths and cost more).
#: errors.py cannot be compiled (``Timeout`` subclasses ``TimeoutError``), nor are the I/O shells.
CORE = (
    "ledger",
    "admission",
    "policy",
    "router",
    "mdp",
    "codec",
    "decisions",
    "logstore",
    "host",
    "fairq",
    "state",
    "protocol",
    "dedup",
    "principal",
    "quotas",
    "worker",
)
#: Written last by tools/build_core.py, so a half-written build never looks fresh.
MANIFEST = "MANIFEST.json"
ENV = "RECA_COMPILED"


def current(root: str) -> dict[str, object]:
    """What a build for the tree at ``root`` records: interpreter, ABI, the sha256 of each source."""
    modules = {}
    for m in CORE:
        rel = f"kernel/{m}.py"
        with open(os.path.join(root, rel), "rb") as f:
            modules[rel] = hashlib.sha256(f.read()).hexdigest()
    return {"python": platform.python_version(), "soabi": sysconfig.get_config_var("SOABI"), "modules": modules}


def activate(build_dir: str, kernel_path: list[str]) -> None:
    """Check the build in ``build_dir`` against the sources and put it first on ``kernel_path``
    (the package's ``__path__``); raise ImportError, naming what is stale, when it does not match."""
    build_dir = os.path.abspath(build_dir)
    root = os.path.dirname(os.path.abspath(kernel_path[0]))
    hint = f"{ENV}={build_dir}: run ./dev build"
    try:
        with open(os.path.join(build_dir, MANIFEST)) as f:
            have = json.load(f)
    except (OSError, ValueError) as e:
        raise ImportError(f"no compiled core in {build_dir} ({e}); {hint}") from None
    want = current(root)
    for key in ("python", "soabi"):
        if have.get(key) != want[key]:
            raise ImportError(
                f"compiled core in {build_dir} was built for {key} {have.get(key)!r}, not {want[key]!r}; {hint}"
            )
    built = have.get("modules") or {}
    wanted = want["modules"]
    assert isinstance(wanted, dict)
    for rel, digest in wanted.items():
        if built.get(rel) != digest:
            raise ImportError(f"compiled core in {build_dir} is stale for {rel}; {hint}")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for m in CORE:
        if not os.path.isfile(os.path.join(build_dir, "kernel", m + suffix)):
            raise ImportError(f"compiled core in {build_dir} lacks kernel/{m}{suffix}; {hint}")
    # the group library (reca_core__mypyc) is a top-level module the shims import; appended, so it
    # can never shadow anything; the shims themselves are found first through the package path
    if build_dir not in sys.path:
        sys.path.append(build_dir)
    kernel_path.insert(0, os.path.join(build_dir, "kernel"))
