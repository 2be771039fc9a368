"""Public causal_conv1d / causal_conv1d_update: validation -> dispatch -> custom op (SPEC.md section 1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._core import config, dispatch, native
from ..._core import validation as v
from ..._core.custom_op import (absent, allocator_like, call_op, define_decode_op, eager_autograd, empty_like, kernels,
                                new_empty, on_device_of, placeholder, plain_eager, qualified)
from ..._core.decode_plan import MAX_PLANS, PLAIN_TYPES, PlanKind
from . import reference

PRIMITIVE = "causal_conv1d"
ACTIVATIONS = (None, "silu", "swish")


def layout_of(x: Tensor) -> str:
    """``"channel_first"`` when ``x (b, d, l)`` has unit stride along l, ``"channel_last"`` along d."""
    if x.stride(2) == 1 or x.shape[2] == 1:
        return "channel_first"
    if x.stride(1) == 1:
        return "channel_last"
    return "strided"


def _normalise_layout(x: Tensor) -> Tensor:
    """Kernels take either layout; anything else is copied to channel-first (never rejected)."""
    return x if layout_of(x) != "strided" else x.contiguous()


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op(qualified("causal_conv1d_fwd"), mutates_args=())
def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
              initial_states: Optional[Tensor], cu_seqlens: Optional[Tensor], silu: bool,
              return_final_states: bool, backend: str) -> tuple[Tensor, Tensor]:
    out = empty_like(x)  # keeps x's layout
    final_states = None
    if return_final_states:
        count = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        final_states = new_empty(x, (count, x.shape[1], weight.shape[1] - 1))
    with on_device_of(x):
        kernels(PRIMITIVE, backend).forward(x, weight, bias, seq_idx, initial_states, cu_seqlens, silu,
                                            out, final_states)
    return out, final_states if final_states is not None else placeholder(x)


@_conv_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, cu_seqlens, silu, return_final_states, backend):
    if not return_final_states:
        return torch.empty_like(x), placeholder(x)
    count = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(count, x.shape[1], weight.shape[1] - 1)


@torch.library.custom_op(qualified("causal_conv1d_bwd"), mutates_args=())
def _conv_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
              initial_states: Optional[Tensor], cu_seqlens: Optional[Tensor], dout: Tensor,
              dfinal_states: Optional[Tensor], silu: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx = empty_like(x)
    impl = kernels(PRIMITIVE, backend)
    # Weight and bias gradients are sums over batch and length, accumulated in float32: into zeroed
    # float32 buffers, or (WRITES_PARAM_GRADS) written whole by the backend in their own dtypes.
    if getattr(impl, "WRITES_PARAM_GRADS", False):
        dweight = empty_like(weight)
        dbias = None if bias is None else empty_like(bias)
    else:
        dweight = torch.zeros_like(weight, dtype=torch.float32)
        dbias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
    dinitial = None if initial_states is None else empty_like(initial_states)
    with on_device_of(x):
        impl.backward(x, weight, bias, seq_idx, initial_states, cu_seqlens, dout, dfinal_states, silu,
                      dx, dweight, dbias, dinitial)
    return (dx, dweight.to(weight.dtype),
            placeholder(x) if dbias is None else dbias.to(bias.dtype),
            placeholder(x) if dinitial is None else dinitial)


@_conv_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, cu_seqlens, dout, dfinal_states, silu, backend):
    return (torch.empty_like(x), torch.empty_like(weight),
            placeholder(x) if bias is None else torch.empty_like(bias),
            placeholder(x) if initial_states is None else torch.empty_like(initial_states))


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, cu_seqlens, silu, _, backend = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states, cu_seqlens)
    ctx.silu, ctx.backend = silu, backend


def _backward(ctx, dout, dfinal_states):
    x, weight, bias, seq_idx, initial_states, cu_seqlens = ctx.saved_tensors
    if dfinal_states is not None and dfinal_states.numel() == 0:
        dfinal_states = None
    dx, dweight, dbias, dinitial = call_op(
        _conv_bwd, x, weight, bias, seq_idx, initial_states, cu_seqlens, dout.contiguous() if layout_of(dout) == "strided"
        else dout, dfinal_states, ctx.silu, ctx.backend)
    return (dx, dweight, None if absent(dbias) else dbias, None,
            None if absent(dinitial) else dinitial, None, None, None, None)


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)
_conv_fwd_autograd = eager_autograd(_conv_fwd, _setup_context, _backward)


def _conv_update_impl(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                      cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor], backend: str) -> Tensor:
    out = empty_like(x)
    with on_device_of(x):
        kernels(PRIMITIVE, backend).update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out)
    return out


def _conv_update_fake(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, backend):
    return torch.empty_like(x)


# A decode op: Library.define rather than custom_op, whose mutation bookkeeping cost ~50-100 us a call.
_conv_update, _UPDATE_LIBRARY = define_decode_op(
    "causal_conv1d_update",
    "(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, Tensor? cache_seqlens, "
    "Tensor? conv_state_indices, str backend) -> Tensor",
    _conv_update_impl, _conv_update_fake)


# ----------------------------------------------------------------------------- public API
def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """Depthwise causal 1-D convolution (drop-in for ``causal_conv1d.causal_conv1d_fn``).

    Args:
        x: ``(b, d, l)``, channel-first (``x.stride(2) == 1``) or channel-last (``x.stride(1) == 1``,
            a transposed ``(b, l, d)`` tensor); the output keeps the layout.
        weight: ``(d, w)`` filter taps; ``out[t]`` sees ``x[t-w+1 .. t]``.
        bias: ``(d,)`` or None.
        seq_idx: ``(b, l)`` int32, non-decreasing: positions only see earlier positions of the same
            sequence (packed sequences).
        initial_states: ``(b, d, w-1)`` inputs before position 0 (``(s, d, w-1)`` with cu_seqlens);
            they feed the row's first sequence only.
        return_final_states: also return the last ``w-1`` inputs of each row's last sequence
            (of each sequence with cu_seqlens).
        final_states_out: optional preallocated ``(b, d, w-1)`` buffer that receives them.
        activation: None, ``"silu"`` or ``"swish"``.
        cu_seqlens: ``(s+1,)`` int32 sequence boundaries along l; needs ``b == 1``.
        backend: None (fastest available), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out (b, d, l)`` in x's dtype, or ``(out, final_states)`` when return_final_states.
    """
    v.check_tensor("x", x)
    v.check_ndim("x", x, (3,))
    b, d, l = x.shape
    v.check_ndim("weight", weight, (2,))
    v.check_tensor("weight", weight, (d, None), device=x.device)
    w = weight.shape[1]
    v.check_tensor("bias", bias, (d,), device=x.device, optional=True)
    v.check_choice("activation", activation, ACTIVATIONS)
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("pass either seq_idx or cu_seqlens, not both")
    count = b
    if seq_idx is not None:
        v.check_seq_idx(seq_idx, b, l, x.device)
    if cu_seqlens is not None:
        count = v.check_cu_seqlens(cu_seqlens, b, l, x.device)
    v.check_tensor("initial_states", initial_states, (count, d, w - 1), device=x.device, optional=True)
    v.check_tensor("final_states_out", final_states_out, (count, d, w - 1), device=x.device, optional=True)

    features = {"dtype": x.dtype, "weight_dtype": weight.dtype, "width": w, "layout": layout_of(x),
                "seq_idx": seq_idx is not None, "cu_seqlens": cu_seqlens is not None,
                "initial_states": initial_states is not None,
                "final_states": return_final_states or final_states_out is not None}
    chosen = dispatch.traced_select_backend(PRIMITIVE, backend, x.device, features)
    want_final = features["final_states"]
    if chosen == "reference":
        out, final = reference.causal_conv1d(x, weight, bias, seq_idx, initial_states, True, None,
                                             activation, cu_seqlens)
    else:
        out, final = _conv_fwd_autograd(
            _normalise_layout(x), weight.contiguous(), None if bias is None else bias.contiguous(),
            v.as_int32(seq_idx), None if initial_states is None else initial_states.to(x.dtype).contiguous(),
            v.as_int32(cu_seqlens), activation is not None, want_final, chosen)
    if final_states_out is not None:
        final_states_out.copy_(final)
    return (out, final) if return_final_states else out


def _update_signature(x, conv_state, weight, bias, cache_seqlens, conv_state_indices) -> tuple:
    """What validation, the backend choice and the launch arguments depend on (a plan's key)."""
    return tuple(None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)
                 for t in (x, conv_state, weight, bias, cache_seqlens, conv_state_indices))


