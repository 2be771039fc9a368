"""The one dtype rule of SPEC.md: arithmetic and recurrent states are float32 for half and single
precision inputs, float64 for float64 inputs."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of internal accumulation and of returned recurrent states for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
