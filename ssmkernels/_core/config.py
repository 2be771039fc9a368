"""Every environment switch of ssmkernels, read in one place.

| variable                    | meaning                                                        |
|-----------------------------|----------------------------------------------------------------|
| SSMKERNELS_BACKEND          | default backend: reference, triton or cuda (unset: fastest)    |
| SSMKERNELS_DETERMINISTIC    | 1: bitwise reproducible kernels (no float atomics)             |
| SSMKERNELS_DISABLE_JIT      | 1: never compile the CUDA extension at run time                |
| SSMKERNELS_CACHE_DIR        | where JIT builds and autotune results live                     |
| SSMKERNELS_CUDA_ARCHS       | CUDA archs to build, ';'-separated (default 90a)               |
| SSMKERNELS_CUDA             | setup.py: 1 build the extension, 0 never, unset auto-detect    |
| SSMKERNELS_POISON_OUTPUTS   | 1: fill kernel outputs with NaN before kernels write (tests)   |
| SSMKERNELS_SSD_DOT_PRECISION| ieee/tf32x3/tf32: float32-operand dots of the Triton SSD       |
| SSMKERNELS_SSD_PRECOMPUTE_CB| 0: Triton SSD heads recompute C B^T (default 1: once per group)|
| TRITON_INTERPRET            | Triton's own: 1 runs Triton kernels on the CPU (tests)         |

Values are read when asked for (not cached at import), so tests can monkeypatch the environment.
"""
from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("reference", "triton", "cuda")

_deterministic_override: bool | None = None


# os.environ.get of an unset variable raises and catches a KeyError inside: ~1.2 us, and the decode
# step reads two variables per call. CPython keeps os.environ's values in a bytes-keyed dict on
# POSIX, updated by every os.environ assignment (monkeypatch.setenv too); reading it takes ~0.05 us.
_RAW_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENCODED_KEYS: dict = {}


def _getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, cheaply."""
    if _RAW_ENVIRON is None:
        return os.environ.get(name, default)
    key = _ENCODED_KEYS.get(name)
    if key is None:
        key = _ENCODED_KEYS[name] = os.environ.encodekey(name)
    value = _RAW_ENVIRON.get(key)
    return default if value is None else os.environ.decodevalue(value)


def _flag(name: str) -> bool:
    return _getenv(name).strip().lower() in ("1", "true", "yes", "on")


def default_backend() -> str | None:
    value = _getenv("SSMKERNELS_BACKEND").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"SSMKERNELS_BACKEND={value!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return value


def deterministic() -> bool:
    if _deterministic_override is not None:
        return _deterministic_override
    return _flag("SSMKERNELS_DETERMINISTIC")


def set_deterministic(enabled: bool | None = True) -> None:
    """Make every kernel bitwise reproducible run to run (no float atomics, pinned configs).

    ``None`` clears the setting, so ``SSMKERNELS_DETERMINISTIC`` decides again. Triton tuning
    configs are pinned when a kernel module is first imported: set this before the first call.
    """
    global _deterministic_override
    _deterministic_override = None if enabled is None else bool(enabled)


def jit_disabled() -> bool:
    return _flag("SSMKERNELS_DISABLE_JIT")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")


def cache_dir() -> Path:
    explicit = _getenv("SSMKERNELS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = _getenv("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssmkernels"


def cuda_archs() -> str:
    return _getenv("SSMKERNELS_CUDA_ARCHS", "90a").strip() or "90a"


def poison_outputs() -> bool:
    """Tests set this so that any output element a kernel fails to write shows up as NaN."""
    return _flag("SSMKERNELS_POISON_OUTPUTS")


_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def ssd_dot_precision() -> str | None:
    """Forced input_precision of the Triton SSD's float32-operand dots (None: chosen per dtype)."""
    value = _getenv("SSMKERNELS_SSD_DOT_PRECISION").strip().lower()
    if not value:
        return None
    if value not in _DOT_PRECISIONS:
        raise ValueError(f"SSMKERNELS_SSD_DOT_PRECISION must be one of {', '.join(_DOT_PRECISIONS)}, got {value!r}")
    return value


def ssd_precompute_cb() -> bool:
    """Whether the Triton SSD computes each chunk's C B^T once per group (default) or per head."""
    return _getenv("SSMKERNELS_SSD_PRECOMPUTE_CB", "1").strip() != "0"
