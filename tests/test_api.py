"""Public API: drop-in signatures, dispatch rules, and a clear error for every bad input."""
import inspect
import math

import pytest
import torch

import ssmkernels
from ssmkernels import BackendUnavailable
from ssmkernels._core import config, dispatch

f32 = dict(dtype=torch.float32)

# Positional parameters of the peer functions we replace (mamba_ssm 2.3.2, causal-conv1d 1.7.0).
PEER_SIGNATURES = {
    "causal_conv1d": ["x", "weight", "bias", "seq_idx", "initial_states", "return_final_states",
                      "final_states_out", "activation"],
    "causal_conv1d_update": ["x", "conv_state", "weight", "bias", "activation", "cache_seqlens",
                             "conv_state_indices"],
    "selective_scan": ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state"],
    "ssd_chunk_scan": ["x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "initial_states", "seq_idx",
                       "cu_seqlens", "dt_softplus", "dt_limit", "return_final_states", "return_varlen_states"],
    "selective_state_update": ["state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus",
                               "state_batch_indices"],
}


@pytest.mark.parametrize("name", sorted(PEER_SIGNATURES))
def test_positional_order_matches_peer(name):
    params = inspect.signature(getattr(ssmkernels, name)).parameters.values()
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    peer = PEER_SIGNATURES[name]
    assert positional[:len(peer)] == peer
    assert "backend" in inspect.signature(getattr(ssmkernels, name)).parameters


@pytest.mark.parametrize("name", sorted(PEER_SIGNATURES))
def test_public_functions_are_documented(name):
    doc = getattr(ssmkernels, name).__doc__
    assert doc and "backend" in doc and "Returns" in doc


# ------------------------------------------------------------------- dispatch
def conv_args():
    return torch.randn(2, 4, 9), torch.randn(4, 3)


def test_default_backend_on_cpu_is_reference():
    x, w = conv_args()
    assert dispatch.select_backend("causal_conv1d", None, x.device, {}) == "reference"


def test_cuda_backend_on_cpu_tensors_says_why():
    x, w = conv_args()
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        ssmkernels.causal_conv1d(x, w, backend="cuda")


def test_triton_without_interpreter_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = conv_args()
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        ssmkernels.causal_conv1d(x, w, backend="triton")


def test_unknown_backend_is_rejected():
    x, w = conv_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        ssmkernels.causal_conv1d(x, w, backend="fast")


