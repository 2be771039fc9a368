"""Cuda kernels of selective_scan (csrc/selective_scan): thin calls into the torch-free extension.

Where they apply (input-dependent B/C of u's dtype, whole 32- or 16-channel blocks per B/C group,
d_state 16-128, forward and backward), state-parallel kernels run the recurrence of a few
states per thread step by step; elsewhere the warp-per-channel kernels scan one channel per warp.
Both keep the state entering every ``CHUNK`` (= 2048) steps as the backward's checkpoint; the
state-parallel backward also takes a workspace (the state entering each 8-step sub-tile of the chunk
its resident blocks work on), sized by the extension. A, D and delta_bias go to the kernels as
float32; delta and z in u's dtype; B and C in u's dtype or float32 (anything else is converted
here). Gradients of input-dependent B and C sum over channels with float atomics (one per block and
element, after the block's channels are summed in shared memory); in deterministic mode the
backward instead runs per slice of channels, each channel adding into a slot of its own (one add
per address, onto zeros), and the slots are summed in a fixed order here.
"""
from __future__ import annotations

import math

import torch

from ..._core import config, ext, native

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 2048  # must equal ssmk::scan::kChunk (checked against the extension at first use)
# With z and a backward to come, the forward also writes ``pregate`` (y + D u before the gate) for
# the state-parallel backward's dz (op.py); without it that backward leaves z calls to the warp kernel.
KEEPS_PREGATE = True
# backward() writes dA, dD and ddelta_bias whole (sums of per-sequence parts), so the op need not zero them.
WRITES_PARAM_GRADS = True


def unsupported(features: dict) -> str | None:
    if not ext.has_kernel("selective_scan_fwd"):
        return "the ssmkernels CUDA extension has no selective_scan kernels (rebuild it)"
    if int(getattr(ext.module(), "selective_scan_chunk", CHUNK)) != CHUNK:
        return "the ssmkernels CUDA extension was built with another selective_scan chunk size (rebuild it)"
    if not hasattr(ext.module().SelectiveScanParams(), "out_pre"):
        return "the loaded ssmkernels._C predates selective_scan's pregate output (rebuild it: python -m ssmkernels build)"
    dtype = features.get("dtype")
    if dtype not in _FLOATS:
        return f"the cuda kernels take float32/float16/bfloat16 inputs, got {dtype}"
    if (config.deterministic() and features.get("needs_grad") and features.get("bc_layout") != "fixed"
            and not hasattr(ext.module().SelectiveScanParams(), "bc_grad_per_channel")):
        return ("the loaded ssmkernels._C predates the deterministic backward of input-dependent B/C "
                "(rebuild it: python -m ssmkernels build)")
    return None


# Deterministic mode: the per-channel B/C gradient slots of one backward launch take at most this
# many bytes each (dB and dC), which sets how many channels a launch covers.
DETERMINISTIC_SLOT_BYTES = 256 << 20


def _groups(M) -> int:
    """Groups of an input-dependent B or C: ``(b, g, n, l)``, or ``(b, n, l)`` shared by all channels."""
    return 1 if M.dim() == 3 else M.shape[1]


