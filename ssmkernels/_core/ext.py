"""Lazy, cached loading of the compiled CUDA extension ``ssmkernels._C``.

Order: the module shipped in the package (built by ``pip install`` with CUDA, or by
``python -m ssmkernels build --inplace``); then a compile-on-first-use build cached under
``SSMKERNELS_CACHE_DIR`` keyed by Python ABI, nvcc version, archs and source hash, built under a
file lock so concurrent processes build once (``SSMKERNELS_DISABLE_JIT=1`` forbids this step).
If neither works, ``load_error()`` says exactly why and the CUDA backend reports it.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import sys
from pathlib import Path

from . import build, config

_module = None
_error: str | None = None
_tried = False


def jit_dir() -> Path:
    root = build.source_root()
    nvcc = build.find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found, so the extension cannot be compiled on first use")
    return config.cache_dir() / "build" / build.cache_key(root, nvcc, config.cuda_archs())


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location("ssmkernels._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["ssmkernels._C"] = module
    return module


def build_cached(verbose: bool = False, log=print) -> Path:
    """Build (or find) the JIT-cached extension; returns the module file."""
    target = jit_dir()
    with _file_lock(target.with_suffix(".lock")):
        built = sorted((target / "lib").glob("_C*"))
        if built:
            return built[0]
        return build.build(target / "lib", target / "cmake", verbose=verbose, log=log)


def _load():
    try:
        return importlib.import_module("ssmkernels._C"), None
    except ImportError as exc:
        shipped_error = f"no prebuilt ssmkernels._C ({exc})"
    try:
        cached = sorted((jit_dir() / "lib").glob("_C*"))
    except FileNotFoundError as exc:
        return None, f"{shipped_error}; {exc}"
    if cached:
        return _import_file(cached[0]), None
    if config.jit_disabled():
        return None, (f"{shipped_error}, none cached, and SSMKERNELS_DISABLE_JIT=1 forbids compiling it: "
                      f"run `python -m ssmkernels build`")
    try:
        path = build_cached(log=lambda msg: print(msg, file=sys.stderr, flush=True))
        return _import_file(path), None
    except Exception as exc:  # a failed build must not crash the caller: the backend reports it
        return None, f"{shipped_error}, and compiling it failed: {exc}"


def load_error() -> str | None:
    """None when the extension is loaded (loading it on first call), else why it is unavailable."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        _module, _error = _load()
    return _error


def module():
    """The compiled extension; raises RuntimeError saying why when it is unavailable."""
    reason = load_error()
    if reason:
        raise RuntimeError(f"the ssmkernels CUDA extension is unavailable: {reason}")
    return _module


def has_kernel(name: str) -> bool:
    return load_error() is None and hasattr(_module, name)
