"""Build the compiled pure core (mypyc) into build/core; never in place.

    .venv/bin/python tools/build_core.py           build, then write build/core/MANIFEST.json
    .venv/bin/python tools/build_core.py --check   exit 0 iff build/core is fresh for this tree

The compiled core is opt-in: a process uses it only with ``RECA_COMPILED=<dir>`` set (see
kernel/_compiled.py); pure Python stays the default and the reference the tests run.  This is a
script, not a root setup.py, so that ``pip install -e .`` never compiles anything.

Output: ``build/core/reca_core__mypyc.<SOABI>.so`` (the one shared group library) and
``build/core/kernel/<mod>.<SOABI>.so`` (a small shim per module).  Never build ``--inplace``: a
``.so`` beside ``kernel/ledger.py`` is imported before the ``.py`` and would silently shadow every
later edit (tests/test_compiled_layout.py catches a stray one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# building must not itself load a (possibly stale) compiled core through `import kernel`
os.environ.pop("RECA_COMPILED", None)

from kernel._compiled import CORE, MANIFEST, current  # noqa: E402  (the one list, shared with the loader)

OUT = os.path.join(ROOT, "build", "core")
TMP = os.path.join(ROOT, "build", "core-tmp")


def manifest_now() -> dict:
    import mypy.version

    m = current(ROOT)
    m["mypy"] = mypy.version.__version__
    return m


def fresh() -> str | None:
    """None when build/core matches this tree (sources, interpreter, mypy), else why not."""
    path = os.path.join(OUT, MANIFEST)
    try:
        with open(path) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return f"no readable {os.path.relpath(path, ROOT)}"
    want = manifest_now()
    for key in ("python", "soabi", "mypy"):
        if have.get(key) != want[key]:
            return f"{key} {have.get(key)!r} != {want[key]!r}"
    if have.get("modules") != want["modules"]:
        diff = sorted(set(have.get("modules", {}).items()) ^ set(want["modules"].items()))
        return f"stale for {diff[0][0] if diff else '?'}"
    return None


def build() -> None:
    from setuptools import setup

    from mypyc.build import mypycify

    # a half-written tree must never look fresh: drop the manifest first, write it last
    shutil.rmtree(OUT, ignore_errors=True)
    os.chdir(ROOT)  # module names come from the paths: kernel/ledger.py -> kernel.ledger
    t0 = time.perf_counter()
    # hashed before compiling: a source edited during the build must leave the build stale
    manifest = manifest_now()
    modules = mypycify(
        [f"kernel/{m}.py" for m in CORE],
        opt_level="3",
        # the invariants (check_invariants) are asserts; the tests rely on them compiled too
        strip_asserts=False,
        group_name="reca_core",
        target_dir=os.path.join(TMP, "c"),
    )
    setup(
        name="reca-core-compiled",
        ext_modules=modules,
        script_args=["build_ext", "--build-lib", OUT, "--build-temp", TMP],
    )
    manifest["build_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(OUT, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(os.path.join(OUT, MANIFEST + ".tmp"), os.path.join(OUT, MANIFEST))
    print(f"built {len(CORE)} modules into {os.path.relpath(OUT, ROOT)} in {manifest['build_s']} s", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 0 iff build/core is fresh, 1 otherwise")
    args = ap.parse_args()
    if args.check:
        why = fresh()
        if why:
            print(f"build/core is stale: {why}", file=sys.stderr)
            return 1
        return 0
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
