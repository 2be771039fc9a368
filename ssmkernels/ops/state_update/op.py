"""Public selective_state_update: validation -> dispatch -> custom op (SPEC.md section 4).

The decode step is host-bound, so this path is kept lean (issue #7). Host time per call, batch 1,
the Mamba-2 step of the issue (state (1, 128, 64, 128) float32, bf16 x/z/B/C, stride-0 A/dt/D/
dt_bias, softplus), CUDA backend with its kernel call stubbed out, on the 2-core CPU development
machine (``scripts/state_update_overhead.py``, which also times the real thing on a GPU):
~20 us before the eager fast path below, ~8.5 us with it. Of those 8.5 us: the plan key ~3.1 us,
the two environment reads that the config module makes on every call (SSMKERNELS_BACKEND,
SSMKERNELS_POISON_OUTPUTS) ~0.8 us each, ``out`` ~0.5 us, addresses + binding ~0.8 us, the mode
guards ~0.3 us. On the H100 machine (torch 2.11) the CUDA backend's wall clock per call in a
back-to-back loop went from 55 us to 20 us with the fast path before its allocation and last-plan
refinements; Triton's from 110 us to 96 us (the rest is Triton's own launch: it specialises the
kernel's ~50 integer arguments on every call).

Every call:
- the op is a ``torch.library.Library`` definition, not ``torch.library.custom_op`` (whose
  mutation bookkeeping rebuilt the schema's argument list on every call: ~110 us -> ~7-12 us);
- shapes, dtypes and devices are checked by plain comparisons, and the generic helpers (which
  build their error text eagerly) only run to report a bad argument;
- the backend is decided once per kind of call and memoised;
- no views are made: the kernels read the caller's tensors through ``layout.mamba2_layout``, which
  maps every form (Mamba-1 or -2, one token or several) to the multi-token Mamba-2 indexing, so
  broadcast (stride-0) inputs stay broadcast and nothing is copied;
- ``state_batch_indices`` values are range-checked on the host only for CPU tensors: for CUDA
  tensors the check would synchronise every step. The kernels treat an index outside
  ``[0, B_cache)`` like ``pad_slot_id`` (output zeros, no state touched), so a bad index can never
  write out of bounds.

The eager fast path: a *plan* per kind of call, keyed by every tensor's type, shape, strides,
dtype and device, the flags, ``backend=`` and SSMKERNELS_BACKEND (``_signature``). The first call
of a kind runs the full path (every check, the backend choice, the op) and stores the plan; a
later call with the same key has passed the same checks and gets the same backend, so it only
re-checks CPU index values and launches directly: ``out`` from a cached layout, the kernel's
static arguments (``prepare`` of cuda.py / triton.py) from the plan, addresses and stream per call,
no op dispatcher (~4 us) and no layout work (~5 us). Any change in a checked property changes the
key, so bad input still gets the full path's errors. The last plan used is matched without building
the key at all (``_Plan.matches``: flags, which optionals are absent, and dynamo's C++
``TensorGuards`` over the present tensors' dispatch keys, dtype, device, sizes and strides): the
whole stubbed call went from 6.65 to 4.09 us on the CPU development machine, and from 18.8 to 5.8 us
on the H100 machine's host. The fast path is taken only when nothing could observe the op: not
under Dynamo (``torch.compile`` traces the full path and records the op), no TorchDispatchMode (FakeTensorMode, functionalization, proxy tracing, user modes), no
TorchFunctionMode, no functorch transform, the profiler off (it records the op), and every tensor
a plain Tensor or Parameter (subclasses take the op). The op path itself caches the kernels'
static arguments the same way (``_LAUNCHES``), which serves compiled graphs. Autograd is unchanged
(the op's Autograd kernel is a fallthrough, so neither path attaches a grad_fn or bumps versions);
launches stay capturable in CUDA graphs (the allocation is the caching allocator's, the stream is
torch's current one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._core import config, dispatch, native
from ..._core import validation as v
from ..._core.custom_op import allocator_like, define_decode_op, empty_like, kernels, plain_eager
from ..._core.decode_plan import MAX_PLANS, PLAIN_TYPES, PlanKind
from . import reference

PRIMITIVE = "state_update"


# ``Library.define`` + ``impl`` rather than ``torch.library.custom_op`` (custom_op.define_decode_op,
# below). Tensors arrive as the caller passed them.
_SCHEMA = ("(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
           "Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, int pad_slot_id, str backend) -> Tensor")


def _signature(state, x, dt, A, B, C, D, z, dt_bias, idx) -> tuple:
    """Everything about the tensors that validation, the backend choice and the kernels' launch
    arguments depend on: type, shape, strides, dtype, device (~3 us for a decode step's nine)."""
    return (
        type(state), state.shape, state.stride(), state.dtype, state.device,
        type(x), x.shape, x.stride(), x.dtype, x.device,
        type(dt), dt.shape, dt.stride(), dt.dtype, dt.device,
        type(A), A.shape, A.stride(), A.dtype, A.device,
        type(B), B.shape, B.stride(), B.dtype, B.device,
        type(C), C.shape, C.stride(), C.dtype, C.device,
        None if D is None else (type(D), D.shape, D.stride(), D.dtype, D.device),
        None if z is None else (type(z), z.shape, z.stride(), z.dtype, z.device),
        None if dt_bias is None else (type(dt_bias), dt_bias.shape, dt_bias.stride(), dt_bias.dtype, dt_bias.device),
        None if idx is None else (type(idx), idx.shape, idx.stride(), idx.dtype, idx.device),
    )


class _Launch:
    """A kernel backend's launch arguments for one kind of call (``prepare`` of cuda.py / triton.py)
    and the layout of its ``out``, computed once: per call only ``out`` and the addresses are new."""
    __slots__ = ("module", "prepared", "device_index", "size", "stride", "dtype", "allocate")

    def __init__(self, backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx, pad_slot_id):
        self.module = kernels(PRIMITIVE, backend)
        out = torch.empty_like(x)  # its layout depends only on x's shape, strides and dtype
        self.prepared = self.module.prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx, pad_slot_id, out)
        self.device_index = x.get_device()  # -1 on the CPU (Triton's interpreter)
        self.size, self.stride, self.dtype = tuple(out.shape), out.stride(), out.dtype  # plain tuples: see allocator_like
        self.allocate = allocator_like(out)

    def __call__(self, state, x, dt, A, B, C, D, z, dt_bias, idx) -> Tensor:
        index = self.device_index
        if index >= 0 and index != native.current_device():  # kernels launch (and out is made) on the current device
            with torch.cuda.device(index):
                return self(state, x, dt, A, B, C, D, z, dt_bias, idx)
        out = empty_like(x) if config.poison_outputs() else self.allocate(self.size, self.stride, self.dtype)
        self.module.launch(self.prepared, state, x, dt, A, B, C, D, z, dt_bias, idx, out)
        return out


