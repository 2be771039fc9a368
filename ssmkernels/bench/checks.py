"""Correctness cases of ``python -m ssmkernels check``: every primitive and feature at small shapes.

A :class:`CheckCase` builds random, non-degenerate inputs in the dtype under test and names the
call. :func:`run_case` runs it three times, as the SPEC correctness rule asks: the reference on
float64 copies (the truth), the reference on the inputs as given (its rounding error sets the
tolerance) and the backend under test; then it compares every output, and every gradient after a
backward with the same random upstream gradients, through ``ssmkernels._core.tolerance.compare``.
A backend that cannot serve a case (``BackendUnavailable``) gives a SKIP row with its reason.

Cases with an ``alternative`` check the reference itself against a second, independent
formulation (SSD's quadratic masked form, torch's conv1d, selective scan through SSD).

Shapes come in two sizes: ``tiny`` (CPU, where Triton runs in its slow interpreter) and ``small``
(GPU). Lengths are odd on purpose (not multiples of any block size).
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .. import BackendUnavailable
from .._core import dispatch
from .._core.tolerance import Comparison, compare
from ..ops.causal_conv1d.op import causal_conv1d, causal_conv1d_update
from ..ops.selective_scan.op import selective_scan
from ..ops.ssd import reference as ssd_reference
from ..ops.ssd.op import ssd_chunk_scan
from ..ops.state_update.op import selective_state_update

PRIMITIVES = ("causal_conv1d", "selective_scan", "ssd", "state_update")
BACKENDS = ("reference", "triton", "cuda")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}

SIZES = {
    # b: batch, d: channels, l: length, n: state, h/p/g: heads/headdim/groups, cache: state slots
    "tiny": dict(b=2, d=6, l=33, n=4, h=4, p=8, g=2, ssd_n=16, ssd_l=37, cache=4),
    "small": dict(b=2, d=96, l=301, n=16, h=8, p=64, g=2, ssd_n=64, ssd_l=333, cache=6),
}


# A second formulation rounds differently from the recurrence (e.g. SSD's quadratic form takes
# differences of a cumulative sum), so the SPEC tolerance of a low-precision run does not apply to
# it: the two formulations are compared in float64, where both are exact to ~1e-13.
SECOND_FORMULATION_DTYPES = (torch.float64,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- input builders
class Inputs:
    """Seeded random tensors built on the CPU in float64, then moved and cast (reproducible
    across devices)."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device, size: dict):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype, self.device, self.size = dtype, device, size

    def _place(self, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if self.dtype == torch.float64:  # a float64 row runs everything in float64
            dtype = torch.float64
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def normal(self, *shape, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._place(torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale, dtype)

    def uniform(self, *shape, low: float, high: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.rand(shape, generator=self.gen, dtype=torch.float64) * (high - low) + low
        return self._place(t, dtype)

    def int32(self, values: Iterable[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.int32, device=self.device)

    def seq_idx(self, b: int, l: int, cuts: Iterable[int]) -> torch.Tensor:
        """``(b, l)`` int32 sequence ids changing after each position in ``cuts`` (shifted per row)."""
        rows = []
        for row in range(b):
            ids, current = [], 0
            marks = {min(max(c + row, 1), l - 1) for c in cuts}
            for t in range(l):
                if t in marks:
                    current += 1
                ids.append(current)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.int32, device=self.device)


def cu_seqlens_for(total: int, lengths_head: Iterable[int]) -> list[int]:
    """Boundaries with the given leading lengths (0 = an empty sequence) and the rest last."""
    bounds = [0]
    for length in lengths_head:
        bounds.append(min(bounds[-1] + length, total))
    bounds.append(total)
    return bounds


# ----------------------------------------------------------------------------- the case type
@dataclass(frozen=True)
class CheckCase:
    """One feature row of one primitive.

    ``make(inputs) -> dict`` builds the keyword inputs in ``inputs.dtype``; ``call(**kw, backend=)``
    runs the primitive and returns a tensor or a tuple of tensors (in-place ops return the mutated
    state too). ``grads`` names the inputs whose gradients are compared. ``backends``/``dtypes``
    restrict where the row applies; ``alternative(**kw)`` replaces the backend run by a second
    formulation (reference-only rows). ``quick`` rows form ``check --quick``.
    """

    primitive: str
    feature: str
    make: Callable[[Inputs], dict]
    call: Callable[..., Any]
    grads: tuple[str, ...] = ()
    backends: tuple[str, ...] = BACKENDS
    dtypes: tuple[torch.dtype, ...] | None = None
    alternative: Callable[..., Any] | None = None
    quick: bool = False

    @property
    def name(self) -> str:
        return f"{self.primitive}/{self.feature}"

    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


@dataclass
class CheckResult:
    case: CheckCase
    backend: str
    dtype: torch.dtype
    status: str  # PASS, FAIL or SKIP
    error: float | None = None
    tolerance: float | None = None
    worst: str = ""  # which output/gradient the reported error belongs to
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


# ----------------------------------------------------------------------------- causal_conv1d
def _conv(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
          activation="silu", cu_seqlens=None, backend=None):
    return causal_conv1d(x, weight, bias, seq_idx, initial_states, return_final_states, None, activation,
                         cu_seqlens=cu_seqlens, backend=backend)


def _conv_strided(x_wide, weight, bias, backend=None):
    """Non-contiguous input: every other position of a wider tensor."""
    return _conv(x_wide[:, :, ::2], weight, bias, backend=backend)


def _conv_torch(x, weight, bias=None, activation="silu", **_):
    """Second formulation: torch's grouped conv1d on the left-padded input."""
    d, w = weight.shape
    out = F.conv1d(F.pad(x, (w - 1, 0)), weight[:, None, :], bias, groups=d)
    return F.silu(out) if activation else out


def _conv_inputs(width: int = 4, bias: bool = True, layout: str = "channel_first", b: int | None = None,
                 l: int | None = None):
    def make(r: Inputs) -> dict:
        bb, d, ll = b or r.size["b"], r.size["d"], l or r.size["l"]
        x = r.normal(bb, d, ll) if layout == "channel_first" else r.normal(bb, ll, d).transpose(1, 2)
        kw = {"x": x, "weight": r.normal(d, width, scale=0.5)}
        if bias:
            kw["bias"] = r.normal(d, scale=0.5)
        return kw
    return make


def _with(make, **extra_builders):
    """``make`` plus more inputs built from the first ones (e.g. seq_idx for x's shape)."""
    def combined(r: Inputs) -> dict:
        kw = make(r)
        for name, builder in extra_builders.items():
            kw[name] = builder(r, kw) if callable(builder) else builder
        return kw
    return combined


def _conv_update_call(x, conv_state, weight, bias=None, cache_seqlens=None, conv_state_indices=None,
                      backend=None):
    out = causal_conv1d_update(x, conv_state, weight, bias, "silu", cache_seqlens=cache_seqlens,
                               conv_state_indices=conv_state_indices, backend=backend)
    return out, conv_state


def _conv_update_inputs(tokens: int | None = None, state_len: int = 3, width: int = 4, b: int | None = None):
    def make(r: Inputs) -> dict:
        bb, d = b or r.size["b"], r.size["d"]
        x = r.normal(bb, d) if tokens is None else r.normal(bb, d, tokens)
        return {"x": x, "conv_state": r.normal(r.size["cache"], d, state_len),
                "weight": r.normal(d, width, scale=0.5), "bias": r.normal(d, scale=0.5)}
    return make


def conv_cases() -> list[CheckCase]:
    P = "causal_conv1d"
    grads = ("x", "weight", "bias")
    states = lambda r, kw: r.normal(kw["x"].shape[0], kw["x"].shape[1], kw["weight"].shape[1] - 1)  # noqa: E731

    def cu(r, kw):
        return r.int32(cu_seqlens_for(kw["x"].shape[2], (5, 0, 11)))  # includes an empty sequence

    def cu_states(r, kw):
        return r.normal(4, kw["x"].shape[1], kw["weight"].shape[1] - 1)

    def seq(r, kw):
        return r.seq_idx(kw["x"].shape[0], kw["x"].shape[2], (2, 13, 14))

    return [
        CheckCase(P, "channel-first silu", _conv_inputs(), _conv, grads, quick=True),
        CheckCase(P, "channel-last silu", _conv_inputs(layout="channel_last"), _conv, grads, quick=True),
        CheckCase(P, "no bias, no activation", _with(_conv_inputs(bias=False), activation=None), _conv,
                  ("x", "weight")),
        CheckCase(P, "width 2", _conv_inputs(width=2), _conv, grads),
        CheckCase(P, "width 3 channel-last", _conv_inputs(width=3, layout="channel_last"), _conv, grads),
        CheckCase(P, "non-contiguous x", lambda r: {"x_wide": r.normal(r.size["b"], r.size["d"], 2 * r.size["l"]),
                                                    "weight": r.normal(r.size["d"], 4, scale=0.5),
                                                    "bias": r.normal(r.size["d"], scale=0.5)},
                  _conv_strided, ("x_wide", "weight", "bias")),
        CheckCase(P, "length 1 + states", _with(_conv_inputs(l=1), initial_states=states, return_final_states=True),
                  _conv, grads + ("initial_states",)),
        CheckCase(P, "initial/final states", _with(_conv_inputs(), initial_states=states, return_final_states=True),
                  _conv, grads + ("initial_states",), quick=True),
        CheckCase(P, "initial/final states channel-last",
                  _with(_conv_inputs(layout="channel_last"), initial_states=states, return_final_states=True),
                  _conv, grads + ("initial_states",)),
        CheckCase(P, "seq_idx + states", _with(_conv_inputs(), seq_idx=seq, initial_states=states,
                                               return_final_states=True), _conv, grads + ("initial_states",)),
        CheckCase(P, "seq_idx channel-last", _with(_conv_inputs(layout="channel_last"), seq_idx=seq), _conv, grads),
        CheckCase(P, "cu_seqlens + states", _with(_conv_inputs(b=1), cu_seqlens=cu, initial_states=cu_states,
                                                  return_final_states=True), _conv, grads + ("initial_states",)),
        CheckCase(P, "vs torch conv1d", _conv_inputs(), _conv, grads, backends=("reference",),
                  alternative=_conv_torch, dtypes=SECOND_FORMULATION_DTYPES, quick=True),
        CheckCase(P, "update 1 token", _conv_update_inputs(), _conv_update_call, quick=True),
        CheckCase(P, "update 3 tokens, longer state", _conv_update_inputs(tokens=3, state_len=5), _conv_update_call),
        CheckCase(P, "update cache_seqlens (circular)",
                  _with(_conv_update_inputs(tokens=2, state_len=5), cache_seqlens=lambda r, kw: r.int32([7, 2])),
                  _conv_update_call),
        CheckCase(P, "update indices + pad slot",
                  _with(_conv_update_inputs(b=3), conv_state_indices=lambda r, kw: r.int32([3, -1, 0])),
                  _conv_update_call),
    ]


# ----------------------------------------------------------------------------- selective_scan
def _scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
          initial_state=None, cu_seqlens=None, backend=None):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                          initial_state=initial_state, cu_seqlens=cu_seqlens, backend=backend)


def _scan_via_ssd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **_):
    """Second formulation (SPEC law 6): Mamba-1 with a per-channel scalar decay is SSD with one
    channel per head (p = 1): x = u as (b, l, d, 1), A's row constant along n."""
    u_ = u.transpose(1, 2)[..., None]
    dt = delta.transpose(1, 2)
    B_ = B.permute(0, 2, 1)[:, :, None, :]  # (b, l, 1, n): one group for all heads
    C_ = C.permute(0, 2, 1)[:, :, None, :]
    z_ = None if z is None else z.transpose(1, 2)[..., None]
    out = ssd_reference.ssd_chunk_scan(u_, dt, A[:, 0], B_, C_, None, D, z_, delta_bias, None, None, None,
                                       delta_softplus)
    return out[..., 0].transpose(1, 2)


