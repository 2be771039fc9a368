"""HybridLM: embedding -> pre-norm residual blocks (Mamba-2 / attention / MLP) -> RMSNorm -> LM head."""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .blocks import Block, Mamba2Mixer, RMSNorm
from .cache import HybridCache
from .config import HybridConfig


class HybridLM(nn.Module):
    """The reference hybrid language model of SPEC.md, built only on ssmkernels primitives.

    ``model(input_ids)`` returns logits ``(b, l, vocab_size)``. With ``cache=`` (from
    :meth:`new_cache`) the call continues the cached sequences: a prompt or prompt chunk
    (``l > 1``) is a prefill, ``l == 1`` a decode step; the cache advances by ``l``.
    Module names follow transformers' NemotronH (``embeddings``, ``layers.i.norm``,
    ``layers.i.mixer``, ``norm_f``, ``lm_head``).
    """

    def __init__(self, cfg: HybridConfig, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        cfg = cfg.replace()  # a private copy (validated): setting model.backend leaves the caller's config alone
        self.cfg = cfg
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.layers = nn.ModuleList(Block(cfg, i, kind) for i, kind in enumerate(cfg.layer_kinds()))
            self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self._init_weights()
        if dtype is not None:
            self.to(dtype)

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.embeddings.weight.is_meta:
            return
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        # GPT-2 style: scale the residual-stream output projections by 1/sqrt(2 * layers).
        scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers:
            mixer = block.mixer
            for name in ("out_proj", "o_proj", "down_proj"):
                if hasattr(mixer, name):
                    getattr(mixer, name).weight.mul_(scale)
            if isinstance(mixer, Mamba2Mixer):
                mixer.reset_ssm_parameters()

    @property
    def backend(self) -> Optional[str]:
        """Backend of every primitive call (``None``: the fastest available per call)."""
        return self.cfg.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.cfg.backend = value
        self.cfg.validate()

    def num_parameters(self) -> int:
        """Parameters, counting a tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, cache: Optional[HybridCache] = None,
                attention_mask: Optional[Tensor] = None, logits_to_keep: int = 0,
                seq_idx: Optional[Tensor] = None) -> Tensor:
        """Logits of ``input_ids (b, l)`` int64.

        Args:
            input_ids: ``(b, l)`` token ids.
            cache: a :class:`HybridCache` to continue (prefill when ``l > 1``, decode step when
                ``l == 1``); it advances by ``l``. None: a plain full-sequence forward.
            attention_mask: ``(b, l)`` 1 for tokens, 0 for left padding (batched prompts of
                different lengths). Padding must precede every token of its row.
            logits_to_keep: compute only the last ``k`` positions' logits (0 = all).
            seq_idx: ``(b, l)`` int32, non-decreasing: packed sequences (training without a cache);
                positions only see earlier positions with the same value, in every block.

        Returns:
            ``(b, l, vocab_size)`` (or ``(b, k, vocab_size)``) logits in the model dtype.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, l):
            raise ValueError(f"attention_mask must have shape {(b, l)}, got {tuple(attention_mask.shape)}")
        if seq_idx is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("seq_idx (packed sequences) goes without cache and attention_mask")
            if tuple(seq_idx.shape) != (b, l):
                raise ValueError(f"seq_idx must have shape {(b, l)}, got {tuple(seq_idx.shape)}")
            seq_idx = seq_idx.to(torch.int32)
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache was made for batch {cache.batch_size}, input_ids has batch {b}")
            cache.begin(l, attention_mask)
        logits = self.forward_body(input_ids, cache, attention_mask, logits_to_keep, seq_idx)
        if cache is not None:
            cache.advance(l)
        return logits

    def forward_body(self, input_ids: Tensor, cache: Optional[HybridCache] = None,
                     attention_mask: Optional[Tensor] = None, logits_to_keep: int = 0,
                     seq_idx: Optional[Tensor] = None) -> Tensor:
        """The layers without the cache bookkeeping (``begin`` / ``advance``): what a CUDA graph captures."""
        hidden = self.embeddings(input_ids)
        for block in self.layers:
            hidden = block(hidden, cache, attention_mask, seq_idx)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(self.norm_f(hidden))

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch_size: int, max_seqlen: int, device=None, dtype: Optional[torch.dtype] = None,
                  ssm_state_dtype: Optional[torch.dtype] = None) -> HybridCache:
        """Empty states for ``batch_size`` sequences of up to ``max_seqlen`` tokens (prompt included).

        Mamba blocks get constant-size conv/SSM states; attention blocks a preallocated KV cache.
        Device and dtype default to the model's; SSM states are float32 (float64 for float64).
        """
        weight = self.embeddings.weight
        return HybridCache(self.cfg, batch_size, max_seqlen, device=device or weight.device,
                           dtype=dtype or weight.dtype, ssm_state_dtype=ssm_state_dtype)

    @torch.no_grad()
    def generate(self, input_ids: Union[Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
                 temperature: float = 0.0, **kwargs) -> Tensor:
        """Greedy (``temperature=0``) or sampled continuation; see :func:`generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None,
                        backend: Optional[str] = None) -> "HybridLM":
        """Load a local Hugging Face directory of ``Mamba2ForCausalLM`` or ``NemotronHForCausalLM``
        (``config.json`` + ``*.safetensors``); see :mod:`ssmkernels.models.hf`."""
        from .hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, backend=backend)

