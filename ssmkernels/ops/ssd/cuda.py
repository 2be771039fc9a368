"""Cuda backend of ssd: the SSD recurrence on the selective-scan CUDA kernels (csrc/selective_scan).

SSD is a selective scan whose decay is one scalar per head (SPEC law 6), so this backend lays the
call out as one: channel ``c = head * p + row`` of a ``(rows, d = h * p, L)`` scan, ``A`` expanded
over ``(p, n)``, the processed ``dt`` over ``p``, and B/C as groups of ``(h / g) * p`` channels (head
``i`` reads group ``i // (h / g)`` in both). It is the CUDA backend until the chunked tensor-core
kernel of issue #5 exists: exact (there is no chunking, ``chunk_size`` is unused) but slower than
the Triton backend, which ``backend=None`` keeps choosing. Its costs:

- layout: ``x``, the processed ``dt`` (expanded over ``p``), ``z``, ``B`` and ``C`` are copied into
  the scan's length-last float32 layout, and ``out`` back;
- float32 scan: ``dt`` is processed here (bias, softplus, ``dt_limit``) in float32, and the scan's
  ``delta`` has ``u``'s dtype, so every operand goes in float32 (a bfloat16 ``dt'`` would lose
  the precision the SPEC rule asks of ``dA``);
- the backward runs the forward scan again for its checkpoints: the op's checkpoint tensor has a
  shape fixed by the inputs' shapes, and ``seq_idx`` makes the number of scan sequences depend on
  values;
- ``seq_idx``: the rows are packed into one row of ``b * l`` positions and cut where ``seq_idx``
  changes, which reads ``seq_idx`` on the host (a device sync; such calls cannot be captured in a
  CUDA graph on this backend).

Deterministic mode: the scan's backward then adds the B/C gradients per channel slot instead of
with float atomics (selective_scan/cuda.py), and everything else here is plain torch arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..selective_scan import cuda as scan_cuda
from . import reference

F32 = torch.float32


def unsupported(features: dict) -> str | None:
    return scan_cuda.unsupported({"dtype": features.get("dtype"), "bc_layout": "grouped",
                                  "needs_grad": features.get("needs_grad")})


def checkpoint_shape(x_shape, n: int, chunk_size: int) -> tuple:
    return (0,)  # nothing kept: the backward recomputes the scan's checkpoints


@dataclass
class _Layout:
    """Where the SSD call's sequences sit in the scan: ``rows`` rows of ``length`` positions, cut
    into ``count`` sequences (``cu`` their boundaries, or None: one sequence per row)."""
    b: int
    l: int
    h: int
    p: int
    n: int
    rows: int
    length: int
    cu: Optional[Tensor]
    count: int
    first: Optional[Tensor] = None  # packed seq_idx rows: each row's first and last sequence
    last: Optional[Tensor] = None

    @property
    def d(self) -> int:
        return self.h * self.p

    def to_scan(self, t: Tensor) -> Tensor:
        """``(b, l, h, p)`` (or ``(b, l, d)``) -> ``(rows, d, length)`` float32, contiguous."""
        return t.to(F32).reshape(self.rows, self.length, self.d).transpose(1, 2).contiguous()

    def from_scan(self, t: Tensor) -> Tensor:
        """``(rows, d, length)`` -> ``(b, l, h, p)`` (a view)."""
        return t.transpose(1, 2).reshape(self.b, self.l, self.h, self.p)

    def groups_to_scan(self, M: Tensor) -> Tensor:
        """B or C ``(b, l, g, n)`` -> ``(rows, g, n, length)`` float32."""
        return M.to(F32).reshape(self.rows, self.length, M.shape[2], self.n).permute(0, 2, 3, 1).contiguous()

    def groups_from_scan(self, t: Tensor) -> Tensor:
        return t.permute(0, 3, 1, 2).reshape(self.b, self.l, t.shape[1], self.n)

    def initial(self, initial_states: Optional[Tensor]) -> Optional[Tensor]:
        """The scan's ``(count, d, n)`` initial states; packed rows start their later sequences at zero."""
        if initial_states is None:
            return None
        states = initial_states.to(F32).reshape(-1, self.d, self.n)
        if self.first is None:
            return states.contiguous()
        full = states.new_zeros(self.count, self.d, self.n)
        full[self.first] = states
        return full

    @property
    def final_rows(self):
        """Index of each row's last sequence among the scan's ``count``: ``final_states`` (and its
        gradient) are those sequences' states."""
        if self.last is not None:
            return self.last
        return slice(self.count - 1, self.count) if self.cu is not None else slice(None)