def _scan_inputs(bc: str = "shared", extras: bool = True, softplus: bool = True, b: int | None = None,
                 l: int | None = None, scalar_A: bool = False):
    def make(r: Inputs) -> dict:
        bb, d, ll, n, g = b or r.size["b"], r.size["d"], l or r.size["l"], r.size["n"], 2
        if scalar_A:
            A = (-r.uniform(d, 1, low=0.5, high=2.0, dtype=torch.float32)).expand(d, n).contiguous()
        else:
            A = -r.uniform(d, n, low=0.5, high=2.0, dtype=torch.float32)
        shape = {"shared": (bb, n, ll), "grouped": (bb, g, n, ll), "fixed": (d, n)}[bc]
        kw = {"u": r.normal(bb, d, ll),
              "delta": (r.uniform(bb, d, ll, low=-3.0, high=0.5) if softplus
                        else r.uniform(bb, d, ll, low=0.05, high=0.6)),
              "A": A, "B": r.normal(*shape), "C": r.normal(*shape), "delta_softplus": softplus}
        if extras:
            kw.update(D=r.normal(d, dtype=torch.float32), z=r.normal(bb, d, ll),
                      delta_bias=r.uniform(d, low=-0.5, high=0.5, dtype=torch.float32))
        return kw
    return make


