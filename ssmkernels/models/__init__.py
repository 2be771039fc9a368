"""ssmkernels.models: a thin Mamba-2 / attention / MLP hybrid language model built on the primitives.

Public API (SPEC.md, "Reference hybrid model")::

    cfg = HybridConfig(pattern="M-M*-", vocab_size=..., d_model=..., ...)   # or HybridConfig.tiny()
    model = HybridLM(cfg)
    logits = model(input_ids)                       # (b, l) -> (b, l, vocab_size)
    cache = model.new_cache(batch_size, max_seqlen)
    logits = model(input_ids, cache=cache)          # prefill or decode step; advances the cache
    tokens = model.generate(input_ids, max_new_tokens, temperature=0.0)
    model = HybridLM.from_pretrained(path)          # local HF Mamba2 / NemotronH directory
"""
from .cache import HybridCache, KVCache, MambaState
from .config import PATTERN_8B, HybridConfig, mamba2_hybrid_8b, nemotron_h_8b, small_125m, tiny
from .generation import generate, left_pad
from .model import HybridLM

__all__ = [
    "HybridConfig",
    "HybridLM",
    "HybridCache",
    "MambaState",
    "KVCache",
    "PATTERN_8B",
    "generate",
    "left_pad",
    "tiny",
    "small_125m",
    "mamba2_hybrid_8b",
    "nemotron_h_8b",
]
