"""Load local Hugging Face checkpoints (``Mamba2ForCausalLM``, ``NemotronHForCausalLM``) into HybridLM.

Reads ``config.json`` and the weights (``*.safetensors``, sharded or not; ``pytorch_model.bin`` as
a fallback) from a directory; nothing is downloaded and ``transformers`` is not needed. Module
names of :class:`HybridLM` follow transformers' NemotronH, so the mapping is a prefix change
(``backbone.`` / ``model.`` dropped; mamba_ssm's ``embedding`` becomes ``embeddings``).

mamba_ssm's own format (``MambaLMHeadModel.save_pretrained``: a ``config.json`` with ``d_model``,
``n_layer``, ``ssm_cfg`` and ``pytorch_model.bin``) loads too when every layer is Mamba-2 with no
inner MLP (the ``state-spaces/mamba2-*`` models).

Config choices that follow transformers' forward (so the logits match it):
- Mamba2 and NemotronH clamp the processed time step to ``time_step_limit`` as given (loaded as
  ``dt_limit``, applied in prefill and decode; ``(0, inf)`` when the config has none). transformers
  up to 5.24 clamped NemotronH's at ``(time_step_min, inf)`` instead, whatever the config said; 5.25
  follows the config. To reproduce the older forward, set ``model.cfg.dt_limit = (time_step_min,
  math.inf)`` after loading.
MoE layers (``E``) of NemotronH-MoE checkpoints are not supported and raise ``ValueError``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from .config import HybridConfig
from .model import HybridLM

_LAYER_TYPES = {"mamba": "M", "linear_attention": "M", "M": "M",
                "attention": "*", "full_attention": "*", "*": "*",
                "mlp": "-", "-": "-",
                "moe": "E", "E": "E"}
_ACTIVATIONS = {"relu2": "relu2", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def _chunk_size(value) -> int:
    """The SSD result does not depend on the chunk size: take the nearest one the kernels accept."""
    value = int(value or 256)
    size = 1 << max(4, min(8, round(math.log2(max(value, 1)))))
    return size


def _float(value) -> float:
    """JSON floats; transformers writes infinity as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    if value is None:
        return math.inf
    return float(value)


def _dt_limit(cfg: dict, key: str) -> tuple[float, float]:
    """The (low, high) time-step clamp under `key` of a config dict; (0, inf) when it has none."""
    low, high = cfg.get(key, (0.0, math.inf))
    return _float(low), _float(high)


def _first(raw: dict, *names, default=None):
    for name in names:
        if name in raw and raw[name] is not None:
            return raw[name]
    return default


def _check_silu(raw: dict, key: str) -> None:
    act = raw.get(key, "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{key}={act!r}: the Mamba-2 block here uses silu (as mamba_ssm); cannot load")


def config_from_hf(raw: dict, backend: Optional[str] = None) -> HybridConfig:
    """A :class:`HybridConfig` from the dict of a transformers ``config.json``."""
    model_type = raw.get("model_type")
    if model_type is None:
        archs = " ".join(raw.get("architectures") or [])
        model_type = "nemotron_h" if "NemotronH" in archs else "mamba2" if "Mamba2" in archs else None
    if model_type == "mamba2":
        _check_silu(raw, "hidden_act")
        d_model = raw["hidden_size"]
        headdim = raw.get("head_dim", 64)
        d_inner = raw.get("num_heads", raw.get("expand", 2) * d_model // headdim) * headdim
        return HybridConfig(
            pattern="M" * raw["num_hidden_layers"], vocab_size=raw["vocab_size"], d_model=d_model,
            d_state=raw.get("state_size", 128), headdim=headdim, ngroups=raw.get("n_groups", 1),
            expand=raw.get("expand", 2), d_conv=raw.get("conv_kernel", 4),
            chunk_size=_chunk_size(raw.get("chunk_size")), d_inner=d_inner,
            norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dt_limit=_dt_limit(raw, "time_step_limit"), mamba_bias=bool(raw.get("use_bias", False)),
            conv_bias=bool(raw.get("use_conv_bias", True)), backend=backend,
            extra={"source": "transformers Mamba2"})
    if model_type == "nemotron_h":
        _check_silu(raw, "mamba_hidden_act")
        kinds = raw.get("layers_block_type") or raw.get("layer_types")
        if kinds is None:
            pattern_src = raw.get("hybrid_override_pattern")
            if pattern_src is None:
                raise ValueError("NemotronH config has neither layers_block_type nor hybrid_override_pattern")
            kinds = list(pattern_src)
        try:
            pattern = "".join(_LAYER_TYPES[k] for k in kinds)
        except KeyError as exc:
            raise ValueError(f"NemotronH layer type {exc.args[0]!r} is not supported") from None
        if "E" in pattern:
            raise ValueError("NemotronH mixture-of-experts layers ('moe' / 'E') are not supported by HybridLM")
        d_model = raw["hidden_size"]
        n_heads = raw.get("num_attention_heads", 1)
        headdim = _first(raw, "mamba_head_dim", default=64)
        mamba_heads = _first(raw, "mamba_num_heads", default=None)
        expand = _first(raw, "expand", "mamba_expand", default=2)
        d_inner = mamba_heads * headdim if mamba_heads else expand * d_model
        act = raw.get("mlp_hidden_act", "relu2")
        if act not in _ACTIVATIONS:
            raise ValueError(f"NemotronH mlp_hidden_act={act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        return HybridConfig(
            pattern=pattern, vocab_size=raw["vocab_size"], d_model=d_model, n_heads=n_heads,
            n_kv_heads=_first(raw, "num_key_value_heads", default=n_heads),
            attn_head_dim=_first(raw, "head_dim", "attention_head_dim", default=d_model // n_heads),
            d_state=_first(raw, "ssm_state_size", default=128), headdim=headdim,
            ngroups=_first(raw, "n_groups", "mamba_n_groups", default=1), expand=expand,
            d_conv=_first(raw, "conv_kernel", "mamba_d_conv", default=4),
            chunk_size=_chunk_size(_first(raw, "chunk_size", "mamba_chunk_size", default=256)),
            d_inner=d_inner, mlp_hidden=raw.get("intermediate_size", 4 * d_model),
            mlp_activation=_ACTIVATIONS[act], norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)), dt_limit=_dt_limit(raw, "time_step_limit"),
            mamba_bias=bool(raw.get("use_bias", False)),
            conv_bias=bool(_first(raw, "use_conv_bias", "mamba_conv_bias", default=True)),
            attn_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
            backend=backend, extra={"source": "transformers NemotronH"})
    if model_type is None and "ssm_cfg" in raw and "d_model" in raw:
        return _config_from_mamba_ssm(raw, backend)
    raise ValueError(f"unsupported model_type {model_type!r}: HybridLM loads 'mamba2' and 'nemotron_h' checkpoints "
                     f"(and mamba_ssm's own Mamba-2 format)")