def scan_cases() -> list[CheckCase]:
    P = "selective_scan"
    grads = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    plain = ("u", "delta", "A", "B", "C")

    def init(r, kw):
        return r.normal(4 if "cu_seqlens" in kw else kw["u"].shape[0], kw["u"].shape[1], kw["A"].shape[1],
                        dtype=torch.float32)

    return [
        CheckCase(P, "B/C (b,n,l) + D, z, delta_bias, softplus", _scan_inputs(), _scan, grads, quick=True),
        CheckCase(P, "B/C grouped (b,g,n,l)", _scan_inputs("grouped"), _scan, grads),
        CheckCase(P, "B/C fixed (d,n)", _scan_inputs("fixed"), _scan, grads),
        CheckCase(P, "plain (no D/z/bias/softplus)", _scan_inputs(extras=False, softplus=False), _scan, plain),
        CheckCase(P, "length 1", _scan_inputs(l=1), _scan, grads),
        CheckCase(P, "initial + last state", _with(_scan_inputs(), initial_state=init, return_last_state=True),
                  _scan, grads + ("initial_state",), quick=True),
        CheckCase(P, "varlen cu_seqlens + states",
                  _with(_scan_inputs(b=1), cu_seqlens=lambda r, kw: r.int32(cu_seqlens_for(kw["u"].shape[2],
                                                                                            (4, 0, 9))),
                        initial_state=init, return_last_state=True),
                  _scan, grads + ("initial_state",)),
        CheckCase(P, "varlen grouped B/C",
                  _with(_scan_inputs("grouped", b=1),
                        cu_seqlens=lambda r, kw: r.int32(cu_seqlens_for(kw["u"].shape[2], (1, 12)))),
                  _scan, grads),
        CheckCase(P, "vs SSD form", _scan_inputs(scalar_A=True), _scan,
                  ("u", "delta", "B", "C", "D", "z", "delta_bias"), backends=("reference",),
                  alternative=_scan_via_ssd, dtypes=SECOND_FORMULATION_DTYPES, quick=True),
    ]


