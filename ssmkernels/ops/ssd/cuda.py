"""Cuda kernels of ssd: not written yet (issue #5)."""
from __future__ import annotations


def unsupported(features: dict) -> str | None:
    return "the cuda kernels of ssd are not implemented yet (issue #5)"
