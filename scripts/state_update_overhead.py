"""Per-call cost of selective_state_update at batch 1 (issue #7): what a decode loop without CUDA
graphs pays per layer and step.

    python scripts/state_update_overhead.py              # on the GPU machine: everything below
    python scripts/state_update_overhead.py --json out.json
    python scripts/state_update_overhead.py --wall-only    # public API only: runs on older commits too

The call is the Mamba-2 decode step of the issue: state (1, 128, 64, 128) float32, x/z (1, 128, 64)
bf16, B/C (1, 8, 128) bf16, stride-0 views for A (h, p, n), dt (b, h, p), D and dt_bias (h, p),
dt_softplus=True.

1. ``wall``, CUDA only: each available backend in a back-to-back loop, wall clock per call
   (``--calls`` calls, then one synchronize; median of ``--repeats`` loops), and the GPU time of
   one call from CUDA events. This is the number of the issue (40 us cuda, 87 us triton before).
2. ``host``: host time per call with the CUDA backend's kernel call stubbed out (the binding is
   replaced by a no-op), on the GPU's tensors when there is a GPU, else on CPU tensors; then each
   piece of the call timed alone. On a machine without a GPU this is the whole measurement.
The stubbed pieces use the op module's internals, so they follow its code; ``wall`` uses only the
public function.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ssmkernels  # noqa: E402
from ssmkernels._core import config, ext  # noqa: E402
from ssmkernels._core.custom_op import empty_like, plain_eager  # noqa: E402
from ssmkernels.bench.timing import queued_gpu_us, warm_up  # noqa: E402
from ssmkernels.ops.state_update import cuda as cuda_kernels  # noqa: E402
from ssmkernels.ops.state_update import op  # noqa: E402

H, P, N, G = 128, 64, 128, 8


def decode_inputs(device: torch.device, batch: int = 1) -> dict:
    gen = torch.Generator().manual_seed(7)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    bf16 = torch.bfloat16
    return {
        "state": rand(batch, H, P, N),
        "x": rand(batch, H, P, dtype=bf16),
        "dt": rand(batch, H, dtype=bf16)[..., None].expand(batch, H, P),
        "A": (-rand(H).abs() - 0.5)[:, None, None].expand(H, P, N),
        "B": rand(batch, G, N, dtype=bf16),
        "C": rand(batch, G, N, dtype=bf16),
        "D": rand(H)[:, None].expand(H, P),
        "z": rand(batch, H, P, dtype=bf16),
        "dt_bias": rand(H)[:, None].expand(H, P),
    }


def call(kw: dict, backend: str | None):
    return ssmkernels.selective_state_update(kw["state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"],
                                             kw["z"], kw["dt_bias"], True, backend=backend)


def per_call_us(fn, calls: int, repeats: int, sync: bool = False, warmup_s: float = 0.5) -> dict:
    """Median and minimum over ``repeats`` loops of ``calls`` calls, in microseconds per call, after
    ``warmup_s`` seconds (and 200 calls) of untimed calls (ssmkernels/bench/timing.py: warm_up)."""
    warm_up([fn], warmup_s, at_least=200)
    if sync:
        torch.cuda.synchronize()
    loops = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            torch.cuda.synchronize()
        loops.append((time.perf_counter() - started) / calls * 1e6)
    return {"median_us": statistics.median(loops), "min_us": min(loops)}


def wall(calls: int, repeats: int) -> dict:
    kw = decode_inputs(torch.device("cuda"))
    results = {"default, first, no warm-up": per_call_us(lambda: call(kw, None), calls, repeats, sync=True, warmup_s=0),
               "default, 0.5 s warm-up": per_call_us(lambda: call(kw, None), calls, repeats, sync=True)}
    for backend in ("cuda", "triton", "reference"):
        try:
            call(kw, backend)
        except Exception as exc:  # an unavailable backend says why (BackendUnavailable)
            results[backend] = {"unavailable": f"{type(exc).__name__}: {exc}"}
            continue
        results[backend] = per_call_us(lambda: call(kw, backend), calls, repeats, sync=True)
        results[backend]["gpu_us"] = queued_gpu_us([lambda: call(kw, backend)])
    results["default"] = per_call_us(lambda: call(kw, None), calls, repeats, sync=True)
    # As `bench` times it: 25 input sets in turn, so no call finds its state in L2 (a decode step
    # over many layers, each with its own state). `bench` measured 12-21 us where the loop above
    # measured 11.1 us (same run of neither): this row puts both in one run.
    rotated = [decode_inputs(torch.device("cuda")) for _ in range(25)]
    steps = [lambda kw=kw: call(kw, "cuda") for kw in rotated]
    turn = iter(range(1 << 62))
    results["cuda, 25 rotated input sets"] = per_call_us(lambda: steps[next(turn) % 25](), calls, repeats, sync=True)
    results["cuda, 25 rotated input sets"]["gpu_us"] = queued_gpu_us(steps)
    return results


@contextlib.contextmanager
def stubbed_cuda_backend():
    """Every call served by the CUDA backend's Python side (on CPU tensors too), its kernel call a no-op."""
    saved = op._backend_for, cuda_kernels._kernel, cuda_kernels._raw_stream
    op._backend_for = lambda *args: "cuda"
    cuda_kernels._kernel = lambda params, addresses, stream: None
    if not torch.cuda.is_available():
        cuda_kernels._raw_stream = lambda device_index: 0
    op.clear_caches()
    try:
        yield
    finally:
        op._backend_for, cuda_kernels._kernel, cuda_kernels._raw_stream = saved
        op.clear_caches()