# ----------------------------------------------------------------------------- ssd
def _ssd(x, dt, A, B, C, chunk_size=16, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
         cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
         return_varlen_states=False, backend=None):
    return ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit, return_final_states, return_varlen_states, backend=backend)


def _ssd_quadratic(x, dt, A, B, C, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf), **_):
    dtp = ssd_reference.process_dt(dt, dt_bias, dt_softplus, dt_limit)
    return ssd_reference.ssd_quadratic(x, dtp, A, B, C).to(x.dtype)


def _ssd_inputs(extras: bool = True, chunk: int = 16, b: int | None = None, l: int | None = None,
                groups: int | None = None, D_per_channel: bool = False):
    def make(r: Inputs) -> dict:
        bb, ll, h, p, n = b or r.size["b"], l or r.size["ssd_l"], r.size["h"], r.size["p"], r.size["ssd_n"]
        g = groups or r.size["g"]
        kw = {"x": r.normal(bb, ll, h, p),
              "dt": r.uniform(bb, ll, h, low=-3.0, high=0.0) if extras else r.uniform(bb, ll, h, low=0.02, high=0.3),
              "A": -r.uniform(h, low=0.5, high=3.0, dtype=torch.float32),
              "B": r.normal(bb, ll, g, n, scale=0.5), "C": r.normal(bb, ll, g, n, scale=0.5), "chunk_size": chunk}
        if extras:
            kw.update(D=r.normal(*((h, p) if D_per_channel else (h,)), dtype=torch.float32), z=r.normal(bb, ll, h, p),
                      dt_bias=r.uniform(h, low=-0.5, high=0.5, dtype=torch.float32), dt_softplus=True)
        return kw
    return make


