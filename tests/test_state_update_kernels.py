"""selective_state_update kernels (triton, cuda) against the float64 reference (SPEC.md section 4).

Inputs are built compact and turned into the views the caller passes (broadcast A / dt / D /
dt_bias, sliced non-contiguous tensors) inside the function under test, because the comparison
helper copies its inputs (a copy would lose stride 0). The function returns the output and the
whole state after the in-place update, so untouched slots (padding rows, unused cache rows) are
checked too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace

import pytest
import torch

import ssmkernels
from ssmkernels._core.tolerance import assert_spec_close
from helpers import DEVICE, KERNEL_BACKENDS, KERNEL_DTYPES, ON_GPU, compare_with_reference, run_opcheck

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    """One call of selective_state_update; each row of CASES changes a few fields of BASE."""
    mamba1: bool = False
    batch: int = 2
    tokens: int | None = None  # None: single-step form (no token axis)
    heads: int = 4
    headdim: int = 3
    groups: int = 2
    dstate: int = 5
    cache: int | None = None  # state slots (B_cache); None: batch
    per_head: bool = True  # Mamba-2's usual call: A, dt, D, dt_bias broadcast over (p, n) by stride 0
    D: bool = True
    z: bool = True
    dt_bias: bool = True
    softplus: bool = True
    indices: tuple[int, ...] | None = None
    pad_slot_id: int = -1
    index_dtype: torch.dtype = torch.int32
    noncontig: bool = False  # x, dt, z, B, C, state as strided slices of bigger buffers
    strided_indices: bool = False  # state_batch_indices as every other element of a bigger buffer


BASE = Case()
CASES = {
    "mamba2_step": BASE,
    "mamba2_tokens3": replace(BASE, tokens=3),
    "mamba2_tokens1": replace(BASE, tokens=1),
    "mamba2_plain": replace(BASE, D=False, z=False, dt_bias=False, softplus=False),
    "mamba2_full_A_dt": replace(BASE, per_head=False),
    "mamba2_full_tokens4": replace(BASE, per_head=False, tokens=4, softplus=False),
    "mamba2_odd_sizes": replace(BASE, heads=3, headdim=7, groups=1, dstate=11, batch=3),
    "mamba2_groups_eq_heads": replace(BASE, groups=4, dstate=16, headdim=8),
    "mamba2_wide_headdim": replace(BASE, heads=2, groups=1, headdim=70, dstate=4, batch=1),
    "mamba2_dstate128": replace(BASE, heads=2, groups=1, headdim=5, dstate=128, tokens=2),
    "mamba2_dstate100": replace(BASE, heads=2, groups=2, headdim=3, dstate=100),
    # More rows per head than one block of the CUDA head kernel takes (64 at d_state 64, bf16 state).
    "mamba2_rows_past_a_block": replace(BASE, heads=2, groups=1, headdim=70, dstate=64, batch=2, tokens=2),
    "mamba2_indices_pad": replace(BASE, batch=4, cache=6, indices=(5, -1, 0, 2), tokens=2),
    "mamba2_indices_custom_pad": replace(BASE, batch=3, cache=4, indices=(3, 9, 1), pad_slot_id=9),
    "mamba2_indices_int64": replace(BASE, batch=3, cache=4, indices=(1, -1, 3), index_dtype=torch.int64, tokens=2),
    "mamba2_noncontig": replace(BASE, noncontig=True, tokens=2, per_head=False),
    "mamba2_noncontig_indices": replace(BASE, noncontig=True, cache=5, indices=(4, -1), per_head=True),
    "mamba2_strided_indices": replace(BASE, batch=3, cache=5, indices=(4, -1, 1), strided_indices=True, tokens=2),
    "mamba1_step": replace(BASE, mamba1=True, headdim=6, per_head=False),
    "mamba1_tokens2": replace(BASE, mamba1=True, headdim=6, tokens=2, D=False, softplus=False),
    "mamba1_indices_pad": replace(BASE, mamba1=True, headdim=5, batch=3, cache=4, indices=(-1, 3, 0)),
}


def make_inputs(case: Case, dtype: torch.dtype, state_dtype: torch.dtype) -> dict:
    """Compact random inputs (x first: its dtype is the dtype under test)."""
    b, h, p, n, g = case.batch, case.heads, case.headdim, case.dstate, case.groups
    t = case.tokens or 1
    cache = case.cache or b
    if case.mamba1:
        h, g = 1, 1
    on = dict(device=DEVICE)
    A_shape = (h,) if case.per_head else (h, p, n)
    per_channel = (h,) if case.per_head else (h, p)
    dt_shape = (b, t, h) if case.per_head else (b, t, h, p)
    inputs = {
        "x": torch.randn(b, t, h, p, **on),
        "state": torch.randn(cache, h, p, n, **on).to(state_dtype),
        "dt": torch.rand(*dt_shape, **on) * 0.8 + 0.05 if not case.softplus else torch.randn(*dt_shape, **on),
        "A": -torch.rand(*A_shape, **on) - 0.2,
        "B": torch.randn(b, t, g, n, **on),
        "C": torch.randn(b, t, g, n, **on),
        "D": torch.randn(*per_channel, **on) if case.D else None,
        "z": torch.randn(b, t, h, p, **on) if case.z else None,
        "dt_bias": torch.rand(*per_channel, **on) * 0.5 if case.dt_bias else None,
        "state_batch_indices": (torch.tensor(case.indices, dtype=case.index_dtype, device=DEVICE)
                                if case.indices is not None else None),
    }
    return {k: (v.to(dtype) if k not in ("state", "state_batch_indices") and v is not None else v)
            for k, v in inputs.items()}


def _strided(v: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a bigger buffer)."""
    view = torch.empty(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)[..., ::2]
    return view.copy_(v)


