"""Cuda kernels of state_update: not written yet (issue #7)."""
from __future__ import annotations


def unsupported(features: dict) -> str | None:
    return "the cuda kernels of state_update are not implemented yet (issue #7)"
