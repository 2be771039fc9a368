"""The blocks of the hybrid: RMSNorms, the Mamba-2 mixer, grouped-query attention, the MLP.

Parameter names follow mamba_ssm's ``Mamba2`` and transformers' ``NemotronH`` (``in_proj``,
``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``; ``q_proj`` .. ``o_proj``;
``up_proj``, ``down_proj``), so Hugging Face checkpoints map one to one.

The Mamba-2 mixer only calls ssmkernels primitives for its sequence mixing: ``causal_conv1d`` and
``ssd_chunk_scan`` for full sequences (training, prefill), ``causal_conv1d_update`` and
``selective_state_update`` for decode steps. ``cfg.backend`` is read on every call, so switching
the backend of a built model is ``model.backend = "triton"``.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ssmkernels

from .config import HybridConfig

if TYPE_CHECKING:  # pragma: no cover
    from .cache import HybridCache


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and the SSM parameters run in float32, or float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 (float64 for float64)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm: one fused kernel on CUDA instead of six elementwise ones, which matters in
        # eager decode, where each of the model's launches costs host time.
        acc = compute_dtype(x.dtype)
        return F.rms_norm(x.to(acc), (x.shape[-1],), self.weight.to(acc), self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``weight * groupnorm(y * silu(z))``: mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``.

    The normalisation runs over groups of ``dim // ngroups`` channels (one group per B/C group,
    as in mamba_ssm and transformers), so tensor-parallel shards normalise alike.
    """

    def __init__(self, dim: int, ngroups: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % ngroups:
            raise ValueError(f"GatedRMSNorm: ngroups {ngroups} must divide dim {dim}")
        self.eps = eps
        self.group_size = dim // ngroups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        acc = compute_dtype(y.dtype)
        v = y.to(acc) * F.silu(z.to(acc))
        grouped = v.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(acc) * grouped.flatten(-2)).to(y.dtype)


def _inverse_softplus(v: Tensor) -> Tensor:
    return v + torch.log(-torch.expm1(-v))