def ssd_cases() -> list[CheckCase]:
    P = "ssd"
    grads = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    kernels_only = ("triton", "cuda")

    def init(r, kw):
        count = 4 if "cu_seqlens" in kw else kw["x"].shape[0]
        return r.normal(count, *kw["x"].shape[2:], kw["B"].shape[-1], scale=0.5, dtype=torch.float32)

    def seq(r, kw):
        return r.seq_idx(kw["x"].shape[0], kw["x"].shape[1], (3, 20))

    def cu(r, kw):
        return r.int32(cu_seqlens_for(kw["x"].shape[1], (5, 0, 19)))  # lengths 5, 0, 19, rest

    def bias(r, kw):
        return r.uniform(kw["x"].shape[2], low=-0.5, high=0.5, dtype=torch.float32)

    return [
        CheckCase(P, "D, z, dt_bias, softplus (chunk 16)", _ssd_inputs(), _ssd, grads, quick=True),
        CheckCase(P, "plain (no D/z/bias)", _ssd_inputs(extras=False), _ssd, ("x", "dt", "A", "B", "C")),
        CheckCase(P, "D per channel (h,p)", _ssd_inputs(D_per_channel=True), _ssd, grads),
        CheckCase(P, "one group", _ssd_inputs(groups=1), _ssd, grads),
        CheckCase(P, "dt_limit", _with(_ssd_inputs(), dt_limit=(0.2, 0.9)), _ssd, grads),
        CheckCase(P, "length 1 + states", _with(_ssd_inputs(l=1), initial_states=init, return_final_states=True),
                  _ssd, grads + ("initial_states",)),
        CheckCase(P, "initial + final states", _with(_ssd_inputs(), initial_states=init, return_final_states=True),
                  _ssd, grads + ("initial_states",), quick=True),
        CheckCase(P, "seq_idx + states", _with(_ssd_inputs(), seq_idx=seq, initial_states=init,
                                               return_final_states=True), _ssd, grads + ("initial_states",)),
        CheckCase(P, "cu_seqlens + varlen states", _with(_ssd_inputs(b=1), cu_seqlens=cu, initial_states=init,
                                                         return_varlen_states=True),
                  _ssd, grads + ("initial_states",)),
        CheckCase(P, "chunk 32", _ssd_inputs(chunk=32), _ssd, grads, backends=kernels_only),
        CheckCase(P, "chunk 64", _ssd_inputs(chunk=64), _ssd, grads, backends=kernels_only),
        CheckCase(P, "chunk 256", _ssd_inputs(chunk=256), _ssd, grads, backends=kernels_only),
        CheckCase(P, "vs quadratic form", _with(_ssd_inputs(extras=False), dt_bias=bias, dt_softplus=True), _ssd,
                  ("x", "dt", "A", "B", "C", "dt_bias"),
                  backends=("reference",), alternative=_ssd_quadratic, dtypes=SECOND_FORMULATION_DTYPES,
                  quick=True),
    ]


