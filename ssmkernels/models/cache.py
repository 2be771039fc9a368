"""Inference cache of the hybrid: constant-size Mamba states, preallocated KV caches.

Per Mamba-2 block: ``conv_state (b, conv_dim, w-1)`` in the model dtype (the last ``w-1`` conv
inputs) and ``ssm_state (b, h, p, n)`` in float32 (float64 for a float64 model). Their size does
not depend on the context length. Per attention block: ``k, v (b, n_kv_heads, max_seqlen,
head_dim)``, allocated once. Every tensor is updated in place, so the addresses stay fixed (what a
CUDA graph of the decode step needs).

Batches of prompts with different lengths are left-padded: all rows share one position counter
(``seqlen_offset``) and ``key_valid (b, max_seqlen)`` marks which cached positions are real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .blocks import compute_dtype
from .config import HybridConfig


@dataclass
class MambaState:
    conv_state: Tensor  # (b, conv_dim, w - 1)
    ssm_state: Tensor   # (b, h, p, n), float32 (float64 for float64 models)

    def tensors(self) -> list[Tensor]:
        return [self.conv_state, self.ssm_state]


@dataclass
class KVCache:
    k: Tensor  # (b, n_kv_heads, max_seqlen, head_dim)
    v: Tensor

    def append(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write ``k, v (b, n_kv, l, d)`` at positions ``start..start+l``; return the filled prefix."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions needed, the cache was made for "
                             f"max_seqlen={self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]


class HybridCache:
    """States of one batch of sequences; made by :meth:`HybridLM.new_cache`.

    Attributes:
        mamba: layer index -> :class:`MambaState`.
        attention: layer index -> :class:`KVCache`.
        seqlen_offset: tokens consumed so far (the same for every row; left padding counts).
        key_valid: ``(b, max_seqlen)`` bool, which positions hold real tokens, or None while no
            padding was ever passed (then every position is real).
    """

    def __init__(self, cfg: HybridConfig, batch_size: int, max_seqlen: int, device=None,
                 dtype: torch.dtype = torch.float32, ssm_state_dtype: Optional[torch.dtype] = None):
        if batch_size < 1 or max_seqlen < 1:
            raise ValueError(f"batch_size and max_seqlen must be positive, got {batch_size} and {max_seqlen}")
        self.batch_size, self.max_seqlen = batch_size, max_seqlen
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        state_dtype = ssm_state_dtype or compute_dtype(dtype)
        self.mamba: dict[int, MambaState] = {}
        self.attention: dict[int, KVCache] = {}
        for i, kind in enumerate(cfg.layer_kinds()):
            if kind == "mamba":
                self.mamba[i] = MambaState(
                    torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype),
                    torch.zeros(batch_size, cfg.mamba_heads, cfg.headdim, cfg.d_state, device=device,
                                dtype=state_dtype))
            elif kind == "attention":
                shape = (batch_size, cfg.n_kv_heads, max_seqlen, cfg.attn_head_dim)
                self.attention[i] = KVCache(torch.zeros(shape, device=device, dtype=dtype),
                                            torch.zeros(shape, device=device, dtype=dtype))
        self.seqlen_offset = 0
        self.key_valid: Optional[Tensor] = None
        # Graph-safe decode (see set_static): the position lives on the device.
        self.static = False
        self.position = torch.zeros(1, dtype=torch.long, device=device)

    def set_static(self, enabled: bool = True) -> None:
        """Decode steps without host-side positions: attention writes the new key/value at
        ``position`` (a device tensor) and attends over all ``max_seqlen`` slots under a mask. Same
        results; needed to capture the step in a CUDA graph (costs attention over the full cache)."""
        self.static = bool(enabled)
        if self.static and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.max_seqlen, dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ bookkeeping
    def begin(self, l: int, mask: Optional[Tensor]) -> None:
        """Called by the model before a forward of ``l`` tokens (``mask (b, l)`` 1 = real token)."""
        end = self.seqlen_offset + l
        if end > self.max_seqlen:
            raise ValueError(f"the cache holds max_seqlen={self.max_seqlen} positions; {self.seqlen_offset} are "
                             f"used and {l} more were passed")
        if self.static:
            self.position.fill_(self.seqlen_offset)
        if mask is None and self.key_valid is None:
            return
        if self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.max_seqlen, dtype=torch.bool, device=self.device)
        self.key_valid[:, self.seqlen_offset:end] = True if mask is None else mask.bool()

    def advance(self, l: int) -> None:
        self.seqlen_offset += l

    def reset(self) -> None:
        """Back to an empty context (zero states), keeping the buffers."""
        for t in self.tensors():
            t.zero_()
        self.seqlen_offset = 0
        self.key_valid = None
        self.position.zero_()
        if self.static:
            self.set_static(True)

    # ------------------------------------------------------------------ memory accounting
    def tensors(self) -> list[Tensor]:
        out = [t for s in self.mamba.values() for t in s.tensors()]
        return out + [t for s in self.attention.values() for t in s.tensors()]

    def mamba_nbytes(self) -> int:
        """Bytes of all Mamba states: independent of the context length."""
        return sum(t.numel() * t.element_size() for s in self.mamba.values() for t in s.tensors())

    def attention_nbytes(self) -> int:
        """Bytes of all KV caches: ``2 * layers * b * n_kv * max_seqlen * head_dim * itemsize``."""
        return sum(t.numel() * t.element_size() for s in self.attention.values() for t in s.tensors())

    def nbytes(self) -> int:
        return self.mamba_nbytes() + self.attention_nbytes()

    def __repr__(self) -> str:
        return (f"HybridCache(batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, "
                f"seqlen_offset={self.seqlen_offset}, mamba_layers={len(self.mamba)}, "
                f"attention_layers={len(self.attention)}, mamba_bytes={self.mamba_nbytes()}, "
                f"attention_bytes={self.attention_nbytes()})")
