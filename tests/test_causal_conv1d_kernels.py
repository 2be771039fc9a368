"""causal_conv1d / causal_conv1d_update kernels (triton, cuda) against the float64 reference (SPEC.md
section 1): forward and backward over layouts, widths and the packed-sequence forms; the decode
update with multi-token input, circular buffers and padding slots; custom-op and compile checks."""
from __future__ import annotations

import copy

import pytest
import torch

import ssmkernels
from ssmkernels._core.tolerance import assert_spec_close
from ssmkernels.ops.causal_conv1d import reference
from tests.helpers import DEVICE, KERNEL_BACKENDS, KERNEL_DTYPES, ON_GPU, compare_with_reference

CUDA_MAX_WIDTH = 4
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _ids(dtypes):
    return [DTYPE_IDS[d] for d in dtypes]


# ----------------------------------------------------------------------------- input layouts
def _as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x (b, d, l)`` contiguous -> the same values in another memory layout."""
    if layout == "channel_first":
        return x
    if layout == "channel_last":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(layout)


def _view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The view the test function takes of its stored x (strided layouts cannot survive a clone)."""
    if layout == "sliced":  # every other channel of a wider tensor: stride(1) = 2l, stride(2) = 1
        return x[:, ::2]
    if layout == "sliced_channel_last":  # first half of a channel-last tensor: stride(1) = 1, stride(2) = 2d
        return x[:, :x.shape[1] // 2]
    return x


def _stored(x: torch.Tensor, layout: str) -> torch.Tensor:
    """What the test stores so that ``_view(stored, layout)`` has x's values."""
    b, d, l = x.shape
    if layout == "sliced":
        wide = torch.randn(b, 2 * d, l, dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide
    if layout == "sliced_channel_last":
        wide = torch.randn(b, l, 2 * d, dtype=x.dtype, device=x.device)
        wide[:, :, :d] = x.transpose(1, 2)
        return wide.transpose(1, 2)
    return _as_layout(x, layout)


# ----------------------------------------------------------------------------- forward + backward
# One base case, then rows that change one thing (lengths not multiples of any block size).
BASE = dict(b=2, d=5, l=33, w=4, bias=True, activation="silu", init=False, final=False, seq=None, cu=None)
CASES = {
    "base": {},
    "l1": dict(l=1, init=True, final=True),
    "l70_w2_plain": dict(l=70, w=2, bias=False, activation=None),
    "w3_l7": dict(w=3, l=7),
    "w6": dict(w=6, l=20, init=True, final=True),
    "d1": dict(d=1, l=9),
    "init_final": dict(init=True, final=True),
    "final_only": dict(final=True, activation=None),
    "seq_idx": dict(seq=[[0] * 10 + [1] * 20 + [2] * 3, [4] * 33], init=True, final=True),
    "seq_idx_short_last": dict(seq=[[0] * 31 + [1] * 2, [0] * 32 + [3]], init=True, final=True),
    "seq_idx_one_seq_short": dict(l=2, seq=[[5, 5], [1, 1]], init=True, final=True),
    "varlen": dict(b=1, cu=[0, 5, 5, 6, 20, 33], init=True, final=True),
    "varlen_no_init": dict(b=1, cu=[0, 0, 2, 3, 33, 33], final=True),
    "varlen_one": dict(b=1, l=7, cu=[0, 7], init=True, final=True, bias=False),
}
LAYOUTS = ("channel_first", "channel_last", "sliced", "sliced_channel_last")
# Every case in the two plain layouts; the strided layouts on the cases where strides matter most.
FULL_GRID = [(c, lay) for c in CASES for lay in LAYOUTS[:2]] + [
    (c, lay) for c in ("base", "seq_idx", "varlen") for lay in LAYOUTS[2:]]


def _conv_inputs(case: dict, dtype, layout: str):
    b, d, l, w = case["b"], case["d"], case["l"], case["w"]
    x = torch.randn(b, d, l, device=DEVICE)
    inputs = dict(x=_stored(x, layout).to(dtype), weight=(torch.randn(d, w, device=DEVICE) * 0.5).to(dtype),
                  bias=torch.randn(d, device=DEVICE).to(dtype) if case["bias"] else None)
    count = b
    if case["seq"] is not None:
        inputs["seq_idx"] = torch.tensor(case["seq"], dtype=torch.int32, device=DEVICE)
    if case["cu"] is not None:
        inputs["cu_seqlens"] = torch.tensor(case["cu"], dtype=torch.int32, device=DEVICE)
        count = len(case["cu"]) - 1
    if case["init"]:
        inputs["initial_states"] = torch.randn(count, d, w - 1, device=DEVICE).to(dtype)
    return inputs


def _conv_fn(layout, activation, final):
    def fn(x, weight, bias=None, seq_idx=None, initial_states=None, cu_seqlens=None, backend=None):
        return ssmkernels.causal_conv1d(_view(x, layout), weight, bias, seq_idx, initial_states, final,
                                        activation=activation, cu_seqlens=cu_seqlens, backend=backend)
    return fn


@pytest.mark.parametrize("case_name,layout", FULL_GRID, ids=[f"{c}-{lay}" for c, lay in FULL_GRID])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_ids(KERNEL_DTYPES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_forward_backward(backend, dtype, case_name, layout):
    case = {**BASE, **CASES[case_name]}
    if backend == "cuda" and case["w"] > CUDA_MAX_WIDTH:
        pytest.skip(f"the cuda kernels cover widths 2..{CUDA_MAX_WIDTH} (triton covers this case)")
    inputs = _conv_inputs(case, dtype, layout)
    grads = tuple(n for n in ("x", "weight", "bias", "initial_states") if inputs.get(n) is not None)
    compare_with_reference(_conv_fn(layout, case["activation"], case["final"]), inputs, backend,
                           grad_names=grads, label=f"{backend} {case_name} {layout}")


# Whole-row fast paths of the CUDA kernels (csrc/causal_conv1d/causal_conv1d_plain.cu): no sequences,
# rows that allow 16-byte vectors (d and l multiples of 8). Lengths that are not multiples of a thread's
# positions (tails inside a vector run), several segments per row, and initial states (forward only:
# their gradient sends the backward to the general kernel).
PLAIN_CASES = {
    "w4_silu": dict(d=16, l=72),
    "w2_none_nobias": dict(d=16, l=72, w=2, activation=None, bias=False),
    "w3_b3": dict(b=3, d=16, l=40, w=3),
    "init_final": dict(d=16, l=72, init=True, final=True),
    "segments": dict(b=1, d=8, l=4200),
    # channel-last tiles: several channel blocks (128 16-bit / 64 float32 channels), the last one
    # partial; two segments of 512 rows, the second with a partial tile
    "channel_blocks": dict(b=2, d=136, l=600),
    # d a multiple of 4 but not 8: the 16-bit channel-last rows take the sliding kernels
    "d12": dict(d=12, l=72),
}
PLAIN_GRID = [(c, lay) for c in PLAIN_CASES for lay in LAYOUTS[:2]]


def _check_plain(fn_for, dtype, case_name, layout, label):
    case = {**BASE, **PLAIN_CASES[case_name]}
    inputs = _conv_inputs(case, dtype, layout)
    grads = tuple(n for n in ("x", "weight", "bias", "initial_states") if inputs.get(n) is not None)
    compare_with_reference(fn_for(layout, case["activation"], case["final"]), inputs, "cuda", grad_names=grads,
                           label=f"{label} {case_name} {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("case_name,layout", PLAIN_GRID, ids=[f"{c}-{lay}" for c, lay in PLAIN_GRID])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16),
                         ids=_ids((torch.float32, torch.float16, torch.bfloat16)))
def test_cuda_whole_row_paths(dtype, case_name, layout):
    _check_plain(_conv_fn, dtype, case_name, layout, "cuda whole rows")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16],
                         ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_float32_weight_with_half_x(backend, dtype):
    case = {**BASE, "init": True, "final": True}
    inputs = _conv_inputs(case, dtype, "channel_last")
    inputs["weight"] = inputs["weight"].float()
    inputs["bias"] = inputs["bias"].float()
    compare_with_reference(_conv_fn("channel_last", "silu", True), inputs, backend,
                           grad_names=("x", "weight", "bias", "initial_states"), keep_dtype=("weight", "bias"),
                           label=f"{backend} fp32 weight")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_all_sequences_empty(backend):
    """l = 0 with cu_seqlens of empty sequences: no output, final states equal the initial ones."""
    d, w = 3, 4
    x = torch.randn(1, d, 0, device=DEVICE)
    init = torch.randn(2, d, w - 1, device=DEVICE, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, final = ssmkernels.causal_conv1d(x, torch.randn(d, w, device=DEVICE), None, None, init, True,
                                          cu_seqlens=cu, backend=backend)
    assert out.shape == (1, d, 0)
    torch.testing.assert_close(final, init.detach(), rtol=0, atol=0)
    upstream = torch.randn_like(final)
    (grad,) = torch.autograd.grad((final * upstream).sum(), init)
    torch.testing.assert_close(grad, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_final_states_out(backend):
    d, w = 4, 3
    x = torch.randn(2, d, 9, device=DEVICE)
    weight = torch.randn(d, w, device=DEVICE)
    buffer = torch.full((2, d, w - 1), float("nan"), device=DEVICE)
    out = ssmkernels.causal_conv1d(x, weight, final_states_out=buffer, backend=backend)
    _, expected = reference.causal_conv1d(x, weight, return_final_states=True)
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_backward_is_deterministic(backend):
    case = {**BASE, "l": 70, "init": True, "final": True, "seq": [[0] * 30 + [1] * 40, [2] * 70]}
    inputs = _conv_inputs(case, torch.float32, "channel_first")
    fn = _conv_fn("channel_first", "silu", True)
    results = []
    for _ in range(2):
        args = {k: (v.clone().requires_grad_(v.is_floating_point()) if v is not None else None)
                for k, v in inputs.items()}
        out, final = fn(**args, backend=backend)
        torch.manual_seed(1)
        loss = (out * torch.randn_like(out)).sum() + (final * torch.randn_like(final)).sum()
        results.append(torch.autograd.grad(loss, [args["x"], args["weight"], args["bias"], args["initial_states"]]))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS[:2])
def test_conv_varlen_equals_loop(backend, layout):
    """SPEC law 4 on the kernel: a cu_seqlens call equals each sequence run alone."""
    d, w, bounds = 6, 4, [0, 3, 3, 17, 40]
    x = _as_layout(torch.randn(1, d, bounds[-1], device=DEVICE), layout)
    weight, bias = torch.randn(d, w, device=DEVICE), torch.randn(d, device=DEVICE)
    init = torch.randn(len(bounds) - 1, d, w - 1, device=DEVICE)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    out, final = ssmkernels.causal_conv1d(x, weight, bias, None, init, True, activation="silu", cu_seqlens=cu,
                                          backend=backend)
    for j, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end == start:
            torch.testing.assert_close(final[j], init[j])
            continue
        o, f = ssmkernels.causal_conv1d(x[:, :, start:end], weight, bias, None, init[j:j + 1], True,
                                        activation="silu", backend=backend)
        torch.testing.assert_close(out[:, :, start:end], o, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final[j:j + 1], f, rtol=0, atol=0)


# ----------------------------------------------------------------------------- update
UPDATE_BASE = dict(b=3, d=5, w=4, s=3, t=None, bias=True, activation="silu", circular=None, indices=None,
                   slots=None, state_dtype=None, sliced_x=False, shifted_x=False, weight_dtype=None)
UPDATE_CASES = {
    "one_token": {},
    "one_token_w2_plain": dict(w=2, s=1, bias=False, activation=None),
    "multi_token": dict(t=3),
    "tokens_past_state": dict(t=5, s=3),
    "long_state": dict(s=7, t=2),
    "circular": dict(s=6, t=2, circular=[0, 4, 13]),
    "circular_one_token": dict(s=3, circular=[2, 0, 100]),
    "circular_tokens_past_state": dict(s=4, t=6, circular=[1, 5, 0]),
    "indices_with_padding": dict(t=2, indices=[4, -1, 0], slots=6),
    "indices_circular": dict(s=5, t=2, indices=[-1, 2, 1], slots=3, circular=[3, 7, 1]),
    "float32_state": dict(t=2, state_dtype=torch.float32),
    "sliced_x": dict(sliced_x=True),
    # The CUDA vector kernel's cases (one token, state of w-1, channels a multiple of 16 bytes,
    # aligned rows); an odd batch leaves its last row group partial.
    "vector": dict(d=24),
    "vector_indices_padding": dict(b=5, d=16, indices=[3, -1, 0, 6, 1], slots=7),
    "vector_w2_plain": dict(d=16, w=2, s=1, bias=False, activation=None),
    "vector_w3_float32_weight": dict(d=32, w=3, s=2, weight_dtype=torch.float32),
    "vector_misaligned_x": dict(d=16, shifted_x=True),  # x one element past a 16-byte boundary: general kernel
}
# Which UPDATE_CASES the CUDA vector kernel serves for every dtype (the rest take the general kernel).
VECTOR_UPDATE_CASES = ("vector", "vector_indices_padding", "vector_w2_plain", "vector_w3_float32_weight")


def _update_inputs(case, dtype):
    b, d, w, s, t = case["b"], case["d"], case["w"], case["s"], case["t"]
    shape = (b, d) if t is None else (b, d, t)
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    if case["sliced_x"]:
        x = torch.randn(b, 2 * d, device=DEVICE).to(dtype)[:, 1::2]
    if case["shifted_x"]:
        x = torch.randn(b * d + 1, device=DEVICE).to(dtype)[1:].view(b, d)
    slots = case["slots"] or b
    state_dtype = case["state_dtype"] or dtype
    inputs = dict(x=x, conv_state=torch.randn(slots, d, s, device=DEVICE).to(state_dtype),
                  weight=(torch.randn(d, w, device=DEVICE) * 0.5).to(case["weight_dtype"] or dtype),
                  bias=torch.randn(d, device=DEVICE).to(dtype) if case["bias"] else None)
    if case["circular"] is not None:
        inputs["cache_seqlens"] = torch.tensor(case["circular"], dtype=torch.int32, device=DEVICE)
    if case["indices"] is not None:
        inputs["conv_state_indices"] = torch.tensor(case["indices"], dtype=torch.int32, device=DEVICE)
    return inputs


def _run_update(inputs, activation, backend, dtype=None):
    args = {k: v for k, v in inputs.items()}
    if dtype is not None:
        args = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in args.items()}
    args["conv_state"] = args["conv_state"].clone()
    out = ssmkernels.causal_conv1d_update(args.pop("x"), args["conv_state"], args.pop("weight"), args.pop("bias"),
                                          activation, backend=backend, **{k: v for k, v in args.items()
                                                                          if k != "conv_state"})
    return out, args["conv_state"]


@pytest.mark.parametrize("case_name", list(UPDATE_CASES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_ids(KERNEL_DTYPES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update(backend, dtype, case_name):
    case = {**UPDATE_BASE, **UPDATE_CASES[case_name]}
    inputs = _update_inputs(case, dtype)
    out64, state64 = _run_update(inputs, case["activation"], "reference", torch.float64)
    out_lowp, state_lowp = _run_update(inputs, case["activation"], "reference")
    out, state = _run_update(inputs, case["activation"], backend)
    assert out.shape == inputs["x"].shape
    assert_spec_close(f"{backend} {case_name} out", out, out64, out_lowp, dtype)
    # The state only ever receives copies of inputs: it must match the reference exactly.
    assert torch.equal(state, state_lowp), f"{backend} {case_name}: conv_state differs from the reference"
    if case["indices"] is not None:
        pad = torch.tensor(case["indices"], device=DEVICE) < 0
        assert bool((out[pad] == 0).all()), "padding rows must give zeros"


def _update_past_the_cache(backend):
    """The op itself (past the public checks, as with CUDA index tensors, whose values are not read
    on the host) with one index past the cache: that row acts as a padding slot."""
    case = {**UPDATE_BASE, "b": 3, "d": 16, "indices": [1, 5, 0], "slots": 2}
    inputs = _update_inputs(case, torch.float32)
    state = inputs["conv_state"].clone()
    out = torch.ops.ssmkernels.causal_conv1d_update(inputs["x"], state, inputs["weight"], inputs["bias"], True, None,
                                                    inputs["conv_state_indices"], backend)
    expected_inputs = {**inputs, "conv_state_indices": torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE)}
    expected, expected_state = _run_update(expected_inputs, "silu", "reference")
    assert bool((out[1] == 0).all()), f"{backend}: a row whose index is past the cache must give zeros"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, expected_state), f"{backend}: an index past the cache must leave the state alone"


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "reference"])
def test_update_index_past_the_cache_is_a_padding_slot(backend):
    _update_past_the_cache(backend)


def test_update_index_past_the_cache_emulated(emulated_cuda):
    _update_past_the_cache("cuda")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update_plan_serves_repeat_calls(backend):
    """A decode loop's second call of a kind takes the plan (op.py: _UpdatePlan): new values give new
    results, bad values and changed shapes still get the full path's errors."""
    from ssmkernels.ops.causal_conv1d import op

    op.clear_caches()
    case = {**UPDATE_BASE, "b": 3, "d": 16, "indices": [2, -1, 0], "slots": 4}
    for step in range(3):
        inputs = _update_inputs(case, torch.float32)
        out64, _ = _run_update(inputs, "silu", "reference", torch.float64)
        out_lowp, state_lowp = _run_update(inputs, "silu", "reference")
        out, state = _run_update(inputs, "silu", backend)
        assert_spec_close(f"{backend} step {step}", out, out64, out_lowp, torch.float32)
        assert torch.equal(state, state_lowp)
    assert len(op._UPDATE_PLANS) == 2 + (backend != "reference")  # (the float64 and float32 reference runs: 2)
    inputs = _update_inputs(case, torch.float32)
    if inputs["conv_state_indices"].device.type == "cpu":  # host index values are checked on every call
        inputs["conv_state_indices"][0] = 9
        with pytest.raises(ValueError, match="conv_state_indices holds 9"):
            _run_update(inputs, "silu", backend)
    inputs = _update_inputs(case, torch.float32)
    inputs["weight"] = inputs["weight"][:8]
    with pytest.raises(ValueError, match="weight must have shape"):
        _run_update(inputs, "silu", backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update_last_plan_tells_kinds_apart(backend):
    """Calls alternating between kinds that differ only in strides, an absent bias or the activation
    each get their own plan (the last plan is matched by its metadata guard and flags) and the
    result of a call of that kind alone."""
    from ssmkernels.ops.causal_conv1d import op

    case = {**UPDATE_BASE, "b": 2, "d": 16}
    base = _update_inputs(case, torch.float32)
    strided = {**base, "x": torch.randn(2, 32, device=DEVICE)[:, ::2]}
    kinds = [(base, "silu"), ({**base, "bias": None}, "silu"), (strided, "silu"), (base, None)]
    expected = []
    for inputs, activation in kinds:
        op.clear_caches()
        expected.append(_run_update(inputs, activation, backend))
    op.clear_caches()
    for _ in range(2):
        for (inputs, activation), (out_alone, state_alone) in zip(kinds, expected):
            out, state = _run_update(inputs, activation, backend)
            assert torch.equal(out, out_alone) and torch.equal(state, state_alone)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
def test_prefill_then_steps_equals_full(backend, circular):
    """SPEC law 2 with the kernels: prefill k tokens, then decode the rest one token at a time."""
    b, d, w, l, k = 2, 4, 4, 12, 5
    x = torch.randn(b, d, l, device=DEVICE)
    weight, bias = torch.randn(d, w, device=DEVICE), torch.randn(d, device=DEVICE)
    full = ssmkernels.causal_conv1d(x, weight, bias, activation="silu", backend=backend)
    _, state = ssmkernels.causal_conv1d(x[:, :, :k], weight, bias, return_final_states=True, activation="silu",
                                        backend=backend)
    seqlens = None
    if circular:  # a longer circular buffer holding the prefill's last w-1 tokens before position k
        s = 6
        buffer = torch.zeros(b, d, s, device=DEVICE)
        for m in range(w - 1):
            buffer[:, :, (k - (w - 1) + m) % s] = state[:, :, m]
        state, seqlens = buffer, torch.full((b,), k, dtype=torch.int32, device=DEVICE)
    state = state.contiguous()
    for t in range(k, l):
        step = ssmkernels.causal_conv1d_update(x[:, :, t], state, weight, bias, "silu", cache_seqlens=seqlens,
                                               backend=backend)
        torch.testing.assert_close(step, full[:, :, t], rtol=1e-5, atol=1e-5)
        if seqlens is not None:
            seqlens = seqlens + 1


# ----------------------------------------------------------------------------- custom ops, compile
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_custom_ops(backend):
    d, w, l = 3, 4, 9
    x = torch.randn(2, d, l, device=DEVICE)
    weight, bias = torch.randn(d, w, device=DEVICE), torch.randn(d, device=DEVICE)
    init = torch.randn(2, d, w - 1, device=DEVICE)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int32, device=DEVICE)
    ops = torch.ops.ssmkernels
    fwd_args = (x.requires_grad_(), weight.requires_grad_(), bias, seq_idx, init, None, True, True, backend)
    torch.library.opcheck(ops.causal_conv1d_fwd.default, fwd_args)
    dout, dfinal = torch.randn(2, d, l, device=DEVICE), torch.randn(2, d, w - 1, device=DEVICE)
    torch.library.opcheck(ops.causal_conv1d_bwd.default,
                          (x.detach(), weight.detach(), bias, seq_idx, init, None, dout, dfinal, True, backend))
    state = torch.randn(2, d, w - 1, device=DEVICE)
    torch.library.opcheck(ops.causal_conv1d_update.default,
                          (torch.randn(2, d, device=DEVICE), state, weight.detach(), bias, True, None, None, backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    d, w, l = 3, 4, 9
    x = torch.randn(2, d, l, device=DEVICE, requires_grad=True)
    weight, bias = torch.randn(d, w, device=DEVICE), torch.randn(d, device=DEVICE)

    def fn(x, weight, bias):
        out, final = ssmkernels.causal_conv1d(x, weight, bias, return_final_states=True, activation="silu",
                                              backend=backend)
        return out.sum() + final.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    loss = compiled(x, weight, bias)
    (grad,) = torch.autograd.grad(loss, x)
    expected_loss = fn(x, weight, bias)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)

    state = torch.randn(2, d, w - 1, device=DEVICE)
    step = torch.compile(lambda x1, st: ssmkernels.causal_conv1d_update(x1, st, weight, bias, "silu", backend=backend),
                         fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    x1 = torch.randn(2, d, device=DEVICE)
    expected_state = state.clone()
    expected = ssmkernels.causal_conv1d_update(x1, expected_state, weight, bias, "silu", backend=backend)
    torch.testing.assert_close(step(x1, state), expected)
    torch.testing.assert_close(state, expected_state)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS[:2])
def test_conv_large_gpu(backend, layout):
    case = {**BASE, "b": 2, "d": 260, "l": 4099, "init": True, "final": True}
    inputs = _conv_inputs(case, torch.bfloat16, layout)
    compare_with_reference(_conv_fn(layout, "silu", True), inputs, backend,
                           grad_names=("x", "weight", "bias", "initial_states"), label=f"{backend} large")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_batch_beyond_the_grid_limit_gpu(backend):
    """65,537 batch rows, past CUDA's 65,535 grid y/z limit (the whole-row kernels' and the update's
    batch axis): forward, backward and the decode update still cover every row."""
    case = {**BASE, "b": 65537, "d": 8, "l": 16}
    inputs = _conv_inputs(case, torch.bfloat16, "channel_first")
    compare_with_reference(_conv_fn("channel_first", "silu", False), inputs, backend,
                           grad_names=("x", "weight", "bias"), label=f"{backend} batch 65537")
    update_case = {**UPDATE_BASE, "b": 65537, "d": 8}
    update_inputs = _update_inputs(update_case, torch.bfloat16)
    out64, _ = _run_update(update_inputs, "silu", "reference", torch.float64)
    out_lowp, state_lowp = _run_update(update_inputs, "silu", "reference")
    out, state = _run_update(update_inputs, "silu", backend)
    assert_spec_close(f"{backend} update batch 65537", out, out64, out_lowp, torch.bfloat16)
    assert torch.equal(state, state_lowp), f"{backend}: conv_state differs from the reference"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_int64_offsets_gpu(backend):
    """More than 2^31 elements: offsets must be 64-bit (checked on the last positions)."""
    b, d, l, w = 1, 16, (2 ** 31) // 16 + 1000, 4
    x = torch.randn(b, d, l, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(d, w, device=DEVICE, dtype=torch.bfloat16)
    out = ssmkernels.causal_conv1d(x, weight, backend=backend)
    tail = x[:, :, -64:]
    expected = reference.causal_conv1d(tail.double(), weight.double(), initial_states=x[:, :, -64 - (w - 1):-64].double())
    assert_spec_close("tail", out[:, :, -64:], expected,
                      reference.causal_conv1d(tail, weight, initial_states=x[:, :, -64 - (w - 1):-64]),
                      torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update_cuda_graph(backend):
    b, d, w, s = 4, 64, 4, 8
    x = torch.randn(b, d, device=DEVICE, dtype=torch.bfloat16)
    state = torch.randn(b, d, s, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(d, w, device=DEVICE, dtype=torch.bfloat16)
    seqlens = torch.tensor([0, 3, 9, 20], dtype=torch.int32, device=DEVICE)
    indices = torch.tensor([1, -1, 0, 3], dtype=torch.int32, device=DEVICE)
    expected_state = state.clone()
    expected = reference.causal_conv1d_update(x, expected_state, weight, None, "silu", seqlens, indices)
    call = lambda: ssmkernels.causal_conv1d_update(x, state, weight, None, "silu", cache_seqlens=seqlens,
                                                   conv_state_indices=indices, backend=backend)
    start_state = state.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    state.copy_(start_state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    state.copy_(start_state)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2)
    assert torch.equal(state, expected_state)


# ----------------------------------------------------------------------------- CUDA kernels, emulated
# The CUDA kernels compiled for the host with g++: each block runs as kThreads std::threads with a
# std::barrier for __syncthreads and static locals for __shared__. This checks their indexing,
# masking and sequence logic on CPU tensors (through cuda.py and the custom ops); it cannot catch
# GPU-only faults (alignment, races the barrier emulation hides), which the GPU run covers.
_EMU_FIELDS = {
    "CausalConv1dForwardParams": (
        "batch dim seqlen width dtype weight_dtype bias_dtype silu x weight bias out initial_states final_states "
        "seq_idx cu_seqlens num_seqs x_batch_stride x_c_stride x_l_stride out_batch_stride out_c_stride "
        "out_l_stride weight_c_stride weight_width_stride bias_stride init_batch_stride init_c_stride "
        "init_l_stride final_batch_stride final_c_stride final_l_stride seq_batch_stride seq_l_stride stream"
    ).split(),
    "CausalConv1dBackwardParams": (
        "batch dim seqlen width dtype weight_dtype bias_dtype silu x weight bias out initial_states final_states "
        "seq_idx cu_seqlens num_seqs x_batch_stride x_c_stride x_l_stride out_batch_stride out_c_stride "
        "out_l_stride weight_c_stride weight_width_stride bias_stride init_batch_stride init_c_stride "
        "init_l_stride final_batch_stride final_c_stride final_l_stride seq_batch_stride seq_l_stride stream "
        "dout dx dfinal_states dinitial_states dweight_partial dbias_partial dweight dbias dweight_c_stride "
        "dweight_width_stride dbias_stride dout_batch_stride dout_c_stride "
        "dout_l_stride dx_batch_stride dx_c_stride dx_l_stride dfinal_batch_stride dfinal_c_stride "
        "dfinal_l_stride dinit_batch_stride dinit_c_stride dinit_l_stride"
    ).split(),
    "CausalConv1dUpdateParams": (
        "batch dim tokens slots state_len width dtype state_dtype weight_dtype bias_dtype silu x conv_state weight bias "
        "out cache_seqlens conv_state_indices x_batch_stride x_c_stride x_l_stride state_batch_stride "
        "state_c_stride state_l_stride out_batch_stride out_c_stride out_l_stride weight_c_stride "
        "weight_width_stride bias_stride stream"
    ).split(),
}
_EMU_FUNCTIONS = {"causal_conv1d_fwd_channel_first": ("ForwardParams", "forward_channel_first"),
                  "causal_conv1d_fwd_channel_last": ("ForwardParams", "forward_channel_last"),
                  "causal_conv1d_final_states": ("ForwardParams", "final_states"),
                  "causal_conv1d_bwd": ("BackwardParams", "backward"),
                  "causal_conv1d_update": ("UpdateParams", "update")}
_EMU_QUERIES = {"causal_conv1d_bwd_partial_rows": ("BackwardParams", "backward_partial_rows"),  # return a count
                "causal_conv1d_update_vector": ("UpdateParams", "update_uses_vector_kernel")}
_EMU_SHIM = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
namespace ssmk_emu {
inline thread_local uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
template <typename F>
void launch(F body, dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  grid_dim = grid; block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(n);
    block_barrier = &bar;
    // Shuffles synchronise only their warp (warps of a block may run different step counts).
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    for (unsigned w = 0; w * 32 < n; ++w) warp_bars.emplace_back(new std::barrier<>(std::min(32u, n - w * 32)));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
      threads.emplace_back([&, t] { thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                                    block_idx = {bx, by, bz}; warp_barrier = warp_bars[t / 32].get(); body();
                                    // an exited thread no longer counts, as on the GPU
                                    warp_barrier->arrive_and_drop(); block_barrier->arrive_and_drop(); });
    for (auto& th : threads) th.join();
  }
}
// Warp shuffles of 4-byte values: every thread of the warp posts its value, then reads its source
// lane's (its own when the source is outside the warp or the block), between two warp barriers.
inline uint32_t shuffle_slots[1024];
template <typename V>
V shuffle_from(V value, int source_lane) {
  static_assert(sizeof(V) == 4, "4-byte shuffles");
  const unsigned n = block_dim.x * block_dim.y * block_dim.z;
  const unsigned tid = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  std::memcpy(&shuffle_slots[tid], &value, 4);
  warp_barrier->arrive_and_wait();
  const unsigned source = tid - tid % 32 + static_cast<unsigned>(source_lane);
  V result = value;
  if (source_lane >= 0 && source_lane < 32 && source < n) std::memcpy(&result, &shuffle_slots[source], 4);
  warp_barrier->arrive_and_wait();
  return result;
}
inline int lane_id() { return static_cast<int>((thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z)) % 32); }
}  // namespace ssmk_emu
#define __shfl_up_sync(mask, value, delta) ssmk_emu::shuffle_from(value, ssmk_emu::lane_id() - (delta))
#define __shfl_down_sync(mask, value, delta) ssmk_emu::shuffle_from(value, ssmk_emu::lane_id() + (delta))
#define __shfl_sync(mask, value, lane) ssmk_emu::shuffle_from(value, (lane) % 32)
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx ssmk_emu::thread_idx
#define blockIdx ssmk_emu::block_idx
#define blockDim ssmk_emu::block_dim
#define gridDim ssmk_emu::grid_dim
#define __syncthreads() ssmk_emu::block_barrier->arrive_and_wait()
#define __expf expf
#define __fdividef(a, b) ((a) / (b))
"""


def _emulation_sources(tmp):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp / "shim.h").write_text(_EMU_SHIM)
    sources = []
    launch = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)
    for cu in sorted((root / "csrc" / "causal_conv1d").glob("*.cu")):
        text = launch.sub(lambda m: f"ssmk_emu::launch([&] {{ {m.group(1)}({m.group(3)}); }}, {m.group(2)});",
                          cu.read_text())
        target = tmp / (cu.stem + ".cpp")
        target.write_text(text)
        sources.append(target)
    harness = ['#include "causal_conv1d/causal_conv1d.h"', "#include <cstdint>",
               'extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }',
               'extern "C" const char* cudaGetErrorString(cudaError_t) { return "emulated"; }']
    for name, (struct, function) in _EMU_FUNCTIONS.items():
        fields = _EMU_FIELDS["CausalConv1d" + struct]
        body = " ".join(f"p.{f} = static_cast<decltype(p.{f})>(v[{i}]);" for i, f in enumerate(fields))
        harness.append(f'extern "C" int emu_{name}(const int64_t* v) {{ ssmk::conv::{struct} p; {body} '
                       f"try {{ ssmk::conv::{function}(p); }} catch (...) {{ return 1; }} return 0; }}")
    for name, (struct, function) in _EMU_QUERIES.items():
        fields = _EMU_FIELDS["CausalConv1d" + struct]
        body = " ".join(f"p.{f} = static_cast<decltype(p.{f})>(v[{i}]);" for i, f in enumerate(fields))
        harness.append(f'extern "C" int64_t emu_{name}(const int64_t* v) {{ ssmk::conv::{struct} p; {body} '
                       f"return ssmk::conv::{function}(p); }}")
    (tmp / "harness.cpp").write_text("\n".join(harness) + "\n")
    return root, sources + [tmp / "harness.cpp"]


@pytest.fixture(scope="module")
def emulated_native(request):
    import ctypes
    import hashlib
    import os
    import shutil
    import subprocess
    import types
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("on a GPU the real CUDA kernels are tested instead of their host emulation")
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parents[1]))
    cuda_home = next((Path(h) for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()), None)
    if shutil.which("g++") is None or cuda_home is None:
        pytest.skip("host emulation of the CUDA kernels needs g++ and the CUDA headers")
    # Built once per source state, cached in pytest's cache folder (compiling takes a while).
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256((_EMU_SHIM + repr(_EMU_FIELDS) + repr(_EMU_FUNCTIONS) + repr(_EMU_QUERIES)).encode())
    for path in sorted((root / "csrc").glob("**/*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.read_bytes())
    from ssmkernels._core.config import cache_dir

    tmp = cache_dir() / "test-emulation" / "causal_conv1d" / digest.hexdigest()[:16]
    library = tmp / "emulated.so"
    if not library.is_file():
        # Each process builds in a folder of its own (pytest-xdist workers may build at once) and
        # moves the finished library into place.
        work = tmp / f"build.{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        _, sources = _emulation_sources(work)
        objects = []
        jobs = []
        for source in sources:  # one g++ per file, in parallel
            obj = source.with_suffix(".o")
            objects.append(obj)
            jobs.append(subprocess.Popen(
                ["g++", "-std=c++20", "-O0", "-c", "-fPIC", "-pthread", "-w", "-include", str(work / "shim.h"),
                 f"-I{root / 'csrc'}", f"-I{cuda_home / 'include'}", str(source), "-o", str(obj)],
                stderr=subprocess.PIPE, text=True))
        for job in jobs:
            _, err = job.communicate()
            assert job.returncode == 0, err[-3000:]
        partial = work / "emulated.so"
        subprocess.run(["g++", "-shared", "-pthread", *map(str, objects), "-o", str(partial)], check=True)
        partial.replace(library)
        shutil.rmtree(work, ignore_errors=True)
    lib = ctypes.CDLL(str(library))

    def make_params(cls_name):
        fields = _EMU_FIELDS[cls_name]

        def init(self):
            for f in fields:
                setattr(self, f, 0)
        return type(cls_name, (), {"__init__": init, "fields": fields})

    module = types.SimpleNamespace()
    for cls_name in _EMU_FIELDS:
        setattr(module, cls_name, make_params(cls_name))
    for name in _EMU_FUNCTIONS:
        function = getattr(lib, f"emu_{name}")

        def call(p, function=function, name=name):
            values = (ctypes.c_int64 * len(p.fields))(*[int(getattr(p, f)) for f in p.fields])
            assert function(values) == 0, f"{name} raised"
        setattr(module, name, call)
    for name in _EMU_QUERIES:
        function = getattr(lib, f"emu_{name}")
        function.restype = ctypes.c_int64

        def query(p, function=function):
            return function((ctypes.c_int64 * len(p.fields))(*[int(getattr(p, f)) for f in p.fields]))
        setattr(module, name, query)

    def update_at(p, x, conv_state, weight, bias, out, cache_seqlens, conv_state_indices, stream):
        """binding.cpp's causal_conv1d_update_at: a copy of the prepared params with these addresses."""
        q = copy.copy(p)
        q.x, q.conv_state, q.weight, q.bias, q.out = x, conv_state, weight, bias, out
        q.cache_seqlens, q.conv_state_indices, q.stream = cache_seqlens, conv_state_indices, stream
        module.causal_conv1d_update(q)
    module.causal_conv1d_update_at = update_at
    return module


@pytest.fixture
def emulated_cuda(emulated_native, monkeypatch):
    from ssmkernels.ops.causal_conv1d import cuda as cuda_kernels

    monkeypatch.setattr(cuda_kernels.ext, "module", lambda: emulated_native)
    monkeypatch.setattr(cuda_kernels, "stream_of", lambda t: 0)
    monkeypatch.setattr(cuda_kernels, "raw_stream", lambda device_index: 0)
    # (the update binds the extension's function on first use)
    monkeypatch.setattr(cuda_kernels, "_update_at", lambda *args: emulated_native.causal_conv1d_update_at(*args))
    return cuda_kernels


def _emulated_conv_fn(layout, activation, final):
    def fn(x, weight, bias=None, seq_idx=None, initial_states=None, cu_seqlens=None, backend=None):
        if backend == "reference":
            return _conv_fn(layout, activation, final)(x, weight, bias, seq_idx, initial_states, cu_seqlens,
                                                       backend="reference")
        xv = _view(x, layout)
        out, states = torch.ops.ssmkernels.causal_conv1d_fwd(
            xv, weight, bias, seq_idx, None if initial_states is None else initial_states.to(x.dtype), cu_seqlens,
            activation is not None, final, "cuda")
        return (out, states) if final else out
    return fn


EMU_GRID = [(c, lay) for c, lay in FULL_GRID if CASES[c].get("w", 4) <= CUDA_MAX_WIDTH]
EMU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("case_name,layout", EMU_GRID, ids=[f"{c}-{lay}" for c, lay in EMU_GRID])
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_ids(EMU_DTYPES))
def test_cuda_forward_backward_emulated(emulated_cuda, dtype, case_name, layout):
    case = {**BASE, **CASES[case_name]}
    inputs = _conv_inputs(case, dtype, layout)
    grads = tuple(n for n in ("x", "weight", "bias", "initial_states") if inputs.get(n) is not None)
    compare_with_reference(_emulated_conv_fn(layout, case["activation"], case["final"]), inputs, "cuda",
                           grad_names=grads, label=f"emulated cuda {case_name} {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids([torch.float32, torch.bfloat16]))
def test_cuda_forward_emulated_long_aligned(emulated_cuda, dtype):
    """Lengths spanning several channel-first chunks and channel-last segments, vector paths on
    (16-byte aligned rows; a varlen start at a multiple of 8 keeps the channel-first vectors)."""
    for layout in ("channel_first", "channel_last"):
        case = {**BASE, "b": 1, "d": 16, "l": 2056, "init": True, "final": True,
                "seq": [[0] * 1000 + [1] * 1056]}
        grads = ("x", "weight", "bias", "initial_states")
        inputs = _conv_inputs(case, dtype, layout)
        compare_with_reference(_emulated_conv_fn(layout, "silu", True), inputs, "cuda", grad_names=grads,
                               label=f"long {layout}")
        case = {**case, "seq": None, "cu": [0, 3, 520, 520, 2056]}
        inputs = _conv_inputs(case, dtype, layout)
        compare_with_reference(_emulated_conv_fn(layout, "silu", True), inputs, "cuda", grad_names=grads,
                               label=f"long varlen {layout}")


@pytest.mark.parametrize("case_name,layout", PLAIN_GRID, ids=[f"{c}-{lay}" for c, lay in PLAIN_GRID])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids([torch.float32, torch.bfloat16]))
def test_cuda_whole_row_paths_emulated(emulated_cuda, dtype, case_name, layout):
    _check_plain(_emulated_conv_fn, dtype, case_name, layout, "emulated whole rows")


@pytest.mark.parametrize("case_name", list(UPDATE_CASES))
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=_ids(EMU_DTYPES))
def test_cuda_update_emulated(emulated_cuda, dtype, case_name):
    case = {**UPDATE_BASE, **UPDATE_CASES[case_name]}
    inputs = _update_inputs(case, dtype)
    out64, _ = _run_update(inputs, case["activation"], "reference", torch.float64)
    out_lowp, state_lowp = _run_update(inputs, case["activation"], "reference")
    state = inputs["conv_state"].clone()
    assert _takes_vector_update(emulated_cuda, inputs, case["activation"]) == (case_name in VECTOR_UPDATE_CASES)
    out = torch.ops.ssmkernels.causal_conv1d_update(
        inputs["x"], state, inputs["weight"], inputs["bias"], case["activation"] is not None,
        inputs.get("cache_seqlens"), inputs.get("conv_state_indices"), "cuda")
    assert_spec_close(f"emulated cuda {case_name} out", out, out64, out_lowp, dtype)
    assert torch.equal(state, state_lowp), f"emulated cuda {case_name}: conv_state differs from the reference"


def _takes_vector_update(cuda_kernels, inputs, activation) -> bool:
    """Whether the CUDA update serves these inputs with its vector kernel (the launcher's own test)."""
    x, state = inputs["x"], inputs["conv_state"]
    cache_seqlens, indices = inputs.get("cache_seqlens"), inputs.get("conv_state_indices")
    out = torch.empty_like(x)
    p = cuda_kernels.prepare_update(x, state, inputs["weight"], inputs["bias"], activation is not None, cache_seqlens,
                                    indices, out)
    p.x, p.conv_state, p.weight, p.out = x.data_ptr(), state.data_ptr(), inputs["weight"].data_ptr(), out.data_ptr()
    p.bias = 0 if inputs["bias"] is None else inputs["bias"].data_ptr()
    p.cache_seqlens = 0 if cache_seqlens is None else cache_seqlens.data_ptr()
    p.conv_state_indices = 0 if indices is None else indices.data_ptr()
    return bool(cuda_kernels.ext.module().causal_conv1d_update_vector(p))


@pytest.mark.parametrize("layout", LAYOUTS[:2])
def test_cuda_emulated_several_channel_blocks(emulated_cuda, layout):
    """Channel counts spanning several CUDA blocks: channel-last forward (512 fp32 channels per block),
    backward tiles (32 channels) and update blocks (128 channels); lengths over several segments."""
    case = {**BASE, "b": 2, "d": 520, "l": 70, "init": True, "final": True, "seq": [[0] * 20 + [1] * 50, [3] * 70]}
    inputs = _conv_inputs(case, torch.float32, layout)
    compare_with_reference(_emulated_conv_fn(layout, "silu", True), inputs, "cuda",
                           grad_names=("x", "weight", "bias", "initial_states"), label=f"wide {layout}")
    update_case = {**UPDATE_BASE, "d": 130, "s": 5, "t": 2, "circular": [0, 7, 3], "indices": [2, -1, 0], "slots": 3}
    update_inputs = _update_inputs(update_case, torch.float32)
    _, state_lowp = _run_update(update_inputs, "silu", "reference")
    out64, _ = _run_update(update_inputs, "silu", "reference", torch.float64)
    out_lowp, _ = _run_update(update_inputs, "silu", "reference")
    state = update_inputs["conv_state"].clone()
    out = torch.ops.ssmkernels.causal_conv1d_update(
        update_inputs["x"], state, update_inputs["weight"], update_inputs["bias"], True,
        update_inputs["cache_seqlens"], update_inputs["conv_state_indices"], "cuda")
    assert_spec_close("wide update", out, out64, out_lowp, torch.float32)
    assert torch.equal(state, state_lowp)


def test_cuda_emulated_long_rows_split(emulated_cuda):
    """Channel-first rows longer than one block's piece (8192 fp32 positions) run as several blocks;
    a sequence boundary sits just before a piece boundary."""
    l = 2 * 8192 + 100
    for seq in (None, [[0] * 8190 + [1] * (l - 8190)]):
        case = {**BASE, "b": 1, "d": 3, "l": l, "init": True, "final": True, "seq": seq}
        inputs = _conv_inputs(case, torch.float32, "channel_first")
        compare_with_reference(_emulated_conv_fn("channel_first", "silu", True), inputs, "cuda",
                               label=f"split rows seq={seq is not None}")