# ----------------------------------------------------------------------------- state_update
def _state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                  state_batch_indices=None, pad_slot_id=-1, broadcast=False, backend=None):
    """Runs the update and returns ``(out, state)``. With ``broadcast``, per-head A/dt/D/dt_bias are
    expanded to ``(h, p[, n])`` as stride-0 views, as Mamba-2 decoding passes them."""
    if broadcast:
        h, p, n = state.shape[1:]
        A = A[:, None, None].expand(h, p, n)
        dt = dt[..., None].expand(*dt.shape, p)
        D = None if D is None else D[:, None].expand(h, p)
        dt_bias = None if dt_bias is None else dt_bias[:, None].expand(h, p)
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                                 pad_slot_id, backend=backend)
    return out, state


def _state_inputs(form: str = "mamba2", tokens: int | None = None, state_dtype: torch.dtype | None = None,
                  broadcast: bool = True, b: int | None = None):
    def make(r: Inputs) -> dict:
        bb, cache = b or r.size["b"], r.size["cache"]
        h, p, g, n = r.size["h"], r.size["p"], r.size["g"], r.size["ssd_n"]
        t = () if tokens is None else (tokens,)
        sdt = state_dtype or r.dtype
        if form == "mamba1":
            d = r.size["d"]
            return {"state": r.normal(cache, d, n, dtype=sdt), "x": r.normal(bb, *t, d),
                    "dt": r.uniform(bb, *t, d, low=-3.0, high=0.0), "A": -r.uniform(d, n, low=0.5, high=2.0),
                    "B": r.normal(bb, *t, n), "C": r.normal(bb, *t, n), "D": r.normal(d), "z": r.normal(bb, *t, d),
                    "dt_bias": r.uniform(d, low=-0.5, high=0.5), "dt_softplus": True}
        kw = {"state": r.normal(cache, h, p, n, dtype=sdt), "x": r.normal(bb, *t, h, p),
              "B": r.normal(bb, *t, g, n), "C": r.normal(bb, *t, g, n), "dt_softplus": True,
              "z": r.normal(bb, *t, h, p)}
        if broadcast:
            kw.update(dt=r.uniform(bb, *t, h, low=-3.0, high=0.0), A=-r.uniform(h, low=0.5, high=3.0),
                      D=r.normal(h), dt_bias=r.uniform(h, low=-0.5, high=0.5), broadcast=True)
        else:
            kw.update(dt=r.uniform(bb, *t, h, p, low=-3.0, high=0.0), A=-r.uniform(h, p, n, low=0.5, high=3.0),
                      D=r.normal(h, p), dt_bias=r.uniform(h, p, low=-0.5, high=0.5))
        return kw
    return make


def state_update_cases() -> list[CheckCase]:
    P = "state_update"
    return [
        CheckCase(P, "mamba2 broadcast A/dt/D (state f32)", _state_inputs(state_dtype=torch.float32),
                  _state_update, quick=True),
        CheckCase(P, "mamba2 dense A/dt/D (state f32)", _state_inputs(state_dtype=torch.float32, broadcast=False),
                  _state_update),
        CheckCase(P, "mamba2 state bf16", _state_inputs(state_dtype=torch.bfloat16), _state_update),
        CheckCase(P, "mamba2 state f16", _state_inputs(state_dtype=torch.float16), _state_update),
        CheckCase(P, "mamba2 state in input dtype", _state_inputs(), _state_update),
        CheckCase(P, "mamba1 (state f32)", _state_inputs("mamba1", state_dtype=torch.float32), _state_update,
                  quick=True),
        CheckCase(P, "multi-token t=3", _state_inputs(tokens=3, state_dtype=torch.float32), _state_update),
        CheckCase(P, "mamba1 multi-token t=2", _state_inputs("mamba1", tokens=2, state_dtype=torch.float32),
                  _state_update),
        CheckCase(P, "indices + pad slot", _with(_state_inputs(state_dtype=torch.float32, b=3),
                                                 state_batch_indices=lambda r, kw: r.int32([3, -1, 1])),
                  _state_update),
        CheckCase(P, "indices, custom pad_slot_id", _with(_state_inputs(state_dtype=torch.float32, b=3),
                                                          state_batch_indices=lambda r, kw: r.int32([2, 99, 0]),
                                                          pad_slot_id=99), _state_update),
    ]