def _layout(x: Tensor, B: Tensor, seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> _Layout:
    b, l, h, p = x.shape
    n = B.shape[-1]
    if cu_seqlens is not None:  # b == 1 (validated): the scan's own packed sequences
        return _Layout(b, l, h, p, n, 1, l, cu_seqlens.to(torch.int32), cu_seqlens.numel() - 1)
    if seq_idx is None:
        return _Layout(b, l, h, p, n, b, l, None, b)
    # Pack the rows into one and cut it at every row start and every change of seq_idx.
    flat = seq_idx.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::l] = True
    begin = torch.nonzero(starts).flatten()  # host sync: the number of sequences
    cu = torch.cat([begin, begin.new_tensor([b * l])]).to(torch.int32)
    first = torch.searchsorted(begin, torch.arange(b, device=x.device) * l)
    last = torch.cat([first[1:], first.new_tensor([begin.numel()])]) - 1
    return _Layout(b, l, h, p, n, 1, b * l, cu, begin.numel(), first, last)


def _scan_inputs(lay: _Layout, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max):
    """The selective-scan inputs of the call, all float32 in the scan's layout."""
    h, p, n = lay.h, lay.p, lay.n
    dtp = reference.process_dt(dt, dt_bias, dt_softplus, (dt_min, dt_max)).to(F32)  # (b, l, h)
    D_channels = None
    if D is not None:
        D_channels = (D.to(F32)[:, None].expand(h, p) if D.dim() == 1 else D.to(F32)).reshape(lay.d).contiguous()
    return dict(u=lay.to_scan(x), delta=lay.to_scan(dtp[..., None].expand(*dtp.shape, p)),
                A=A.to(F32)[:, None, None].expand(h, p, n).reshape(lay.d, n).contiguous(),
                B=lay.groups_to_scan(B), C=lay.groups_to_scan(C), D=D_channels,
                z=None if z is None else lay.to_scan(z), delta_bias=None,
                initial_state=lay.initial(initial_states))


def _run_scan(lay: _Layout, i: dict, for_backward: bool = False):
    """(out, per-sequence final states, checkpoints, pregate) of the forward scan; pregate (the
    output before the z gate, which the scan's backward takes for dz) only for_backward with z."""
    u = i["u"]
    out = torch.empty_like(u)
    last = u.new_empty(lay.count, lay.d, lay.n)
    checkpoints = u.new_empty(scan_cuda.checkpoint_shape(u.shape, lay.n, lay.count))
    pregate = torch.empty_like(u) if for_backward and i["z"] is not None else None
    scan_cuda.forward(u, i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], None, i["initial_state"], lay.cu,
                      False, out, last, checkpoints, pregate=pregate)
    return out, last, checkpoints, pregate


def forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
            dt_min, dt_max, out, final_states, varlen_states, checkpoints) -> None:
    if x.numel() == 0:  # no positions: every state is its initial one
        states = varlen_states if cu_seqlens is not None else final_states
        if initial_states is not None:
            states.copy_(initial_states)
        else:
            states.zero_()
        if cu_seqlens is not None:
            final_states.copy_(states[-1:])
        return
    lay = _layout(x, B, seq_idx, cu_seqlens)
    i = _scan_inputs(lay, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max)
    scan_out, last, _, _ = _run_scan(lay, i)
    out.copy_(lay.from_scan(scan_out))
    final_states.copy_(last[lay.final_rows].view(final_states.shape))
    if cu_seqlens is not None:
        varlen_states.copy_(last.view(varlen_states.shape))


