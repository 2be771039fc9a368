"""One place where Triton kernels get their tuning configs.

``autotune(configs, key)`` wraps ``triton.autotune`` with three policies:
- results are cached on disk (Triton's ``cache_results``, under Triton's cache dir), so a new
  process does not re-tune a shape it has seen;
- deterministic mode (``SSMKERNELS_DETERMINISTIC=1`` when the kernel module is imported) and the
  CPU interpreter use only the first config: a pinned config is reproducible, and the interpreter
  would otherwise run every candidate;
- the first config of every list is the safe default, documented next to the kernel.
"""
from __future__ import annotations

from . import config

# CUDA's limit on a launch grid's y and z sizes (x allows 2**31 - 1): kernels whose grids put batch
# rows or heads there slice or re-grid larger launches.
MAX_GRID_YZ = 65535


def pinned() -> bool:
    return config.deterministic() or config.triton_interpret()


def select(configs: list) -> list:
    """The configs to tune over: all of them, or only the first when pinned."""
    if not configs:
        raise ValueError("a kernel needs at least one config")
    return configs[:1] if pinned() else list(configs)


def autotune(configs: list, key: list[str], **kwargs):
    import triton

    chosen = select(configs)
    if len(chosen) > 1:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=chosen, key=key, **kwargs)