_LAUNCHES: dict = {}  # (backend, flags, _signature) -> _Launch, for calls through the op


def _state_update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, backend):
    idx = state_batch_indices
    key = (backend, dt_softplus, pad_slot_id, _signature(state, x, dt, A, B, C, D, z, dt_bias, idx))
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= MAX_PLANS:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = _Launch(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx,
                                          pad_slot_id)
    return launch(state, x, dt, A, B, C, D, z, dt_bias, idx)


def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, backend):
    return torch.empty_like(x)


_state_update, _LIBRARY = define_decode_op("selective_state_update", _SCHEMA, _state_update_impl,
                                           _state_update_fake)


def _check_shapes(state, x, dt, A, B, C, D, z, dt_bias):
    """Check every argument against the form implied by ``state``'s rank; returns (batch, tokens)."""
    v.check_tensor("x", x)
    v.check_tensor("state", state)
    v.check_ndim("state", state, (3, 4))
    dev = x.device
    mamba1 = state.dim() == 3
    if mamba1:
        d, n = state.shape[1:]
        v.check_ndim("x", x, (2, 3))
        b = x.shape[0]
        tokens = () if x.dim() == 2 else (x.shape[1],)
        channel, groups = (d,), (n,)
        v.check_tensor("A", A, (d, n), device=dev)
        per_channel = (d,)
    else:
        h, p, n = state.shape[1:]
        v.check_ndim("x", x, (3, 4))
        b = x.shape[0]
        tokens = () if x.dim() == 3 else (x.shape[1],)
        channel = (h, p)
        v.check_ndim("B", B, (3 + len(tokens),))
        g = B.shape[-2]
        if g == 0 or h % g:
            raise ValueError(f"B has {g} groups, which must divide the {h} heads")
        groups = (g, n)
        v.check_tensor("A", A, (h, p, n), device=dev)
        per_channel = (h, p)
    v.check_tensor("x", x, (b, *tokens, *channel), device=dev)
    v.check_tensor("dt", dt, (b, *tokens, *channel), device=dev)
    v.check_tensor("B", B, (b, *tokens, *groups), device=dev)
    v.check_tensor("C", C, (b, *tokens, *groups), device=dev)
    v.check_tensor("z", z, (b, *tokens, *channel), device=dev, optional=True)
    v.check_tensor("D", D, per_channel, device=dev, optional=True)
    v.check_tensor("dt_bias", dt_bias, per_channel, device=dev, optional=True)
    v.check_tensor("state", state, None, device=dev)
    return b, tokens[0] if tokens else 1


