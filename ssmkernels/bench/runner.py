"""Runs benchmark cases on every ssmkernels backend and, with ``compare``, every importable peer,
side by side; used by ``python -m ssmkernels bench`` and by ``benchmarks/``."""
from __future__ import annotations

import datetime
import math
from typing import Any, Callable

import torch

from .. import BackendUnavailable
from .._core import config
from . import peers as peer_registry
from .cases import BenchCase, Forward, human_bytes, human_flops
from .report import Row, table, write_json, write_markdown, write_plot
from .timing import Peaks, measure, peaks, queued_gpu_us, wall_per_call_us

KERNEL_BACKENDS = ("cuda", "triton")


def _queued_or_none(steps, row) -> float | None:
    """GPU time per call with the host taken out (``queued_gpu_us``), for every case: per-call events
    time the host wherever it enqueues a call more slowly than the GPU runs it (decode steps, and a
    fwd+bwd whose host path nears its kernels' time on a loaded machine), so the GPU-only figure
    stands beside the event time for ours and the peers alike. Calls: as many as fill about half a
    second, at least 3 and at most 200; the sleep kernel in front is sized from the event-timed
    median, an upper bound of the host time per call. None where it cannot be taken (reported as
    '-'): the measured row stands without it."""
    try:
        per_call_us = row.wall_us_per_call or (row.median_ms or 0.0) * 1e3
        calls = max(3, min(200, int(0.5e6 / max(per_call_us, 1.0))))
        return queued_gpu_us(steps, calls=calls, host_us=max(per_call_us, 1.0))
    except Exception:  # a measurement aid only
        return None


def first_tensor(result: Any) -> torch.Tensor:
    """The main output of a call that may return a tuple (out, states...)."""
    while isinstance(result, (tuple, list)):
        result = result[0]
    return result