class Mamba2Mixer(nn.Module):
    """Mamba-2: in_proj -> causal_conv1d (silu) -> ssd_chunk_scan -> gated RMSNorm -> out_proj.

    ``in_proj`` produces ``[z (d_inner), xBC (d_inner + 2 g n), dt (h)]``; the conv runs over xBC;
    ``x`` is split into ``h`` heads of ``p`` channels, B and C into ``g`` groups of ``n``.
    ``A = -exp(A_log)`` per head; ``dt' = clamp(softplus(dt + dt_bias), *dt_limit)``.
    """

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.d_inner, self.nheads, self.headdim = cfg.d_inner, cfg.mamba_heads, cfg.headdim
        self.ngroups, self.d_state, self.conv_dim = cfg.ngroups, cfg.d_state, cfg.conv_dim
        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.mamba_bias)
        # nn.Conv1d only as the parameter holder (weight (conv_dim, 1, w)), as mamba_ssm stores it.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=cfg.mamba_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba_ssm's init: dt log-uniform in [dt_min, dt_max] (floored), A uniform in A_init_range, D = 1."""
        if self.dt_bias.is_meta:
            return
        cfg = self.cfg
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(_inverse_softplus(dt))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*cfg.A_init_range)))
        self.D.fill_(1.0)

    # ------------------------------------------------------------------ pieces
    def _split_proj(self, zxbcdt: Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xBC: Tensor):
        gn = self.ngroups * self.d_state
        return torch.split(xBC, [self.d_inner, gn, gn], dim=-1)

    def _A(self, dtype: torch.dtype) -> Tensor:
        return -torch.exp(self.A_log.to(compute_dtype(dtype)))

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (conv_dim, w)

    # ------------------------------------------------------------------ forward
    def forward(self, u: Tensor, cache: Optional["HybridCache"] = None, mask: Optional[Tensor] = None,
                seq_idx: Optional[Tensor] = None) -> Tensor:
        """``u (b, l, d_model)`` -> ``(b, l, d_model)``.

        With ``cache``: ``l == 1`` takes the decode step (``causal_conv1d_update`` +
        ``selective_state_update``), longer inputs a prefill chunk that starts from the cached
        states and leaves the final ones in the cache. ``mask (b, l)`` (1 = token, 0 = left padding)
        zeroes padded positions so they leave the states untouched (exact left padding).
        ``seq_idx (b, l)`` int32 (no cache): packed sequences; conv and scan restart where it changes.
        """
        if cache is not None and u.shape[1] == 1 and mask is None:
            return self._step(u, cache)
        return self._scan(u, cache, mask, seq_idx)

    def _scan(self, u: Tensor, cache: Optional["HybridCache"], mask: Optional[Tensor],
              seq_idx: Optional[Tensor] = None) -> Tensor:
        cfg = self.cfg
        b, l, _ = u.shape
        keep = None if mask is None else mask.to(u.dtype).unsqueeze(-1)  # (b, l, 1)
        if keep is not None:
            u = u * keep
        z, xBC, dt = self._split_proj(self.in_proj(u))
        if keep is not None:
            xBC = xBC * keep  # padded positions feed zeros into the conv, like an empty history
        state = None if cache is None else cache.mamba[self.layer_idx]
        conv_out = ssmkernels.causal_conv1d(
            xBC.transpose(1, 2), self._conv_weight(), self.conv1d.bias, seq_idx=seq_idx,
            initial_states=None if state is None else state.conv_state.to(xBC.dtype),
            return_final_states=state is not None, activation="silu", backend=cfg.backend)
        if state is not None:
            conv_out, conv_final = conv_out
        xBC = conv_out.transpose(1, 2)  # (b, l, conv_dim)
        if keep is not None:
            xBC = xBC * keep  # x = B = 0 at padded positions: the SSM state stays as it was
        x, B, C = self._split_xbc(xBC)
        result = ssmkernels.ssd_chunk_scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, self._A(u.dtype),
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            cfg.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias,
            initial_states=None if state is None else state.ssm_state, seq_idx=seq_idx,
            dt_softplus=True, dt_limit=cfg.dt_limit, return_final_states=state is not None,
            backend=cfg.backend)
        if state is not None:
            y, ssm_final = result
            with torch.no_grad():
                state.conv_state.copy_(conv_final)
                state.ssm_state.copy_(ssm_final)
        else:
            y = result
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    def _step(self, u: Tensor, cache: "HybridCache") -> Tensor:
        cfg = self.cfg
        state = cache.mamba[self.layer_idx]
        h, p, n = self.nheads, self.headdim, self.d_state
        z, xBC, dt = self._split_proj(self.in_proj(u[:, 0]))  # (b, .)
        xBC = ssmkernels.causal_conv1d_update(xBC.contiguous(), state.conv_state, self._conv_weight(),
                                              self.conv1d.bias, "silu", backend=cfg.backend)
        x, B, C = self._split_xbc(xBC)
        b = x.shape[0]
        acc = compute_dtype(u.dtype)
        A = self._A(u.dtype)[:, None, None].expand(h, p, n)
        D = self.D[:, None].expand(h, p)
        low, high = cfg.dt_limit
        if low > 0.0 or high < math.inf:
            # selective_state_update has no dt_limit: process dt here, as ssd_chunk_scan does
            # (in float32, then in x's dtype as the kernels expect).
            dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc)).clamp(min=low, max=high).to(u.dtype)
            dt_bias, softplus = None, False
        else:
            dt_bias, softplus = self.dt_bias[:, None].expand(h, p), True
        y = ssmkernels.selective_state_update(
            state.ssm_state, x.reshape(b, h, p), dt[:, :, None].expand(b, h, p), A,
            B.reshape(b, self.ngroups, n), C.reshape(b, self.ngroups, n), D, z=None, dt_bias=dt_bias,
            dt_softplus=softplus, backend=cfg.backend)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y).unsqueeze(1)