_FLOAT_DTYPES = frozenset(v.FLOAT_DTYPES)
_INDEX_DTYPES = frozenset(v.INDEX_DTYPES)


def _fast_check(state, x, dt, A, B, C, D, z, dt_bias):
    """The checks of ``_check_shapes`` as plain comparisons, with no error text built: (batch,
    tokens) when every argument is right, None when something is off (then ``_check_shapes`` says
    what). Saves ~30 us per decode step over the generic helpers."""
    tensors = (state, x, dt, A, B, C) + tuple(t for t in (D, z, dt_bias) if t is not None)
    for t in tensors:
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES:
            return None
    device = x.device
    for t in tensors:
        if t.device != device:
            return None
    xs = x.shape
    if state.dim() == 4:
        _, h, p, n = state.shape
        if x.dim() == 3:
            channel = (xs[0], h, p)
        elif x.dim() == 4:
            channel = (xs[0], xs[1], h, p)
        else:
            return None
        if B.dim() != len(channel):
            return None
        g = B.shape[-2]
        if g == 0 or h % g:
            return None
        groups = channel[:-2] + (g, n)
        per_channel = (h, p)
        if A.shape != (h, p, n):
            return None
    elif state.dim() == 3:
        _, d, n = state.shape
        if x.dim() == 2:
            channel = (xs[0], d)
        elif x.dim() == 3:
            channel = (xs[0], xs[1], d)
        else:
            return None
        groups = channel[:-1] + (n,)
        per_channel = (d,)
        if A.shape != (d, n):
            return None
    else:
        return None
    if xs != channel or dt.shape != channel or B.shape != groups or C.shape != groups:
        return None
    if (z is not None and z.shape != channel) or (D is not None and D.shape != per_channel) or (
            dt_bias is not None and dt_bias.shape != per_channel):
        return None
    return xs[0], (xs[1] if len(channel) == len(per_channel) + 2 else 1)


_DISPATCH: dict = {}  # (call features) -> backend name: dispatch decides once per kind of call
# Batches up to this size are launch-bound (CUDA wins, measured at batch 1); larger ones are
# bandwidth-bound (Triton wins, measured at batch 256). The crossover in between is unmeasured.
SMALL_BATCH = 8


@dispatch.assume_constant_result
def _backend_for(requested, default, device, dtype, state_dtype, mamba1, indices, d_state, small_batch) -> str:
    key = (requested, default, device, dtype, state_dtype, mamba1, indices, d_state, small_batch)
    chosen = _DISPATCH.get(key)
    if chosen is None:
        features = {"dtype": dtype, "state_dtype": state_dtype, "form": "mamba1" if mamba1 else "mamba2",
                    "d_state": d_state, "indices": indices, "small_batch": small_batch}
        chosen = _DISPATCH[key] = dispatch.select_backend(PRIMITIVE, requested, device, features)
    return chosen


def _check(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id) -> int:
    """Every check of the arguments (ValueError / TypeError saying what is wrong); returns the batch."""
    shapes = _fast_check(state, x, dt, A, B, C, D, z, dt_bias)
    b, _ = shapes if shapes is not None else _check_shapes(state, x, dt, A, B, C, D, z, dt_bias)
    if idx is None:
        if state.shape[0] < b:
            raise ValueError(f"state has {state.shape[0]} slots for batch {b}; pass state_batch_indices "
                             f"or a state with at least {b} rows")
    else:
        if not (isinstance(idx, Tensor) and idx.shape == (b,) and idx.dtype in _INDEX_DTYPES
                and idx.device == x.device):
            v.check_tensor("state_batch_indices", idx, (b,), v.INDEX_DTYPES, x.device)
        if not idx.is_cuda:  # reading CUDA values would synchronise the decode loop: see the docstring
            v.check_indices("state_batch_indices", idx, b, state.shape[0], x.device, pad_value=pad_slot_id)
    return b