def make_step(forward: Forward, leaves: list[torch.Tensor], backward: bool) -> Callable[[], Any]:
    """The timed closure: the forward, or forward + backward of its main output. A forward-only case's
    inputs never require grad, so autograd records nothing and the forward is the step itself (a
    ``torch.no_grad()`` per call added ~2 us of host time, which decode cases would count)."""
    if not backward:
        return forward
    leaves = [t for t in leaves if t.is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    grad_out = torch.randn_like(first_tensor(forward()))

    def step():
        out = first_tensor(forward())
        return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return step


DETERMINISTIC = ":deterministic"


def implementations(case: BenchCase, backends: tuple[str, ...], compare: bool, deterministic: bool = False):
    """(label, build(inputs) -> (forward, leaves), missing reason or None, note) per implementation.
    With ``deterministic``, fwd+bwd cases also get ``ssmkernels:<backend>:deterministic`` rows, run
    under ``ssmkernels.set_deterministic(True)`` (SPEC: the cost of deterministic mode is measured)."""
    impls = []
    for backend in backends:
        def build(kw, b=backend):
            return case.ours(kw, b), [kw[n] for n in case.grads]
        impls.append((f"ssmkernels:{backend}", build, None, ""))
        if deterministic and case.backward:
            impls.append((f"ssmkernels:{backend}{DETERMINISTIC}", build, None, "set_deterministic(True)"))
    if compare:
        loaded = peer_registry.load()
        for peer in case.peers:
            entry = loaded[peer.peer]
            fn = entry.get(peer.function)
            reason = None if fn is not None else entry.why_missing(peer.function)
            impls.append((peer.label, lambda kw, p=peer, f=fn: p.build(kw, f), reason, peer.note))
    return impls


class Unavailable(RuntimeError):
    """An implementation that cannot run here (missing peer, backend that cannot serve the call)."""


def implementation(case: BenchCase, label: str):
    """``(build, note)`` of the implementation called ``label`` in this case (``ssmkernels:<backend>``
    or a peer's label); raises :class:`Unavailable` when it cannot run here."""
    backends = (label.split(":")[1],) if label.startswith("ssmkernels:") else ()
    for name, build, missing, note in implementations(case, backends, compare=not backends,
                                                      deterministic=label.endswith(DETERMINISTIC)):
        if name == label:
            if missing:
                raise Unavailable(missing)
            return build, note
    raise Unavailable(f"{case.name} has no implementation {label!r}")


def labels(case: BenchCase, backends: tuple[str, ...] = KERNEL_BACKENDS, compare: bool = True) -> list[str]:
    return [f"ssmkernels:{b}" for b in backends] + ([p.label for p in case.peers] if compare else [])


def build_steps(case: BenchCase, label: str) -> list[Callable[[], Any]]:
    """Timed closures of one implementation, one per rotated input copy (for ``benchmarks/``).
    Raises :class:`Unavailable` when the implementation cannot run here."""
    build, _ = implementation(case, label)
    device = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    try:
        steps = [make_step(*build(case.make(device)), case.backward) for _ in range(_rotations(case, l2))]
        steps[0]()
    except BackendUnavailable as exc:
        raise Unavailable(str(exc).split("cannot serve this call: ", 1)[-1]) from None
    return steps


def _rotations(case: BenchCase, l2_bytes: int) -> int:
    """How many input copies to cycle through so that one call's data is not left in L2 by the last."""
    if case.bytes >= 2 * l2_bytes:
        return 1
    return min(32, math.ceil(4 * l2_bytes / max(case.bytes, 1)))


def run_case(case: BenchCase, backends: tuple[str, ...], compare: bool, the_peaks: Peaks | None,
             warmup_ms: float, rep_ms: float, device: torch.device | None = None,
             deterministic: bool = False) -> list[Row]:
    device = device or torch.device("cuda")
    l2 = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
          if device.type == "cuda" else 50 * 2**20)
    copies = [case.make(device) for _ in range(_rotations(case, l2))]
    rows = []
    for label, build, missing, note in implementations(case, backends, compare, deterministic):
        row = Row(case.name, case.primitive, case.mode, case.shape, label, "ok", bytes=case.bytes, flops=case.flops,
                  note=note)
        if missing:
            row.status, row.reason = "unavailable", missing
            rows.append(row)
            continue
        previous_mode = config.deterministic()
        try:
            if label.endswith(DETERMINISTIC):
                config.set_deterministic(True)
            steps = [make_step(*build(kw), case.backward) for kw in copies]
            timing = measure(steps, warmup_ms, rep_ms)
            row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
            row.min_ms, row.reps = timing.min_ms, timing.reps
            seconds = timing.median_ms * 1e-3
            row.gbps = case.bytes / seconds / 1e9
            row.tflops = case.flops / seconds / 1e12
            if the_peaks:
                row.pct_copy_bw = 100 * row.gbps / the_peaks.copy_gbps
                row.pct_matmul_peak = 100 * row.tflops / the_peaks.matmul_tflops
            if case.wall_loop:
                row.wall_us_per_call = wall_per_call_us(steps, calls=1000, loops=7, warmup_s=0.5)
            if device.type == "cuda":
                row.queued_gpu_us = _queued_or_none(steps, row)
                if the_peaks and row.queued_gpu_us:
                    row.queued_pct_copy_bw = 100 * case.bytes / (row.queued_gpu_us * 1e-6) / 1e9 / the_peaks.copy_gbps
        except BackendUnavailable as exc:
            row.status, row.reason = "unavailable", str(exc).split("cannot serve this call: ", 1)[-1]
        except Exception as exc:  # a failing implementation is reported, the run goes on
            text = str(exc).strip().splitlines()
            row.status, row.reason = "error", f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
        finally:
            config.set_deterministic(previous_mode)
            for kw in copies:
                for value in kw.values():
                    if isinstance(value, torch.Tensor):
                        value.grad = None
                        value.requires_grad_(False)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        rows.append(row)
    best_peer = min((r.median_ms for r in rows if not r.ours and r.status == "ok"), default=None)
    if best_peer:
        for r in rows:
            if r.ours and r.status == "ok":
                r.speedup_vs_best_peer = best_peer / r.median_ms
    del copies
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def metadata(the_peaks: Peaks | None, warmup_ms: float, rep_ms: float) -> dict[str, Any]:
    from ..cli import gpu_description, versions

    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_description(),
        "versions": versions(),
        "peers": peer_registry.versions(),
        "peaks": the_peaks.as_dict() if the_peaks else None,
        "timing": (f"CUDA events, median of >= 10 calls over ~{rep_ms:.0f} ms after ~{warmup_ms:.0f} ms of "
                   f"warm-up; inputs rotated through copies where one call's data would fit in L2"),
        "bytes_and_flops": "minimum traffic and useful FLOPs per case (ssmkernels/bench/cases.py)",
    }


