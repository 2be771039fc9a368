"""Input checks shared by every public function.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device, value)
naming the argument, what it got and what was expected. Kernels assume these checks passed.

Value checks (monotone ``seq_idx``, valid ``cu_seqlens``, index ranges) read tensor contents and so
synchronise with the GPU; they are skipped while a CUDA graph is being captured or ``torch.compile``
is tracing, where a host read is impossible.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def can_read_values(t: torch.Tensor) -> bool:
    """Whether it is safe to look at tensor values on the host right now."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(
    name: str,
    t,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    optional: bool = False,
) -> None:
    """Check ``t`` is a tensor with the given shape (``None`` entries match any size), dtype, device."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {expected}, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the main input, got {_describe(t)}")


def check_ndim(name: str, t: torch.Tensor, allowed: Sequence[int]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in allowed:
        dims = " or ".join(f"{n}-D" for n in allowed)
        raise ValueError(f"{name} must be {dims}, got {_describe(t)}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(name: str, value, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")


def check_chunk_size(chunk_size) -> None:
    """SSD chunk sizes: powers of two from 16 to 256 (the kernels tile by them)."""
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 16
        or chunk_size > 256
        or chunk_size & (chunk_size - 1)
    ):
        raise ValueError(f"chunk_size must be a power of two in [16, 256], got {chunk_size!r}")


def check_seq_idx(seq_idx: torch.Tensor, batch: int, seqlen: int, device: torch.device) -> None:
    check_tensor("seq_idx", seq_idx, (batch, seqlen), INDEX_DTYPES, device)
    if seqlen > 1 and can_read_values(seq_idx):
        if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be non-decreasing along the sequence axis")


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int, device: torch.device) -> int:
    """Check ``cu_seqlens (s+1,)``; returns the number of sequences ``s``."""
    check_tensor("cu_seqlens", cu_seqlens, (None,), INDEX_DTYPES, device)
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along l), got batch {batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries (0 and the total length), got {cu_seqlens.numel()}")
    if can_read_values(cu_seqlens):
        values = cu_seqlens.tolist()
        if values[0] != 0 or values[-1] != total:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at the sequence length {total}, "
                f"got first {values[0]} and last {values[-1]}"
            )
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
    return cu_seqlens.numel() - 1


def check_indices(name: str, idx: torch.Tensor, batch: int, upper: int, device: torch.device,
                  pad_value: int | None = None) -> None:
    """Check a per-row index tensor ``(batch,)`` with values in ``[0, upper)`` or the pad value."""
    check_tensor(name, idx, (batch,), INDEX_DTYPES, device)
    if can_read_values(idx) and idx.numel():
        valid = (idx >= 0) & (idx < upper)
        if pad_value is not None:
            valid |= idx == pad_value
        else:
            valid |= idx < 0  # negative entries are padding slots
        if not bool(valid.all()):
            bad = idx[~valid][0].item()
            raise ValueError(f"{name} holds {bad}, outside [0, {upper}) and not a padding slot")


def check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of floats (low, high), got {dt_limit!r}") from None
    if not low <= high:
        raise ValueError(f"dt_limit must have low <= high, got {dt_limit!r}")
    return low, high


def as_int32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int32)