class _UpdatePlan(PlanKind):
    """A plain eager decode call of one kind after its first call (same signature, flags, backend
    request): the checks passed and the backend is chosen, so a later call re-checks only CPU index
    values and launches directly, without the op dispatcher. On the CUDA backend the native params
    are prepared once too (``prepare_update``). Host time per call is what a decode loop without
    CUDA graphs waits on: the batch-256 step's kernel takes ~10-40 us. ``matches``
    (``decode_plan.PlanKind``) tells whether a call is of this kind without building its key."""
    __slots__ = ("silu", "module", "prepared", "device_index", "size", "stride", "dtype", "allocate",
                 "batch", "slots", "host_indices", "to_int32", "weight_contiguous")

    def __init__(self, key, flags, x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, backend):
        super().__init__(key, flags, (bias is None, cache_seqlens is None, conv_state_indices is None),
                         (x, conv_state, weight, bias, cache_seqlens, conv_state_indices), _update_signature)
        self.silu = silu
        self.batch, self.slots = x.shape[0], conv_state.shape[0]
        self.host_indices = conv_state_indices is not None and not conv_state_indices.is_cuda
        self.to_int32 = any(t is not None and t.dtype != torch.int32 for t in (cache_seqlens, conv_state_indices))
        self.weight_contiguous = weight.is_contiguous()
        self.device_index = x.get_device()  # -1 on the CPU (Triton's interpreter)
        self.module = None if backend == "reference" else kernels(PRIMITIVE, backend)
        out = torch.empty_like(x)
        self.size, self.stride, self.dtype = tuple(out.shape), out.stride(), out.dtype
        self.allocate = allocator_like(out)
        self.prepared = None
        if backend == "cuda":
            self.prepared = self.module.prepare_update(x, conv_state, weight.contiguous(), bias, silu,
                                                       v.as_int32(cache_seqlens), v.as_int32(conv_state_indices), out)

    def __call__(self, x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
        if self.host_indices:  # CPU index values: checked every call, as on the full path
            v.check_indices("conv_state_indices", conv_state_indices, self.batch, self.slots, x.device)
        if self.module is None:
            return reference.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                                  conv_state_indices)
        if not self.weight_contiguous:
            weight = weight.contiguous()
        if self.to_int32:
            cache_seqlens, conv_state_indices = v.as_int32(cache_seqlens), v.as_int32(conv_state_indices)
        out = empty_like(x) if config.poison_outputs() else self.allocate(self.size, self.stride, self.dtype)
        if self.prepared is not None:
            self.module.launch_update(self.prepared, x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                                      out)
        else:
            self.module.update(x, conv_state, weight, bias, self.silu, cache_seqlens, conv_state_indices, out)
        return out