def test_env_backend_is_honoured_and_never_falls_back(monkeypatch):
    x, w = conv_args()
    monkeypatch.setenv("SSMKERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="SSMKERNELS_BACKEND='cuda'"):
        ssmkernels.causal_conv1d(x, w)
    monkeypatch.setenv("SSMKERNELS_BACKEND", "reference")
    assert ssmkernels.causal_conv1d(x, w).shape == x.shape
    monkeypatch.setenv("SSMKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SSMKERNELS_BACKEND"):
        ssmkernels.causal_conv1d(x, w)


def test_availability_reports_every_backend():
    table = dispatch.availability("ssd", torch.device("cpu"), {"dtype": torch.float32})
    assert set(table) == set(config.BACKENDS) and table["reference"] is None
    assert "CUDA tensors" in table["cuda"]


def test_set_deterministic_overrides_env(monkeypatch):
    monkeypatch.setenv("SSMKERNELS_DETERMINISTIC", "1")
    try:
        assert config.deterministic()
        ssmkernels.set_deterministic(False)
        assert not config.deterministic()
    finally:
        ssmkernels.set_deterministic(None)


# ------------------------------------------------------------------- bad input: one row per error path
def _conv(**over):
    args = dict(x=torch.randn(1, 4, 8), weight=torch.randn(4, 3))
    args.update(over)
    return lambda: ssmkernels.causal_conv1d(**args)


def _update(**over):
    args = dict(x=torch.randn(2, 4), conv_state=torch.randn(2, 4, 2), weight=torch.randn(4, 3))
    args.update(over)
    return lambda: ssmkernels.causal_conv1d_update(**args)


def _scan(**over):
    b, d, l, n = 1, 4, 6, 3
    args = dict(u=torch.randn(b, d, l), delta=torch.randn(b, d, l), A=-torch.rand(d, n), B=torch.randn(b, n, l),
                C=torch.randn(b, n, l))
    args.update(over)
    return lambda: ssmkernels.selective_scan(**args)


def _ssd(**over):
    b, l, h, p, g, n = 1, 6, 4, 2, 2, 3
    args = dict(x=torch.randn(b, l, h, p), dt=torch.rand(b, l, h), A=-torch.rand(h), B=torch.randn(b, l, g, n),
                C=torch.randn(b, l, g, n), chunk_size=16)
    args.update(over)
    return lambda: ssmkernels.ssd_chunk_scan(**args)


def _step(**over):
    b, h, p, n = 2, 4, 2, 3
    args = dict(state=torch.randn(b, h, p, n), x=torch.randn(b, h, p), dt=torch.rand(b, h, p),
                A=-torch.rand(h, p, n), B=torch.randn(b, 2, n), C=torch.randn(b, 2, n))
    args.update(over)
    return lambda: ssmkernels.selective_state_update(**args)


I32 = dict(dtype=torch.int32)
BAD_INPUTS = {
    "conv x not a tensor": (_conv(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    "conv x int dtype": (_conv(x=torch.ones(1, 4, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
    "conv x 2-D": (_conv(x=torch.randn(4, 8)), ValueError, "x must be 3-D"),
    "conv weight channels": (_conv(weight=torch.randn(5, 3)), ValueError, r"weight must have shape \(4, \*\)"),
    "conv weight 1-D": (_conv(weight=torch.randn(4)), ValueError, "weight must be 2-D"),
    "conv bias shape": (_conv(bias=torch.randn(3)), ValueError, r"bias must have shape \(4\)"),
    "conv activation": (_conv(activation="relu"), ValueError, "activation must be one of"),
    "conv seq_idx shape": (_conv(seq_idx=torch.zeros(1, 7, **I32)), ValueError, "seq_idx must have shape"),
    "conv seq_idx float": (_conv(seq_idx=torch.zeros(1, 8)), TypeError, "seq_idx must have dtype"),
    "conv seq_idx decreasing": (_conv(seq_idx=torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]], **I32)), ValueError,
                                "non-decreasing"),
    "conv seq_idx and cu_seqlens": (_conv(seq_idx=torch.zeros(1, 8, **I32), cu_seqlens=torch.tensor([0, 8], **I32)),
                                    ValueError, "either seq_idx or cu_seqlens"),
    "conv cu_seqlens batch": (_conv(x=torch.randn(2, 4, 8), cu_seqlens=torch.tensor([0, 8], **I32)), ValueError,
                              "batch size 1"),
    "conv cu_seqlens end": (_conv(cu_seqlens=torch.tensor([0, 3, 7], **I32)), ValueError, "end at the sequence length"),
    "conv cu_seqlens start": (_conv(cu_seqlens=torch.tensor([1, 8], **I32)), ValueError, "start at 0"),
    "conv cu_seqlens order": (_conv(cu_seqlens=torch.tensor([0, 5, 3, 8], **I32)), ValueError, "non-decreasing"),
    "conv cu_seqlens short": (_conv(cu_seqlens=torch.tensor([0], **I32)), ValueError, "at least 2 entries"),
    "conv cu_seqlens 2-D": (_conv(cu_seqlens=torch.tensor([[0, 8]], **I32)), ValueError, "cu_seqlens must have shape"),
    "conv initial_states shape": (_conv(initial_states=torch.randn(1, 4, 3)), ValueError,
                                  r"initial_states must have shape \(1, 4, 2\)"),
    "conv final_states_out shape": (_conv(final_states_out=torch.randn(1, 4, 3)), ValueError, "final_states_out"),
    "conv device": (_conv(weight=torch.randn(4, 3, device="meta")), ValueError, "must be on cpu"),
    "update x 4-D": (_update(x=torch.randn(2, 4, 1, 1)), ValueError, "x must be 2-D or 3-D"),
    "update state short": (_update(conv_state=torch.randn(2, 4, 1)), ValueError, "at least w-1 = 2"),
    "update state channels": (_update(conv_state=torch.randn(2, 5, 2)), ValueError, "conv_state must have shape"),
    "update too few slots": (_update(conv_state=torch.randn(1, 4, 2)), ValueError, "1 slots for batch 2"),
    "update index range": (_update(conv_state_indices=torch.tensor([0, 2], **I32)), ValueError,
                           "outside"),
    "update cache_seqlens shape": (_update(cache_seqlens=torch.zeros(3, **I32)), ValueError, "cache_seqlens"),
    "scan A complex": (_scan(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "A must"),
    "scan delta shape": (_scan(delta=torch.randn(1, 4, 5)), ValueError, "delta must have shape"),
    "scan B layout": (_scan(B=torch.randn(1, 3, 5)), ValueError, "B must have shape"),
    "scan B groups": (_scan(B=torch.randn(1, 3, 3, 6)), ValueError, "must divide d = 4"),
    "scan C 5-D": (_scan(C=torch.randn(1, 1, 1, 3, 6)), ValueError, "C must be 2-D or 3-D or 4-D"),
    "scan D shape": (_scan(D=torch.randn(3)), ValueError, "D must have shape"),
    "scan initial_state shape": (_scan(initial_state=torch.randn(1, 4, 2)), ValueError, "initial_state must"),
    "ssd chunk not power of two": (_ssd(chunk_size=48), ValueError, "chunk_size must be a power of two"),
    "ssd chunk too small": (_ssd(chunk_size=8), ValueError, "chunk_size"),
    "ssd chunk bool": (_ssd(chunk_size=True), ValueError, "chunk_size"),
    "ssd groups": (_ssd(B=torch.randn(1, 6, 3, 3), C=torch.randn(1, 6, 3, 3)), ValueError, "must divide the 4 heads"),
    "ssd C shape": (_ssd(C=torch.randn(1, 6, 2, 4)), ValueError, "C must have shape"),
    "ssd A shape": (_ssd(A=torch.randn(4, 1)), ValueError, "A must have shape"),
    "ssd D shape": (_ssd(D=torch.randn(4, 3)), ValueError, r"D must have shape \(4, 2\)"),
    "ssd dt_limit": (_ssd(dt_limit=(1.0, 0.1)), ValueError, "low <= high"),
    "ssd dt_limit type": (_ssd(dt_limit=0.1), TypeError, "dt_limit must be a pair"),
    "ssd varlen states without cu": (_ssd(return_varlen_states=True), ValueError, "needs cu_seqlens"),
    "ssd initial states count": (_ssd(cu_seqlens=torch.tensor([0, 2, 6], **I32), initial_states=torch.randn(1, 4, 2, 3)),
                                 ValueError, r"initial_states must have shape \(2, 4, 2, 3\)"),
    "step state 2-D": (_step(state=torch.randn(2, 3)), ValueError, "state must be 3-D or 4-D"),
    "step x shape": (_step(x=torch.randn(2, 4, 3)), ValueError, "x must have shape"),
    "step A shape": (_step(A=torch.randn(4)), ValueError, "A must have shape"),
    "step B groups": (_step(B=torch.randn(2, 3, 3), C=torch.randn(2, 3, 3)), ValueError, "must divide the 4 heads"),
    "step indices pad": (_step(state_batch_indices=torch.tensor([0, 7], **I32)), ValueError, "outside"),
    "step too few slots": (_step(state=torch.randn(1, 4, 2, 3)), ValueError, "1 slots for batch 2"),
    "step mamba1 x": (_step(state=torch.randn(2, 4, 3), x=torch.randn(2, 5), A=torch.randn(4, 3)), ValueError,
                      "x must have shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()


def test_nan_inputs_propagate_not_zeroed():
    x, w = conv_args()
    x[0, 1, 3] = math.nan
    out = ssmkernels.causal_conv1d(x, w, backend="reference")
    assert torch.isnan(out[0, 1, 3:6]).all() and not torch.isnan(out[1]).any()


def test_preferred_order_follows_the_measurements():
    order = dispatch.preferred_order
    assert order("causal_conv1d", {"layout": "channel_first"})[0] == "cuda"
    assert order("causal_conv1d", {"layout": "channel_last"})[0] == "cuda"
    assert order("selective_scan", {})[0] == "cuda"
    assert order("state_update", {"small_batch": True})[0] == "cuda"
    assert order("state_update", {"small_batch": False})[0] == "triton"
    assert order("ssd", {})[0] == "triton"
    for primitive in ("causal_conv1d", "selective_scan", "state_update", "ssd"):
        assert order(primitive, {})[-1] == "reference"


def test_import_does_not_load_dynamo():
    """``import ssmkernels`` stays cheap: torch._dynamo (1.3 s of import on the CPU development
    machine) is loaded by torch.compile when a user compiles, not by us at import time."""
    import subprocess
    import sys

    code = "import sys, ssmkernels; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _eager_vs_op_inputs():
    g = torch.Generator().manual_seed(5)
    b, d, l, n = 2, 4, 37, 3
    conv = dict(x=torch.randn(b, d, l, generator=g), weight=torch.randn(d, 4, generator=g),
                bias=torch.randn(d, generator=g))
    scan = dict(u=torch.randn(b, d, l, generator=g), delta=torch.rand(b, d, l, generator=g) - 0.5,
                A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, n, l, generator=g),
                C=torch.randn(b, n, l, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, l, generator=g))
    return {"causal_conv1d": (conv, lambda kw: ssmkernels.causal_conv1d(**kw, activation="silu", backend="triton")),
            "selective_scan": (scan, lambda kw: ssmkernels.selective_scan(**kw, delta_softplus=True, backend="triton"))}


@pytest.mark.parametrize("primitive", ["causal_conv1d", "selective_scan"])
def test_eager_fast_path_equals_the_custom_op(primitive, monkeypatch):
    """Plain eager calls run the custom ops' implementations through one autograd.Function
    (custom_op.eager_autograd); with the fast path off they go through torch.library's dispatcher.
    Both give bitwise the same outputs and gradients (up to float atomics' order on the GPU), and
    each path is the one taken."""
    from ssmkernels._core import custom_op

    inputs, fn = _eager_vs_op_inputs()[primitive]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs Triton's interpreter)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    results = {}
    for path in ("eager", "op"):
        if path == "op":
            monkeypatch.setattr(custom_op, "plain_eager", lambda: False)
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = fn(leaves)
        assert type(out.grad_fn).__name__.startswith("Eager" if path == "eager" else "GeneratedBackwardFor"), \
            type(out.grad_fn).__name__
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        results[path] = (out.detach(), grads)
    torch.testing.assert_close(results["eager"][0], results["op"][0], rtol=0, atol=0)
    # Gradients: bitwise on the CPU (Triton's interpreter); on the GPU the selective scan's backward
    # sums over the sequence with float atomics, whose order varies run to run (H200: 34 of 222
    # elements 1 ulp apart), so there the two paths agree to float32 rounding.
    exact = device == "cpu" or primitive != "selective_scan"
    for eager, op in zip(results["eager"][1], results["op"][1]):
        torch.testing.assert_close(eager, op, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