def _config_from_mamba_ssm(raw: dict, backend: Optional[str]) -> HybridConfig:
    """mamba_ssm's ``MambaConfig`` (``MambaLMHeadModel.save_pretrained``): pure Mamba-2 stacks."""
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise ValueError(f"mamba_ssm checkpoint with ssm_cfg.layer={layer!r}: only Mamba2 layers are supported")
    if raw.get("d_intermediate", 0):
        raise ValueError("mamba_ssm checkpoints with d_intermediate > 0 (a gated MLP inside each block) "
                         "are not supported")
    if raw.get("attn_layer_idx"):
        raise ValueError("mamba_ssm checkpoints with attention layers (rotary MHA) are not supported")
    if not raw.get("rms_norm", True) or not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
        raise ValueError("only mamba_ssm Mamba2 with RMSNorm and norm_before_gate=False is supported")
    if ssm.get("D_has_hdim", False):
        raise ValueError("mamba_ssm Mamba2 with D_has_hdim=True is not supported (D must be per head)")
    d_model, expand, headdim = raw["d_model"], ssm.get("expand", 2), ssm.get("headdim", 64)
    d_inner = expand * d_model
    if ssm.get("d_ssm") not in (None, d_inner):
        raise ValueError("mamba_ssm Mamba2 with d_ssm != expand * d_model is not supported")
    vocab, multiple = raw.get("vocab_size", 50277), raw.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    return HybridConfig(
        pattern="M" * raw["n_layer"], vocab_size=vocab, d_model=d_model, d_state=ssm.get("d_state", 128),
        headdim=headdim, ngroups=ssm.get("ngroups", 1), expand=expand, d_conv=ssm.get("d_conv", 4),
        chunk_size=_chunk_size(ssm.get("chunk_size", 256)), d_inner=d_inner, norm_eps=raw.get("norm_epsilon", 1e-5),
        tie_embeddings=bool(raw.get("tie_embeddings", True)), dt_limit=_dt_limit(ssm, "dt_limit"),
        mamba_bias=bool(ssm.get("bias", False)), conv_bias=bool(ssm.get("conv_bias", True)), backend=backend,
        extra={"source": "mamba_ssm MambaLMHeadModel"})


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("loading *.safetensors needs the 'safetensors' package (pip install safetensors)") from exc
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")


def map_weight_name(name: str) -> str:
    """Checkpoint key -> HybridLM state-dict key."""
    for prefix in ("backbone.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith("embedding."):
        name = "embeddings." + name[len("embedding."):]
    return name


def load_pretrained(path, dtype: Optional[torch.dtype] = None, device=None,
                    backend: Optional[str] = None) -> HybridLM:
    """Build a :class:`HybridLM` from a local HF directory; ``dtype`` defaults to the stored dtype."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json (expected a local Hugging Face model directory)")
    cfg = config_from_hf(json.loads(config_file.read_text()), backend=backend)
    raw = _read_weights(directory)
    state = {map_weight_name(k): v for k, v in raw.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = HybridLM(cfg)
    expected = set(model.state_dict().keys())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint in {directory} does not match the {cfg.extra.get('source')} layout: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    target = dtype or state["embeddings.weight"].dtype
    state = {k: v.to(device=device or "cpu", dtype=target if v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embeddings.weight
    return model