class Attention(nn.Module):
    """Causal grouped-query attention through ``F.scaled_dot_product_attention``, no positional encoding."""

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, u: Tensor, cache: Optional["HybridCache"] = None, mask: Optional[Tensor] = None,
                seq_idx: Optional[Tensor] = None) -> Tensor:
        """``u (b, l, d_model)``; ``mask (b, l)`` marks real tokens (0 = left padding, never attended to);
        ``seq_idx (b, l)`` (no cache): packed sequences, a query sees only keys of its own sequence."""
        b, l, _ = u.shape
        q = self.q_proj(u).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
        attn_mask, is_causal = None, False
        if cache is None:
            if mask is None and seq_idx is None:
                is_causal = True
            else:
                attn_mask = _padded_causal_mask(None if mask is None else mask.bool(), 0, l, device=u.device)
                if seq_idx is not None:
                    same = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, l, l)
                    attn_mask = attn_mask & same[:, None]
        elif cache.static and l == 1:
            return self._static_step(q, k, v, cache)
        else:
            kv = cache.attention[self.layer_idx]
            start = cache.seqlen_offset
            k, v = kv.append(k, v, start)
            if cache.key_valid is not None:
                attn_mask = _padded_causal_mask(cache.key_valid[:, :start + l], start, l)
            elif l > 1:
                attn_mask = _padded_causal_mask(None, start, l, device=u.device)
        out = self._sdpa(q, k, v, attn_mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))


    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """SDPA with grouped KV heads. A single query token is regrouped as ``(b, kv_heads, group, d)``
        (the ``group`` query heads sharing a KV head become its query rows), so decode reads each KV
        head once and never expands the cache; a mask ``(b, 1, 1, keys)`` broadcasts unchanged.
        Calls that are not plain causal (decode steps, cached prefill chunks, masks) run without
        cuDNN's backend: see ``_without_cudnn``."""
        groups = self.n_heads // self.n_kv_heads
        b, _, l, d = q.shape
        with contextlib.nullcontext() if is_causal else _without_cudnn():
            if groups == 1:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
            if l == 1 and not is_causal:
                out = F.scaled_dot_product_attention(q.reshape(b, self.n_kv_heads, groups, d), k, v,
                                                     attn_mask=attn_mask)
                return out.reshape(b, self.n_heads, 1, d)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, cache: "HybridCache") -> Tensor:
        """Decode step with no host-side position: writes at ``cache.position`` (a device tensor) and
        attends over the whole preallocated cache under a mask, so a CUDA graph can replay it."""
        b = q.shape[0]
        kv = cache.attention[self.layer_idx]
        kv.k.index_copy_(2, cache.position, k)
        kv.v.index_copy_(2, cache.position, v)
        positions = torch.arange(cache.max_seqlen, device=q.device)
        allowed = (positions <= cache.position) & cache.key_valid  # (b, max_seqlen)
        out = self._sdpa(q, kv.k, kv.v, allowed[:, None, None, :], False)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))


def _without_cudnn():
    """SDPA backends without cuDNN attention, for calls whose key length changes from call to call
    (every decode step): cuDNN builds an execution plan per new shape, which took 34 ms of host time
    per call on an H100 (torch 2.11) and made the 125M hybrid's eager decode 18 tokens/s at batch 1."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _padded_causal_mask(key_valid: Optional[Tensor], start: int, l: int, device=None) -> Tensor:
    """Boolean mask ``(b or 1, 1, l, start + l)``: query ``i`` (at ``start + i``) sees keys ``<= start + i``
    that are real tokens; a padded query sees itself only (its output is never used)."""
    total = start + l
    device = key_valid.device if key_valid is not None else device
    q_pos = torch.arange(start, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos  # (l, total)
    if key_valid is None:
        return allowed[None, None]
    allowed = allowed[None] & key_valid[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


def _activation(name: str):
    if name == "relu2":
        return lambda v: torch.square(F.relu(v))
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda v: F.gelu(v, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown mlp_activation {name!r}")


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))``; squared ReLU by default (NemotronH)."""

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=cfg.mlp_bias)
        self.act = _activation(cfg.mlp_activation)

    def forward(self, u: Tensor, cache=None, mask=None, seq_idx=None) -> Tensor:
        return self.down_proj(self.act(self.up_proj(u)))


MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP}


class Block(nn.Module):
    """Pre-norm residual block: ``h + mixer(norm(h))``."""

    def __init__(self, cfg: HybridConfig, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MIXERS[kind](cfg, layer_idx)

    def forward(self, hidden: Tensor, cache=None, mask=None, seq_idx=None) -> Tensor:
        return hidden + self.mixer(self.norm(hidden), cache, mask, seq_idx)
