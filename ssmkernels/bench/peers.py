"""The peer libraries benchmarked beside ssmkernels, imported only when present.

- ``causal_conv1d``: ``causal_conv1d_fn`` and ``causal_conv1d_update`` (CUDA build of the package).
- ``mamba_ssm``: imported *without* running its ``__init__`` (which pulls in optional packages and
  its CUDA selective scan): a bare module object whose ``__path__`` is the package folder stands in
  for the package, then ``ops.triton.ssd_combined.mamba_chunk_scan_combined``,
  ``ops.triton.selective_state_update.selective_state_update`` and (with its CUDA build)
  ``ops.selective_scan_interface.selective_scan_fn`` are imported directly.
- ``fla``: ``fla.ops.simple_gla.chunk_simple_gla`` computes SSD with q=C, k=B, v=x*dt, g=A*dt, scale 1.
- ``torch``: ``torch.nn.functional.conv1d`` as the baseline of the convolution.

Each entry records why it is missing, so the benchmark table can say so.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Peer:
    name: str
    version: str | None = None
    functions: dict[str, Callable] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, function: str) -> Callable | None:
        return self.functions.get(function)

    def why_missing(self, function: str) -> str:
        return self.errors.get(function) or self.errors.get("*") or f"{self.name}.{function} not found"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _import_mamba_without_init() -> Path:
    """Make ``import mamba_ssm.<sub>`` work without executing ``mamba_ssm/__init__.py``."""
    existing = sys.modules.get("mamba_ssm")
    if existing is not None and getattr(existing, "__path__", None):
        return Path(list(existing.__path__)[0])
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package; runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mamba_ssm is not on the path (unpack its sdist and add it to PYTHONPATH)")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["mamba_ssm"] = package
    return Path(package.__path__[0])


def _version_from_init(folder: Path) -> str | None:
    try:
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (folder / "__init__.py").read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _load_causal_conv1d() -> Peer:
    peer = Peer("causal_conv1d")
    try:
        module = importlib.import_module("causal_conv1d")
        peer.version = getattr(module, "__version__", None)
        for name in ("causal_conv1d_fn", "causal_conv1d_update"):
            if hasattr(module, name):
                peer.functions[name] = getattr(module, name)
            else:
                peer.errors[name] = f"causal_conv1d has no {name}"
    except Exception as exc:
        peer.errors["*"] = _short(exc)
    return peer


def _load_mamba() -> Peer:
    peer = Peer("mamba_ssm")
    try:
        folder = _import_mamba_without_init()
        peer.version = _version_from_init(folder)
    except Exception as exc:
        peer.errors["*"] = _short(exc)
        return peer
    for module_name, name in (("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
                              ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
                              ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")):
        try:
            peer.functions[name] = getattr(importlib.import_module(module_name), name)
        except Exception as exc:
            hint = " (needs mamba_ssm's CUDA build: selective_scan_cuda)" if "selective_scan_cuda" in str(exc) else ""
            peer.errors[name] = _short(exc) + hint
    return peer


def _load_fla() -> Peer:
    peer = Peer("fla")
    try:
        module = importlib.import_module("fla.ops.simple_gla")
        peer.functions["chunk_simple_gla"] = module.chunk_simple_gla
        peer.version = getattr(sys.modules.get("fla"), "__version__", None)
    except Exception as exc:
        peer.errors["*"] = _short(exc)
    return peer


def _load_torch() -> Peer:
    import torch
    import torch.nn.functional as F

    return Peer("torch", torch.__version__, {"conv1d": F.conv1d})


@functools.lru_cache(maxsize=None)
def load() -> dict[str, Peer]:
    """All peers, imported once; a missing one carries its reason."""
    return {peer.name: peer for peer in (_load_causal_conv1d(), _load_mamba(), _load_fla(), _load_torch())}


def versions() -> dict[str, Any]:
    return {name: (peer.version if not peer.errors.get("*") else f"missing: {peer.errors['*']}")
            for name, peer in load().items()}
