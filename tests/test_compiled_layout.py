"""Which path ran: the pure core (the default, the reference) or the compiled one (opt-in,
``RECA_COMPILED=<dir>``, built by ``./dev build``), never a silent mix of both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from kernel import _compiled
from kernel._compiled import CORE, ENV, GROUP, MANIFEST, activate, check, current

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "core")
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

#: Prints, for each core module and for one shell module, where it was loaded from.
PROBE = """
import importlib, json, sys
mods = [importlib.import_module("kernel." + m) for m in sys.argv[1:]]
print(json.dumps({m.__name__: m.__file__ for m in mods}))
"""


def _origins(env_dir: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_dir is not None:
        env[ENV] = env_dir
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *CORE, "errors", "server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _fresh(build_dir: str) -> str | None:
    """Why ``build_dir`` cannot be used for this tree (None: it can)."""
    try:
        check(os.path.abspath(build_dir), ROOT)
    except ImportError as e:
        return str(e)
    return None


def _build_or_skip() -> str:
    """The compiled core to check: RECA_COMPILED's (never skipped: ``./dev test --compiled`` must run
    compiled), else build/core when it is fresh for this tree."""
    build = os.environ.get(ENV) or BUILD
    if ENV not in os.environ:
        why = _fresh(build)
        if why is not None:
            pytest.skip(f"no fresh compiled core ({why})")
    return os.path.abspath(build)


def test_without_reca_compiled_every_core_module_is_the_source():
    """The default: a stray in-place ``.so`` beside a core ``.py`` would load first and silently
    shadow every later edit of it."""
    for name, origin in _origins(None).items():
        assert origin == os.path.join(ROOT, *name.split(".")) + ".py", f"{name} loaded from {origin}"


def test_with_reca_compiled_every_core_module_is_compiled():
    """Each core module from its shim under the build, the rest of the kernel from the sources.
    Under ``./dev test --compiled`` (RECA_COMPILED set) this never skips: the run must be compiled."""
    build = _build_or_skip()
    origins = _origins(build)
    for m in CORE:
        assert origins[f"kernel.{m}"] == os.path.join(build, "kernel", m + SUFFIX)
    for m in ("errors", "server"):  # not compiled: still the source tree's
        assert origins[f"kernel.{m}"] == os.path.join(ROOT, "kernel", m + ".py")
    if ENV in os.environ:  # this very process too
        import kernel.ledger

        assert kernel.ledger.__file__ == os.path.join(build, "kernel", "ledger" + SUFFIX)
        assert kernel.ledger.Ledger.__module__ == "kernel.ledger"
        assert sys.modules["reca_core__mypyc"].__file__.startswith(build + os.sep)


def _fake_build(tmp_path, **change) -> str:
    """A build directory whose manifest matches this tree (then ``change``d), with empty shims."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = current(ROOT)
    manifest.update(change)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "kernel").mkdir()
    for m in CORE:
        (tmp_path / "kernel" / (m + SUFFIX)).write_bytes(b"")
    (tmp_path / (GROUP + SUFFIX)).write_bytes(b"")
    return str(tmp_path)


def test_a_matching_build_goes_first_on_the_package_path(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(_compiled, "_load_group", loaded.append)  # the fake build's library is empty
    build = _fake_build(tmp_path)
    path = [os.path.join(ROOT, "kernel")]
    activate(build, path)
    assert path == [os.path.join(build, "kernel"), os.path.join(ROOT, "kernel")]
    assert loaded == [os.path.join(build, GROUP + SUFFIX)]  # the group library: this build's own file


def test_a_stale_build_is_refused_loudly(tmp_path):
    """Never a silent fallback to the pure path: a source edited since the build, another
    interpreter, a missing shim or no build at all raise ImportError naming what to run."""
    manifest = current(ROOT)
    modules = dict(manifest["modules"])  # type: ignore[call-overload]
    modules["kernel/ledger.py"] = "0" * 64
    cases = {
        "stale for kernel/ledger.py": _fake_build(tmp_path / "edited", modules=modules),
        "built for python": _fake_build(tmp_path / "other", python="2.7.18"),
        "built for soabi": _fake_build(tmp_path / "abi", soabi="cpython-27"),
        "no compiled core": str(tmp_path / "none"),
    }
    shimless = _fake_build(tmp_path / "shimless")
    os.remove(os.path.join(shimless, "kernel", "router" + SUFFIX))
    cases[f"lacks kernel/router{SUFFIX}"] = shimless
    libless = _fake_build(tmp_path / "libless")
    os.remove(os.path.join(libless, GROUP + SUFFIX))
    cases[f"lacks {GROUP}{SUFFIX}"] = libless
    # a shim of a module not (or no longer) in CORE would be imported first, its source edits ignored
    extra = _fake_build(tmp_path / "extra")
    (tmp_path / "extra" / "kernel" / ("server" + SUFFIX)).write_bytes(b"")
    cases[f"holds kernel/server{SUFFIX}, not a compiled module"] = extra
    for expect, build in cases.items():
        path = [os.path.join(ROOT, "kernel")]
        with pytest.raises(ImportError, match="run ./dev build") as e:
            activate(build, path)
        assert expect in str(e.value)
        assert path == [os.path.join(ROOT, "kernel")]  # nothing activated
    # and through `import kernel` itself, in a fresh process
    env = {**os.environ, ENV: cases["stale for kernel/ledger.py"]}
    out = subprocess.run(
        [sys.executable, "-c", "import kernel.router"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "ImportError: compiled core in" in out.stderr and "stale for kernel/ledger.py" in out.stderr


def test_the_group_library_is_the_checked_builds_even_with_another_copy_first_on_sys_path(tmp_path):
    """The shims import ``reca_core__mypyc`` by name; a copy earlier on sys.path (PYTHONPATH, another
    build) must not be the one they get (found by review)."""
    build = _build_or_skip()
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.symlink(os.path.join(build, GROUP + SUFFIX), other / (GROUP + SUFFIX))  # stands for a stale build's
    env = {**os.environ, ENV: build, "PYTHONPATH": f"{other}{os.pathsep}{ROOT}"}
    probe = f"import kernel.ledger, sys; print(sys.modules[{GROUP!r}].__file__)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(build, GROUP + SUFFIX)
