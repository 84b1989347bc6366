"""Host emulation of reca's CUDA kernels: the same ``cuda/*.cu`` source compiled by g++.

A small C++ driver includes ``cuda/host_shim.h`` and then the ``.cu`` file, and exports each entry
point through ``EMU_EXPORT`` as ``emu_launch_<name>(grid, block, args)`` (``args`` an array of
pointers to the argument values, the convention of ``cuLaunchKernel``) and
``emu_signature_<name>()`` (one type code per kernel parameter). The shared library is built once
per source/compiler/flags hash into a cache directory (``$RECA_EMU_CACHE`` or
``~/.cache/reca/emulate``) and loaded with ctypes.

:class:`EmulatedFunction` is called exactly like a CuPy ``RawKernel`` —
``f(grid, block, args)`` — and checks every argument against the kernel's signature: a pointer
parameter takes a C-contiguous numpy array, a scalar parameter takes the numpy scalar type of the
same width (``np.int64`` for ``long long``, ``np.int32`` for ``int``…), which is also what CuPy
needs to pass the right bytes. A launch CUDA would reject (zero or oversized grid or block)
raises ``ValueError``. The threads run one after another (see host_shim.h for why that is exact
for these kernels), so emulation is for correctness, never speed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from accel._backend import CUDA_DIR, ENTRY_POINTS, source_path

CXX_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter")
CACHE_ENV = "RECA_EMU_CACHE"

_SCALAR_TYPES: dict[str, tuple[type, type]] = {
    "i": (np.int32, ctypes.c_int32),
    "I": (np.uint32, ctypes.c_uint32),
    "q": (np.int64, ctypes.c_int64),
    "Q": (np.uint64, ctypes.c_uint64),
    "f": (np.float32, ctypes.c_float),
    "d": (np.float64, ctypes.c_double),
}


class EmulationBuildError(RuntimeError):
    """g++ is missing or rejected the driver; the message carries the compiler output."""


def driver_source(module: str) -> str:
    lines = ['#include "host_shim.h"', f'#include "{source_path(module).name}"']
    lines += [f"EMU_EXPORT({name})" for name in ENTRY_POINTS[module]]
    return "\n".join(lines) + "\n"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "reca" / "emulate"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise EmulationBuildError(f"C++ compiler {cxx!r} not found (set CXX)")
    return cxx


def build(module: str) -> Path:
    """Compile (if not cached) the emulation library for one CUDA module; return its path."""
    cxx = _compiler()
    driver = driver_source(module)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (driver, (CUDA_DIR / "host_shim.h").read_text(), source_path(module).read_text(),
                 " ".join(CXX_FLAGS), cxx, version):
        digest.update(part.encode())
    out_dir = _cache_dir() / digest.hexdigest()[:16]
    lib = out_dir / f"libreca_emu_{module}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / f"emu_{module}.cpp"
        src.write_text(driver)
        tmp_lib = Path(tmp) / lib.name
        cmd = [cxx, *CXX_FLAGS, f"-I{CUDA_DIR}", "-x", "c++", str(src), "-o", str(tmp_lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise EmulationBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders never load a half-written file
    return lib


class EmulatedFunction:
    """One kernel entry point, callable as ``f(grid, block, args)`` like a CuPy ``RawKernel``."""

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.name = name
        self._launch = getattr(lib, f"emu_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"emu_signature_{name}")
        sig.restype = ctypes.c_char_p
        self.signature: str = sig().decode()

    def _dims(self, dims: Any, what: str) -> Any:
        dims = tuple(int(d) for d in (dims if isinstance(dims, tuple) else (dims,)))
        if not 1 <= len(dims) <= 3:
            raise ValueError(f"{self.name}: {what} must have 1 to 3 dimensions, got {dims}")
        dims += (1,) * (3 - len(dims))
        if any(d < 0 or d >= 2**32 for d in dims):
            raise ValueError(f"{self.name}: {what} {dims} out of range")
        return (ctypes.c_uint * 3)(*dims)

    def __call__(self, grid: Any, block: Any, args: tuple) -> None:
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        keep: list[Any] = []  # ctypes values must outlive the call
        pointers = (ctypes.c_void_p * len(args))()
        for i, (code, arg) in enumerate(zip(self.signature, args)):
            if code == "p":
                if not isinstance(arg, np.ndarray) or not arg.flags.c_contiguous:
                    raise TypeError(f"{self.name} argument {i}: expected a C-contiguous ndarray, got {type(arg).__name__}")
                value: Any = ctypes.c_void_p(arg.ctypes.data)
            else:
                np_type, c_type = _SCALAR_TYPES[code]
                if type(arg) is not np_type:
                    raise TypeError(f"{self.name} argument {i}: expected {np_type.__name__}, got {type(arg).__name__}")
                value = c_type(arg.item())
            keep.append(value)
            pointers[i] = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
        rc = self._launch(self._dims(grid, "grid"), self._dims(block, "block"), pointers)
        if rc != 0:
            raise ValueError(f"{self.name}: invalid launch configuration grid={grid} block={block}")


class EmulatedModule:
    """The emulated counterpart of a CuPy ``RawModule`` for one ``cuda/<module>.cu``."""

    def __init__(self, module: str):
        self.module = module
        self.library_path = build(module)
        self._lib = ctypes.CDLL(str(self.library_path))
        self._functions = {name: EmulatedFunction(self._lib, name) for name in ENTRY_POINTS[module]}

    def get_function(self, name: str) -> EmulatedFunction:
        try:
            return self._functions[name]
        except KeyError:
            raise ValueError(f"{self.module}.cu has no entry point {name!r}") from None


@functools.cache
def emulated_module(module: str) -> EmulatedModule:
    return EmulatedModule(module)
