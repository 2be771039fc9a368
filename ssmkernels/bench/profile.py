"""``python -m ssmkernels bench --profile``: where the time of a case goes, kernel by kernel.

Runs each selected implementation's step a few times under ``torch.profiler`` and prints the GPU
kernels sorted by total time (per call), so that a slow case points at the kernel to work on.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._core.profiling import STEP_NAMES
from .cases import BenchCase
from .runner import Unavailable, build_steps, labels


def kernel_table(step: Callable[[], object], calls: int = 5, top: int = 15) -> str:
    """The ``top`` GPU kernels of ``calls`` runs of ``step``, time per call in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    # CPU activity too: without it the profiler drops the named step ranges (profiling.step_range).
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    averages = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    # Kernels: the GPU-side events. Named steps span kernels (a CPU range whose device time is that
    # of the kernels it launched, and its GPU annotation): listed apart, so that nothing counts twice.
    events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in STEP_NAMES]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    step_times: dict = {}
    for e in averages:
        if e.key in STEP_NAMES and e.device_time_total > step_times.get(e.key, (0, 0))[0]:
            step_times[e.key] = (e.device_time_total, e.count)
    steps = sorted(step_times.items(), key=lambda item: item[1][0], reverse=True)
    total = sum(e.device_time_total for e in events) / calls
    lines = [f"    {'us/call':>10} {'share':>6} {'launches':>8}  kernel (GPU total {total:.1f} us/call)"]
    for e in events[:top]:
        per_call = e.device_time_total / calls
        lines.append(f"    {per_call:10.1f} {100 * per_call / max(total, 1e-9):5.1f}% {e.count // calls:8d}  "
                     f"{e.key[:110]}")
    if steps:
        lines.append(f"    {'us/call':>10} {'share':>6} {'calls':>8}  step (GPU time of its kernels)")
        for name, (device_time, count) in steps:
            per_call = device_time / calls
            lines.append(f"    {per_call:10.1f} {100 * per_call / max(total, 1e-9):5.1f}% {count // calls:8d}  {name}")
    return "\n".join(lines)


def main(selected: list[BenchCase], backends: tuple[str, ...], compare: bool, log=print) -> int:
    for case in selected:
        for label in labels(case, backends, compare):
            try:
                steps = build_steps(case, label)
            except Unavailable as exc:
                log(f"{case.name} [{label}]: not run ({exc})")
                continue
            log(f"{case.name} [{label}] {case.mode} {case.shape}")
            log(kernel_table(steps[0]))
            del steps
            torch.cuda.empty_cache()
    return 0
