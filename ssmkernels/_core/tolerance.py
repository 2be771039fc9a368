"""The correctness rule of SPEC.md, written once.

A kernel run in dtype X passes when ``max|out - ref64| <= 2 * max|ref_X - ref64| + atol_X``, where
``ref64`` is the reference on the same inputs in float64 and ``ref_X`` the reference run in dtype X
(inputs and elementwise math in X, recurrent states and reductions in float32, as SPEC fixes).
NaN or Inf where the float64 reference is finite always fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Absolute floor per dtype: covers outputs whose low-precision reference happens to be exact.
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


def compare(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Error of ``out`` against ``ref64`` and the SPEC tolerance from the low-precision reference."""
    return Comparison(max_error(out, ref64), 2 * max_error(ref_lowp, ref64) + atol_for(dtype))


def assert_spec_close(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                      dtype: torch.dtype) -> Comparison:
    result = compare(out, ref64, ref_lowp, dtype)
    if not result.ok:
        raise AssertionError(
            f"{name}: max error {result.error:.3e} exceeds the SPEC tolerance {result.tolerance:.3e} "
            f"(2 x reference-in-{str(dtype).replace('torch.', '')} error + atol {atol_for(dtype):.0e})"
        )
    return result
