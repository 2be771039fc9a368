"""Named benchmark cases per primitive (issue 3's shapes), with bytes moved and FLOPs.

Each :class:`BenchCase` knows how to build its inputs on a device, how to call ssmkernels on a
backend, and how to call each peer library on the same problem. Bytes are the minimum traffic
(every input read once, every output written once; for fwd+bwd also the backward's reads of the
saved inputs and upstream gradient and its writes of the gradients); FLOPs count the useful
arithmetic of the algorithm (documented per primitive below), so GB/s and TFLOP/s compare
implementations on equal terms.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..ops.causal_conv1d.op import causal_conv1d, causal_conv1d_update
from ..ops.selective_scan.op import selective_scan
from ..ops.ssd.op import ssd_chunk_scan
from ..ops.state_update.op import selective_state_update

BF16 = torch.bfloat16
F32 = torch.float32

Forward = Callable[[], Any]
# build(inputs, peer_function) -> (forward closure, tensors to differentiate in fwd+bwd)
PeerBuild = Callable[[dict, Callable], tuple[Forward, list[torch.Tensor]]]


@dataclass(frozen=True)
class PeerImpl:
    label: str  # column name in the tables, e.g. "mamba_ssm"
    peer: str  # key in peers.load()
    function: str  # function that must be importable
    build: PeerBuild
    note: str = ""


@dataclass
class BenchCase:
    primitive: str
    name: str
    mode: str  # "fwd", "fwd+bwd" or "decode" (in place, no gradient)
    shape: str
    make: Callable[[torch.device], dict]
    ours: Callable[[dict, str], Forward]  # (inputs, backend) -> forward closure
    grads: tuple[str, ...]  # inputs differentiated in fwd+bwd
    bytes: int
    flops: int
    peers: list[PeerImpl] = field(default_factory=list)
    wall_loop: bool = False  # also report the wall-clock time per call of a back-to-back loop

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"


def _seeded(make: Callable[[torch.device], dict], seed: int) -> Callable[[torch.device], dict]:
    def seeded(device: torch.device) -> dict:
        torch.manual_seed(seed)
        return make(device)
    return seeded


# ----------------------------------------------------------------------------- causal_conv1d
# FLOPs: 2 * w per output element (multiply-add per tap); the backward computes dx and dweight,
# 2 * w each. Bytes: x and out (bf16); the backward reads x and dout and writes dx.
def _conv_cases() -> list[BenchCase]:
    b, d, l, w = 4, 10240, 4096, 4
    elems = b * d * l
    cases = []
    for layout in ("channel-first", "channel-last"):
        def make(device, layout=layout):
            x = (torch.randn(b, d, l, device=device, dtype=BF16) if layout == "channel-first"
                 else torch.randn(b, l, d, device=device, dtype=BF16).transpose(1, 2))
            return {"x": x, "weight": torch.randn(d, w, device=device, dtype=BF16) * 0.5,
                    "bias": torch.randn(d, device=device, dtype=BF16) * 0.5}

        def ours(kw, backend):
            return lambda: causal_conv1d(kw["x"], kw["weight"], kw["bias"], activation="silu", backend=backend)

        def peer_fn(kw, fn):
            return (lambda: fn(kw["x"], kw["weight"], kw["bias"], activation="silu")), \
                [kw["x"], kw["weight"], kw["bias"]]

        def torch_fn(kw, conv1d):
            x, weight, bias = kw["x"], kw["weight"], kw["bias"]
            width, length = weight.shape[1], x.shape[2]
            return (lambda: F.silu(conv1d(x, weight[:, None, :], bias, padding=width - 1,
                                          groups=weight.shape[0])[..., :length])), [x, weight, bias]

        peers = [PeerImpl("causal_conv1d", "causal_conv1d", "causal_conv1d_fn", peer_fn),
                 PeerImpl("torch", "torch", "conv1d", torch_fn, "F.conv1d (padded, groups=d) + silu")]
        short = "cf" if layout == "channel-first" else "cl"
        shape = f"B{b} D{d} L{l} W{w} bf16 silu {layout}"
        weights = d * w * 2 + d * 2
        cases.append(BenchCase("causal_conv1d", f"conv1d-{short}-fwd", "fwd", shape, _seeded(make, 1), ours,
                               (), 2 * elems * 2 + weights, 2 * w * elems, peers))
        cases.append(BenchCase("causal_conv1d", f"conv1d-{short}-fwdbwd", "fwd+bwd", shape, _seeded(make, 1), ours,
                               ("x", "weight", "bias"), 5 * elems * 2 + 3 * weights, 6 * w * elems, peers))

    bu = 256

    def make_update(device):
        return {"x": torch.randn(bu, d, device=device, dtype=BF16),
                "conv_state": torch.randn(bu, d, w - 1, device=device, dtype=BF16),
                "weight": torch.randn(d, w, device=device, dtype=BF16) * 0.5,
                "bias": torch.randn(d, device=device, dtype=BF16) * 0.5}

    def ours_update(kw, backend):
        return lambda: causal_conv1d_update(kw["x"], kw["conv_state"], kw["weight"], kw["bias"], "silu",
                                            backend=backend)

    def peer_update(kw, fn):
        return (lambda: fn(kw["x"], kw["conv_state"], kw["weight"], kw["bias"], "silu")), []

    cases.append(BenchCase(
        "causal_conv1d", "conv1d-update-b256", "decode", f"batch {bu} D{d} W{w} bf16 silu, state {w - 1}",
        _seeded(make_update, 2), ours_update, (), (2 * bu * d + 2 * bu * d * (w - 1)) * 2 + d * w * 2,
        2 * w * bu * d, [PeerImpl("causal_conv1d", "causal_conv1d", "causal_conv1d_update", peer_update)]))
    return cases


# ----------------------------------------------------------------------------- selective_scan
# FLOPs: 9 per (b, d, l, n) as mamba_ssm counts its scan (exp(dt A), dt B u, the state update and
# C . h); the backward is counted as twice the forward. Bytes: u, delta, z, out (b, d, l) and B, C
# (b, n, l) in bf16; the backward reads u, delta, z, B, C, dout and writes du, ddelta, dz, dB, dC.
def _scan_cases() -> list[BenchCase]:
    b, d, l = 4, 5120, 4096
    cases = []
    for n, modes in ((16, ("fwd", "fwd+bwd")), (64, ("fwd", "fwd+bwd")), (128, ("fwd", "fwd+bwd"))):
        def make(device, n=n):
            return {"u": torch.randn(b, d, l, device=device, dtype=BF16),
                    "delta": torch.rand(b, d, l, device=device, dtype=BF16) * 3 - 4,
                    "A": -torch.rand(d, n, device=device, dtype=F32) * 2 - 0.5,
                    "B": torch.randn(b, n, l, device=device, dtype=BF16),
                    "C": torch.randn(b, n, l, device=device, dtype=BF16),
                    "D": torch.randn(d, device=device, dtype=F32),
                    "z": torch.randn(b, d, l, device=device, dtype=BF16),
                    "delta_bias": torch.rand(d, device=device, dtype=F32) - 0.5}

        def ours(kw, backend):
            return lambda: selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                          kw["delta_bias"], True, backend=backend)

        def peer_fn(kw, fn):
            names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
            return (lambda: fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                               delta_softplus=True)), [kw[k] for k in names]

        peers = [PeerImpl("mamba_ssm", "mamba_ssm", "selective_scan_fn", peer_fn, "CUDA selective scan")]
        shape = f"B{b} D{d} L{l} N{n} bf16, z, D, delta_bias, softplus"
        fwd_bytes = (4 * b * d * l + 2 * b * n * l) * 2
        bwd_bytes = (7 * b * d * l + 4 * b * n * l) * 2
        flops = 9 * b * d * l * n
        for mode in modes:
            backward = mode == "fwd+bwd"
            cases.append(BenchCase(
                "selective_scan", f"scan-n{n}-{'fwdbwd' if backward else 'fwd'}", mode, shape, _seeded(make, 3 + n),
                ours, ("u", "delta", "A", "B", "C", "D", "z", "delta_bias") if backward else (),
                fwd_bytes + (bwd_bytes if backward else 0), flops * (3 if backward else 1), peers))
    return cases


# ----------------------------------------------------------------------------- ssd
# FLOPs of the chunked algorithm with chunk Q, per token, causal halves counted once:
# C B^T within the chunk Q*g*n, its product with x Q*h*p, chunk states 2*h*p*n, state-to-output
# 2*h*p*n (multiply-adds count 2). The backward is counted as twice the forward. Bytes: x, out
# (b, l, h, p), dt (b, l, h), B, C (b, l, g, n) in bf16 (plus the float32 final state of every
# sequence in the varlen case); the backward reads x, dt, B, C, dout and writes dx, ddt, dB, dC.
def _ssd_flops(tokens: int, h: int, p: int, n: int, g: int, chunk: int) -> int:
    return tokens * (chunk * (g * n + h * p) + 4 * h * p * n)


def _varlen_bounds(total: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < total:
        bounds.append(min(total, bounds[-1] + rng.randint(low, high)))
    return bounds


def _ssd_cases() -> list[BenchCase]:
    b, l, h, p, g = 4, 4096, 128, 64, 8
    cases = []
    variants = [  # (name, n, chunk, modes, varlen)
        ("ssd", 128, 256, ("fwd", "fwd+bwd"), False),
        ("ssd-chunk128", 128, 128, ("fwd", "fwd+bwd"), False),
        ("ssd-chunk64", 128, 64, ("fwd",), False),
        ("ssd-n64", 64, 256, ("fwd", "fwd+bwd"), False),
        ("ssd-varlen", 128, 256, ("fwd", "fwd+bwd"), True),
    ]
    for name, n, chunk, modes, varlen in variants:
        rows, length = (1, b * l) if varlen else (b, l)
        bounds = _varlen_bounds(length, 64, 512, seed=7) if varlen else None

        def make(device, n=n, rows=rows, length=length, bounds=bounds):
            kw = {"x": torch.randn(rows, length, h, p, device=device, dtype=BF16),
                  "dt": torch.rand(rows, length, h, device=device, dtype=BF16) * 3 - 4,
                  "A": -torch.rand(h, device=device, dtype=F32) * 4 - 0.5,
                  "B": torch.randn(rows, length, g, n, device=device, dtype=BF16) * 0.5,
                  "C": torch.randn(rows, length, g, n, device=device, dtype=BF16) * 0.5,
                  "D": torch.randn(h, device=device, dtype=F32),
                  "dt_bias": torch.rand(h, device=device, dtype=F32) - 0.5}
            if bounds is not None:
                kw["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32, device=device)
                lengths = torch.tensor([e - s for s, e in zip(bounds, bounds[1:])], device=device)
                kw["seq_idx"] = torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32),
                                                        lengths)[None]
            return kw

        def ours(kw, backend, chunk=chunk):
            if "cu_seqlens" in kw:
                return lambda: ssd_chunk_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"],
                                              dt_bias=kw["dt_bias"], cu_seqlens=kw["cu_seqlens"], dt_softplus=True,
                                              return_varlen_states=True, backend=backend)
            return lambda: ssd_chunk_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"],
                                          dt_bias=kw["dt_bias"], dt_softplus=True, backend=backend)

        def mamba(kw, fn, chunk=chunk):
            leaves = [kw[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
            if "cu_seqlens" in kw:
                return (lambda: fn(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"],
                                   dt_bias=kw["dt_bias"], seq_idx=kw["seq_idx"], cu_seqlens=kw["cu_seqlens"],
                                   dt_softplus=True, return_varlen_states=True)), leaves
            return (lambda: fn(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"],
                               dt_bias=kw["dt_bias"], dt_softplus=True)), leaves

        def fla(kw, fn):
            with torch.no_grad():
                dt = F.softplus(kw["dt"].float() + kw["dt_bias"])
                heads = kw["x"].shape[2] // kw["B"].shape[2]
                q = kw["C"].repeat_interleave(heads, dim=2).contiguous()
                k = kw["B"].repeat_interleave(heads, dim=2).contiguous()
                v = (kw["x"] * dt[..., None]).to(BF16)
                gate = (kw["A"] * dt).contiguous()
            cu = kw["cu_seqlens"].long() if "cu_seqlens" in kw else None
            return (lambda: fn(q, k, v, g=gate, scale=1.0, cu_seqlens=cu,
                               output_final_state=cu is not None)), [q, k, v, gate]

        peers = [PeerImpl("mamba_ssm", "mamba_ssm", "mamba_chunk_scan_combined", mamba, "Triton SSD"),
                 PeerImpl("fla", "fla", "chunk_simple_gla", fla,
                          "chunk_simple_gla, core scan only: q=C, k=B (expanded per head), v=x*dt, g=A*dt "
                          "precomputed; no D")]
        tokens = rows * length
        fwd_bytes = (2 * tokens * h * p + tokens * h + 2 * tokens * g * n) * 2
        if varlen:  # the final state of every sequence, float32
            fwd_bytes += (len(bounds) - 1) * h * p * n * 4
        bwd_bytes = (3 * tokens * h * p + 2 * tokens * h + 4 * tokens * g * n) * 2
        flops = _ssd_flops(tokens, h, p, n, g, chunk)
        seqs = f", {len(bounds) - 1} sequences of 64..512" if varlen else ""
        shape = f"B{rows} L{length} H{h} P{p} N{n} G{g} chunk {chunk} bf16, D, dt_bias, softplus{seqs}"
        for mode in modes:
            backward = mode == "fwd+bwd"
            cases.append(BenchCase(
                "ssd", f"{name}-{'fwdbwd' if backward else 'fwd'}", mode, shape, _seeded(make, 11 + n + chunk),
                ours, ("x", "dt", "A", "B", "C", "D", "dt_bias") if backward else (),
                fwd_bytes + (bwd_bytes if backward else 0), flops * (3 if backward else 1), peers))
    return cases


# ----------------------------------------------------------------------------- state_update
# FLOPs: 5 per state element (decay, dt*B*x, the update, C . state); bytes: the state read and
# written in its dtype, x/out (b, h, p) and B/C (b, g, n) in bf16, dt (b, h) broadcast over p.
def _state_cases() -> list[BenchCase]:
    h, p, n, g = 128, 64, 128, 8
    cases = []
    for batch in (256, 1):
        for state_dtype in (F32, BF16):
            def make(device, batch=batch, state_dtype=state_dtype):
                return {"state": torch.randn(batch, h, p, n, device=device, dtype=state_dtype),
                        "x": torch.randn(batch, h, p, device=device, dtype=BF16),
                        "dt": torch.rand(batch, h, device=device, dtype=BF16) * 3 - 4,
                        "A": -torch.rand(h, device=device, dtype=F32) * 4 - 0.5,
                        "B": torch.randn(batch, g, n, device=device, dtype=BF16),
                        "C": torch.randn(batch, g, n, device=device, dtype=BF16),
                        "D": torch.randn(h, device=device, dtype=F32),
                        "dt_bias": torch.rand(h, device=device, dtype=F32) - 0.5}

            def broadcast(kw):
                """Per-head values as stride-0 views, as Mamba-2 decoding passes them."""
                return (kw["dt"][..., None].expand(-1, h, p), kw["A"][:, None, None].expand(h, p, n),
                        kw["D"][:, None].expand(h, p), kw["dt_bias"][:, None].expand(h, p))

            def ours(kw, backend):
                dt, A, D, dt_bias = broadcast(kw)
                return lambda: selective_state_update(kw["state"], kw["x"], dt, A, kw["B"], kw["C"], D, None,
                                                      dt_bias, True, backend=backend)

            def mamba(kw, fn):
                dt, A, D, dt_bias = broadcast(kw)
                return (lambda: fn(kw["state"], kw["x"], dt, A, kw["B"], kw["C"], D=D, dt_bias=dt_bias,
                                   dt_softplus=True)), []

            size = state_dtype.itemsize
            elements = batch * h * p * n
            nbytes = 2 * elements * size + (2 * batch * h * p + 2 * batch * g * n + batch * h) * 2
            sname = "f32" if state_dtype == F32 else "bf16"
            cases.append(BenchCase(
                "state_update", f"state-update-b{batch}-{sname}state", "decode",
                f"batch {batch} H{h} P{p} N{n} G{g}, x bf16, state {sname}, D, dt_bias, softplus",
                _seeded(make, 20 + batch), ours, (), nbytes, 5 * elements,
                [PeerImpl("mamba_ssm", "mamba_ssm", "selective_state_update", mamba, "Triton")],
                wall_loop=batch == 1))
    return cases


def all_cases() -> list[BenchCase]:
    return _conv_cases() + _scan_cases() + _ssd_cases() + _state_cases()


def select(primitives: list[str] | None = None, names: list[str] | None = None) -> list[BenchCase]:
    """Cases of the given primitives matching ``names``: a name that is exactly a case's name picks
    that case; any other name picks every case whose name contains it."""
    every = [c for c in all_cases() if not primitives or c.primitive in primitives]
    if not names:
        return every
    exact = {c.name for c in every}

    def matches(case: BenchCase, name: str) -> bool:
        return case.name == name if name in exact else name in case.name

    return [c for c in every if any(matches(c, name) for name in names)]


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_flops(value: float) -> str:
    if value <= 0:
        return "-"
    exponent = min(int(math.log10(value) // 3), 4)
    return f"{value / 10 ** (3 * exponent):.1f} {['', 'K', 'M', 'G', 'T'][exponent]}FLOP"