class _Plan(PlanKind):
    """What a plain eager call of one kind (same ``_signature``, backend request and flags) needs
    after its first call: the checks passed and the backend is chosen, so only the index values (CPU
    tensors) are checked again and the kernel is launched directly (``launch``; None: reference).
    ``matches`` (``decode_plan.PlanKind``) tells whether a call is of this kind without building its key."""
    __slots__ = ("batch", "slots", "host_indices", "launch")

    def __init__(self, key, flags, b, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx, pad_slot_id, backend):
        super().__init__(key, flags, (D is None, z is None, dt_bias is None, idx is None),
                         (state, x, dt, A, B, C, D, z, dt_bias, idx), _signature)
        self.batch, self.slots = b, state.shape[0]
        self.host_indices = idx is not None and not idx.is_cuda
        self.launch = None if backend == "reference" else _Launch(
            backend, state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), idx, int(pad_slot_id))


_PLANS: dict = {}  # (backend=, SSMKERNELS_BACKEND, flags, _signature) -> _Plan, for plain eager calls
# The last plan used: a decode step calls every Mamba layer with the same kind of arguments, and
# ``_Plan.matches`` (~1.5 us on the CPU development machine) skips building the key (~3.5 us).
_last_plan: Optional[_Plan] = None


def clear_caches() -> None:
    """Forget every plan and launch (the next call of each kind checks and dispatches again)."""
    global _last_plan
    _PLANS.clear()
    _LAUNCHES.clear()
    _last_plan = None




def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
    pad_slot_id: int = -1,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One decode step (or t steps) of the SSM recurrence, in place on ``state`` (drop-in for
    ``mamba_ssm``'s ``selective_state_update``).

    Mamba-2 form: state ``(B_cache, h, p, n)``, x/dt/z ``(b, h, p)``, A ``(h, p, n)``,
    B/C ``(b, g, n)``, D/dt_bias ``(h, p)``; broadcast (stride-0) views such as
    ``A[:, None, None].expand(h, p, n)`` are the expected way to pass per-head values.
    Mamba-1 form: the same without the head axis: state ``(B_cache, d, n)``, x ``(b, d)``,
    B/C ``(b, n)``, A ``(d, n)``, D/dt_bias ``(d,)``.
    Multi-token form: a token axis after the batch axis (x ``(b, t, h, p)``, B ``(b, t, g, n)``;
    Mamba-1 x ``(b, t, d)``) applies t steps in order.

    Args:
        state: float32, bfloat16 or float16 (math is float32 either way); updated in place.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        state_batch_indices: ``(b,)`` int32 or int64: row i reads and writes
            ``state[state_batch_indices[i]]``; rows equal to ``pad_slot_id`` are skipped (output
            zeros, state untouched). Values are checked (ValueError) for CPU tensors; for CUDA
            tensors they are not read on the host (that would synchronise every decode step), and
            the kernels treat any index outside ``[0, B_cache)`` as a padding row.
        backend: None, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out`` shaped like x, in x's dtype.
    """
    global _last_plan
    if plain_eager():
        # Plain eager call: see the module docstring. Under tracing, modes or the profiler, and on
        # the first call of a kind, the full path below runs (it fills the plan cache).
        tensors = (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
        try:
            flags = (backend, config.default_backend(), bool(dt_softplus), int(pad_slot_id))
            plan = _last_plan
            if plan is None or not plan.matches(flags, (D is None, z is None, dt_bias is None,
                                                        state_batch_indices is None), tensors):
                key = (*flags, _signature(*tensors))
                plan = _PLANS.get(key)
                if plan is not None:
                    _last_plan = plan
        except (AttributeError, TypeError, ValueError, RuntimeError):  # not tensors ...: the full path says what
            key = plan = None
        if plan is not None:
            if plan.host_indices:  # CPU index values: checked every call, as on the full path
                v.check_indices("state_batch_indices", state_batch_indices, plan.batch, plan.slots, x.device,
                                pad_value=pad_slot_id)
            if plan.launch is None:
                return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                        state_batch_indices, pad_slot_id)
            return plan.launch(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    else:
        key = None
    b = _check(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id)
    chosen = _backend_for(backend, config.default_backend(), x.device, x.dtype, state.dtype, state.dim() == 3,
                          state_batch_indices is not None, state.shape[-1], b <= SMALL_BATCH)
    if key is not None and all(type(t) in PLAIN_TYPES for t in (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
                               if t is not None):
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = _Plan(key, flags, b, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                            pad_slot_id, chosen)
    if chosen == "reference":
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                state_batch_indices, pad_slot_id)
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices,
                         int(pad_slot_id), chosen)