def all_cases() -> list[CheckCase]:
    return conv_cases() + scan_cases() + ssd_cases() + state_update_cases()


# ----------------------------------------------------------------------------- the runner
def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _prepare(inputs: dict, dtype: torch.dtype | None, grads: tuple[str, ...]) -> dict:
    """Fresh copies (in-place ops mutate them), floats cast to ``dtype`` unless None, grads enabled."""
    prepared = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = value.clone()
            if name in grads:
                value.requires_grad_(True)
        prepared[name] = value
    return prepared


def _compare_all(case: CheckCase, runs: dict, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, Comparison]]:
    comparisons = []
    outs64, outs_lowp, outs_kernel = (runs[k][1] for k in ("ref64", "ref_lowp", "kernel"))
    if len(outs_kernel) != len(outs64):
        raise AssertionError(f"the backend returned {len(outs_kernel)} outputs, the reference {len(outs64)}")
    for i, (o64, olow, oker) in enumerate(zip(outs64, outs_lowp, outs_kernel)):
        comparisons.append((f"output {i}", compare(oker, o64, olow, dtype)))
    if not case.grads:
        return comparisons
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs64]
    grads = {}
    for key, (args, outs) in runs.items():
        terms = [(o.to(torch.float64) * g.to(o.device)).sum() for o, g in zip(outs, upstream) if o.requires_grad]
        if not terms:
            raise AssertionError(f"no output of the {key} run requires grad")
        wanted = [args[name] for name in case.grads if name in args]
        grads[key] = dict(zip([n for n in case.grads if n in args],
                              torch.autograd.grad(sum(terms), wanted, allow_unused=True)))
    for name, g64 in grads["ref64"].items():
        if g64 is None:
            continue
        g_kernel = grads["kernel"][name]
        if g_kernel is None:
            raise AssertionError(f"the backend gives no gradient for {name}")
        comparisons.append((f"grad {name}", compare(g_kernel, g64, grads["ref_lowp"][name], dtype)))
    return comparisons


def run_case(case: CheckCase, backend: str, dtype: torch.dtype, device: torch.device,
             size: str = "tiny") -> CheckResult:
    """Run one row; never raises for a kernel error (that is a FAIL row with the message)."""
    started = time.perf_counter()
    result = CheckResult(case, backend, dtype, "FAIL")
    try:
        inputs = case.make(Inputs(case.seed(), dtype, device, SIZES[size]))
        runs = {}
        # The backend first: an unavailable one is skipped before the references are paid for.
        args = _prepare(inputs, None, case.grads)
        if case.alternative is not None:
            runs["kernel"] = (args, _outputs(case.alternative(**args)))
        else:
            runs["kernel"] = (args, _outputs(case.call(**args, backend=backend)))
        for key, target in (("ref64", torch.float64), ("ref_lowp", None)):
            args = _prepare(inputs, target, case.grads)
            runs[key] = (args, _outputs(case.call(**args, backend="reference")))
        comparisons = _compare_all(case, runs, dtype, torch.Generator().manual_seed(case.seed() + 1))
        worst_name, worst = max(comparisons, key=lambda item: _ratio(item[1]))
        result.error, result.tolerance, result.worst = worst.error, worst.tolerance, worst_name
        failed = [name for name, c in comparisons if not c.ok]
        result.status = "FAIL" if failed else "PASS"
        if failed:
            result.detail = "exceeds tolerance: " + ", ".join(failed)
    except BackendUnavailable as exc:
        result.status, result.detail = "SKIP", _reason(str(exc))
    except Exception as exc:  # a crashing kernel is a failure of this row, not of the run
        lines = str(exc).strip().splitlines()
        result.status, result.detail = "FAIL", f"{type(exc).__name__}: {lines[0] if lines else ''}"
    result.seconds = time.perf_counter() - started
    return result


