"""Helpers shared by the ops' ``torch.library`` registrations.

Every kernel-backed primitive is a pair of custom ops ``ssmkernels::<name>_fwd`` / ``_bwd`` taking a
``backend: str`` argument ("triton" or "cuda"), with shape-only fake kernels, glued into autograd
by ``torch.library.register_autograd``. The reference backend needs none of this: it is plain
PyTorch and differentiates itself.

Plain eager calls skip the custom-op machinery (``eager_autograd``, ``call_op``): nothing can observe
the op there, and torch.library.custom_op with register_autograd cost ~900 us of host time per
causal_conv1d fwd+bwd step on the H200 machine, more than the kernels' ~600 us (the GPU waited).
Under tracing (torch.compile, make_fx, FakeTensorMode), other modes, functorch transforms and the
profiler, the custom ops run as before.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch

from . import config, native

NAMESPACE = "ssmkernels"


def qualified(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def define_decode_op(name: str, schema: str, impl, fake):
    """``ssmkernels::<name>``, an in-place decode op, as ``Library.define`` + ``impl``; returns the
    op's default overload and the library (keep it alive).

    Not ``torch.library.custom_op``: its mutation bookkeeping rebuilds the argument list on every
    call, ~100 us, more than the decode kernels take. Not differentiable (decode only): autograd
    passes straight through, so ``out`` never carries a grad_fn, and a backward through it fails
    loudly instead of returning wrong gradients."""
    library = torch.library.Library(NAMESPACE, "FRAGMENT")
    library.define(f"{name}{schema}")
    library.impl(name, impl, "CompositeExplicitAutograd")
    library.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(qualified(name), fake, lib=library)
    return getattr(torch.ops.ssmkernels, name).default, library


_KERNEL_MODULES: dict = {}  # (primitive, backend) -> module: import_module costs microseconds per call


def kernels(primitive: str, backend: str):
    """The module holding ``primitive``'s kernels for ``backend`` (``triton`` or ``cuda``)."""
    module = _KERNEL_MODULES.get((primitive, backend))
    if module is None:
        if backend not in ("triton", "cuda"):
            raise ValueError(f"kernel backend must be 'triton' or 'cuda', got {backend!r}")
        module = _KERNEL_MODULES[(primitive, backend)] = importlib.import_module(f"ssmkernels.ops.{primitive}.{backend}")
    return module


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output buffer shaped (and laid out) like ``t``; NaN-filled under SSMKERNELS_POISON_OUTPUTS=1."""
    out = torch.empty_like(t, dtype=dtype or t.dtype)
    return out.fill_(float("nan")) if config.poison_outputs() and out.is_floating_point() else out


def allocator_like(like: torch.Tensor):
    """``allocate(size, stride, dtype)`` of an uninitialised tensor on ``like``'s device (the current
    one): inductor's ``empty_strided_{cpu,cuda}`` (~0.5 us) where this torch has it and it makes
    what ``torch.empty_like`` makes, else ``torch.empty_strided`` (~1.5 us: the dispatcher)."""
    device = like.device

    def public(size, stride, dtype):
        return torch.empty_strided(size, stride, dtype=dtype, device=device)

    try:
        fast = getattr(torch._C._dynamo.guards, f"_empty_strided_{device.type}")
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            made = fast(tuple(like.shape), like.stride(), like.dtype)  # exact tuples, not torch.Size
    except Exception:  # an older or newer torch without it, or with another signature
        return public
    same = (type(made) is torch.Tensor and made.shape == like.shape and made.stride() == like.stride()
            and made.dtype == like.dtype and made.device == device and not made.requires_grad)
    return fast if same else public


def on_device_of(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is the current one, for the kernels launched inside:
    Triton launches on the current device, and a native launch on another device's stream fails.
    A no-op on the CPU and where that device is current already (the usual case, ~0.3 us)."""
    if t.device.type != "cuda" or t.device.index == native.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def new_empty(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output buffer of ``shape`` on ``like``'s device; NaN-filled under SSMKERNELS_POISON_OUTPUTS=1."""
    out = like.new_empty(shape, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if config.poison_outputs() and out.is_floating_point() else out


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """A 0-element tensor standing for an output that was not asked for (custom ops return tensors)."""
    return like.new_empty(0)


def absent(t: torch.Tensor | None) -> bool:
    return t is None or t.numel() == 0


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a backward of a call on these inputs (a dispatch feature: a
    backend may serve the forward but not that backward, e.g. in deterministic mode)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# What makes the custom op necessary: Dynamo tracing, a TorchDispatchMode (FakeTensorMode,
# functionalization and proxy tracing included), a TorchFunctionMode, a functorch transform (vmap,
# grad, functionalize), the profiler (which records the op). Each check is a ~50 ns C call.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_profiling = torch._C._autograd._profiler_enabled


def plain_eager() -> bool:
    """Whether nothing could observe a custom op here: not under Dynamo, no dispatch or function mode,
    no functorch transform, the profiler off. Then the op's implementation may run directly."""
    return not (_is_compiling() or _dispatch_modes() or _function_modes() or _functorch_active() or _profiling())


def _implementation(op) -> Callable | None:
    """The Python function behind a ``torch.library.custom_op`` (its private ``_init_fn``; None where a
    torch version lacks it, and then the op always runs through the dispatcher)."""
    fn = getattr(op, "_init_fn", None)
    return fn if callable(fn) else None


def call_op(op, *args):
    """``op(*args)``, or in plain eager mode its implementation called directly (same result)."""
    impl = _implementation(op)
    return impl(*args) if impl is not None and plain_eager() else op(*args)


def eager_autograd(op, setup_context: Callable, backward: Callable) -> Callable:
    """``call(*args)`` for a custom op registered with ``op.register_autograd(backward,
    setup_context=setup_context)``: in plain eager mode an autograd.Function that runs the op's
    implementation and the same two functions (as torch's generated Function does: zeros for the
    outputs without a gradient unless setup_context turns that off), else the op itself. Arguments
    are positional, as the op's schema lists them."""
    impl = _implementation(op)
    if impl is None:
        return op

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"Eager_{getattr(op, '_name', 'op').replace('::', '_')}"

    def call(*args):
        return EagerFunction.apply(*args) if plain_eager() else op(*args)

    return call