_UPDATE_PLANS: dict = {}  # (backend=, SSMKERNELS_BACKEND, activation, _update_signature) -> _UpdatePlan
# The last plan used: a decode step calls every layer's conv with the same kind of arguments.
_last_update_plan: Optional[_UpdatePlan] = None


def clear_caches() -> None:
    """Forget every decode plan (the next call of each kind checks and dispatches again)."""
    global _last_update_plan
    _UPDATE_PLANS.clear()
    _last_update_plan = None


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[Tensor] = None,
    conv_state_indices: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Decode step(s) of the causal conv; updates ``conv_state`` in place (drop-in for
    ``causal_conv1d.causal_conv1d_update``).

    Args:
        x: ``(b, d)`` one new token, or ``(b, d, t)`` for t new tokens (speculative decoding).
        conv_state: ``(B_cache, d, s)`` with ``s >= w-1``: the last s inputs of each cached sequence.
        weight: ``(d, w)``; bias: ``(d,)`` or None; activation: None, ``"silu"`` or ``"swish"``.
        cache_seqlens: ``(b,)`` int32: treat the state as a circular buffer whose newest token sits
            at ``(cache_seqlens[i] - 1) mod s``; new token j goes to ``(cache_seqlens[i] + j) mod s``.
        conv_state_indices: ``(b,)`` int32: row i uses ``conv_state[conv_state_indices[i]]``; a
            negative index is a padding slot (zeros out, state untouched). Values are checked
            (ValueError) for CPU tensors; CUDA tensors are not read on the host (that would
            synchronise every decode step), and the kernels treat an index past the cache as a
            padding slot too, so a bad index never writes out of bounds.
        backend: None, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out`` shaped like x.

    A plain eager call (no torch.compile, modes, functorch or profiler) of a kind seen before takes
    a plan (``_UpdatePlan``) instead of the checks, the backend choice and the op dispatcher.
    """
    global _last_update_plan
    key = None
    if plain_eager():
        try:
            flags = (backend, config.default_backend(), activation)
            tensors = (x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
            plan = _last_update_plan
            absent = (bias is None, cache_seqlens is None, conv_state_indices is None)
            if plan is None or not plan.matches(flags, absent, tensors):
                key = (*flags, _update_signature(*tensors))
                plan = _UPDATE_PLANS.get(key)
                if plan is not None:
                    _last_update_plan = plan
        except (AttributeError, TypeError):  # not tensors, unhashable arguments: the full path says what
            key = plan = None
        if plan is not None and (plan.device_index < 0 or plan.device_index == native.current_device()):
            return plan(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    v.check_tensor("x", x)
    v.check_ndim("x", x, (2, 3))
    b, d = x.shape[:2]
    v.check_ndim("conv_state", conv_state, (3,))
    v.check_tensor("conv_state", conv_state, (None, d, None), device=x.device)
    v.check_ndim("weight", weight, (2,))
    v.check_tensor("weight", weight, (d, None), device=x.device)
    w = weight.shape[1]
    if conv_state.shape[2] < w - 1:
        raise ValueError(f"conv_state must hold at least w-1 = {w - 1} steps, got shape {tuple(conv_state.shape)}")
    v.check_tensor("bias", bias, (d,), device=x.device, optional=True)
    v.check_choice("activation", activation, ACTIVATIONS)
    if conv_state_indices is None:
        if conv_state.shape[0] < b:
            raise ValueError(f"conv_state has {conv_state.shape[0]} slots for batch {b}; pass conv_state_indices "
                             f"or a state with at least {b} rows")
    else:
        v.check_tensor("conv_state_indices", conv_state_indices, (b,), v.INDEX_DTYPES, x.device)
        if not conv_state_indices.is_cuda:  # CUDA values are not read on the host: see the docstring
            v.check_indices("conv_state_indices", conv_state_indices, b, conv_state.shape[0], x.device)
    v.check_tensor("cache_seqlens", cache_seqlens, (b,), v.INDEX_DTYPES, x.device, optional=True)

    features = {"dtype": x.dtype, "state_dtype": conv_state.dtype, "width": w,
                "state_len": conv_state.shape[2], "tokens": 1 if x.dim() == 2 else x.shape[2],
                "cache_seqlens": cache_seqlens is not None, "indices": conv_state_indices is not None}
    chosen = dispatch.traced_select_backend(PRIMITIVE, backend, x.device, features)
    if key is not None and all(type(t) in PLAIN_TYPES for t in (x, conv_state, weight, bias, cache_seqlens,
                                                                   conv_state_indices) if t is not None):
        if len(_UPDATE_PLANS) >= MAX_PLANS:
            _UPDATE_PLANS.clear()
        _UPDATE_PLANS[key] = _UpdatePlan(key, key[:3], x, conv_state, weight, bias, activation is not None,
                                         cache_seqlens, conv_state_indices, chosen)
    if chosen == "reference":
        return reference.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                              conv_state_indices)
    return _conv_update(x, conv_state, weight.contiguous(), bias, activation is not None,
                        v.as_int32(cache_seqlens), v.as_int32(conv_state_indices), chosen)