def _dt_gradients(dt, dt_bias, dt_softplus, dt_min, dt_max, d_dtp: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Chain ``d out / d dt'`` through ``dt' = clamp(softplus(dt + dt_bias))`` by hand (a custom op's
    kernel runs below autograd), with the derivatives torch gives the reference's functions:
    softplus' = sigmoid up to its linear threshold of 20, then 1; clamp passes the gradient where
    ``low <= v <= high``."""
    v = dt.to(F32)
    if dt_bias is not None:
        v = v + dt_bias.to(F32)
    grad = d_dtp.to(F32)
    if dt_softplus:
        grad = grad * torch.where(v > 20.0, torch.ones_like(v), torch.sigmoid(v))
        v = torch.nn.functional.softplus(v)
    if dt_min > 0.0 or dt_max < math.inf:
        grad = grad * ((v >= dt_min) & (v <= dt_max))
    return grad, (None if dt_bias is None else grad.sum((0, 1)))


def backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
             dt_min, dt_max, out, checkpoints, dout, dfinal_states, dvarlen_states,
             dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states) -> None:
    """Writes dx, ddt, dz, dinitial_states; adds into the zeroed float32 dA, dB, dC, dD, ddt_bias."""
    if x.numel() == 0:  # no positions: the state gradients flow straight to the initial states
        ddt.zero_()
        if dinitial_states is not None:
            dinitial_states.zero_()
            if dvarlen_states is not None:
                dinitial_states += dvarlen_states
            if dfinal_states is not None:
                dinitial_states[-dfinal_states.shape[0]:] += dfinal_states
        return
    lay = _layout(x, B, seq_idx, cu_seqlens)
    i = _scan_inputs(lay, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max)
    _, _, scan_checkpoints, scan_pregate = _run_scan(lay, i, for_backward=True)

    dlast = None
    if dfinal_states is not None or dvarlen_states is not None:
        dlast = i["u"].new_zeros(lay.count, lay.d, lay.n)
        if dvarlen_states is not None:
            dlast += dvarlen_states.to(F32).reshape(lay.count, lay.d, lay.n)
        if dfinal_states is not None:
            dlast[lay.final_rows] += dfinal_states.to(F32).reshape(-1, lay.d, lay.n)
    u = i["u"]
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz_scan = None if z is None else torch.empty_like(u)
    dA_scan = torch.empty_like(i["A"])  # (written whole by the scan backward, as dD_scan)
    dB_scan, dC_scan = torch.zeros_like(i["B"]), torch.zeros_like(i["C"])
    dD_scan = None if D is None else torch.empty_like(i["D"])
    dinit_scan = None if initial_states is None else u.new_empty(lay.count, lay.d, lay.n)
    scan_cuda.backward(u, i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], None, i["initial_state"], lay.cu,
                       False, scan_checkpoints, lay.to_scan(dout), dlast, du, ddelta, dA_scan, dB_scan, dC_scan,
                       dD_scan, dz_scan, None, dinit_scan, pregate=scan_pregate)

    h, p, n = lay.h, lay.p, lay.n
    dx.copy_(lay.from_scan(du))
    if dz is not None:
        dz.copy_(lay.from_scan(dz_scan))
    dA += dA_scan.view(h, p * n).sum(1)
    if dD is not None:
        dD += dD_scan.view(h, p).sum(1) if D.dim() == 1 else dD_scan.view(h, p)
    dB += lay.groups_from_scan(dB_scan)
    dC += lay.groups_from_scan(dC_scan)
    d_dtp = lay.from_scan(ddelta).sum(-1)  # (b, l, h): dt' is shared by the p channels of a head
    g_dt, g_bias = _dt_gradients(dt, dt_bias, dt_softplus, dt_min, dt_max, d_dtp)
    ddt.copy_(g_dt)
    if ddt_bias is not None:
        ddt_bias += g_bias
    if dinitial_states is not None:
        rows = dinit_scan if lay.first is None else dinit_scan[lay.first]
        dinitial_states.copy_(rows.view(dinitial_states.shape))
