"""Issue #10's exponent clamping: decays so strong that the per-step exponent reaches -1e4 and a
chunk's cumulative sum about -1e6 (next to heads and channels with ordinary decay) give finite
outputs and gradients that match the float64 reference (SPEC rule), on every kernel backend.
Rounding a difference of two huge cumulative sums to a small positive number must never turn
``exp`` into inf or NaN."""
from __future__ import annotations

import pytest
import torch

import ssmkernels
from ssmkernels._core.dispatch import BackendUnavailable
from tests.helpers import DEVICE, KERNEL_BACKENDS, compare_with_reference


def _finite_grads_or_skip(fn, inputs, backend, names, label):
    try:
        compare_with_reference(fn, inputs, backend, grad_names=names, label=label)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ssd_extreme_decays(backend):
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 70, 4, 8, 1, 8
    dt = torch.randn(b, l, h, device=DEVICE) * 0.5
    dt[:, :, 1] += 60.0  # softplus(dt) ~ 60 ...
    A = -(torch.rand(h, device=DEVICE) + 0.5)
    A[1] = -200.0  # ... times A: -1.2e4 per step on head 1
    A[2] = -1e-3  # and almost no decay on head 2
    inputs = dict(x=torch.randn(b, l, h, p, device=DEVICE), dt=dt, A=A, B=torch.randn(b, l, g, n, device=DEVICE),
                  C=torch.randn(b, l, g, n, device=DEVICE), chunk_size=64, D=torch.randn(h, device=DEVICE),
                  dt_bias=torch.zeros(h, device=DEVICE), initial_states=torch.randn(b, h, p, n, device=DEVICE),
                  dt_softplus=True, return_final_states=True)
    _finite_grads_or_skip(ssmkernels.ssd_chunk_scan, inputs, backend,
                          ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states"), f"{backend}/ssd extreme decays")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_selective_scan_extreme_decays(backend):
    torch.manual_seed(0)
    b, d, l, n = 2, 4, 70, 4
    delta = torch.randn(b, d, l, device=DEVICE) * 0.5
    delta[:, 1] += 60.0
    A = -torch.rand(d, n, device=DEVICE) - 0.1
    A[1] = -200.0
    A[2, :2] = -1e-3
    inputs = dict(u=torch.randn(b, d, l, device=DEVICE), delta=delta, A=A, B=torch.randn(b, n, l, device=DEVICE),
                  C=torch.randn(b, n, l, device=DEVICE), D=torch.randn(d, device=DEVICE),
                  z=torch.randn(b, d, l, device=DEVICE), delta_bias=torch.zeros(d, device=DEVICE),
                  delta_softplus=True, return_last_state=True, initial_state=torch.randn(b, d, n, device=DEVICE))
    _finite_grads_or_skip(ssmkernels.selective_scan, inputs, backend,
                          ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"),
                          f"{backend}/selective_scan extreme decays")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_state_update_extreme_decays(backend):
    torch.manual_seed(0)
    bsz, h, p, n = 3, 4, 8, 8
    dt = torch.randn(bsz, h, device=DEVICE) * 0.5
    dt[:, 1] += 60.0
    A = -(torch.rand(h, device=DEVICE) + 0.5)
    A[1] = -200.0
    inputs = dict(state=torch.randn(bsz, h, p, n, device=DEVICE), x=torch.randn(bsz, h, p, device=DEVICE),
                  dt=dt[:, :, None].expand(bsz, h, p), A=A[:, None, None].expand(h, p, n),
                  B=torch.randn(bsz, 1, n, device=DEVICE), C=torch.randn(bsz, 1, n, device=DEVICE),
                  D=torch.randn(h, p, device=DEVICE), dt_softplus=True)
    try:
        compare_with_reference(ssmkernels.selective_state_update, inputs, backend, keep_dtype=("state",),
                               label=f"{backend}/state update extreme decays")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
