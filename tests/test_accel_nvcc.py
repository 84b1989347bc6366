"""nvcc compiles every cuda/*.cu to PTX for sm_80 and sm_90, and ptxas assembles that PTX.

One nvcc call per file covers both archs (compiled once per module, the files in parallel);
the tests check the PTX target, the SASS, and that every entry point the wrappers launch exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from accel._backend import CUDA_DIR, ENTRY_POINTS, source_path

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH (CUDA toolkit absent)")


def _compile(module: str, out_dir: Path) -> subprocess.CompletedProcess:
    """One nvcc call per file: PTX and SASS (ptxas) for every arch, intermediates kept."""
    gencode = [f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in ARCHS]
    keep = out_dir / module
    keep.mkdir()
    return subprocess.run(
        [NVCC, "-fatbin", "-std=c++17", "-Werror", "all-warnings", *gencode, "--keep",
         "--keep-dir", str(keep), str(source_path(module)), "-o", str(keep / f"{module}.fatbin")],
        capture_output=True, text=True, check=False,
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    out_dir = tmp_path_factory.mktemp("nvcc")
    modules = sorted(ENTRY_POINTS)
    with ThreadPoolExecutor(max_workers=len(modules)) as pool:
        results = list(pool.map(lambda m: _compile(m, out_dir), modules))
    return {m: (proc, out_dir / m) for m, proc in zip(modules, results)}


def test_every_cu_file_is_covered() -> None:
    on_disk = {p.stem for p in CUDA_DIR.glob("*.cu")}
    assert on_disk == set(ENTRY_POINTS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_nvcc_compiles_to_ptx_and_sass(compiled: dict, module: str, arch: str) -> None:
    proc, keep = compiled[module]
    assert proc.returncode == 0, proc.stderr
    ptx = (keep / f"{module}.compute_{arch}.ptx").read_text()
    assert re.search(rf"^\.target sm_{arch}\b", ptx, re.M), "PTX has the wrong target"
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(ENTRY_POINTS[module])
    assert (keep / f"{module}.compute_{arch}.sm_{arch}.cubin").stat().st_size > 0, "ptxas produced no SASS"


def test_sources_need_no_host_headers() -> None:
    """CuPy compiles with NVRTC, which has no system headers: the .cu files include nothing."""
    for module in ENTRY_POINTS:
        text = source_path(module).read_text()
        assert "#include" not in text, f"{module}.cu includes a header"
        assert text.startswith("// " + module + ".cu"), f"{module}.cu lacks its header comment"
