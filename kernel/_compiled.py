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
import importlib.util
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
#: The group's shared library (mypyc names it after ``group_name`` in tools/build_core.py).
GROUP = "reca_core__mypyc"


def current(root: str) -> dict[str, object]:
    """What a build for the tree at ``root`` records: interpreter, ABI, the sha256 of each source."""
    modules = {}
    for m in CORE:
        rel = f"kernel/{m}.py"
        with open(os.path.join(root, rel), "rb") as f:
            modules[rel] = hashlib.sha256(f.read()).hexdigest()
    return {"python": platform.python_version(), "soabi": sysconfig.get_config_var("SOABI"), "modules": modules}


def check(build_dir: str, root: str) -> str:
    """Check the build in ``build_dir`` against the sources of the tree at ``root``; raise
    ImportError, naming what is stale, when it does not match.  The path of its group library."""
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
    # Only the checked modules may be found there: a shim of a module since taken out of CORE would
    # be imported first and its source edits ignored (a stale build used silently).
    extra = sorted(
        f for f in os.listdir(os.path.join(build_dir, "kernel")) if f.endswith(suffix) and f[: -len(suffix)] not in CORE
    )
    if extra:
        raise ImportError(f"compiled core in {build_dir} holds kernel/{extra[0]}, not a compiled module; {hint}")
    lib = os.path.join(build_dir, GROUP + suffix)
    if not os.path.isfile(lib):
        raise ImportError(f"compiled core in {build_dir} lacks {GROUP}{suffix}; {hint}")
    return lib


def _load_group(lib: str) -> None:
    """Load the group library the shims import by name from ``lib`` itself, so no other copy on
    sys.path (PYTHONPATH, the script's folder, another build) can be the one they get."""
    loaded = sys.modules.get(GROUP)
    if loaded is not None:
        if os.path.abspath(getattr(loaded, "__file__", None) or "") != lib:
            raise ImportError(f"{GROUP} is already loaded from {getattr(loaded, '__file__', None)}, not {lib}")
        return
    spec = importlib.util.spec_from_file_location(GROUP, lib)
    if spec is None or spec.loader is None:
        raise ImportError(f"{lib} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules[GROUP] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[GROUP]
        raise


def activate(build_dir: str, kernel_path: list[str]) -> None:
    """Check the build in ``build_dir`` against the sources (:func:`check`), load its group library
    and put its modules first on ``kernel_path`` (the package's ``__path__``)."""
    build_dir = os.path.abspath(build_dir)
    lib = check(build_dir, os.path.dirname(os.path.abspath(kernel_path[0])))
    _load_group(lib)
    kernel_path.insert(0, os.path.join(build_dir, "kernel"))