def describe_cases(selected: list[BenchCase], compare: bool) -> str:
    lines = [f"{len(selected)} benchmark cases (bytes = minimum traffic, FLOPs = useful arithmetic):"]
    width = max(len(c.name) for c in selected)
    for case in selected:
        impls = [f"ssmkernels:{b}" for b in KERNEL_BACKENDS]
        if compare:
            impls += [f"{p.label}" for p in case.peers]
        extra = ", wall-clock loop" if case.wall_loop else ""
        lines.append(f"  {case.name:<{width}}  {case.mode:<8} {case.shape}")
        lines.append(f"  {'':<{width}}  {'':<8} {human_bytes(case.bytes)}, {human_flops(case.flops)}{extra}; "
                     f"impls: {', '.join(impls)}")
    if not compare:
        lines.append("(add --compare to time the peers too: causal_conv1d, mamba_ssm, fla, torch)")
    return "\n".join(lines)


def main(selected: list[BenchCase], backends: list[str] | None = None, compare: bool = False,
         json_path: str | None = None, markdown_path: str | None = None, plot_path: str | None = None,
         warmup_ms: float = 25.0, rep_ms: float = 100.0, measure_peaks: bool = True,
         deterministic: bool = False, log: Callable[[str], None] = print) -> int:
    backends = tuple(backends or KERNEL_BACKENDS)
    log(f"ssmkernels bench on {torch.cuda.get_device_name(0)}: {len(selected)} cases, backends "
        f"{', '.join(backends)}{', peers' if compare else ''}")
    if compare:
        for name, version in peer_registry.versions().items():
            log(f"  peer {name}: {version}")
    the_peaks = None
    if measure_peaks:
        the_peaks = peaks()
        log(f"  measured peaks: copy {the_peaks.copy_gbps:.0f} GB/s, bf16 matmul {the_peaks.matmul_tflops:.0f} "
            f"TFLOP/s")
    rows: list[Row] = []
    for index, case in enumerate(selected, start=1):
        log(f"[{index}/{len(selected)}] {case.name}: {case.mode}, {case.shape}")
        case_rows = run_case(case, backends, compare, the_peaks, warmup_ms, rep_ms, deterministic=deterministic)
        for row in case_rows:
            status = (f"{row.median_ms:.3f} ms, {row.gbps:.0f} GB/s, {row.tflops:.1f} TFLOP/s"
                      if row.status == "ok" else f"{row.status}: {row.reason}")
            log(f"    {row.impl:<22} {status}")
        rows += case_rows
    log("")
    log(table(rows))
    meta = metadata(the_peaks, warmup_ms, rep_ms)
    if json_path:
        write_json(json_path, meta, rows)
        log(f"wrote {json_path}")
    if markdown_path:
        write_markdown(markdown_path, meta, rows)
        log(f"wrote {markdown_path}")
    status = 0
    if plot_path:
        problem = write_plot(plot_path, meta, rows)
        if problem:
            log(f"plot not written: {problem}")
            status = 2
        else:
            log(f"wrote {plot_path}")
    return status
