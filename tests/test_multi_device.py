"""Inputs on a CUDA device other than the current one (model parallelism without set_device): every
primitive's kernels must run on the inputs' device and give the reference's result there. Needs two
GPUs (the device tool's nvidia-h200-x2); skipped otherwise."""
from __future__ import annotations

import pytest
import torch

import ssmkernels
from tests.helpers import KERNEL_BACKENDS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _check(run, leaves, backend):
    """run(backend) -> output tensor; its values and the leaves' gradients against the reference."""
    results = {}
    for name in ("reference", backend):
        out = run(name)
        grads = torch.autograd.grad(out.float().square().sum(), leaves, allow_unused=True)
        results[name] = (out.detach(), grads)
    (ref, ref_grads), (got, got_grads) = results["reference"], results[backend]
    assert got.device == leaves[0].device
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    for g, r in zip(got_grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_run_on_the_inputs_device(backend):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    torch.manual_seed(0)

    x, w, bias = _leaf(2, 64, 100, device=dev), _leaf(64, 4, device=dev, scale=0.5), _leaf(64, device=dev)
    _check(lambda b: ssmkernels.causal_conv1d(x, w, bias, activation="silu", backend=b), [x, w, bias], backend)

    state = torch.randn(2, 64, 3, device=dev)
    steps = [ssmkernels.causal_conv1d_update(x[:, :, 0].detach(), state.clone(), w.detach(), bias.detach(), "silu",
                                             backend=b) for b in ("reference", backend)]
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)

    u, delta = _leaf(2, 32, 80, device=dev), _leaf(2, 32, 80, device=dev, scale=0.5)
    A, Bm, Cm = _leaf(32, 8, device=dev, scale=0.5), _leaf(2, 8, 80, device=dev), _leaf(2, 8, 80, device=dev)
    _check(lambda b: ssmkernels.selective_scan(u, delta, -A.abs(), Bm, Cm, delta_softplus=True, backend=b),
           [u, delta, A, Bm, Cm], backend)

    xs, dt = _leaf(1, 100, 4, 16, device=dev), _leaf(1, 100, 4, device=dev, scale=0.5)
    As, Bs, Cs = _leaf(4, device=dev, scale=0.5), _leaf(1, 100, 1, 16, device=dev), _leaf(1, 100, 1, 16, device=dev)
    _check(lambda b: ssmkernels.ssd_chunk_scan(xs, dt, -As.abs(), Bs, Cs, 32, dt_softplus=True, backend=b),
           [xs, dt, As, Bs, Cs], backend)

    h, p, n = 4, 16, 16
    cache = torch.randn(2, h, p, n, device=dev)
    args = (torch.randn(2, h, p, device=dev), torch.rand(2, h, p, device=dev), -torch.rand(h, p, n, device=dev),
            torch.randn(2, 1, n, device=dev), torch.randn(2, 1, n, device=dev))
    outs = [(ssmkernels.selective_state_update(s, *args, backend=b), s)
            for b, s in (("reference", cache.clone()), (backend, cache.clone()))]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-4)
