"""Deterministic mode: every kernel backward is bitwise reproducible run to run (SPEC robustness).

Runs forward + backward twice per primitive and kernel backend with ``set_deterministic(True)`` and
compares every output and gradient bit for bit. On CPU this exercises the Triton kernels through the
interpreter; the GPU run is the one that can catch float atomics.
"""
import pytest
import torch

import ssmkernels
from ssmkernels._core import config

from helpers import DEVICE, KERNEL_BACKENDS


def conv_case():
    x = torch.randn(2, 6, 37, device=DEVICE)
    args = dict(x=x, weight=torch.randn(6, 4, device=DEVICE), bias=torch.randn(6, device=DEVICE),
                initial_states=torch.randn(2, 6, 3, device=DEVICE), return_final_states=True, activation="silu")
    return "causal_conv1d", ssmkernels.causal_conv1d, args, ("x", "weight", "bias", "initial_states")


def scan_case():
    b, d, l, n = 2, 8, 45, 4
    args = dict(u=torch.randn(b, d, l, device=DEVICE), delta=torch.randn(b, d, l, device=DEVICE) * 0.5,
                A=-torch.rand(d, n, device=DEVICE) - 0.1, B=torch.randn(b, n, l, device=DEVICE),
                C=torch.randn(b, n, l, device=DEVICE), D=torch.randn(d, device=DEVICE),
                z=torch.randn(b, d, l, device=DEVICE), delta_bias=torch.randn(d, device=DEVICE) * 0.1,
                delta_softplus=True, return_last_state=True)
    return "selective_scan", ssmkernels.selective_scan, args, ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def ssd_case():
    b, l, h, p, g, n = 2, 45, 4, 16, 2, 16
    args = dict(x=torch.randn(b, l, h, p, device=DEVICE), dt=torch.randn(b, l, h, device=DEVICE),
                A=-torch.rand(h, device=DEVICE) - 0.2, B=torch.randn(b, l, g, n, device=DEVICE),
                C=torch.randn(b, l, g, n, device=DEVICE), chunk_size=16, D=torch.randn(h, device=DEVICE),
                z=torch.randn(b, l, h, p, device=DEVICE), dt_bias=torch.randn(h, device=DEVICE) * 0.5,
                dt_softplus=True, return_final_states=True)
    return "ssd", ssmkernels.ssd_chunk_scan, args, ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _run(fn, args, grad_names, backend):
    inputs = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    outs = fn(**inputs, backend=backend)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=DEVICE)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [inputs[k] for k in grad_names])
    return outs + list(grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [conv_case, scan_case, ssd_case], ids=["causal_conv1d", "selective_scan", "ssd"])
def test_backward_is_bitwise_reproducible(case, backend):
    primitive, fn, args, grad_names = case()
    ssmkernels.set_deterministic(True)
    try:
        try:
            first = _run(fn, args, grad_names, backend)
        except ssmkernels.BackendUnavailable as exc:
            pytest.skip(str(exc))
        second = _run(fn, args, grad_names, backend)
    finally:
        ssmkernels.set_deterministic(None)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{primitive}/{backend}: result {i} differs between two runs"