def caller_views(case: Case, x, state, dt, A, B, C, D, z, dt_bias):
    """The tensors a caller passes for ``case``: SPEC's shapes, broadcast / strided as configured."""
    b, t, h, p = x.shape
    n = state.shape[-1]
    if case.per_head:  # A (h,) -> (h, p, n), dt (b, t, h) -> (b, t, h, p), ... all stride 0
        A = A[:, None, None].expand(h, p, n)
        dt = dt[..., None].expand(b, t, h, p)
        D = None if D is None else D[:, None].expand(h, p)
        dt_bias = None if dt_bias is None else dt_bias[:, None].expand(h, p)
    if case.noncontig:
        x, dt, z, B, C = (None if v is None else _strided(v) for v in (x, dt, z, B, C))
    if case.mamba1:  # drop the head axis: state (B_cache, d, n), x (b, t, d), B/C (b, t, n), A (d, n)
        state, A = state[:, 0], A[0]
        x, dt, z = (None if v is None else v[:, :, 0] for v in (x, dt, z))
        B, C = B[:, :, 0], C[:, :, 0]
        D = None if D is None else D[0]
        dt_bias = None if dt_bias is None else dt_bias[0]
    if case.tokens is None:  # single-step form: no token axis
        x, dt, z, B, C = (None if v is None else v[:, 0] for v in (x, dt, z, B, C))
    return x, dt, A, B, C, D, z, dt_bias


def run_case(case: Case):
    """fn(**inputs, backend) for compare_with_reference: returns (out, state after the update)."""

    def fn(x, state, dt, A, B, C, D, z, dt_bias, state_batch_indices, backend):
        target = state
        if case.noncontig:  # update a strided view of a bigger buffer in place
            buffer = torch.zeros(*state.shape[:-1], 3 * state.shape[-1], dtype=state.dtype, device=state.device)
            target = buffer[..., 1::3]
            target.copy_(state)
        x_, dt_, A_, B_, C_, D_, z_, dt_bias_ = caller_views(case, x, target, dt, A, B, C, D, z, dt_bias)
        target_ = target[:, 0] if case.mamba1 else target
        if case.strided_indices:
            state_batch_indices = _strided(state_batch_indices)
        out = ssmkernels.selective_state_update(target_, x_, dt_, A_, B_, C_, D=D_, z=z_, dt_bias=dt_bias_,
                                                dt_softplus=case.softplus, state_batch_indices=state_batch_indices,
                                                pad_slot_id=case.pad_slot_id, backend=backend)
        return out, target.clone()

    return fn


