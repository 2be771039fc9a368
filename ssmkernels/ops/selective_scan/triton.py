"""Triton kernels of selective_scan: not written yet (issue #6)."""
from __future__ import annotations


def unsupported(features: dict) -> str | None:
    return "the triton kernels of selective_scan are not implemented yet (issue #6)"
