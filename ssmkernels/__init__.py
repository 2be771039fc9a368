"""ssmkernels: fused state-space-model kernels (selective scan, SSD, causal conv1d, state update).

Public API (SPEC.md): the five functions below, each with ``backend=None|"reference"|"triton"|"cuda"``,
plus ``set_deterministic``. The compiled CUDA extension is loaded lazily on first CUDA use.
"""
from ._core.config import set_deterministic
from ._core.dispatch import BackendUnavailable
from .ops.causal_conv1d.op import causal_conv1d, causal_conv1d_update
from .ops.selective_scan.op import selective_scan
from .ops.ssd.op import ssd_chunk_scan
from .ops.state_update.op import selective_state_update

__version__ = "0.1.0"



def __getattr__(name: str):
    # ``ssmkernels.models`` and ``ssmkernels.demos`` load on first use, so importing the kernels stays light.
    if name in ("models", "demos"):
        import importlib

        return importlib.import_module(f"ssmkernels.{name}")
    raise AttributeError(f"module 'ssmkernels' has no attribute {name!r}")


__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "selective_scan",
    "ssd_chunk_scan",
    "selective_state_update",
    "set_deterministic",
    "BackendUnavailable",
]