# ------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, dtype, state_dtype, case_name):
    case = CASES[case_name]
    compare_with_reference(run_case(case), make_inputs(case, dtype, state_dtype), backend,
                           label=f"{backend} {case_name} x {dtype_id(dtype)} state {dtype_id(state_dtype)}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tokens_equal_single_steps(backend):
    """t tokens in one call give what t single-step calls give (float32 state: no rounding between)."""
    case = replace(BASE, tokens=4)
    inputs = make_inputs(case, torch.float32, torch.float32)
    fn = run_case(case)
    args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out_all, state_all = fn(**args, backend=backend)
    state = inputs["state"].clone()
    outs = []
    for j in range(4):
        x, dt, A, B, C, D, z, dt_bias = caller_views(BASE, inputs["x"][:, j:j + 1], state, inputs["dt"][:, j:j + 1],
                                                     inputs["A"], inputs["B"][:, j:j + 1], inputs["C"][:, j:j + 1],
                                                     inputs["D"], inputs["z"][:, j:j + 1], inputs["dt_bias"])
        outs.append(ssmkernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, backend=backend))
    torch.testing.assert_close(out_all, torch.stack(outs, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(state_all, state, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates(backend):
    """A NaN in x reaches that row's output and state; other rows stay finite."""
    case = replace(BASE, batch=3)
    inputs = make_inputs(case, torch.float32, torch.float32)
    inputs["x"][1, 0, 2, 1] = float("nan")
    out, state = run_case(case)(**inputs, backend=backend)
    assert torch.isnan(out[1, 2, 1]) and torch.isnan(state[1, 2, 1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all() and torch.isfinite(state[[0, 2]]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_rows_padding(backend):
    """Every row a padding slot: zeros out, state bitwise untouched."""
    case = replace(BASE, batch=2, cache=3, indices=(-1, -1), tokens=2)
    inputs = make_inputs(case, torch.float32, torch.bfloat16)
    before = inputs["state"].clone()
    out, state = run_case(case)(**inputs, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(state, before)


def test_bad_index_raises_for_cpu_indices():
    """Index values are range-checked on the host where that costs no device sync (CPU tensors)."""
    case = replace(BASE, batch=2, cache=3, indices=(0, 3))
    inputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
              for k, v in make_inputs(case, torch.float32, torch.float32).items()}
    with pytest.raises(ValueError, match="state_batch_indices holds 3"):
        run_case(case)(**inputs, backend="reference")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_skips_out_of_range_indices(backend):
    """The host does not range-check CUDA indices (that would synchronise every step): the kernels
    themselves treat an index outside [0, B_cache) like a padding slot, never writing out of bounds."""
    args = list(_op_args(backend))
    args[10] = torch.tensor([3, -5], dtype=torch.int32, device=DEVICE)  # 3 slots: both out of range
    before = args[0].clone()
    out = torch.ops.ssmkernels.selective_state_update(*args)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(args[0], before)


# ------------------------------------------------------------------- the eager fast path
# After the first call of a kind, a plain eager call skips the checks it already passed, the backend
# choice and the op dispatcher (op.py's plans). These tests pin what must not change because of it.
def _step_args(backend: str, batch: int = 2, indices: tuple[int, ...] | None = None):
    case = replace(BASE, batch=batch, cache=3 if indices else None, indices=indices)
    i = make_inputs(case, torch.float32, torch.float32)
    x, dt, A, B, C, D, z, dt_bias = caller_views(case, i["x"], i["state"], i["dt"], i["A"], i["B"], i["C"], i["D"],
                                                 i["z"], i["dt_bias"])
    return dict(state=i["state"], x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                state_batch_indices=i["state_batch_indices"], backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_path_matches_the_op(backend, monkeypatch):
    """Repeated eager calls give what the op gives, and do not go through the op dispatcher."""
    from ssmkernels.ops.state_update import op

    args = _step_args(backend, indices=(2, -1))
    state_op = args["state"].clone()
    op_args = [args[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "state_batch_indices")]
    outs_op = [torch.ops.ssmkernels.selective_state_update(state_op, *op_args, -1, backend) for _ in range(3)]
    ssmkernels.selective_state_update(**{**args, "state": args["state"].clone()})  # caches the plan

    def no_dispatcher(*_):
        raise AssertionError("a repeated plain eager call went through the op dispatcher")

    monkeypatch.setattr(op, "_state_update", no_dispatcher)
    outs = [ssmkernels.selective_state_update(**args) for _ in range(3)]
    for out, expected in zip(outs, outs_op):
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(args["state"], state_op, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_path_takes_parameters(backend, monkeypatch):
    """Mamba-1 passes its (d,) parameters as they are: nn.Parameter is a plain tensor to the fast path."""
    from ssmkernels.ops.state_update import op

    args = _step_args(backend)
    state, x, A, B, C = args["state"][:, 0], args["x"][:, 0], args["A"][0], args["B"][:, 0], args["C"][:, 0]
    D, dt_bias = torch.nn.Parameter(args["D"][0].contiguous()), torch.nn.Parameter(args["dt_bias"][0].contiguous())
    call = lambda s: ssmkernels.selective_state_update(s, x, args["dt"][:, 0], A, B, C, D, args["z"][:, 0], dt_bias,
                                                        True, backend=backend)
    expected = call(state.clone())  # the first call of its kind goes through the op and caches a plan
    monkeypatch.setattr(op, "_state_update", None)  # a call through the op dispatcher would fail
    out = call(state.clone())
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ("reference",))
def test_fast_path_still_rejects_bad_input(backend, monkeypatch):
    """Once a kind of call is cached, a call that differs in any checked property is checked again."""
    args = _step_args(backend)
    ssmkernels.selective_state_update(**args)
    ssmkernels.selective_state_update(**args)
    bad = {
        "B": (ValueError, "B must have shape", args["B"][:, :, :-1]),
        "x": (TypeError, "x must be a torch.Tensor", args["x"].tolist()),
        "z": (ValueError, "z must have shape", args["z"][:1]),
        "D": (TypeError, "D must have dtype", args["D"].to(torch.int32)),
        "dt_bias": (ValueError, "dt_bias must be on", args["dt_bias"].to("meta")),
    }
    for name, (error, message, value) in bad.items():
        with pytest.raises(error, match=message):
            ssmkernels.selective_state_update(**{**args, name: value})
    with pytest.raises(ValueError, match="slots for batch"):
        ssmkernels.selective_state_update(**{**args, "state": args["state"][:1]})
    monkeypatch.setenv("SSMKERNELS_BACKEND", "bogus")  # read on every call, cached plan or not
    with pytest.raises(ValueError, match="SSMKERNELS_BACKEND"):
        ssmkernels.selective_state_update(**{**args, "backend": None})


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_last_plan_match_tells_kinds_apart(backend):
    """The last plan is matched by its metadata guard, not by key: calls that alternate between kinds
    differing only in strides, in an absent optional tensor or in a flag each get their own plan and
    the same result as a call of that kind alone."""
    from ssmkernels._core import decode_plan
    from ssmkernels.ops.state_update import op

    args = _step_args(backend)
    assert decode_plan.guard_rejects_changes(), "this torch's TensorGuards no longer rejects metadata changes"
    strided_x = torch.empty_like(args["x"]).transpose(-1, -2).contiguous().transpose(-1, -2).copy_(args["x"])
    kinds = {"base": args, "strided x": {**args, "x": strided_x}, "no z": {**args, "z": None},
             "no softplus": {**args, "dt_softplus": False}}
    alone = {name: ssmkernels.selective_state_update(**{**kind, "state": kind["state"].clone()})
             for name, kind in kinds.items()}
    for _ in range(2):
        for name, kind in kinds.items():
            out = ssmkernels.selective_state_update(**{**kind, "state": kind["state"].clone()})
            torch.testing.assert_close(out, alone[name], rtol=0, atol=0, msg=name)
    assert all(plan.guard is not None for plan in op._PLANS.values())
    assert not torch.equal(alone["base"], alone["no z"]) and not torch.equal(alone["base"], alone["no softplus"])


def test_fast_path_checks_cpu_index_values_every_call():
    args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in _step_args("reference", indices=(2, -1)).items()}
    ssmkernels.selective_state_update(**args)
    ssmkernels.selective_state_update(**args)
    args["state_batch_indices"][0] = 3  # 3 slots
    with pytest.raises(ValueError, match="state_batch_indices holds 3"):
        ssmkernels.selective_state_update(**args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_modes_and_profiler_see_the_op(backend):
    """Under a TorchDispatchMode, FakeTensorMode or the profiler, calls go through the op (cached plan or not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    args = _step_args(backend)
    ssmkernels.selective_state_update(**args)  # a cached plan exists from here on
    ssmkernels.selective_state_update(**args)

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        ssmkernels.selective_state_update(**args)
    assert "ssmkernels.selective_state_update.default" in recorder.ops

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ssmkernels.selective_state_update(**args)
    assert any(event.name == "ssmkernels::selective_state_update" for event in profile.events())

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        out = ssmkernels.selective_state_update(**fake)
    assert type(out).__name__ == "FakeTensor" and out.shape == args["x"].shape


# ------------------------------------------------------------------- torch.library integration
def _op_args(backend: str, tokens: int = 2):
    case = replace(BASE, tokens=tokens, cache=3, batch=2, indices=(2, -1))
    i = make_inputs(case, torch.float32, torch.float32)
    x, dt, A, B, C, D, z, dt_bias = caller_views(case, i["x"], i["state"], i["dt"], i["A"], i["B"], i["C"], i["D"],
                                                 i["z"], i["dt_bias"])
    return (i["state"], x, dt, A, B, C, D, z, dt_bias, True, i["state_batch_indices"], -1, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    run_opcheck(torch.ops.ssmkernels.selective_state_update.default, _op_args(backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    args = _op_args(backend)
    state, x, dt, A, B, C, D, z, dt_bias, softplus, idx, pad, _ = args

    def step(state, x, dt, B, C, z, idx):
        return ssmkernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx, pad,
                                                 backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    state_eager, state_compiled = state.clone(), state.clone()
    expected = step(state_eager, x, dt, B, C, z, idx)
    got = compiled(state_compiled, x, dt, B, C, z, idx)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(state_compiled, state_eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """Decode under a CUDA graph: capture one step, replay it with new inputs copied into the
    captured buffers, and get what eager calls give."""
    case = replace(BASE, batch=4, cache=6, heads=8, headdim=64, groups=2, dstate=128, indices=(5, -1, 0, 2))
    steps = [make_inputs(case, torch.bfloat16, torch.float32) for _ in range(3)]
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in steps[0].items()}
    state_graph = static["state"]
    state_eager = static["state"].clone()

    def step(inputs, state):
        x, dt, A, B, C, D, z, dt_bias = caller_views(case, inputs["x"], state, inputs["dt"], inputs["A"], inputs["B"],
                                                     inputs["C"], inputs["D"], inputs["z"], inputs["dt_bias"])
        return ssmkernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True,
                                                 inputs["state_batch_indices"], -1, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, the extension loads) outside capture
        step(static, state_graph.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(static, state_graph)
    state_graph.copy_(state_eager)  # capture ran nothing; start both from the same state
    for inputs in steps:
        for k, v in inputs.items():
            if k != "state" and isinstance(v, torch.Tensor):
                static[k].copy_(v)
        graph.replay()
        expected = step(inputs, state_eager)
        torch.cuda.synchronize()
        torch.testing.assert_close(out_static, expected, rtol=0, atol=0)
        torch.testing.assert_close(state_graph, state_eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_state_beyond_2_31_elements(backend):
    """A float16 cache of more than 2^31 elements, updating its last slot (64-bit offsets)."""
    h, p, n = 1, 64, 128
    slots = 2**31 // (h * p * n) + 2
    state = torch.zeros(slots, h, p, n, dtype=torch.float16, device=DEVICE)
    case = replace(BASE, batch=2, heads=h, headdim=p, groups=1, dstate=n, cache=2, indices=(1, 0))
    inputs = make_inputs(case, torch.bfloat16, torch.float16)
    rows = inputs["state"]
    state[slots - 1], state[0] = rows[1], rows[0]
    idx = torch.tensor([slots - 1, 0], dtype=torch.int32, device=DEVICE)
    views = caller_views(case, inputs["x"], state, *(inputs[k] for k in ("dt", "A", "B", "C", "D", "z", "dt_bias")))
    out = ssmkernels.selective_state_update(state, *views[:6], z=views[6], dt_bias=views[7], dt_softplus=True,
                                            state_batch_indices=idx, backend=backend)
    fn = run_case(case)
    ref64 = fn(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inputs.items()}, backend="reference")
    ref_lowp = fn(**inputs, backend="reference")
    assert_spec_close("out", out, ref64[0], ref_lowp[0], torch.bfloat16)
    assert_spec_close("last slot", state[slots - 1], ref64[1][1], ref_lowp[1][1], torch.bfloat16)
    assert_spec_close("first slot", state[0], ref64[1][0], ref_lowp[1][0], torch.bfloat16)


_LOWER_FOR_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ssmkernels.ops.state_update import triton as kernels

    fn = kernels._state_update_kernel
    variants = [("fp32", "bf16", True, True, True, 16, 128, True, True),
                ("bf16", "fp16", False, False, False, 4, 16, False, False),
                ("fp16", "fp32", True, False, True, 1, 512, False, True)]
    for state_ty, in_ty, indices, dt_per_head, a_per_head, block_p, block_n, even_n, one_token in variants:
        constants = dict(DT_SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, HAS_INDICES=indices,
                         DT_PER_HEAD=dt_per_head, A_PER_HEAD=a_per_head, BF16_BY_BITS=False, EVEN_N=even_n,
                         BLOCK_P=block_p, BLOCK_N=block_n, ONE_TOKEN=one_token)
        signature = {}
        for name in fn.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name == "indices_ptr":
                signature[name] = "*i32" if indices else "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + (state_ty if name == "state_ptr" else in_ty)
            else:
                signature[name] = "i64" if name == "stride_state_slot" else "i32"
        if not indices:
            constants["indices_ptr"] = None
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        assert "cubin" in compiled.asm
    print("lowered")
""")


@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles the kernels for real")
def test_triton_kernel_lowers_for_sm90():
    """The interpreter runs the kernel as Python; this compiles it for an H100 (to a cubin, no GPU
    needed), so constructs that only fail in the real compiler (early return, loops) show up here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _LOWER_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "lowered" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("case_name", ["mamba2_step", "mamba2_odd_sizes", "mamba2_tokens3", "mamba2_indices_pad",
                                       "mamba2_noncontig_indices", "mamba2_dstate100", "mamba1_indices_pad"])
def test_triton_pipelined_kernel(case_name, programs, monkeypatch):
    """The Triton kernel that loops over tiles with the next tile's state prefetched (opt-in until
    measured faster: triton.py's _PROGRAMS_PER_SM): 1 or 3 programs for 6-12 tiles, padding rows
    among them, against the float64 reference."""
    if "triton" not in KERNEL_BACKENDS:
        pytest.skip("no triton backend here")
    from ssmkernels.ops.state_update import op
    from ssmkernels.ops.state_update import triton as su_triton

    default = su_triton._launch_config
    monkeypatch.setattr(su_triton, "_launch_config", lambda *a: (*default(*a)[:3], 1))
    monkeypatch.setattr(su_triton, "_sm_count", lambda device_index: programs)
    launched = []
    real_launch = su_triton.launch
    monkeypatch.setattr(su_triton, "launch", lambda prepared, *args: (launched.append(prepared[0]),
                                                                       real_launch(prepared, *args)))
    case = CASES[case_name]
    op.clear_caches()
    try:
        compare_with_reference(run_case(case), make_inputs(case, torch.float32, torch.bfloat16), "triton",
                               label=f"triton pipelined, {programs} programs, {case_name}")
    finally:
        op.clear_caches()
    assert launched and all(k is su_triton._state_update_pipelined_kernel for k in launched)


# ------------------------------------------------------------------- the CUDA kernel, emulated
# Without a GPU, the CUDA kernel and its launcher run in host emulation (csrc/state_update/
# emulation.cc, tests/cuda_emulation.py) behind the real op layer: the kernel's indexing, pack
# widths, lanes per row, B/C paths, padding rows and grid against the float64 reference in CI.
@pytest.mark.skipif(ON_GPU, reason="the GPU runs the real kernel (test_matches_reference)")
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=["f32_f32state", "f16_bf16state"])
def test_emulated_cuda_kernel_matches_reference(case_name, dtype, state_dtype, emulated_state_update_cuda):
    case = CASES[case_name]
    before = emulated_state_update_cuda.launches
    compare_with_reference(run_case(case), make_inputs(case, dtype, state_dtype), "cuda",
                           label=f"emulated cuda {case_name} x {dtype_id(dtype)} state {dtype_id(state_dtype)}")
    assert emulated_state_update_cuda.launches > before  # the emulated kernel ran, not a fallback


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the real kernel (test_matches_reference)")
@pytest.mark.parametrize("dstate", [8, 64, 128, 256])
def test_emulated_cuda_kernel_packed_bc(dstate, emulated_state_update_cuda):
    """d_state a multiple of the pack width, B/C contiguous: the head kernel (the per-row kernel at
    d_state 256 with a float32 state: 64 packs a row) with B/C read in packs of their own type (bf16
    x/B/C with float32 and with bf16 state), several tokens, padding rows."""
    case = replace(BASE, heads=2, groups=1, headdim=9, dstate=dstate, batch=3, cache=4, indices=(3, -1, 0), tokens=2)
    for state_dtype in (torch.float32, torch.bfloat16):
        compare_with_reference(run_case(case), make_inputs(case, torch.bfloat16, state_dtype), "cuda",
                               label=f"emulated cuda packed B/C n{dstate} state {dtype_id(state_dtype)}")


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the real kernel (test_matches_reference)")
def test_emulated_cuda_kernel_vector_state_strided_bc(emulated_state_update_cuda):
    """A state laid out for 16-byte packs with B/C that are not (strided along n) and per-head A:
    the launcher takes the element-by-element path for both, against the float64 reference."""
    case = replace(BASE, heads=2, groups=1, headdim=5, dstate=16, tokens=2)
    inner = run_case(case)

    def fn(B, C, **kw):
        return inner(B=_strided(B), C=_strided(C), **kw)

    compare_with_reference(fn, make_inputs(case, torch.float16, torch.float32), "cuda",
                           label="emulated cuda, strided B/C")


@pytest.mark.skipif(not ON_GPU, reason="65,536 batch rows: too slow for Triton's interpreter")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_beyond_the_grid_limit(backend):
    """More batch rows than a CUDA grid's y size (65,535): the CUDA launcher splits the grid, the
    Triton path takes its 1D-grid kernel; both against the float64 reference."""
    case = replace(BASE, batch=65_537, heads=2, groups=1, headdim=3, dstate=8)
    compare_with_reference(run_case(case), make_inputs(case, torch.float32, torch.float32), backend,
                           label=f"{backend} batch 65537")
