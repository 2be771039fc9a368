"""Compile every Triton kernel that a representative call of each primitive launches, for an H100
(sm_90), on a machine without a GPU; nothing is launched.

Run as a script (tests/test_triton_lowering.py does, in a subprocess): Triton's CPU interpreter
accepts constructs that the real compiler rejects (re-bound constexpr names, branches returning
different shapes, shared-memory overflows), and CI has no GPU. Triton is pointed at a stand-in
driver that reports an sm_90 target, and every launch becomes a compile-only ``warmup``. Kernel
outputs are therefore never written: this checks compilation, not results.

When ``ptxas`` is on PATH, each kernel's PTX is also assembled with ``-v`` and its local-memory
spills are checked against ``SPILL_LIMIT``: the SSD backward once ran its float32 matmuls as FMA
dots whose register tiles spilled 9-14 KB per thread, 100x slower on the GPU, and nothing
functional caught it.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["SSMKERNELS_DETERMINISTIC"] = "1"  # one pinned config per kernel: nothing to benchmark

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """What JITFunction.run asks of a driver before launching, answered for an H100."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


driver.set_active(CompileOnlyDriver())
_run = JITFunction.run
compiled = []


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append((self.fn.__name__, kernel.metadata.shared if kernel is not None else None,
                     kernel.asm.get("ptx") if kernel is not None else None))
    return kernel


JITFunction.run = compile_only

import ssmkernels  # noqa: E402
from ssmkernels._core import dispatch  # noqa: E402

dispatch.triton_device_reason = lambda device: None  # CPU tensors stand in for CUDA ones
SHARED_LIMIT = 232448  # bytes of shared memory per block on an H100
# Bytes of spill stores per thread a kernel may have (ptxas -v). The largest today: 1408 B (an SSD
# float32 backward scan), 1264 B (the bf16-input dB/dC scans with their 128-wide value tile, which
# the H200 still ran faster: whole fwd+bwd 14.68 against 18.36 ms with 64 and 364 B), 996 B (the
# conv backward, channel-first); the regression this guards against was 13 KB
# (SSMKERNELS_SSD_DOT_PRECISION=ieee still shows it).
SPILL_LIMIT = 2048
_SPILLS = re.compile(r"(\d+) bytes spill stores")


def ptxas_report(ptx: str) -> str | None:
    """What ``ptxas -v`` prints for ``ptx`` assembled for sm_90a (registers, spills; None without ptxas)."""
    ptxas = shutil.which("ptxas")
    if ptxas is None or not ptx:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        return subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, timeout=600).stderr
    finally:
        os.unlink(f.name)


def spill_stores(ptx: str) -> int | None:
    """Bytes of spill stores per thread of ``ptx`` assembled for sm_90a (None without ptxas)."""
    report = ptxas_report(ptx)
    found = _SPILLS.findall(report) if report else []
    return max(int(v) for v in found) if found else None


def grad_all(outputs, inputs):
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    loss = sum(o.float().sum() for o in outputs)
    torch.autograd.grad(loss, [t for t in inputs if t.requires_grad], allow_unused=True)


def leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def conv(dtype):
    x = leaf(2, 64, 300, dtype=dtype)
    w, bias = leaf(64, 4, dtype=torch.float32), leaf(64, dtype=torch.float32)
    init = leaf(2, 64, 3, dtype=dtype)
    grad_all(ssmkernels.causal_conv1d(x, w, bias, initial_states=init, return_final_states=True,
                                      activation="silu", backend="triton"), (x, w, bias, init))
    xl = leaf(2, 300, 64, dtype=dtype)
    seq = torch.tensor([[0] * 100 + [1] * 200] * 2, dtype=torch.int32)
    grad_all(ssmkernels.causal_conv1d(xl.transpose(1, 2), w, bias, seq_idx=seq, activation="silu",
                                      backend="triton"), (xl, w, bias))
    state = torch.randn(4, 64, 5, dtype=dtype)
    ssmkernels.causal_conv1d_update(torch.randn(2, 64, 3, dtype=dtype), state, w, bias, "silu",
                                    torch.tensor([3, 9], dtype=torch.int32), torch.tensor([1, -1], dtype=torch.int32),
                                    backend="triton")


def scan(dtype):
    b, d, l, n = 2, 64, 300, 16
    u, delta, z = leaf(b, d, l, dtype=dtype), leaf(b, d, l, dtype=dtype), leaf(b, d, l, dtype=dtype)
    A, D, bias = leaf(d, n, dtype=torch.float32), leaf(d, dtype=torch.float32), leaf(d, dtype=torch.float32)
    for B, C in ((leaf(b, n, l, dtype=dtype), leaf(b, n, l, dtype=dtype)),
                 (leaf(b, 2, n, l, dtype=dtype), leaf(b, 2, n, l, dtype=dtype)),
                 (leaf(d, n, dtype=torch.float32), leaf(d, n, dtype=torch.float32))):
        grad_all(ssmkernels.selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="triton"),
                 (u, delta, A, B, C, D, z, bias))


