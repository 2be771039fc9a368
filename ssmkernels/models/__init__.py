"""ssmkernels.models: a thin Mamba-2 / attention / MLP hybrid language model built on the primitives.

Public API (SPEC.md, "Reference hybrid model")::

    cfg = HybridConfig(pattern="M-M*-", vocab_size=..., d_model=..., ...)   # or HybridConfig.tiny()
    model = HybridLM(cfg)
    logits = model(input_ids)                       # (b, l) -> (b, l, vocab_size)
    cache = model.new_cache(batch_size, max_seqlen)
    logits = model(input_ids, cache=cache)          # prefill or decode step; advances the cache
    tokens = model.generate(input_ids, max_new_tokens, temperature=0.0)
    model = HybridLM.from_pretrained(path)          # local HF Mamba2 / NemotronH directory

Design choices:
- Layout and names follow mamba_ssm's ``Mamba2`` and transformers' ``NemotronH`` (``embeddings``,
  ``layers.i.norm``, ``layers.i.mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}``,
  ``q/k/v/o_proj``, ``up/down_proj``, ``norm_f``, ``lm_head``): checkpoints map by a prefix change.
- The gated norm is ``norm(y * silu(z))`` over ``ngroups`` groups (mamba_ssm's RMSNormGated with
  ``norm_before_gate=False``); ``ssd_chunk_scan`` runs with ``z=None``.
- Cache (:class:`HybridCache`): per Mamba block ``conv_state (b, conv_dim, d_conv - 1)`` in the
  model dtype and ``ssm_state (b, h, p, n)`` in float32 (float64 for float64 models), constant in
  the context length; per attention block a preallocated ``(b, kv_heads, max_seqlen, head_dim)``
  K and V. Calls with ``l > 1`` prefill (``causal_conv1d`` / ``ssd_chunk_scan`` from the cached
  states, final states written back: chunked prefill), ``l == 1`` steps (``causal_conv1d_update``
  + ``selective_state_update`` with broadcast A / dt / D views).
- Prompts of different lengths are left-padded with an ``attention_mask``; padding is exact
  (Mamba inputs zeroed around the conv so states stay zero; attention never sees padded keys).
- ``cache.set_static(True)`` makes decode steps free of host-side positions; ``DecodeGraph`` (and
  ``generate(..., cuda_graph=True)``) captures such a step in a CUDA graph.
- ``model.backend = "triton"`` (or ``cfg.backend``) routes every primitive call to one backend;
  ``None`` lets each call pick the fastest available.
- :mod:`ssmkernels.models.bench` measures training and decode speed and memory.
"""
from .cache import HybridCache, KVCache, MambaState
from .config import PATTERN_8B, HybridConfig, mamba2_hybrid_8b, nemotron_h_8b, small_125m, tiny
from .generation import DecodeGraph, generate, left_pad
from .model import HybridLM

__all__ = [
    "HybridConfig",
    "HybridLM",
    "HybridCache",
    "MambaState",
    "KVCache",
    "PATTERN_8B",
    "generate",
    "DecodeGraph",
    "left_pad",
    "tiny",
    "small_125m",
    "mamba2_hybrid_8b",
    "nemotron_h_8b",
]
