"""Times the CUDA selective-scan kernels against each other on the GPU, in one process.

    python scripts/scan_forward_variants.py [--n 16,64,128] [--states 8,4] [--backward] [--backward-kernels]

The tiled (state-parallel) kernel serves the calls it supports, with SSMKERNELS_SCAN_TILED_STATES
states per thread (8 or 4); SSMKERNELS_SCAN_FORWARD_KERNEL=warp sends them to the warp-per-channel
kernel instead (both read at every launch), so all run on the same inputs here. Prints ms per call
(CUDA events, median of repeats) and the largest difference of each variant's outputs and last
states from the warp kernel's. ``--backward-kernels`` times the backward alone (after the default
forward), the state-parallel kernel against the warp-per-channel one
(SSMKERNELS_SCAN_BACKWARD_KERNEL=warp), with the largest difference of their gradients relative to
the largest gradient.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import ssmkernels


def _time_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16,64,128", help="d_state values")
    parser.add_argument("--b", type=int, default=4)
    parser.add_argument("--d", type=int, default=5120)
    parser.add_argument("--l", type=int, default=4096)
    parser.add_argument("--states", default="8,4", help="states per thread of the tiled kernel to time")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--backward-kernels", action="store_true",
                        help="time the backward kernels (tiled, warp) instead of the forward ones")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, d, l = args.b, args.d, args.l
    for n in (int(v) for v in args.n.split(",")):
        def rand(*shape, dtype=torch.bfloat16, scale=1.0):
            return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)
        u, delta, z = rand(b, d, l), rand(b, d, l, scale=0.5), rand(b, d, l)
        A = -torch.rand(d, n, device="cuda", generator=gen) - 0.5
        B, C = rand(b, n, l), rand(b, n, l)
        D, bias = rand(d, dtype=torch.float32), rand(d, dtype=torch.float32, scale=0.1)

        def forward():
            return ssmkernels.selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="cuda")

        if args.backward_kernels:
            _time_backward_kernels(f"B{b} D{d} L{l} N{n} bf16", u, delta, A, B, C, D, z, bias)
            continue

        results = {}
        variants = [f"tiled{v}" for v in args.states.split(",")] + ["warp"]
        for kernel in variants:
            os.environ.pop("SSMKERNELS_SCAN_FORWARD_KERNEL", None)
            if kernel == "warp":
                os.environ["SSMKERNELS_SCAN_FORWARD_KERNEL"] = "warp"
            else:
                os.environ["SSMKERNELS_SCAN_TILED_STATES"] = kernel[len("tiled"):]
            out, last = forward()
            row = {"fwd": _time_ms(forward), "out": out.float(), "last": last}
            if args.backward:
                leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, B, C)]
                dout = torch.randn_like(out)

                def fwd_bwd():
                    o, s = ssmkernels.selective_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], D, z, bias, True,
                                                     True, backend="cuda")
                    torch.autograd.backward([o, s], [dout, torch.ones_like(s)])

                row["fwdbwd"] = _time_ms(fwd_bwd, reps=10)
            results[kernel] = row
        os.environ.pop("SSMKERNELS_SCAN_FORWARD_KERNEL", None)
        os.environ.pop("SSMKERNELS_SCAN_TILED_STATES", None)
        warp = results["warp"]
        for kernel in variants:
            r = results[kernel]
            line = f"B{b} D{d} L{l} N{n} bf16 {kernel:7}: forward {r['fwd']:.3f} ms ({warp['fwd'] / r['fwd']:.2f}x warp)"
            if args.backward:
                line += f", fwd+bwd {r['fwdbwd']:.3f} ms"
            if kernel != "warp":
                line += (f"; max |diff| from warp: out {(r['out'] - warp['out']).abs().max().item():.3g}, "
                         f"last state {(r['last'] - warp['last']).abs().max().item():.3g}")
            print(line, flush=True)

def _time_backward_kernels(label, u, delta, A, B, C, D, z, bias) -> None:
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]
    out, last = ssmkernels.selective_scan(*leaves[:7], leaves[7], True, True, backend="cuda")
    dout, dlast = torch.randn_like(out), torch.randn_like(last)

    def backward():
        return torch.autograd.grad([out, last], leaves, [dout, dlast], retain_graph=True)

    # (environment variable, value) of each variant.
    variants = {"tiled": None, "warp": ("SSMKERNELS_SCAN_BACKWARD_KERNEL", "warp")}
    results = {}
    for kernel, setting in variants.items():
        if setting:
            os.environ[setting[0]] = setting[1]
        results[kernel] = (_time_ms(backward, reps=10), [g.float() for g in backward()])
        if setting:
            os.environ.pop(setting[0])
    warp_ms, warp_grads = results["warp"]
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for kernel in variants:
        if kernel == "warp":
            continue
        ms, grads = results[kernel]
        diffs = ", ".join(f"{name} {((t - w).abs().max() / w.abs().max().clamp_min(1e-30)).item():.2g}"
                          for name, t, w in zip(names, grads, warp_grads))
        print(f"{label} backward: {kernel} {ms:.3f} ms, warp {warp_ms:.3f} ms ({warp_ms / ms:.2f}x); "
              f"max |{kernel} - warp| / max |warp|: {diffs}", flush=True)


if __name__ == "__main__":
    main()