def _deterministic_slice(B, C, d: int, per_channel_bytes: int) -> int:
    """Channels per launch in deterministic mode: a divisor of every varying B/C's channels per group
    (so a launch's slots belong to one group of each), within DETERMINISTIC_SLOT_BYTES."""
    span = 0
    for M in (B, C):
        if M.dim() != 2:
            span = math.gcd(span, d // _groups(M))
    if span < 1:  # no channels: nothing to slice
        return 1
    limit = max(1, DETERMINISTIC_SLOT_BYTES // max(1, per_channel_bytes))
    return max(k for k in range(1, min(span, limit) + 1) if span % k == 0)


def checkpoint_shape(u_shape, n: int, num_sequences: int) -> tuple:
    """One float32 ``(d, n)`` state per chunk of each sequence (layout as in the Triton backend)."""
    b, d, l = u_shape
    return (b * -(-l // CHUNK) + num_sequences, d, n)


def _bc_fields(params, prefix: str, M: torch.Tensor, d: int) -> None:
    fixed = M.dim() == 2
    setattr(params, f"{prefix.lower()}_fixed", fixed)
    if fixed:  # (d, n): the channel plays the group
        setattr(params, f"channels_per_{prefix.lower()}_group", 1)
        strides = (0, M.stride(0), M.stride(1))
    elif M.dim() == 3:  # (b, n, l): one group
        setattr(params, f"channels_per_{prefix.lower()}_group", d)
        strides = (M.stride(0), 0, M.stride(1))
    else:
        setattr(params, f"channels_per_{prefix.lower()}_group", d // M.shape[1])
        strides = (M.stride(0), M.stride(1), M.stride(2))
    for name, value in zip(("batch", "group", "n"), strides):
        setattr(params, f"{prefix}_{name}_stride", value)


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Tensors in the dtypes the kernels take (copies only where the caller mixed dtypes)."""
    f32 = torch.float32
    delta = delta if delta.dtype == u.dtype else delta.to(u.dtype)
    z = z if z is None or z.dtype == u.dtype else z.to(u.dtype)
    if not (B.dtype == C.dtype and B.dtype in (u.dtype, f32)):
        B, C = B.to(f32), C.to(f32)
    A = A.to(f32).contiguous()
    D = None if D is None else D.to(f32).contiguous()
    delta_bias = None if delta_bias is None else delta_bias.to(f32).contiguous()
    return delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias


def _params(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, count):
    b, d, l = u.shape
    m = ext.module()
    p = m.SelectiveScanParams()
    p.batch, p.dim, p.seqlen, p.dstate = b, d, l, A.shape[1]
    p.num_seqs = count
    p.chunks_per_row = -(-l // CHUNK)
    p.dtype = native.dtype_code(u)
    p.bc_dtype = native.dtype_code(B)
    p.softplus = bool(delta_softplus)
    _bc_fields(p, "B", B, d)
    _bc_fields(p, "C", C, d)
    p.u, p.delta, p.z = native.address(u), native.address(delta), native.address(z)
    p.A, p.B, p.C = native.address(A), native.address(B), native.address(C)
    p.D, p.delta_bias = native.address(D), native.address(delta_bias)
    p.cu_seqlens = native.address(cu_seqlens)
    p.x_batch_stride, p.x_d_stride = u.stride(0), u.stride(1)
    p.stream = native.stream_of(u)
    return p


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
            out, last_state, checkpoints, pregate=None) -> None:
    """Writes ``out (b, d, l)``, ``last_state (s, d, n)``, the chunk ``checkpoints`` and, when given,
    ``pregate (b, d, l)`` (the output before the z gate, u's dtype)."""
    delta, A, B, C, D, z, delta_bias = _prepare(u, delta, A, B, C, D, z, delta_bias)
    p = _params(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, last_state.shape[0])
    p.out = native.address(out)
    p.out_pre = native.address(pregate)
    p.initial_state = native.address(initial_state)
    p.last_state = native.address(last_state)
    p.checkpoints = native.address(checkpoints)
    ext.module().selective_scan_fwd(p)


def backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
             checkpoints, dout, dlast_state, du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
             dinitial_state, pregate=None) -> None:
    """Writes du, ddelta, dz, dinitial_state and the float32 dA, dD, ddelta_bias; adds into the zeroed
    float32 dB, dC. ``pregate``: the forward's, when it kept one."""
    b, d, l = u.shape
    n = A.shape[1]
    count = checkpoints.shape[0] - b * -(-l // CHUNK)
    delta, A, B, C, D, z, delta_bias = _prepare(u, delta, A, B, C, D, z, delta_bias)
    p = _params(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, count)
    p.out_pre = native.address(pregate)  # (before the workspace query: without it, z calls take the warp kernel)
    dev, f32 = u.device, torch.float32
    dout = dout if dout.dtype == u.dtype else dout.to(u.dtype)
    if dlast_state is not None:
        dlast_state = dlast_state.to(f32).contiguous()
    # The kernels write du/ddelta/dz in u's dtype: stage through buffers when the outputs differ.
    staged = {name: (g if g is None or g.dtype == u.dtype else torch.empty_like(g, dtype=u.dtype))
              for name, g in (("ddelta", ddelta), ("dz", dz))}
    dA_part = torch.empty(count, d, n, device=dev, dtype=f32)
    dD_part = torch.empty(count, d, device=dev, dtype=f32)
    dbias_part = torch.empty(count, d, device=dev, dtype=f32)
    # Deterministic mode with input-dependent B/C: launches over slices of `per_launch` channels,
    # each channel adding into its own slot of a (b, per_launch, n, l) buffer (see selective_scan.h).
    per_channel = config.deterministic() and any(M.dim() != 2 for M in (B, C))
    per_launch = _deterministic_slice(B, C, d, b * n * l * 4) if per_channel else d
    grad_bufs = []
    for prefix, M, dM in (("dB", B, dB), ("dC", C, dC)):
        if M.dim() == 2:
            buf = torch.empty(count, d, n, device=dev, dtype=f32)
            strides = (0, 0, 0)
        elif per_channel:
            buf = torch.empty(M.shape[0], per_launch, n, l, device=dev, dtype=f32)
            strides = (buf.stride(0), buf.stride(1), buf.stride(2))
        else:
            g = _groups(M)
            buf = dM.view(M.shape[0], g, n, l)  # zeroed float32: the kernel adds with atomics
            strides = (buf.stride(0), buf.stride(1) if g > 1 else 0, buf.stride(2))
        grad_bufs.append(buf)
        setattr(p, prefix, native.address(buf))
        for name, value in zip(("batch", "group", "n"), strides):
            setattr(p, f"{prefix}_{name}_stride", value)
    p.checkpoints = native.address(checkpoints)
    # The state-parallel backward's workspace (the state entering each 8-step sub-tile of the chunk its
    # resident blocks work on); 0 values: the call takes the warp-per-channel kernel.
    workspace = None
    if not per_channel and hasattr(ext.module(), "selective_scan_bwd_workspace"):
        floats = ext.module().selective_scan_bwd_workspace(p)
        if floats > 0:
            workspace = torch.empty(floats, device=dev, dtype=f32)
            p.tile_states = native.address(workspace)
    p.dout, p.dlast_state = native.address(dout), native.address(dlast_state)
    p.du, p.ddelta, p.dz = native.address(du), native.address(staged["ddelta"]), native.address(staged["dz"])
    p.dinitial_state = native.address(dinitial_state)
    p.dA_part, p.dD_part, p.dbias_part = native.address(dA_part), native.address(dD_part), native.address(dbias_part)
    if not per_channel:
        ext.module().selective_scan_bwd(p)
    else:
        # (slots, dM as (b, g, n, l), channels per group) of each input-dependent B/C
        varying = [(buf, dM.view(M.shape[0], _groups(M), n, l), d // _groups(M))
                   for M, dM, buf in ((B, dB, grad_bufs[0]), (C, dC, grad_bufs[1])) if M.dim() != 2]
        p.bc_grad_per_channel, p.channel_count = True, per_launch
        for begin in range(0, d, per_launch):
            for slots, _, _ in varying:
                slots.zero_()
            p.channel_begin = begin
            ext.module().selective_scan_bwd(p)
            for slots, grouped, per_group in varying:  # the slice lies in one group of each
                grouped[:, begin // per_group] += slots.sum(1)
    for name, g in (("ddelta", ddelta), ("dz", dz)):
        if g is not None and staged[name] is not g:
            g.copy_(staged[name])
    torch.sum(dA_part, 0, out=dA)  # written whole (WRITES_PARAM_GRADS)
    if dD is not None:
        torch.sum(dD_part, 0, out=dD)
    if ddelta_bias is not None:
        torch.sum(dbias_part, 0, out=ddelta_bias)
    for M, dM, buf in ((B, dB, grad_bufs[0]), (C, dC, grad_bufs[1])):
        if M.dim() == 2:
            dM += buf.sum(0).view_as(dM)
