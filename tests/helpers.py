"""Shared test machinery: devices, backends under test, and the SPEC comparison of a kernel run
against the float64 reference (forward and backward) through one helper."""
from __future__ import annotations

from typing import Callable

import torch

from ssmkernels._core.tolerance import assert_spec_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Kernel backends exercised here: on CPU only Triton, through its interpreter.
KERNEL_BACKENDS = ("triton", "cuda") if ON_GPU else ("triton",)
# The interpreter is slow and mishandles bf16 tl.dot: CPU runs use float32 and float16 only.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


def floats_as(value, dtype: torch.dtype):
    """``value`` cast to ``dtype`` if it is a floating-point tensor, keeping its memory layout."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return copy_keeping_layout(value, dtype)
    return value


def copy_keeping_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached copy with ``t``'s strides: sliced (non-contiguous) inputs stay sliced and broadcast
    (stride-0) inputs stay broadcast, so kernels see the layout the test meant to exercise."""
    t = t.detach()
    dtype = dtype or t.dtype
    broadcast = [d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]
    if broadcast:
        base = t
        for d in broadcast:
            base = base.narrow(d, 0, 1)
        return copy_keeping_layout(base, dtype).expand(t.shape)
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
    return out.copy_(t)


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def compare_with_reference(
    fn: Callable,
    inputs: dict,
    backend: str,
    grad_names: tuple[str, ...] = (),
    keep_dtype: tuple[str, ...] = (),
    label: str = "",
) -> None:
    """Run ``fn(**inputs, backend=backend)`` and check it against the reference by the SPEC rule.

    ``inputs`` are in the dtype under test (the first floating input's dtype defines it). The
    reference runs twice: on float64 copies (the truth) and on the inputs as given (its own
    rounding error sets the tolerance). Names in ``keep_dtype`` are not upcast in the float64 run
    (e.g. integer-like or state tensors that must keep their dtype). Gradients of ``grad_names``
    are compared after a backward with the same random upstream gradients.
    """
    dtype = next(v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())

    def prepare(target_dtype):
        prepared = {}
        for name, value in inputs.items():
            cast = value if (target_dtype is None or name in keep_dtype) else floats_as(value, target_dtype)
            if isinstance(cast, torch.Tensor):
                cast = copy_keeping_layout(cast)
                if name in grad_names:
                    cast.requires_grad_(True)
            prepared[name] = cast
        return prepared

    runs = {}
    for key, target, be in (("ref64", torch.float64, "reference"), ("ref_lowp", None, "reference"),
                            ("kernel", None, backend)):
        args = prepare(target)
        outs = _outputs(fn(**args, backend=be))
        runs[key] = (args, outs)

    kernel_outs = runs["kernel"][1]
    for i, ref64 in enumerate(runs["ref64"][1]):
        assert_spec_close(f"{label} output {i}", kernel_outs[i], ref64, runs["ref_lowp"][1][i], dtype)

    if not grad_names:
        return
    upstream = [torch.randn_like(o, dtype=torch.float64) for o in runs["ref64"][1]]
    grads = {}
    for key, (args, outs) in runs.items():
        loss = sum((o.to(torch.float64) * g.to(o.device)).sum() for o, g in zip(outs, upstream) if o.requires_grad)
        tensors = [args[name] for name in grad_names]
        grads[key] = torch.autograd.grad(loss, tensors, allow_unused=True)
    for name, g64, g_lowp, g_kernel in zip(grad_names, grads["ref64"], grads["ref_lowp"], grads["kernel"]):
        if g64 is None:
            continue
        assert g_kernel is not None, f"{label}: no gradient for {name}"
        assert_spec_close(f"{label} grad {name}", g_kernel, g64, g_lowp, dtype)


def run_opcheck(op, args: tuple, kwargs: dict | None = None) -> None:
    """``torch.library.opcheck`` on one of our custom ops (schema, fake kernel, autograd registration).

    ``op`` is e.g. ``torch.ops.ssmkernels.causal_conv1d_fwd.default``; a failure raises with
    opcheck's own report of which check broke.
    """
    results = torch.library.opcheck(op, args, kwargs or {},
                                    test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    failed = {name: result for name, result in results.items() if result != "SUCCESS"}
    assert not failed, f"opcheck failed for {op}: {failed}"