def _ratio(c: Comparison) -> float:
    return math.inf if not math.isfinite(c.error) else c.error / c.tolerance


def _reason(message: str) -> str:
    """The reason part of a BackendUnavailable message."""
    return message.split("cannot serve this call: ", 1)[-1]


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """What ``check`` will run: (case, backend, dtype) rows plus rows skipped up front with a reason."""
    device: torch.device
    size: str
    rows: list[tuple[CheckCase, str, torch.dtype, str | None]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[CheckCase, str, torch.dtype, str | None]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def backend_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run anything on ``device`` (per-call reasons come later, as SKIP rows)."""
    if backend == "reference":
        return None
    if backend == "triton":
        return dispatch.triton_device_reason(device)
    return dispatch.cuda_device_reason(device)


def default_dtypes(backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """Every dtype on a GPU and for the reference. Triton on the CPU (its interpreter) gets float32
    for every row and float16 for the ``quick`` rows (``plan``): the interpreter is slow, and it
    mishandles bf16 ``tl.dot``; ``--dtype`` overrides this."""
    if device.type == "cuda" or backend == "reference":
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float16)


def plan(primitives: Iterable[str] | None = None, backends: Iterable[str] | None = None,
         dtypes: Iterable[torch.dtype] | None = None, quick: bool = False,
         device: torch.device | None = None, cases: list[CheckCase] | None = None,
         features: str | None = None, size: str | None = None) -> Plan:
    """The rows to run: ``size`` is ``tiny`` (default on CPU) or ``small`` (default on a GPU)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    primitives = tuple(primitives or PRIMITIVES)
    backends = tuple(backends or BACKENDS)
    result = Plan(device, size or ("small" if device.type == "cuda" else "tiny"))
    reasons = {b: backend_reason(b, device) for b in backends}
    for case in cases if cases is not None else all_cases():
        if case.primitive not in primitives or (quick and not case.quick):
            continue
        if features and features.lower() not in case.feature.lower():
            continue
        for backend in backends:
            if backend not in case.backends:
                continue
            wanted = tuple(dtypes) if dtypes else default_dtypes(backend, device)
            if not dtypes and backend == "triton" and device.type == "cpu" and not case.quick:
                wanted = wanted[:1]  # the interpreter is slow: float16 for the main rows only
            if case.dtypes is not None:  # rows pinned to dtypes (second formulations: float64)
                wanted = tuple(d for d in case.dtypes if not dtypes or d in dtypes)
            if quick and not dtypes:
                wanted = wanted[:1]
            for dtype in wanted:
                skip = reasons[backend]
                if (skip is None and backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16):
                    skip = "the Triton interpreter mishandles bfloat16 tl.dot; bf16 is checked on a GPU"
                result.rows.append((case, backend, dtype, skip))
    return result


def run_plan(the_plan: Plan, on_result: Callable[[int, int, CheckResult], None] | None = None) -> list[CheckResult]:
    results = []
    for index, (case, backend, dtype, skip) in enumerate(the_plan, start=1):
        if skip:
            res = CheckResult(case, backend, dtype, "SKIP", detail=skip)
        else:
            res = run_case(case, backend, dtype, the_plan.device, the_plan.size)
        results.append(res)
        if on_result:
            on_result(index, len(the_plan), res)
    return results


__all__ = ["CheckCase", "CheckResult", "Inputs", "Plan", "all_cases", "plan", "run_case", "run_plan"]