def host(device: torch.device, calls: int, repeats: int) -> dict:
    kw = decode_inputs(device)
    state, x, dt, A, B, C, D, z, dt_bias = (kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    args = (state, x, dt, A, B, C, D, z, dt_bias, True, None, -1)
    results = {}
    with stubbed_cuda_backend():
        call(kw, None)  # the first call checks, dispatches and caches the plan
        plan = next(iter(op._PLANS.values()))
        launch = plan.launch
        tensors = (state, x, dt, A, B, C, D, z, dt_bias, None)
        prepared = launch.prepared
        out = empty_like(x)
        pieces = {
            "whole call (public function, kernel call stubbed)": lambda: call(kw, None),
            "  guards (is_compiling, modes, functorch, profiler)": plain_eager,
            "  last-plan match (flags, absent optionals, C++ TensorGuards)": lambda: plan.matches(
                (None, config.default_backend(), True, -1), (D is None, z is None, dt_bias is None, True), tensors),
            "  (plan key by _signature: used when the last plan does not match)": lambda: op._signature(*tensors),
            "  SSMKERNELS_BACKEND read (part of the plan key)": config.default_backend,
            "  out: SSMKERNELS_POISON_OUTPUTS read + allocation": lambda: (
                empty_like(x) if config.poison_outputs() else launch.allocate(launch.size, launch.stride, launch.dtype)),
            "  (out by torch.empty_like, for comparison)": lambda: torch.empty_like(x),
            "  cuda.launch: addresses + stream + (stubbed) binding": lambda: cuda_kernels.launch(
                prepared, state, x, dt, A, B, C, D, z, dt_bias, None, out),
            "first call of a kind only: validation (_check)": lambda: op._check(
                state, x, dt, A, B, C, D, z, dt_bias, None, -1),
            "first call of a kind only: backend choice (memoised)": lambda: op._backend_for(
                None, config.default_backend(), x.device, x.dtype, state.dtype, False, False, N, True),
            "first call of a kind only: cuda.prepare (layout, params tuple)": lambda: cuda_kernels.prepare(
                state, x, dt, A, B, C, D, z, dt_bias, True, None, -1, out),
            "through the op dispatcher (compile / modes path), stubbed": lambda: op._state_update(*args, "cuda"),
        }
        for name, fn in pieces.items():
            results[name] = per_call_us(fn, calls, repeats)
    if ext.load_error() is None and getattr(ext.module(), "state_update_binding_version", 0) == cuda_kernels.BINDING_VERSION:
        # The real binding's argument conversion: tokens = 0 makes the launcher return before any CUDA call.
        params = list(prepared[0])
        params[11] = 0
        params = tuple(params)
        addresses = tuple(range(1 << 20, (1 << 20) + 11))
        binding = ext.module().state_update
        results["  the binding's argument conversion (real, no launch)"] = per_call_us(
            lambda: binding(params, addresses, 0), calls, repeats)
    return results


def environment() -> dict:
    info = {"timestamp": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops (median and minimum reported)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="tensors of the stubbed host measurement (auto: cuda when available)")
    parser.add_argument("--wall-only", action="store_true",
                        help="only the wall-clock loops (public API only: times older commits too)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                        help="Python's garbage collector during the measurement: as is, with every object that "
                             "exists after the imports frozen (gc.freeze), or disabled")
    parser.add_argument("--import-peers", action="store_true",
                        help="first import the peer libraries, as `bench --compare` does (to tell whether "
                             "their imports change our per-call cost, e.g. by enabling a torch mode)")
    args = parser.parse_args()
    if args.import_peers:
        from ssmkernels.bench import peers
        print("peers:", peers.versions())
        print("modes after the imports: dispatch", torch._C._len_torch_dispatch_stack(),
              "function", torch._C._is_torch_function_mode_enabled(),
              "functorch", torch._C._are_functorch_transforms_active(),
              "profiler", torch._C._autograd._profiler_enabled())
    if args.gc == "freeze":
        gc.freeze()
    elif args.gc == "off":
        gc.disable()
    print(f"gc: {args.gc}, {len(gc.get_objects())} tracked objects, {gc.get_freeze_count()} frozen")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    report = {"environment": environment()}
    print(json.dumps(report["environment"]))
    if torch.cuda.is_available():
        report["wall"] = wall(args.calls, args.repeats)
        print(f"\nwall clock per call, batch 1, back-to-back ({args.calls} calls, median of {args.repeats} loops)")
        for backend, r in report["wall"].items():
            if "unavailable" in r:
                print(f"  {backend:10s} unavailable: {r['unavailable'][:150]}")
            else:
                gpu = f"   GPU {r['gpu_us']:6.2f} us" if "gpu_us" in r else ""
                print(f"  {backend:10s} {r['median_us']:7.2f} us (min {r['min_us']:6.2f}){gpu}")
    if not args.wall_only:
        report["host"] = host(device, args.calls, args.repeats)
        report["host_device"] = str(device)
        print(f"\nhost time per call on {device} tensors, CUDA backend's kernel call stubbed out")
        for name, r in report["host"].items():
            print(f"  {name:66s} {r['median_us']:7.2f} us (min {r['min_us']:6.2f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
