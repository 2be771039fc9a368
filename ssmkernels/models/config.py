"""HybridConfig: the shape of a Mamba-2 / attention / MLP hybrid, in Megatron-LM's pattern notation.

A pattern is one character per layer: ``M`` a Mamba-2 block, ``*`` an attention block, ``-`` an MLP
block (SPEC.md, "Reference hybrid model"). Every block is pre-norm residual:
``h = h + mixer(rmsnorm(h))``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .._core import config as core_config

LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}
MLP_ACTIVATIONS = ("relu2", "relu", "gelu", "gelu_tanh", "silu")

# The 56-layer Mamba-2-Hybrid 8B of "An Empirical Study of Mamba-based Language Models" (SPEC.md).
PATTERN_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


@dataclass
class HybridConfig:
    """Sizes and options of :class:`ssmkernels.models.HybridLM`.

    Args:
        pattern: one character per layer: ``M`` Mamba-2, ``*`` attention, ``-`` MLP.
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_heads: attention heads (query heads).
        n_kv_heads: key/value heads of grouped-query attention; divides ``n_heads``.
        d_state: SSM state size ``n`` of the Mamba-2 blocks.
        headdim: Mamba-2 head dim ``p``.
        ngroups: Mamba-2 groups ``g`` sharing B and C (and the gated norm's groups).
        expand: Mamba-2 inner width is ``expand * d_model`` unless ``d_inner`` is given.
        d_conv: causal conv width ``w``.
        chunk_size: SSD chunk size (power of two in [16, 256]); the result does not depend on it.
        backend: ``None`` (fastest available per call), ``"reference"``, ``"triton"`` or ``"cuda"``;
            passed to every ssmkernels primitive the model calls.
        d_inner: Mamba-2 inner width ``h * p`` (default ``expand * d_model``; NemotronH sets it).
        attn_head_dim: attention head dim (default ``d_model // n_heads``).
        mlp_hidden: hidden width of the MLP blocks (default ``4 * d_model``).
        mlp_activation: ``relu2`` (squared ReLU, as NemotronH), ``relu``, ``gelu``, ``gelu_tanh``
            or ``silu``.
        norm_eps: epsilon of every RMSNorm (block norms, gated norm, final norm).
        tie_embeddings: the LM head reuses the embedding matrix.
        dt_limit: ``(low, high)`` clamp of the processed time step (SPEC section 3).
        mamba_bias: bias in the Mamba in_proj / out_proj; conv_bias: bias of the causal conv.
        attn_bias: bias in q/k/v/o projections; mlp_bias: bias in the MLP linears.
        dt_min, dt_max, dt_init_floor, A_init_range: initialisation of dt_bias and A_log as in
            mamba_ssm's Mamba2.
        initializer_range: std of the normal init of embeddings and linear weights.
    """

    pattern: str
    vocab_size: int
    d_model: int
    n_heads: int = 1
    n_kv_heads: int | None = None
    d_state: int = 128
    headdim: int = 64
    ngroups: int = 1
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 256
    backend: str | None = None
    d_inner: int | None = None
    attn_head_dim: int | None = None
    mlp_hidden: int | None = None
    mlp_activation: str = "relu2"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dt_limit: tuple[float, float] = (0.0, math.inf)
    mamba_bias: bool = False
    conv_bias: bool = True
    attn_bias: bool = False
    mlp_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict, repr=False)  # free-form notes (e.g. the HF source)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_inner is None and isinstance(self.expand, int) and isinstance(self.d_model, int):
            self.d_inner = self.expand * self.d_model
        if self.attn_head_dim is None and self._is_int(self.d_model) and self._is_int(self.n_heads) \
                and self.n_heads > 0:
            self.attn_head_dim = self.d_model // self.n_heads
        if self.mlp_hidden is None and self._is_int(self.d_model):
            self.mlp_hidden = 4 * self.d_model
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @staticmethod
    def _is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_heads(self) -> int:
        """Mamba-2 heads ``h = d_inner // headdim``."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C side by side."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        """Output width of the Mamba in_proj: ``[z (d_inner), xBC (conv_dim), dt (h)]``."""
        return self.d_inner + self.conv_dim + self.mamba_heads

    def counts(self) -> dict[str, int]:
        """Number of layers of each kind: ``{"M": .., "*": .., "-": ..}``."""
        return {kind: self.pattern.count(kind) for kind in LAYER_KINDS}

    def layer_kinds(self) -> list[str]:
        """``["mamba", "mlp", "attention", ...]``, one entry per layer."""
        return [LAYER_KINDS[c] for c in self.pattern]

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "HybridConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the field when the config cannot work."""
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern must be a non-empty string of 'M', '*', '-', got {self.pattern!r}")
        bad = sorted(set(self.pattern) - set(LAYER_KINDS))
        if bad:
            raise ValueError(
                f"pattern {self.pattern!r} holds {bad}; allowed: 'M' (Mamba-2), '*' (attention), '-' (MLP)"
            )
        for name in ("vocab_size", "d_model", "d_state", "headdim", "ngroups", "d_conv", "d_inner",
                     "mlp_hidden"):
            self._check_positive(name)
        if self.d_conv < 2:
            raise ValueError(f"d_conv must be at least 2, got {self.d_conv}")
        counts = self.counts()
        if counts["M"]:
            if self.d_inner % self.headdim:
                raise ValueError(
                    f"d_inner ({self.d_inner} = expand {self.expand} x d_model {self.d_model} unless given) "
                    f"must be a multiple of headdim {self.headdim}"
                )
            if self.mamba_heads % self.ngroups:
                raise ValueError(f"ngroups {self.ngroups} must divide the {self.mamba_heads} Mamba heads "
                                 f"(d_inner {self.d_inner} / headdim {self.headdim})")
            cs = self.chunk_size
            if not self._is_int(cs) or cs < 16 or cs > 256 or cs & (cs - 1):
                raise ValueError(f"chunk_size must be a power of two in [16, 256], got {cs!r}")
        if counts["*"]:
            self._check_positive("n_heads")
            self._check_positive("n_kv_heads")
            self._check_positive("attn_head_dim")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {list(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.backend is not None and self.backend not in core_config.BACKENDS:
            raise ValueError(f"backend must be one of {list(core_config.BACKENDS)} or None, got {self.backend!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")
        low, high = self.dt_limit
        if not 0.0 <= low <= high:
            raise ValueError(f"dt_limit must satisfy 0 <= low <= high, got {self.dt_limit!r}")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not self._is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides) -> "HybridConfig":
        """A few-thousand-parameter model for CPU tests: every block kind twice, GQA, 2 groups."""
        base = dict(pattern="M-*M-*M", vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, d_state=8,
                    headdim=8, ngroups=2, expand=2, d_conv=4, chunk_size=16, mlp_hidden=48)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small_125m(cls, **overrides) -> "HybridConfig":
        """About 125M parameters (tied embeddings, 24 layers: 10 M, 2 *, 12 -): the speed benchmark's model."""
        base = dict(pattern="M-M-M-M-M*-M-M-M-M-M*-", vocab_size=50304, d_model=768, n_heads=12, n_kv_heads=4,
                    d_state=128, headdim=64, ngroups=1, expand=2, d_conv=4, chunk_size=256,
                    mlp_hidden=3072, tie_embeddings=True)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def mamba2_hybrid_8b(cls, **overrides) -> "HybridConfig":
        """The 8B Mamba-2-Hybrid shape (56 layers: 24 M, 4 *, 28 -; d_model 4096; GQA 32/8;
        d_state 128, headdim 64, 8 groups; MLP 16384 squared ReLU; 256K vocab): about 8.7B parameters."""
        base = dict(pattern=PATTERN_8B, vocab_size=256000, d_model=4096, n_heads=32, n_kv_heads=8,
                    d_state=128, headdim=64, ngroups=8, expand=2, d_conv=4, chunk_size=128,
                    mlp_hidden=16384, mlp_activation="relu2")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def nemotron_h_8b(cls, **overrides) -> "HybridConfig":
        """Same 56-layer shape as :meth:`mamba2_hybrid_8b` (NemotronH layout: squared-ReLU MLP,
        GQA without positions). Real NemotronH checkpoints carry their own config: load them with
        :meth:`HybridLM.from_pretrained`."""
        return cls.mamba2_hybrid_8b(**overrides)


tiny = HybridConfig.tiny
small_125m = HybridConfig.small_125m
mamba2_hybrid_8b = HybridConfig.mamba2_hybrid_8b
nemotron_h_8b = HybridConfig.nemotron_h_8b
