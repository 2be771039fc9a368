"""The correctness rule of SPEC.md, written once.

A kernel run in dtype X passes when ``max|out - ref64| <= 2 * max|ref_X - ref64| + atol_X * scale``,
where ``ref64`` is the reference on the same inputs in float64, ``ref_X`` the reference run on the
inputs in dtype X (its arithmetic is float32, so its error is mostly the final rounding), and
``scale = max(1, max|ref64|)``.

Why the floor scales: the reference in dtype X rounds once, at the end, while a kernel sums in another
order (chunked scans, blocked reductions for weight gradients). For quantities that are large sums
(dA, dB, final states) that reordering alone costs about ``eps_X * magnitude``; an absolute floor
would fail correct kernels on large outputs and be meaningless on small ones. atol_X is the relative
floor: 1e-5 for float32 still rejects a tf32 matmul (~1e-3 relative).
NaN or Inf where the float64 reference is finite always fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative floor per dtype (times max(1, max|ref64|)): covers outputs whose low-precision
# reference happens to be exact, and summation-order differences in large reductions.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def atol_for(dtype: torch.dtype) -> float:
    return ATOL[dtype]


def max_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """Largest absolute difference; inf when ``out`` is non-finite where ``ref64`` is finite."""
    if out.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out.shape)} differs from the reference's {tuple(ref64.shape)}")
    if out.numel() == 0:
        return 0.0
    out64 = out.detach().to(device=ref64.device, dtype=torch.float64)
    ref64 = ref64.detach().to(torch.float64)
    bad = ~torch.isfinite(out64) & torch.isfinite(ref64)
    if bool(bad.any()):
        return float("inf")
    diff = (out64 - ref64).abs()
    diff = torch.where(torch.isfinite(ref64), diff, torch.zeros_like(diff))
    return float(diff.max())


@dataclass
class Comparison:
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def magnitude(ref64: torch.Tensor) -> float:
    """``max(1, max|ref64|)`` over finite entries: the scale of the tolerance floor."""
    finite = ref64.detach()[torch.isfinite(ref64.detach())]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def compare(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Error of ``out`` against ``ref64`` and the SPEC tolerance from the low-precision reference."""
    floor = atol_for(dtype) * magnitude(ref64.to(torch.float64))
    return Comparison(max_error(out, ref64), 2 * max_error(ref_lowp, ref64) + floor)


def assert_spec_close(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                      dtype: torch.dtype) -> Comparison:
    result = compare(out, ref64, ref_lowp, dtype)
    if not result.ok:
        raise AssertionError(
            f"{name}: max error {result.error:.3e} exceeds the SPEC tolerance {result.tolerance:.3e} "
            f"(2 x reference-in-{str(dtype).replace('torch.', '')} error + {atol_for(dtype):.0e} x max(1, |ref|))"
        )
    return result
