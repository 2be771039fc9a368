"""Building the torch-free CUDA extension ``ssmkernels._C`` with CMake + ninja.

CMakeLists.txt is the single description of the build; this module only drives it, for setup.py
(ahead of time), ``python -m ssmkernels build`` and the compile-on-first-use cache in ``ext.py``.
The module links the CUDA runtime statically and includes no torch header, so one build serves
every torch version.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from . import config


def source_root() -> Path:
    """Folder holding CMakeLists.txt and csrc/: the checkout, or the copy shipped in the wheel."""
    package = Path(__file__).resolve().parents[1]
    for root in (package.parent, package / "_native"):
        if (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir():
            return root
    raise FileNotFoundError(f"no CMakeLists.txt with csrc/ next to {package} or in {package / '_native'}")


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def find_cmake() -> str:
    try:
        import cmake  # the PyPI package ships a recent binary

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise FileNotFoundError("cmake not found: pip install cmake") from None
        return found


def sources_hash(root: Path) -> str:
    digest = hashlib.sha256()
    files = [root / "CMakeLists.txt", *sorted((root / "csrc").rglob("*"))]
    for path in files:
        if path.is_file() and path.suffix in (".txt", ".cu", ".cuh", ".cpp", ".h", ".hpp"):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(root: Path, nvcc: str, archs: str) -> str:
    """Python ABI, CUDA compiler, archs and sources; torch is not part of it (the module is torch-free)."""
    abi = sysconfig.get_config_var("EXT_SUFFIX") or sys.version
    text = "|".join([abi, nvcc_version(nvcc), archs, sources_hash(root)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build(output_dir: Path, build_dir: Path, archs: str | None = None, jobs: int | None = None,
          verbose: bool = False, log=print) -> Path:
    """Configure and build ``_C`` into ``output_dir``; returns the built file's path."""
    root = source_root()
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDACXX / CUDA_HOME")
    archs = archs or config.cuda_archs()
    cmake = find_cmake()
    build_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    configure = [cmake, "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-DSSMKERNELS_CUDA_ARCHS={archs}", f"-DSSMKERNELS_OUTPUT_DIR={output_dir}"]
    if shutil.which("ninja") or _pip_ninja():
        configure += ["-G", "Ninja"]
        if _pip_ninja():
            configure.append(f"-DCMAKE_MAKE_PROGRAM={_pip_ninja()}")
    jobs = jobs or int(os.environ.get("MAX_JOBS", 0)) or os.cpu_count() or 1
    started = time.perf_counter()
    log(f"ssmkernels: building the CUDA extension for sm_{archs} with {jobs} jobs in {build_dir}")
    _run(configure, verbose)
    _run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], verbose)
    built = sorted(output_dir.glob("_C*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))
    if not built:
        raise RuntimeError(f"the build finished but no _C module appeared in {output_dir}")
    log(f"ssmkernels: built {built[0].name} in {time.perf_counter() - started:.1f} s")
    return built[0]


def _pip_ninja() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        return path if os.path.isfile(path) else None
    except ImportError:
        return None


def _run(cmd: list[str], verbose: bool) -> None:
    result = subprocess.run(cmd, capture_output=not verbose, text=True, check=False)
    if result.returncode != 0:
        output = "" if verbose else (result.stdout[-4000:] + result.stderr[-4000:])
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{output}")