def ssd(dtype):
    b, l, h, p, g, n = 1, 300, 8, 64, 2, 128
    x, z = leaf(b, l, h, p, dtype=dtype), leaf(b, l, h, p, dtype=dtype)
    dt, B, C = leaf(b, l, h, dtype=dtype), leaf(b, l, g, n, dtype=dtype), leaf(b, l, g, n, dtype=dtype)
    A, D, bias = leaf(h, dtype=torch.float32), leaf(h, dtype=torch.float32), leaf(h, dtype=torch.float32)
    init = leaf(3, h, p, n, dtype=torch.float32)
    for chunk in (64, 256):
        grad_all(ssmkernels.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                           return_final_states=True, backend="triton"), (x, dt, A, B, C, D, z, bias))
    cu = torch.tensor([0, 100, 100, 300], dtype=torch.int32)
    grad_all(ssmkernels.ssd_chunk_scan(x, dt, A, B, C, 64, D=D, dt_bias=bias, dt_softplus=True, initial_states=init,
                                       cu_seqlens=cu, return_varlen_states=True, backend="triton"),
             (x, dt, A, B, C, D, bias, init))


def state_update(dtype):
    b, h, p, n = 4, 8, 64, 128
    for state_dtype in (torch.float32, torch.bfloat16):
        state = torch.randn(b, h, p, n, dtype=state_dtype)
        A = torch.randn(h, dtype=torch.float32)[:, None, None].expand(h, p, n)
        dt = torch.randn(b, h, dtype=dtype)[:, :, None].expand(b, h, p)
        ssmkernels.selective_state_update(state, torch.randn(b, h, p, dtype=dtype), dt, A,
                                          torch.randn(b, 2, n, dtype=dtype), torch.randn(b, 2, n, dtype=dtype),
                                          D=torch.randn(h, p), z=torch.randn(b, h, p, dtype=dtype),
                                          dt_bias=torch.randn(h, p), dt_softplus=True, backend="triton")
    # The pipelined kernel (opt-in: triton.py's _PROGRAMS_PER_SM), at a batch * heads that takes it.
    from ssmkernels.ops.state_update import op as su_op
    from ssmkernels.ops.state_update import triton as su_triton

    b, saved = 128, su_triton._PROGRAMS_PER_SM
    su_triton._PROGRAMS_PER_SM = 4
    su_op.clear_caches()
    try:
        for state_dtype in (torch.float32, torch.bfloat16):
            ssmkernels.selective_state_update(torch.empty(b, h, p, n, dtype=state_dtype), torch.randn(b, h, p, dtype=dtype),
                                              torch.randn(b, h, dtype=dtype)[:, :, None].expand(b, h, p), A,
                                              torch.randn(b, 2, n, dtype=dtype), torch.randn(b, 2, n, dtype=dtype),
                                              dt_softplus=True, backend="triton")
    finally:
        su_triton._PROGRAMS_PER_SM = saved
        su_op.clear_caches()


if __name__ == "__main__":
    failures = []
    wanted = set(sys.argv[1:])  # primitive names; none = all
    for name, case in (("causal_conv1d", conv), ("selective_scan", scan), ("ssd", ssd), ("state_update", state_update)):
        if wanted and name not in wanted:
            continue
        for dtype in (torch.bfloat16, torch.float32):
            start = len(compiled)
            try:
                case(dtype)
            except Exception as exc:  # report every primitive, not just the first failure
                failures.append(f"{name}/{dtype}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            new = compiled[start:]
            too_big = [(k, s) for k, s, _ in new if s is not None and s > SHARED_LIMIT]
            if too_big:
                failures.append(f"{name}/{dtype}: shared memory over the H100's {SHARED_LIMIT} B: {too_big}")
            spills = {}
            for kernel, _, ptx in new:
                if ptx is not None and (kernel, ptx) not in spills:
                    spills[(kernel, ptx)] = spill_stores(ptx)
            worst = max((v for v in spills.values() if v is not None), default=None)
            spilling = sorted({(k, v) for (k, _), v in spills.items() if v is not None and v > SPILL_LIMIT})
            if spilling:
                failures.append(f"{name}/{dtype}: spill stores over {SPILL_LIMIT} B per thread: {spilling}")
            print(f"{name}/{str(dtype).replace('torch.', '')}: {len(new)} launches compiled for sm_90, "
                  f"{len(spills)} distinct kernels, most spill stores per thread: "
                  f"{'no ptxas' if worst is None else f'{worst} B'}", flush=True)
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("lowered")
