"""What the Python side passes to the torch-free native module: addresses, dtype codes, streams."""
from __future__ import annotations

import torch

# Must match ssmk::DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def address(t: torch.Tensor | None) -> int:
    """Raw device address of ``t`` (0 for None: kernels treat a null pointer as 'absent')."""
    return 0 if t is None else t.data_ptr()


def strides(t: torch.Tensor | None, ndim: int) -> list[int]:
    """``t``'s strides in elements (zeros for None), for the 64-bit stride fields of params structs."""
    return [0] * ndim if t is None else list(t.stride())


def _raw_stream_function():
    """torch's current stream on a device index as a raw handle (what :func:`stream_of` gives) without
    building a Stream object (~2 us less per call); inductor's generated code calls the same function."""
    function = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if function is None:  # not exported by this torch build: the public way
        def function(index):
            return torch.cuda.current_stream(index).cuda_stream
    return function


raw_stream = _raw_stream_function()
# torch's current CUDA device (``torch.cuda.current_device()`` without its Python layers).
current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def stream_of(t: torch.Tensor) -> int:
    """Handle of torch's current stream on ``t``'s device, so kernels order with torch's work."""
    return raw_stream(t.get_device())
