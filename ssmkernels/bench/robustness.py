"""``python -m ssmkernels robustness``: the measurements of issue #10 (robustness), in one command.

    python -m ssmkernels robustness [--quick] [--json PATH] [--only NAME,...]

Each section prints a progress line per measurement, then a Markdown table; ``--json`` writes
every row with the environment (GPU, versions, timestamp). Sections (``--only`` takes a
comma-separated subset):

``first-call``
    Time of the first forward (+ backward where the primitive has one) call in a fresh
    ``python -c`` process, per primitive and kernel backend (triton, cuda), at a model-sized shape,
    with a CUDA sync: *cold* with an empty Triton cache, then *warm* in a second fresh process
    that reuses it, then the second call of that process (*steady*). Cache choice: ``TRITON_CACHE_DIR``
    points at a new temporary folder, which holds everything the first call may have to produce
    (compiled kernels, Triton's own launcher module, and the autotune results: ``_core/autotune``
    caches them through Triton's ``cache_results``, under Triton's cache dir). ``SSMKERNELS_CACHE_DIR``
    is left as it is: it holds the JIT-built CUDA extension, which this section loads (building it if
    needed) *before* the first child starts, and the children run with ``SSMKERNELS_DISABLE_JIT=1``, so
    the one-time extension build is never part of "cold" (``python -m ssmkernels build`` times that).
    ``import ssmkernels`` is timed separately. Needs a CUDA GPU.
``batch-invariance``
    Bitwise: the fraction of output elements of one request computed alone that differ from the
    same request computed as row k of a batch of 64 (the other rows random), for ssd_chunk_scan,
    selective_scan and causal_conv1d on every backend, and the peers (mamba_ssm's
    ``mamba_chunk_scan_combined``; its CUDA ``selective_scan_fn`` and ``causal_conv1d_fn`` when built)
    when importable (``ssmkernels.bench.peers``).
``prefill-decode``
    SPEC law 2 in production dtypes: the last 16 outputs of a prefill of L tokens against a prefill
    of L-16 tokens followed by 16 single steps (``causal_conv1d_update`` for the conv,
    ``selective_state_update`` for SSD (Mamba-2 form) and the selective scan (Mamba-1 form)), for
    each backend, for ``backend=None`` (the default dispatch, which may prefill on one backend and
    decode on another), and for the peers. Reported: fraction of bitwise-different elements, max
    abs difference, and each path's error against the float64 reference with the SPEC tolerance.
    The conv runs channel-last (the layout of a Mamba-2 block; causal_conv1d returns final states
    only for it).
``long``
    Forward + backward of ssd_chunk_scan and selective_scan at L = 262144 (``--quick``: 4096),
    compared with the float64 reference on three windows of the sequence (start, an unaligned middle,
    end). The reference of window ``[s, e)`` starts from the kernel's own state at ``s`` (a kernel
    prefill of ``x[:s]`` with ``return_final_states``), and its backward receives the kernel's own
    gradient flowing into the state at ``e`` (the gradient w.r.t. ``initial_states`` of a kernel run
    on ``x[e:]``; the scan is linear in its state, so that gradient does not depend on the state's
    value). Compared by the SPEC rule (``_core/tolerance.compare``): the window's outputs, the
    gradients of the per-position inputs (x, dt, B, C, z / u, delta, B, C, z) and, in the last
    window, the final state. The gradients of A, D and dt_bias sum over the whole sequence and are
    only checked to be finite, like every other output and gradient. Also: fwd+bwd time and peak
    memory.
``deterministic``
    The cost of deterministic mode: forward + backward of ssd_chunk_scan, selective_scan and
    causal_conv1d per backend, timed (median of 10) in a fresh process with
    ``SSMKERNELS_DETERMINISTIC=0`` and in one with ``=1`` (the mode pins autotune configs when the
    kernel modules are imported, so it cannot be switched in-process), plus the number of output and
    gradient elements whose bits differ between two identical runs in each mode. A deterministic
    run that differs from its repeat is a FAIL.
``sanitizer``
    Runs ``scripts/sanitize_kernels.py`` (every primitive on every GPU backend, forward and backward,
    varlen, initial states, index maps with padding slots) once normally, to fill Triton's usual cache
    (kernels and autotune results), then under ``compute-sanitizer --tool memcheck --error-exitcode 1``
    with the same cache and
    ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (so that every tensor is its own allocation and an
    out-of-bounds access cannot land silently in a neighbour of the caching allocator's pool).
    Reports the exit code and the ``ERROR SUMMARY`` line; "not available" without compute-sanitizer.

Dtypes: bfloat16 inputs with float32 states on a GPU. Without a GPU everything runs at toy shapes
in float32 (a smoke test of the plumbing): Triton kernels run only under ``TRITON_INTERPRET=1``, and
the interpreter mishandles bfloat16 ``tl.dot``. first-call and sanitizer need a GPU and say so.

Exit code: 1 when a measurement raised, a ``long`` check exceeded the SPEC tolerance, or the
sanitizer reported errors; otherwise 0. Non-invariance is a measured figure, not a failure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .. import BackendUnavailable
from .._core import config
from .._core.tolerance import compare
from ..ops.causal_conv1d.op import causal_conv1d, causal_conv1d_update
from ..ops.selective_scan.op import selective_scan
from ..ops.ssd.op import ssd_chunk_scan
from ..ops.state_update.op import selective_state_update

SECTIONS = ("first-call", "batch-invariance", "prefill-decode", "long", "deterministic", "sanitizer")
STEPS = 16  # decode steps of prefill-decode
ROOT = Path(__file__).resolve().parents[2]
SANITIZE_SCRIPT = ROOT / "scripts" / "sanitize_kernels.py"
NEEDS_GPU = "skipped: needs a CUDA GPU"

# Shapes per size: "gpu" (default on a GPU), "quick" (GPU, --quick) and "toy" (CPU).
SHAPES: dict[str, dict[str, dict[str, dict[str, int]]]] = {
    "gpu": {
        "first-call": {
            "ssd": dict(b=1, l=2048, h=32, p=64, n=128, g=1, chunk=256),
            "causal_conv1d": dict(b=2, d=2048, l=2048, w=4),
            "selective_scan": dict(b=1, d=1536, l=2048, n=16),
            "state_update": dict(b=8, h=32, p=64, n=128, g=1),
        },
        "batch-invariance": {
            "ssd": dict(b=64, l=1024, h=32, p=64, n=128, g=1, chunk=256),
            "selective_scan": dict(b=64, d=1536, l=1024, n=16),
            "causal_conv1d": dict(b=64, d=2048, l=1024, w=4),
        },
        "prefill-decode": {
            "ssd": dict(b=4, l=2048, h=32, p=64, n=128, g=1, chunk=256),
            "selective_scan": dict(b=4, d=1536, l=2048, n=16),
            "causal_conv1d": dict(b=4, d=2048, l=2048, w=4),
        },
        "long": {
            "ssd": dict(b=1, l=262144, h=8, p=64, n=128, g=1, chunk=256, window=256),
            "selective_scan": dict(b=1, d=256, l=262144, n=16, window=256),
        },
        "deterministic": {
            "ssd": dict(b=2, l=2048, h=32, p=64, n=128, g=1, chunk=256),
            "selective_scan": dict(b=2, d=1536, l=2048, n=16),
            "causal_conv1d": dict(b=2, d=2048, l=2048, w=4),
        },
    },
    "toy": {
        "batch-invariance": {
            "ssd": dict(b=4, l=40, h=2, p=4, n=8, g=1, chunk=16),
            "selective_scan": dict(b=4, d=6, l=40, n=4),
            "causal_conv1d": dict(b=4, d=6, l=40, w=4),
        },
        "prefill-decode": {
            "ssd": dict(b=2, l=40, h=2, p=4, n=8, g=1, chunk=16),
            "selective_scan": dict(b=2, d=6, l=40, n=4),
            "causal_conv1d": dict(b=2, d=6, l=40, w=4),
        },
        "long": {
            "ssd": dict(b=1, l=96, h=2, p=4, n=8, g=1, chunk=16, window=16),
            "selective_scan": dict(b=1, d=6, l=96, n=4, window=16),
        },
        "deterministic": {
            "ssd": dict(b=2, l=40, h=2, p=4, n=8, g=1, chunk=16),
            "selective_scan": dict(b=2, d=6, l=40, n=4),
            "causal_conv1d": dict(b=2, d=6, l=40, w=4),
        },
    },
}
SHAPES["quick"] = {**SHAPES["gpu"], "long": {
    "ssd": dict(SHAPES["gpu"]["long"]["ssd"], l=4096),
    "selective_scan": dict(SHAPES["gpu"]["long"]["selective_scan"], l=4096),
}}


@dataclass
class Context:
    device: torch.device
    size: str                      # a key of SHAPES
    dtype: torch.dtype             # inputs; states are float32
    log: Callable[[str], None]
    sanitizer_timeout_s: int = 170  # each of the three runs (plain, memcheck cuda, memcheck triton): under 10 minutes in all
    primitives: Optional[frozenset] = None  # first-call / deterministic rows of these keys only (None: all)

    def wants(self, key: str) -> bool:
        return self.primitives is None or key in self.primitives

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def shapes(self, section: str) -> dict[str, dict[str, int]]:
        return SHAPES[self.size][section]


# ----------------------------------------------------------------------------- small helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _shape_text(shape: dict[str, int]) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of elements whose bits differ (so -0.0 vs 0.0 and NaN payloads count, NaN == NaN bits do not)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {tuple(a.shape)} {a.dtype} with {tuple(b.shape)} {b.dtype} bitwise")
    view = _INT_VIEW[a.element_size()]
    return int((a.detach().contiguous().view(view) != b.detach().contiguous().view(view)).sum())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; inf when only one of them is NaN somewhere."""
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double(), b.detach().to(a.device).double()
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    diff = torch.where(both_nan, torch.zeros_like(a64), (a64 - b64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def table(columns: list[tuple[str, Callable[[dict], Any]]], rows: list[dict]) -> str:
    """A Markdown table, columns padded so it also reads as plain text."""
    cells = [[header for header, _ in columns]]
    for row in rows:
        cells.append([_fmt(get(row)).replace("|", "/").replace("\n", " ") for _, get in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _percent(row: dict) -> Optional[str]:
    if row.get("differ_fraction") is None:
        return None
    return f"{100 * row['differ_fraction']:.4g}%"


def _note(row: dict) -> str:
    return row.get("reason") or row.get("error") or ""


# ----------------------------------------------------------------------------- inputs
def _log_uniform(shape, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(shape, device=device).uniform_(math.log(low), math.log(high)).exp()


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    return value + torch.log(-torch.expm1(-value))


def ssd_inputs(s: dict, dtype: torch.dtype, device, batch: Optional[int] = None) -> dict:
    """Mamba-2 block inputs: x, z, B, C, dt in ``dtype``; A, D, dt_bias float32 (as in the module).
    A spans -0.01..-16 (slow and fast heads); softplus(dt + dt_bias) is mostly 0.001..0.1."""
    b, l, h, p, n, g = batch or s["b"], s["l"], s["h"], s["p"], s["n"], s["g"]
    rnd = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return dict(x=rnd(b, l, h, p), dt=(0.5 * torch.randn(b, l, h, device=device)).to(dtype),
                A=-_log_uniform(h, 0.01, 16.0, device), B=rnd(b, l, g, n), C=rnd(b, l, g, n),
                D=torch.randn(h, device=device), z=rnd(b, l, h, p),
                dt_bias=_inverse_softplus(_log_uniform(h, 1e-3, 0.1, device)))


def scan_inputs(s: dict, dtype: torch.dtype, device, batch: Optional[int] = None) -> dict:
    """Mamba-1 block inputs: u, delta, B, C (shared across channels), z in ``dtype``; A, D, delta_bias float32."""
    b, d, l, n = batch or s["b"], s["d"], s["l"], s["n"]
    rnd = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return dict(u=rnd(b, d, l), delta=(0.5 * torch.randn(b, d, l, device=device)).to(dtype),
                A=-_log_uniform((d, n), 0.01, 16.0, device), B=rnd(b, n, l), C=rnd(b, n, l),
                D=torch.randn(d, device=device), z=rnd(b, d, l),
                delta_bias=_inverse_softplus(_log_uniform(d, 1e-3, 0.1, device)))


def conv_inputs(s: dict, dtype: torch.dtype, device, batch: Optional[int] = None,
                channel_last: bool = False) -> dict:
    b, d, l, w = batch or s["b"], s["d"], s["l"], s["w"]
    x = torch.randn(b, l, d, device=device).to(dtype).transpose(1, 2) if channel_last else \
        torch.randn(b, d, l, device=device).to(dtype)
    return dict(x=x, weight=(torch.randn(d, w, device=device) / w).to(dtype),
                bias=(0.1 * torch.randn(d, device=device)).to(dtype))


@dataclass(frozen=True)
class Primitive:
    """How to call a sequence primitive on an inputs dict: which inputs have a batch and a length
    axis, and one call that takes a backend, an initial state and whether to return the final one."""
    name: str
    make: Callable[..., dict]
    seq_names: tuple[str, ...]   # inputs with a batch axis (0) and a length axis
    length_axis: int             # of those inputs
    run: Callable[..., Any]      # run(inputs, backend, initial, want_final, shape) -> out or (out, final)
    params: tuple[str, ...]      # inputs without a batch axis that get gradients (weights)


def _run_ssd(i: dict, backend, initial=None, want_final=False, s=None):
    return ssd_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], s["chunk"], D=i["D"], z=i["z"],
                          dt_bias=i["dt_bias"], initial_states=initial, dt_softplus=True,
                          return_final_states=want_final, backend=backend)


def _run_scan(i: dict, backend, initial=None, want_final=False, s=None):
    return selective_scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True,
                          want_final, initial_state=initial, backend=backend)


def _run_conv(i: dict, backend, initial=None, want_final=False, s=None):
    return causal_conv1d(i["x"], i["weight"], i["bias"], initial_states=initial, return_final_states=want_final,
                         activation="silu", backend=backend)


PRIMITIVES = {
    "ssd": Primitive("ssd_chunk_scan", ssd_inputs, ("x", "dt", "B", "C", "z"), 1, _run_ssd, ("A", "D", "dt_bias")),
    "selective_scan": Primitive("selective_scan", scan_inputs, ("u", "delta", "B", "C", "z"), 2, _run_scan,
                                ("A", "D", "delta_bias")),
    "causal_conv1d": Primitive("causal_conv1d", conv_inputs, ("x",), 2, _run_conv, ("weight", "bias")),
}


def _rows_of(inputs: dict, names: tuple[str, ...], index: int) -> dict:
    """The inputs of batch row ``index`` alone, as fresh contiguous tensors."""
    return {k: (v[index:index + 1].clone() if k in names else v) for k, v in inputs.items()}


def _positions(inputs: dict, names: tuple[str, ...], axis: int, start: int, stop: int) -> dict:
    return {k: (v.narrow(axis, start, stop - start) if k in names else v) for k, v in inputs.items()}


def _peer_functions(ctx: Context) -> dict[str, Any]:
    """``{function name: callable or reason it is missing}`` for the peer functions used here."""
    if not ctx.on_gpu:
        reason = "peers are measured on the GPU only (their Triton autotuning would run every config in the interpreter)"
        return {name: reason for name in ("mamba_chunk_scan_combined", "selective_state_update", "selective_scan_fn",
                                          "causal_conv1d_fn", "causal_conv1d_update")}
    from . import peers

    found: dict[str, Any] = {}
    for peer_name, names in (("mamba_ssm", ("mamba_chunk_scan_combined", "selective_state_update",
                                            "selective_scan_fn")),
                             ("causal_conv1d", ("causal_conv1d_fn", "causal_conv1d_update"))):
        peer = peers.load()[peer_name]
        for name in names:
            found[name] = peer.get(name) or f"{peer_name}: {peer.why_missing(name)}"
    return found


def _peer_versions(ctx: Context) -> dict:
    if not ctx.on_gpu:
        return {}
    from . import peers

    return peers.versions()


# ----------------------------------------------------------------------------- first-call
FIRST_CALL_PRIMITIVES = ("ssd", "causal_conv1d", "selective_scan", "state_update")
_RESULT_TAG = "ROBUSTNESS_RESULT "
_CHILD_CODE = ("import sys, time; t = time.perf_counter(); import torch, ssmkernels; "
               "t = time.perf_counter() - t; from ssmkernels.bench import robustness; "
               "getattr(robustness, sys.argv[1])(sys.argv[2], sys.argv[3], t)")


def _first_call_closure(primitive: str, backend: str, device: torch.device, dtype: torch.dtype):
    """(shape text, call): the model-sized first call of ``primitive`` (forward + backward when it has one)."""
    s = SHAPES["gpu"]["first-call"][primitive]
    if primitive == "state_update":
        b, h, p, n, g = s["b"], s["h"], s["p"], s["n"], s["g"]
        state = torch.randn(b, h, p, n, device=device)
        x, dt = torch.randn(b, h, p, device=device).to(dtype), torch.randn(b, h, device=device).to(dtype)
        A = -torch.rand(h, device=device) - 0.5
        B, C = torch.randn(b, g, n, device=device).to(dtype), torch.randn(b, g, n, device=device).to(dtype)
        D, dt_bias = torch.randn(h, device=device), torch.randn(h, device=device)

        def call():
            selective_state_update(state, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
                                   D=D[:, None].expand(h, p), dt_bias=dt_bias[:, None].expand(h, p),
                                   dt_softplus=True, backend=backend)
        return _shape_text(s), call
    spec = PRIMITIVES[primitive]
    inputs = spec.make(s, dtype, device)
    for name in spec.seq_names + spec.params:
        inputs[name].requires_grad_(True)
    out = None

    def call():
        nonlocal out
        out = spec.run(inputs, backend, s=s)
        out.backward(torch.ones_like(out))
    return _shape_text(s), call


def _input_dtype(device: torch.device) -> torch.dtype:
    """Inputs in bfloat16 on the GPU; float32 on the CPU (toy shapes, plumbing only)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _child_device() -> tuple[torch.device, torch.dtype]:
    """A child's device (the GPU when there is one) and input dtype."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, _input_dtype(device)


def first_call_child(primitive: str, backend: str, import_s: float) -> None:
    """Runs in the child process: time the first and second call, print one tagged JSON line.
    (On a machine without a GPU it runs on the CPU in float32: only to test the plumbing.)"""
    device, dtype = _child_device()
    result: dict[str, Any] = {"import_ms": 1e3 * import_s}
    try:
        shape, call = _first_call_closure(primitive, backend, device, dtype)
        result["shape"] = shape
        _sync(device)
        for key in ("first_ms", "second_ms"):
            started = time.perf_counter()
            call()
            _sync(device)
            result[key] = 1e3 * (time.perf_counter() - started)
    except BackendUnavailable as exc:
        result["reason"] = str(exc)
    except Exception as exc:
        result["error"] = _short(exc)
    print(_RESULT_TAG + json.dumps(result), flush=True)


def _child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               **extra)
    env.pop("SSMKERNELS_POISON_OUTPUTS", None)
    return env


def _run_child(primitive: str, backend: str, env: dict, timeout_s: int = 400,
               entry: str = "first_call_child") -> dict:
    """Run ``robustness.<entry>(primitive, backend, import_seconds)`` in a fresh interpreter; its
    tagged JSON line, plus the process's wall time."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, entry, primitive, backend], env=env, cwd=str(ROOT),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    wall = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return {**json.loads(line[len(_RESULT_TAG):]), "process_s": wall}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"child exited {proc.returncode} without a result: {' / '.join(tail)}"}


def section_first_call(ctx: Context) -> dict:
    if not ctx.on_gpu:
        return {"status": "skipped", "reason": NEEDS_GPU, "rows": []}
    from .._core import ext

    started = time.perf_counter()
    ext_error = ext.load_error()  # builds the JIT extension now if needed, so no child ever does
    ctx.log(f"  CUDA extension: {'unavailable: ' + ext_error if ext_error else 'loaded'} "
            f"({time.perf_counter() - started:.1f} s, not part of any timing below)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssmkernels-first-call-") as tmp:
        for primitive in filter(ctx.wants, FIRST_CALL_PRIMITIVES):
            for backend in ("triton", "cuda"):
                cache = Path(tmp) / f"{primitive}-{backend}"
                cache.mkdir()
                env = _child_env(TRITON_CACHE_DIR=str(cache), SSMKERNELS_DISABLE_JIT="1")
                env.pop("TRITON_INTERPRET", None)
                row: dict[str, Any] = {"primitive": primitive, "backend": backend, "dtype": "bfloat16"}
                cold = _run_child(primitive, backend, env)
                row["shape"] = cold.get("shape")
                if "reason" in cold or "error" in cold:
                    row.update(status="skipped" if "reason" in cold else "error",
                               reason=cold.get("reason"), error=cold.get("error"))
                else:
                    warm = _run_child(primitive, backend, env)
                    row.update(status="ok" if "error" not in warm else "error", error=warm.get("error"),
                               cold_ms=cold["first_ms"], warm_ms=warm.get("first_ms"),
                               steady_ms=warm.get("second_ms"), import_ms=warm.get("import_ms"),
                               cold_process_s=cold["process_s"], cache_files=sum(1 for _ in cache.rglob("*")))
                rows.append(row)
                if row["status"] == "ok":
                    ctx.log(f"  {primitive:<15}{backend:<8} cold {row['cold_ms']:9.1f} ms   warm {_fmt(row['warm_ms']):>8} ms"
                            f"   steady {_fmt(row['steady_ms'])} ms   (import {_fmt(row['import_ms'])} ms)")
                else:
                    ctx.log(f"  {primitive:<15}{backend:<8} {row['status']}: {_note(row)}")
    return {"status": "ran", "rows": rows, "cache_note": "cold: empty TRITON_CACHE_DIR (kernels, launcher, "
            "autotune results); the CUDA extension comes from SSMKERNELS_CACHE_DIR and is built beforehand"}


FIRST_CALL_COLUMNS = [("primitive", lambda r: r["primitive"]), ("backend", lambda r: r["backend"]),
                      ("shape", lambda r: r.get("shape")), ("cold ms", lambda r: r.get("cold_ms")),
                      ("warm ms", lambda r: r.get("warm_ms")), ("steady ms", lambda r: r.get("steady_ms")),
                      ("import ms", lambda r: r.get("import_ms")), ("note", _note)]


# ----------------------------------------------------------------------------- batch-invariance
def _batch_implementations(ctx: Context, key: str) -> list[tuple[str, str, Any]]:
    """(impl, backend label, call(inputs, s) or a reason string)."""
    spec = PRIMITIVES[key]
    impls: list[tuple[str, str, Any]] = [
        ("ssmkernels", backend, (lambda be: lambda i, s: spec.run(i, be, s=s))(backend))
        for backend in config.BACKENDS]
    peer = _peer_functions(ctx)
    if key == "ssd":
        f = peer["mamba_chunk_scan_combined"]
        impls.append(("mamba_ssm", "triton", f if isinstance(f, str) else (
            lambda i, s: f(i["x"], i["dt"], i["A"], i["B"], i["C"], s["chunk"], D=i["D"], z=i["z"],
                           dt_bias=i["dt_bias"], dt_softplus=True))))
    elif key == "selective_scan":
        f = peer["selective_scan_fn"]
        impls.append(("mamba_ssm", "cuda", f if isinstance(f, str) else (
            lambda i, s: f(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True))))
    else:
        f = peer["causal_conv1d_fn"]
        impls.append(("causal_conv1d", "cuda", f if isinstance(f, str) else (
            lambda i, s: f(i["x"], i["weight"], i["bias"], activation="silu"))))
    return impls


def section_batch_invariance(ctx: Context) -> dict:
    rows = []
    for key, s in ctx.shapes("batch-invariance").items():
        spec = PRIMITIVES[key]
        torch.manual_seed(1)
        batch = spec.make(s, ctx.dtype, ctx.device)
        k = (2 * s["b"]) // 3
        alone = _rows_of(batch, spec.seq_names, k)
        for impl, backend, call in _batch_implementations(ctx, key):
            row: dict[str, Any] = {"primitive": spec.name, "impl": impl, "backend": backend,
                                   "dtype": _dtype_name(ctx.dtype), "shape": _shape_text(s), "row": k}
            if isinstance(call, str):
                row.update(status="skipped", reason=call)
            else:
                started = time.perf_counter()
                try:
                    with torch.no_grad():
                        in_batch = call(batch, s)[k:k + 1]
                        by_itself = call(alone, s)
                    _sync(ctx.device)
                    count = bitwise_differ(in_batch, by_itself)
                    row.update(status="ok", differ=count, elements=by_itself.numel(),
                               differ_fraction=count / max(1, by_itself.numel()),
                               max_abs_diff=max_abs_diff(in_batch, by_itself),
                               seconds=time.perf_counter() - started)
                except BackendUnavailable as exc:
                    row.update(status="skipped", reason=str(exc))
                except Exception as exc:
                    row.update(status="error", error=_short(exc))
            rows.append(row)
            what = (f"{row['differ']}/{row['elements']} elements differ ({_percent(row)}), max |diff| "
                    f"{_fmt(row['max_abs_diff'])}, {row['seconds']:.1f} s") if row["status"] == "ok" \
                else f"{row['status']}: {_note(row)}"
            ctx.log(f"  {spec.name:<15}{impl:<14}{backend:<10}{what}")
    return {"status": "ran", "rows": rows}


BATCH_COLUMNS = [("primitive", lambda r: r["primitive"]), ("impl", lambda r: r["impl"]),
                 ("backend", lambda r: r["backend"]), ("shape", lambda r: r["shape"]),
                 ("row", lambda r: r["row"]), ("differ", _percent), ("max abs diff", lambda r: r.get("max_abs_diff")),
                 ("note", _note)]


# ----------------------------------------------------------------------------- prefill-decode
def _ours_prefill_decode(key: str, backend: Optional[str]):
    """(full(i, s) -> out, steps(i, s, k) -> outputs of positions k.. computed by prefill + single steps)."""
    spec = PRIMITIVES[key]

    def full(i, s):
        return spec.run(i, backend, s=s)

    def steps(i, s, k):
        L = i[spec.seq_names[0]].shape[spec.length_axis]
        _, state = spec.run(_positions(i, spec.seq_names, spec.length_axis, 0, k), backend, want_final=True, s=s)
        state = state.contiguous().clone()
        outs = []
        for t in range(k, L):
            if key == "ssd":
                b, _, h, p = i["x"].shape
                n = i["B"].shape[-1]
                outs.append(selective_state_update(
                    state, i["x"][:, t], i["dt"][:, t, :, None].expand(b, h, p), i["A"][:, None, None].expand(h, p, n),
                    i["B"][:, t], i["C"][:, t], D=i["D"][:, None].expand(h, p), z=i["z"][:, t],
                    dt_bias=i["dt_bias"][:, None].expand(h, p), dt_softplus=True, backend=backend))
            elif key == "selective_scan":
                outs.append(selective_state_update(
                    state, i["u"][..., t], i["delta"][..., t], i["A"], i["B"][..., t], i["C"][..., t], D=i["D"],
                    z=i["z"][..., t], dt_bias=i["delta_bias"], dt_softplus=True, backend=backend))
            else:
                outs.append(causal_conv1d_update(i["x"][..., t], state, i["weight"], i["bias"], "silu",
                                                 backend=backend))
        return torch.stack(outs, dim=spec.length_axis)
    return full, steps


def _peer_prefill_decode(ctx: Context, key: str):
    """(impl, backend, (full, steps) or a reason) for the peer of ``key``."""
    peer = _peer_functions(ctx)
    if key == "ssd":
        scan, update = peer["mamba_chunk_scan_combined"], peer["selective_state_update"]
        impl, backend = "mamba_ssm", "triton"
    elif key == "selective_scan":
        scan, update = peer["selective_scan_fn"], peer["selective_state_update"]
        impl, backend = "mamba_ssm", "cuda+triton"
    else:
        scan, update = peer["causal_conv1d_fn"], peer["causal_conv1d_update"]
        impl, backend = "causal_conv1d", "cuda"
    missing = next((f for f in (scan, update) if isinstance(f, str)), None)
    if missing:
        return impl, backend, missing

    def run(i, s, want_final=False):
        if key == "ssd":
            return scan(i["x"], i["dt"], i["A"], i["B"], i["C"], s["chunk"], D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                        dt_softplus=True, return_final_states=want_final)
        if key == "selective_scan":
            return scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True, want_final)
        return scan(i["x"], i["weight"], i["bias"], return_final_states=want_final, activation="silu")

    spec = PRIMITIVES[key]

    def steps(i, s, k):
        L = i[spec.seq_names[0]].shape[spec.length_axis]
        _, state = run(_positions(i, spec.seq_names, spec.length_axis, 0, k), s, want_final=True)
        state = state.contiguous().clone()
        if key != "causal_conv1d":
            state = state.float()  # the decode state is float32
        outs = []
        for t in range(k, L):
            if key == "ssd":
                b, _, h, p = i["x"].shape
                n = i["B"].shape[-1]
                outs.append(update(state, i["x"][:, t], i["dt"][:, t, :, None].expand(b, h, p),
                                   i["A"][:, None, None].expand(h, p, n), i["B"][:, t], i["C"][:, t],
                                   D=i["D"][:, None].expand(h, p), z=i["z"][:, t],
                                   dt_bias=i["dt_bias"][:, None].expand(h, p), dt_softplus=True))
            elif key == "selective_scan":
                outs.append(update(state, i["u"][..., t], i["delta"][..., t], i["A"], i["B"][..., t], i["C"][..., t],
                                   D=i["D"], z=i["z"][..., t], dt_bias=i["delta_bias"], dt_softplus=True))
            else:
                outs.append(update(i["x"][..., t], state, i["weight"], i["bias"], "silu"))
        return torch.stack(outs, dim=spec.length_axis)
    return impl, backend, (lambda i, s: run(i, s), steps)


def _as_float64(inputs: dict) -> dict:
    return {k: (v.detach().double() if v.is_floating_point() else v) for k, v in inputs.items()}


def section_prefill_decode(ctx: Context) -> dict:
    rows = []
    for key, s in ctx.shapes("prefill-decode").items():
        spec = PRIMITIVES[key]
        torch.manual_seed(2)
        inputs = conv_inputs(s, ctx.dtype, ctx.device, channel_last=True) if key == "causal_conv1d" \
            else spec.make(s, ctx.dtype, ctx.device)
        L = s["l"]
        k = L - STEPS
        last = lambda out: out.narrow(spec.length_axis, k, STEPS)  # noqa: E731
        with torch.no_grad():  # the truth and the SPEC tolerance of the last 16 outputs
            ref64 = last(spec.run(_as_float64(inputs), "reference", s=s))
            ref_lowp = last(spec.run(inputs, "reference", s=s))
        impls: list[tuple[str, str, Any]] = [("ssmkernels", backend, _ours_prefill_decode(key, backend))
                                             for backend in config.BACKENDS]
        if ctx.on_gpu:
            impls.append(("ssmkernels", "default", _ours_prefill_decode(key, None)))
        impls.append(_peer_prefill_decode(ctx, key))
        for impl, backend, calls in impls:
            row: dict[str, Any] = {"primitive": spec.name, "impl": impl, "backend": backend,
                                   "dtype": _dtype_name(ctx.dtype), "shape": _shape_text(s), "prefill": k,
                                   "steps": STEPS}
            if isinstance(calls, str):
                row.update(status="skipped", reason=calls)
            else:
                full_call, steps_call = calls
                started = time.perf_counter()
                try:
                    with torch.no_grad():
                        full = last(full_call(inputs, s))
                        stepped = steps_call(inputs, s, k)
                    _sync(ctx.device)
                    count = bitwise_differ(full, stepped)
                    full_check = compare(full, ref64, ref_lowp, ctx.dtype)
                    step_check = compare(stepped, ref64, ref_lowp, ctx.dtype)
                    row.update(status="ok", differ=count, elements=full.numel(),
                               differ_fraction=count / max(1, full.numel()), max_abs_diff=max_abs_diff(full, stepped),
                               max_abs_out=float(ref64.abs().max()), full_error=full_check.error,
                               steps_error=step_check.error, tolerance=step_check.tolerance,
                               full_within_tol=full_check.ok, steps_within_tol=step_check.ok,
                               seconds=time.perf_counter() - started)
                except BackendUnavailable as exc:
                    row.update(status="skipped", reason=str(exc))
                except Exception as exc:
                    row.update(status="error", error=_short(exc))
            rows.append(row)
            what = (f"{row['differ']}/{row['elements']} differ ({_percent(row)}), max |diff| {_fmt(row['max_abs_diff'])}"
                    f"; vs float64: full {_fmt(row['full_error'])}, steps {_fmt(row['steps_error'])} "
                    f"(tol {_fmt(row['tolerance'])}); {row['seconds']:.1f} s") if row["status"] == "ok" \
                else f"{row['status']}: {_note(row)}"
            ctx.log(f"  {spec.name:<15}{impl:<14}{backend:<12}{what}")
    return {"status": "ran", "rows": rows}


PREFILL_COLUMNS = [("primitive", lambda r: r["primitive"]), ("impl", lambda r: r["impl"]),
                   ("backend", lambda r: r["backend"]), ("differ", _percent),
                   ("max abs diff", lambda r: r.get("max_abs_diff")), ("max abs out", lambda r: r.get("max_abs_out")),
                   ("err full", lambda r: r.get("full_error")), ("err steps", lambda r: r.get("steps_error")),
                   ("tol", lambda r: r.get("tolerance")), ("note", _note)]


# ----------------------------------------------------------------------------- long
def _windows(L: int, window: int, chunk: int) -> list[tuple[int, int]]:
    """Start, an unaligned middle (not a multiple of any chunk or block) and the end."""
    window = min(window, L // 3)
    middle = min(L // 2 + chunk // 2 + 3, L - 2 * window)
    return [(0, window), (middle, middle + window), (L - window, L)]


def _leaves(inputs: dict, grad_names: tuple[str, ...]) -> dict:
    return {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}


def _long_one(ctx: Context, key: str, s: dict, backend: str) -> dict:
    spec = PRIMITIVES[key]
    grad_names = spec.seq_names + spec.params
    torch.manual_seed(3)
    inputs = spec.make(s, ctx.dtype, ctx.device)
    first = inputs[spec.seq_names[0]]
    L, axis = s["l"], spec.length_axis
    dout = torch.randn(first.shape, device=ctx.device).to(ctx.dtype)
    row: dict[str, Any] = {}
    if ctx.on_gpu:  # compile (and autotune) outside the timed run
        warm = _leaves(inputs, grad_names)
        spec.run(warm, backend, want_final=True, s=s)[0].backward(dout)
        del warm
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row["inputs_mib"] = torch.cuda.memory_allocated() / 2**20
    leaves = _leaves(inputs, grad_names)
    started = time.perf_counter()
    out, final = spec.run(leaves, backend, want_final=True, s=s)
    out.backward(dout)
    _sync(ctx.device)
    row["fwd_bwd_ms"] = 1e3 * (time.perf_counter() - started)
    if ctx.on_gpu:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    tensors = {"out": out, "final_state": final, **{f"d{k}": leaves[k].grad for k in grad_names}}
    row["missing"] = [name for name, t in tensors.items() if t is None]
    row["all_finite"] = not row["missing"] and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    grads = {name: leaves[name].grad for name in spec.seq_names}
    out, final = out.detach(), final.detach()

    checks: dict[str, dict] = {}

    def record(name: str, got, ref64, ref_lowp):
        result = compare(got, ref64, ref_lowp, ctx.dtype)
        ratio = result.error / result.tolerance if result.tolerance > 0 else math.inf
        if name not in checks or ratio > checks[name]["ratio"]:
            checks[name] = {"error": result.error, "tolerance": result.tolerance, "ratio": ratio, "ok": result.ok}
        else:
            checks[name]["ok"] = checks[name]["ok"] and result.ok

    windows = _windows(L, s["window"], s.get("chunk", 16))
    for start, stop in windows:
        with torch.no_grad():  # the kernel's own state before the window
            initial = spec.run(_positions(inputs, spec.seq_names, axis, 0, start), backend, want_final=True,
                               s=s)[1] if start > 0 else None
        d_end = None
        if stop < L:  # the kernel's own gradient flowing into the state after the window
            state0 = torch.zeros_like(final).requires_grad_(True)
            tail = spec.run(_positions(inputs, spec.seq_names, axis, stop, L), backend, initial=state0, s=s)
            tail.backward(dout.narrow(axis, stop, L - stop))
            d_end = state0.grad
        refs = {}
        for label, cast in (("ref64", torch.float64), ("lowp", None)):
            window = _positions(inputs, spec.seq_names, axis, start, stop)
            window = {k: (v.detach().to(cast) if cast is not None and v.is_floating_point() else v.detach())
                      .requires_grad_(k in spec.seq_names) for k, v in window.items()}
            init = None if initial is None else (initial.to(cast) if cast is not None else initial)
            r_out, r_final = spec.run(window, "reference", initial=init, want_final=True, s=s)
            acc = cast or torch.float32
            loss = (r_out.to(acc) * dout.narrow(axis, start, stop - start).to(acc)).sum()
            if d_end is not None:
                loss = loss + (r_final.to(acc) * d_end.to(acc)).sum()
            loss.backward()
            refs[label] = (r_out.detach(), r_final.detach(), {k: window[k].grad for k in spec.seq_names})
        (o64, f64, g64), (olp, flp, glp) = refs["ref64"], refs["lowp"]
        record("out", out.narrow(axis, start, stop - start), o64, olp)
        if stop == L:
            record("final_state", final, f64, flp)
        for name in spec.seq_names:
            record(f"d{name}", grads[name].narrow(axis, start, stop - start), g64[name], glp[name])
    worst = max(checks, key=lambda name: checks[name]["ratio"])
    ok = row["all_finite"] and all(c["ok"] for c in checks.values())
    row.update(status="PASS" if ok else "FAIL", windows=windows, checks=checks, worst=worst,
               worst_ratio=checks[worst]["ratio"])
    return row


def section_long(ctx: Context) -> dict:
    rows = []
    for key, s in ctx.shapes("long").items():
        spec = PRIMITIVES[key]
        backends = ("triton", "cuda") if ctx.on_gpu else ("triton",)
        for backend in backends:
            row: dict[str, Any] = {"primitive": spec.name, "backend": backend, "dtype": _dtype_name(ctx.dtype),
                                   "shape": _shape_text(s), "length": s["l"]}
            started = time.perf_counter()
            try:
                row.update(_long_one(ctx, key, s, backend))
            except BackendUnavailable as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:
                row.update(status="error", error=_short(exc))
            finally:
                if ctx.on_gpu:
                    torch.cuda.empty_cache()
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            if row["status"] in ("PASS", "FAIL"):
                c = row["checks"][row["worst"]]
                what = (f"{row['status']}: worst {row['worst']} err {_fmt(c['error'])} vs tol {_fmt(c['tolerance'])}"
                        f" ({100 * c['ratio']:.0f}% of tol); fwd+bwd {row['fwd_bwd_ms']:.1f} ms"
                        + (f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else "")
                        + ("" if row["all_finite"] else f", NON-FINITE or missing ({', '.join(row['missing'])})")
                        + f"; {row['seconds']:.1f} s")
            else:
                what = f"{row['status']}: {_note(row)}"
            ctx.log(f"  {spec.name:<15}{backend:<8}L={s['l']:<8}{what}")
    return {"status": "ran", "rows": rows}


LONG_COLUMNS = [("primitive", lambda r: r["primitive"]), ("backend", lambda r: r["backend"]),
                ("L", lambda r: r["length"]), ("status", lambda r: r["status"]),
                ("worst", lambda r: r.get("worst")),
                ("err", lambda r: r["checks"][r["worst"]]["error"] if r.get("worst") else None),
                ("tol", lambda r: r["checks"][r["worst"]]["tolerance"] if r.get("worst") else None),
                ("fwd+bwd ms", lambda r: r.get("fwd_bwd_ms")), ("peak MiB", lambda r: r.get("peak_mib")),
                ("finite", lambda r: r.get("all_finite")), ("note", _note)]


# ----------------------------------------------------------------------------- deterministic
DETERMINISTIC_TIMED_RUNS = 10


def _forward_backward(spec: Primitive, inputs: dict, backend: str, s: dict, dout: torch.Tensor) -> list[torch.Tensor]:
    """The output and every gradient of one forward + backward."""
    leaves = _leaves(inputs, spec.seq_names + spec.params)
    out = spec.run(leaves, backend, s=s)
    out.backward(dout)
    return [out.detach()] + [leaves[name].grad for name in spec.seq_names + spec.params]


def deterministic_child(primitive: str, backend: str, import_s: float) -> None:
    """Runs in a child process whose ``SSMKERNELS_DETERMINISTIC`` the parent set before any kernel
    module was imported (the mode pins autotune configs at import): median fwd+bwd time, and the
    number of output/gradient elements whose bits differ between two identical runs."""
    device, dtype = _child_device()
    s = SHAPES["gpu" if device.type == "cuda" else "toy"]["deterministic"][primitive]
    spec = PRIMITIVES[primitive]
    result: dict[str, Any] = {"shape": _shape_text(s), "deterministic": config.deterministic()}
    try:
        torch.manual_seed(5)
        inputs = spec.make(s, dtype, device)
        dout = torch.randn(inputs[spec.seq_names[0]].shape, device=device).to(dtype)
        first = _forward_backward(spec, inputs, backend, s, dout)
        second = _forward_backward(spec, inputs, backend, s, dout)
        _sync(device)
        result["repeat_differ"] = sum(bitwise_differ(a, b) for a, b in zip(first, second))
        result["elements"] = sum(t.numel() for t in first)
        times = []
        for _ in range(DETERMINISTIC_TIMED_RUNS if device.type == "cuda" else 1):
            _sync(device)
            started = time.perf_counter()
            _forward_backward(spec, inputs, backend, s, dout)
            _sync(device)
            times.append(1e3 * (time.perf_counter() - started))
        result["ms"] = sorted(times)[len(times) // 2]
    except BackendUnavailable as exc:
        result["reason"] = str(exc)
    except Exception as exc:
        result["error"] = _short(exc)
    print(_RESULT_TAG + json.dumps(result), flush=True)


def section_deterministic(ctx: Context) -> dict:
    """Default vs deterministic mode, each in its own fresh process (the mode is read when the
    kernel modules are imported): fwd+bwd time, its cost, and whether two identical runs agree
    bitwise. A deterministic run whose repeat differs is a FAIL; a default-mode difference is a figure."""
    rows = []
    backends = ("triton", "cuda") if ctx.on_gpu else ("triton",)
    for key in filter(ctx.wants, ctx.shapes("deterministic")):
        spec = PRIMITIVES[key]
        for backend in backends:
            row: dict[str, Any] = {"primitive": spec.name, "backend": backend, "dtype": _dtype_name(ctx.dtype)}
            default, pinned = (_run_child(key, backend, _child_env(SSMKERNELS_DETERMINISTIC=mode),
                                          entry="deterministic_child") for mode in ("0", "1"))
            row["shape"] = default.get("shape") or pinned.get("shape")
            problem = next((r for r in (pinned, default) if "reason" in r or "error" in r), None)
            if problem is not None:
                row.update(status="skipped" if "reason" in problem else "error",
                           reason=problem.get("reason"), error=problem.get("error"))
            else:
                row.update(default_ms=default["ms"], deterministic_ms=pinned["ms"],
                           cost=pinned["ms"] / default["ms"] - 1.0, elements=pinned["elements"],
                           default_repeat_differ=default["repeat_differ"],
                           deterministic_repeat_differ=pinned["repeat_differ"],
                           status="ok" if pinned["repeat_differ"] == 0 else "FAIL")
            rows.append(row)
            if row["status"] in ("ok", "FAIL"):
                ctx.log(f"  {spec.name:<15}{backend:<8} default {row['default_ms']:8.2f} ms   deterministic "
                        f"{row['deterministic_ms']:8.2f} ms ({100 * row['cost']:+.0f}%)   repeat differs: default "
                        f"{row['default_repeat_differ']}, deterministic {row['deterministic_repeat_differ']} "
                        f"of {row['elements']} elements")
            else:
                ctx.log(f"  {spec.name:<15}{backend:<8} {row['status']}: {_note(row)}")
    return {"status": "ran", "rows": rows}


DETERMINISTIC_COLUMNS = [("primitive", lambda r: r["primitive"]), ("backend", lambda r: r["backend"]),
                         ("shape", lambda r: r.get("shape")), ("default ms", lambda r: r.get("default_ms")),
                         ("deterministic ms", lambda r: r.get("deterministic_ms")),
                         ("cost", lambda r: None if r.get("cost") is None else f"{100 * r['cost']:+.0f}%"),
                         ("repeat differs (default)", lambda r: r.get("default_repeat_differ")),
                         ("repeat differs (deterministic)", lambda r: r.get("deterministic_repeat_differ")),
                         ("status", lambda r: r["status"]), ("note", _note)]


# ----------------------------------------------------------------------------- sanitizer
def find_compute_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and Path(base, "bin", "compute-sanitizer").is_file():
            return str(Path(base, "bin", "compute-sanitizer"))
    return None


def _tail(text: str, lines: int = 15) -> list[str]:
    return text.strip().splitlines()[-lines:]


def section_sanitizer(ctx: Context) -> dict:
    if not ctx.on_gpu:
        return {"status": "skipped", "reason": NEEDS_GPU, "rows": []}
    tool = find_compute_sanitizer()
    if tool is None:
        return {"status": "skipped", "reason": "not available: compute-sanitizer is not on PATH (nor in CUDA_HOME/bin)",
                "rows": []}
    if not SANITIZE_SCRIPT.is_file():
        return {"status": "skipped", "reason": f"{SANITIZE_SCRIPT} not found (run from a source checkout)", "rows": []}
    rows = []
    # Triton's cache is the usual one (TRITON_CACHE_DIR or ~/.triton/cache), shared by both runs: the
    # plain run compiles and autotunes, so the memcheck run only loads kernels (and never benchmarks
    # autotune configs under the sanitizer).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    script = [sys.executable, str(SANITIZE_SCRIPT)]
    # One memcheck run per backend, each with its own time limit, so that a slow one still leaves
    # the other's verdict (the plain run compiles and autotunes every Triton kernel: ~96 s on the H100).
    memcheck = [tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "50"]
    runs = [("plain (fills the Triton cache)", script)] + [
        (f"memcheck {backend}", [*memcheck, *script, "--backends", backend]) for backend in ("cuda", "triton")]
    for label, command in runs:
        ctx.log(f"  running {label}: {' '.join(command)}")
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True,
                                  timeout=ctx.sanitizer_timeout_s)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = None
            output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                      else (exc.stdout or "")) + f"\ntimed out after {ctx.sanitizer_timeout_s} s"
        summary = next((line.strip() for line in reversed(output.splitlines()) if "ERROR SUMMARY" in line), None)
        row = {"run": label, "exit_code": code, "seconds": time.perf_counter() - started,
               "error_summary": summary, "tail": _tail(output), "status": "ok" if code == 0 else "error"}
        if code != 0:
            row["error"] = f"exit code {code}: {summary or (row['tail'][-1] if row['tail'] else '')}"
        rows.append(row)
        ctx.log(f"  {label}: exit {code} after {row['seconds']:.1f} s" + (f"; {summary}" if summary else ""))
        if code != 0:
            for line in row["tail"]:
                ctx.log(f"    | {line}")
    return {"status": "ran", "rows": rows, "tool": tool}


SANITIZER_COLUMNS = [("run", lambda r: r["run"]), ("exit code", lambda r: r["exit_code"]),
                     ("seconds", lambda r: r["seconds"]), ("summary", lambda r: r.get("error_summary"))]


# ----------------------------------------------------------------------------- driver
RUNNERS = {"first-call": (section_first_call, FIRST_CALL_COLUMNS),
           "batch-invariance": (section_batch_invariance, BATCH_COLUMNS),
           "prefill-decode": (section_prefill_decode, PREFILL_COLUMNS),
           "long": (section_long, LONG_COLUMNS),
           "deterministic": (section_deterministic, DETERMINISTIC_COLUMNS),
           "sanitizer": (section_sanitizer, SANITIZER_COLUMNS)}


def environment(ctx: Context) -> dict:
    from ..cli import gpu_description, versions

    return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(ctx.device),
            "gpu": gpu_description(), "size": ctx.size, "dtype": _dtype_name(ctx.dtype),
            "triton_interpret": config.triton_interpret(), "deterministic": config.deterministic(),
            **versions(), "peers": _peer_versions(ctx)}


def failures(section: dict) -> int:
    """Rows that count against the exit code: errors, long checks beyond tolerance, sanitizer findings."""
    return sum(row.get("status") in ("error", "FAIL") for row in section.get("rows", ()))


def run(sections: list[str], quick: bool = False, device: Optional[torch.device] = None,
        log: Callable[[str], None] = print, primitives: Optional[Iterable[str]] = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = ("quick" if quick else "gpu") if device.type == "cuda" else "toy"
    dtype = _input_dtype(device)
    ctx = Context(device, size, dtype, log, primitives=None if primitives is None else frozenset(primitives))
    results: dict[str, Any] = {"meta": environment(ctx), "sections": {}}
    log(f"ssmkernels robustness on {device} ({results['meta']['gpu']}); sizes: {size}; inputs "
        f"{_dtype_name(dtype)}, states float32; sections: {', '.join(sections)}")
    if device.type == "cpu":
        log("note: no GPU: toy shapes in float32 (a smoke test); Triton rows need TRITON_INTERPRET=1"
            + ("" if config.triton_interpret() else " (not set here, so they are skipped)"))
    for name in sections:
        function, columns = RUNNERS[name]
        log("")
        log(f"[{name}]")
        started = time.perf_counter()
        try:
            section = function(ctx)
        except Exception as exc:  # a section that breaks must not take the others with it
            section = {"status": "error", "error": _short(exc), "rows": [{"status": "error", "error": _short(exc)}]}
        section["seconds"] = time.perf_counter() - started
        results["sections"][name] = section
        if section["status"] == "skipped":
            log(f"  {section['reason']}")
        elif section["status"] == "error":
            log(f"  section failed: {section['error']}")
        else:
            log("")
            log(table(columns, section["rows"]))
        log(f"  ({name}: {section['seconds']:.1f} s)")
    results["failures"] = {name: failures(section) for name, section in results["sections"].items()}
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmkernels robustness",
                                     description="robustness measurements (issue #10): first-call times, batch "
                                                 "invariance, prefill vs decode, 256K-token fwd+bwd vs float64, "
                                                 "deterministic-mode cost, compute-sanitizer")
    parser.add_argument("--quick", action="store_true", help="long: L = 4096 instead of 262144")
    parser.add_argument("--json", metavar="PATH", help="write every row and the environment as JSON")
    parser.add_argument("--only", action="append", metavar="NAME,...",
                        help=f"sections to run (default all): {', '.join(SECTIONS)}")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--primitive", action="append", metavar="NAME,...",
                        help=f"first-call and deterministic rows of these only: {', '.join(FIRST_CALL_PRIMITIVES)}")
    args = parser.parse_args(argv)

    def listed(values, allowed, what: str) -> list[str]:
        """The comma-separated names of a repeatable option, each one of ``allowed``."""
        names = [item.strip() for value in values or () for item in value.split(",") if item.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            parser.error(f"unknown {what} {unknown[0]!r}; expected one of {', '.join(allowed)}")
        return names

    names = listed(args.only, SECTIONS, "section")
    sections = [name for name in SECTIONS if name in names] if names else list(SECTIONS)
    primitives = listed(args.primitive, FIRST_CALL_PRIMITIVES, "primitive")
    log = lambda message: print(message, flush=True)  # noqa: E731
    results = run(sections, quick=args.quick, device=torch.device(args.device) if args.device else None, log=log,
                  primitives=primitives or None)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    failed = sum(results["failures"].values())
    log("")
    log(f"robustness: {failed} failing row(s)" + (
        f" ({', '.join(f'{k}: {v}' for k, v in results['failures'].items() if v)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
