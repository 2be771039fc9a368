"""Helpers shared by the ops' ``torch.library`` registrations.

Every kernel-backed primitive is a pair of custom ops ``ssmkernels::<name>_fwd`` / ``_bwd`` taking a
``backend: str`` argument ("triton" or "cuda"), with shape-only fake kernels, glued into autograd
by ``torch.library.register_autograd``. The reference backend needs none of this: it is plain
PyTorch and differentiates itself.
"""
from __future__ import annotations

import importlib

import torch

from . import config

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


