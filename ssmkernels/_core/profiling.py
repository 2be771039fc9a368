"""Named profiler ranges around the steps of multi-kernel primitives.

The SSD's scan kernel runs in five roles and its segment kernel in several, so a kernel list alone
cannot say which step takes the time. ``step_range(name)`` marks a step for ``torch.profiler`` (and
so for ``bench --profile`` and user traces); it costs nothing measurable (~0.1 us) unless the
profiler is recording. ``STEP_NAMES`` holds every name used, so that a report can list the ranges
apart from the kernels they contain instead of counting that time twice.
"""
from __future__ import annotations

import contextlib

import torch

STEP_NAMES: set[str] = set()


def step_range(name: str):
    """A ``torch.profiler.record_function(name)`` while the profiler records, else a no-op."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    STEP_NAMES.add(name)
    return torch.profiler.record_function(name)
