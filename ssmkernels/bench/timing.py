"""GPU timing: CUDA-event medians after warm-up, and the GPU's measured peaks.

``measure(fns)`` times each call with its own pair of CUDA events (so percentiles mean something),
cycling through ``fns`` (one closure per rotated input copy, so small working sets are not served
from L2). ``peaks()`` measures, once per run, a large device-to-device copy (bandwidth roof) and an
8192^3 bf16 matmul (compute roof); results are reported as a percentage of both.
Decode-sized calls are host-bound, so their per-call events mostly time Python, and so are larger
ones where the host's enqueue time nears the kernels' (a fwd+bwd on a loaded machine);
``queued_gpu_us`` times any call with the host taken out (the bench reports it for every case), and
``wall_per_call_us`` with it included.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def measure(fns: Sequence[Callable[[], Any]], warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 10, max_reps: int = 2000) -> Timing:
    """Median (and 20th/80th percentile) time of one call, in ms, from CUDA events."""
    fns = list(fns)
    fns[0]()  # first call: compilation, autotuning, lazy loading
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(warmup_ms / estimate))):
        fns[i % len(fns)]()
    reps = min(max(int(rep_ms / estimate), min_reps), max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), times[0], reps)


def warm_up(fns: Sequence[Callable[[], Any]], seconds: float, at_least: int) -> None:
    """Calls ``fns`` in turn, untimed, ``at_least`` times and for at least ``seconds``. On the H200
    machine a batch-1 decode loop measured 10.8-17.5 us per call in different loops of one process
    (in one run the first ~0.5 s were the slow ones): a time-based warm-up takes out that first
    phase; the spread that remains shows in the median of several loops."""
    fns = list(fns)
    warm_until = time.perf_counter() + seconds
    i = 0
    while i < at_least or time.perf_counter() < warm_until:
        fns[i % len(fns)]()
        i += 1


def wall_per_call_us(fns: Sequence[Callable[[], Any]], calls: int = 500, loops: int = 1,
                     warmup_s: float = 0.0) -> float:
    """Wall-clock time per call of a back-to-back loop (host overhead included), in microseconds:
    what a decode loop without CUDA graphs sees. With ``loops`` > 1, the median of that many loops
    (one loop of 500 calls is 5-10 ms of host time, easily disturbed).

    The loop first runs for ``warmup_s`` untimed (see :func:`warm_up`)."""
    fns = list(fns)
    warm_up(fns, warmup_s, at_least=20)
    torch.cuda.synchronize()
    per_loop = []
    for _ in range(loops):
        started = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
        per_loop.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(per_loop)


def queued_times(fns: Sequence[Callable[[], Any]], calls: int = 200, host_us: float | None = None
                 ) -> tuple[float, float]:
    """(GPU time, host enqueue time) per call, in microseconds: a spin kernel holds the GPU while
    ``calls`` calls are queued behind it, so the events around them time the kernels back to back
    and the host's clock times its own work alone. For calls whose per-call events mostly time the
    host (the GPU idles between a start event and a launch that Python has not issued yet)."""
    fns = list(fns)
    if host_us is None:  # (the wall-clock time per call, when the caller measured it already)
        host_us = wall_per_call_us(fns, calls=20)
    # hold the GPU for twice the time queueing takes (torch.cuda._sleep spins for a cycle count; 2e9
    # cycles per second is about an H100's clock, an overestimate of older GPUs')
    cycles = int(max(2e8, 2 * calls * host_us * 1e-6 * 2e9))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    start.record()
    started = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    enqueue_us = (time.perf_counter() - started) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3, enqueue_us


def queued_gpu_us(fns: Sequence[Callable[[], Any]], calls: int = 200, host_us: float | None = None) -> float:
    """GPU time per call with the host taken out, in microseconds (see :func:`queued_times`)."""
    return queued_times(fns, calls, host_us)[0]


@dataclass
class Peaks:
    copy_gbps: float  # device-to-device copy: (read + write) bytes / time
    matmul_tflops: float  # 8192^3 bf16 matmul
    copy_bytes: int
    matmul_n: int

    def as_dict(self) -> dict:
        return asdict(self)


def peaks(copy_gib: float = 1.0, matmul_n: int = 8192) -> Peaks:
    """Measure the GPU's copy bandwidth and bf16 matmul rate once (a few hundred ms)."""
    elements = int(copy_gib * 2**30) // 4
    src = torch.empty(elements, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    copy = measure([lambda: dst.copy_(src)], warmup_ms=50, rep_ms=200)
    copy_bytes = 2 * elements * 4
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty_like(a)
    mm = measure([lambda: torch.matmul(a, b, out=c)], warmup_ms=100, rep_ms=300)
    del a, b, c
    torch.cuda.empty_cache()
    return Peaks(copy_gbps=copy_bytes / (copy.median_ms * 1e-3) / 1e9,
                 matmul_tflops=2 * matmul_n**3 / (mm.median_ms * 1e-3) / 1e12,
                 copy_bytes=copy_bytes, matmul_n=matmul_n)
