"""The reference backend against the consistency laws of SPEC.md (float64, CPU) and against second,
independent formulations. These pin down the semantics every kernel is tested against."""
import math

import pytest
import torch
import torch.nn.functional as F

import ssmkernels
from ssmkernels.ops.ssd import reference as ssd_ref

f64 = dict(dtype=torch.float64)
REF = dict(backend="reference")


def ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, **f64)
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, **f64) - 0.2,
                B=r(b, l, g, n), C=r(b, l, g, n), D=r(h), z=r(b, l, h, p), dt_bias=r(h) * 0.5)


def conv_inputs(b=2, d=5, l=29, w=4):
    return dict(x=torch.randn(b, d, l, **f64), weight=torch.randn(d, w, **f64), bias=torch.randn(d, **f64))


def scan_inputs(b=2, d=6, l=23, n=4):
    return dict(u=torch.randn(b, d, l, **f64), delta=torch.randn(b, d, l, **f64) * 0.5,
                A=-torch.rand(d, n, **f64) - 0.1, B=torch.randn(b, n, l, **f64), C=torch.randn(b, n, l, **f64),
                D=torch.randn(d, **f64), z=torch.randn(b, d, l, **f64), delta_bias=torch.randn(d, **f64) * 0.1)


# ------------------------------------------------------------------- second formulations
def test_conv_matches_torch_conv1d():
    inp = conv_inputs()
    w = inp["weight"].shape[1]
    expected = F.conv1d(F.pad(inp["x"], (w - 1, 0)), inp["weight"][:, None], inp["bias"], groups=inp["x"].shape[1])
    got = ssmkernels.causal_conv1d(inp["x"], inp["weight"], inp["bias"], **REF)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_ssd_recurrence_matches_quadratic_form():
    inp = ssd_inputs(b=2, l=40)
    dt = ssd_ref.process_dt(inp["dt"], inp["dt_bias"], dt_softplus=True)
    quad = ssd_ref.ssd_quadratic(inp["x"], dt, inp["A"], inp["B"], inp["C"])
    rec = ssmkernels.ssd_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, dt_bias=inp["dt_bias"],
                                    dt_softplus=True, **REF)
    torch.testing.assert_close(rec, quad, rtol=1e-10, atol=1e-10)


def test_selective_scan_matches_closed_form_for_one_step():
    inp = scan_inputs(l=1)
    out = ssmkernels.selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **REF)
    dt = inp["delta"][..., 0]
    expected = (dt * inp["u"][..., 0])[..., None] * inp["B"][:, None, :, 0] * inp["C"][:, None, :, 0]
    torch.testing.assert_close(out[..., 0], expected.sum(-1), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- law 2: prefill + steps = full
@pytest.mark.parametrize("k", [0, 1, 17])
def test_law2_ssd_prefill_then_state_updates(k):
    inp = ssd_inputs(l=24)
    h, p, n, g = 4, 3, 5, 2
    full = ssmkernels.ssd_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, D=inp["D"], z=inp["z"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True, **REF)
    sl = slice(0, k)
    if k:
        _, state = ssmkernels.ssd_chunk_scan(inp["x"][:, sl], inp["dt"][:, sl], inp["A"], inp["B"][:, sl],
                                             inp["C"][:, sl], 16, D=inp["D"], z=inp["z"][:, sl],
                                             dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True, **REF)
    else:
        state = torch.zeros(2, h, p, n, **f64)
    A = inp["A"][:, None, None].expand(h, p, n)
    for t in range(k, 24):
        y = ssmkernels.selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t, :, None].expand(2, h, p), A, inp["B"][:, t], inp["C"][:, t],
            D=inp["D"][:, None].expand(h, p), z=inp["z"][:, t], dt_bias=inp["dt_bias"][:, None].expand(h, p),
            dt_softplus=True, **REF)
        torch.testing.assert_close(y, full[:, t], rtol=1e-10, atol=1e-10)


def test_law2_selective_scan_prefill_then_mamba1_updates():
    inp = scan_inputs(l=15)
    full = ssmkernels.selective_scan(**inp, delta_softplus=True, **REF)
    k = 9
    _, state = ssmkernels.selective_scan(*(inp[name][..., :k] if inp[name].dim() == 3 else inp[name]
                                           for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                         delta_softplus=True, return_last_state=True, **REF)
    for t in range(k, 15):
        y = ssmkernels.selective_state_update(state, inp["u"][..., t], inp["delta"][..., t], inp["A"],
                                              inp["B"][..., t], inp["C"][..., t], D=inp["D"], z=inp["z"][..., t],
                                              dt_bias=inp["delta_bias"], dt_softplus=True, **REF)
        torch.testing.assert_close(y, full[..., t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("state_len,circular", [(3, False), (6, False), (5, True)])
def test_law2_conv_prefill_then_updates(state_len, circular):
    inp = conv_inputs(l=20)
    full = ssmkernels.causal_conv1d(**inp, activation="silu", **REF)
    k = 12
    _, final = ssmkernels.causal_conv1d(inp["x"][..., :k], inp["weight"], inp["bias"], return_final_states=True,
                                        activation="silu", **REF)
    state = torch.zeros(2, 5, state_len, **f64)
    state[..., -3:] = final  # the last w-1 = 3 inputs, oldest first
    seqlens = None
    if circular:  # the same history as a circular buffer whose newest entry sits at (c - 1) mod s
        seqlens = torch.tensor([7, 2], dtype=torch.int32)
        circ = torch.empty_like(state)
        for row, c in enumerate(seqlens.tolist()):
            for m in range(state_len):
                circ[row, :, (c - state_len + m) % state_len] = state[row, :, m]
        state = circ
    # feed the rest in pieces of 1 and 3 tokens (multi-token form)
    t = k
    for width in (1, 3, 1, 3):
        chunk = inp["x"][..., t:t + width]
        y = ssmkernels.causal_conv1d_update(chunk if width > 1 else chunk[..., 0], state, inp["weight"], inp["bias"],
                                            "silu", cache_seqlens=seqlens, **REF)
        torch.testing.assert_close(y if width > 1 else y[..., None], full[..., t:t + width], rtol=1e-12, atol=1e-12)
        if circular:
            seqlens += width
        t += width


# ------------------------------------------------------------------- law 3: split prefill
def _grads(output, tensors):
    loss = (output * torch.linspace(-1, 1, output.numel(), **f64).reshape(output.shape)).sum()
    return torch.autograd.grad(loss, tensors)


def test_law3_ssd_split_prefill_forward_and_backward():
    inp = {k: v.requires_grad_() for k, v in ssd_inputs(l=30).items()}
    args = lambda sl: (inp["x"][:, sl], inp["dt"][:, sl], inp["A"], inp["B"][:, sl], inp["C"][:, sl], 16)
    kw = lambda sl: dict(D=inp["D"], z=inp["z"][:, sl], dt_bias=inp["dt_bias"], dt_softplus=True, **REF)
    full = ssmkernels.ssd_chunk_scan(*args(slice(None)), **kw(slice(None)))
    first, state = ssmkernels.ssd_chunk_scan(*args(slice(0, 11)), return_final_states=True, **kw(slice(0, 11)))
    second = ssmkernels.ssd_chunk_scan(*args(slice(11, None)), initial_states=state, **kw(slice(11, None)))
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-10, atol=1e-10)
    tensors = list(inp.values())
    for g_split, g_full in zip(_grads(torch.cat([first, second], 1), tensors), _grads(full, tensors)):
        torch.testing.assert_close(g_split, g_full, rtol=1e-9, atol=1e-9)


def test_law3_selective_scan_split_prefill():
    inp = scan_inputs(l=21)
    full = ssmkernels.selective_scan(**inp, delta_softplus=True, **REF)
    cut = lambda sl: {k: (v[..., sl] if v.dim() == 3 else v) for k, v in inp.items()}
    first, state = ssmkernels.selective_scan(**cut(slice(0, 8)), delta_softplus=True, return_last_state=True, **REF)
    second = ssmkernels.selective_scan(**cut(slice(8, None)), delta_softplus=True, initial_state=state, **REF)
    torch.testing.assert_close(torch.cat([first, second], -1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 10])
def test_law3_conv_split_prefill(k):
    inp = conv_inputs(l=18)
    full = ssmkernels.causal_conv1d(**inp, **REF)
    first, state = ssmkernels.causal_conv1d(inp["x"][..., :k], inp["weight"], inp["bias"], return_final_states=True,
                                            **REF)
    second = ssmkernels.causal_conv1d(inp["x"][..., k:], inp["weight"], inp["bias"], initial_states=state, **REF)
    torch.testing.assert_close(torch.cat([first, second], -1), full, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- law 4: varlen = loop (= seq_idx)
LENGTHS = [5, 0, 1, 13, 7]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


def _seq_idx(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]


def test_law4_conv_varlen_equals_seq_idx_and_loop():
    inp = conv_inputs(b=1, l=sum(LENGTHS))
    init = torch.randn(len(LENGTHS), 5, 3, **f64)
    out, finals = ssmkernels.causal_conv1d(**inp, initial_states=init, return_final_states=True,
                                           cu_seqlens=_cu(LENGTHS), **REF)
    cu = _cu(LENGTHS).tolist()
    for j, (s, e) in enumerate(zip(cu, cu[1:])):
        o, f = ssmkernels.causal_conv1d(inp["x"][..., s:e], inp["weight"], inp["bias"], initial_states=init[j:j + 1],
                                        return_final_states=True, **REF)
        torch.testing.assert_close(out[..., s:e], o)
        torch.testing.assert_close(finals[j:j + 1], f)
    assert torch.equal(finals[1], init[1]), "an empty sequence keeps its initial state"
    # seq_idx: same outputs when no initial states are involved beyond the first sequence
    by_idx = ssmkernels.causal_conv1d(**inp, seq_idx=_seq_idx(LENGTHS), **REF)
    by_cu = ssmkernels.causal_conv1d(**inp, cu_seqlens=_cu(LENGTHS), **REF)
    torch.testing.assert_close(by_idx, by_cu, rtol=0, atol=1e-12)


def test_conv_seq_idx_final_states_follow_spec():
    inp = conv_inputs(b=1, l=9)
    init = torch.randn(1, 5, 3, **f64)
    # last sequence of length 2 (shorter than w-1 = 3) and not the first: zero-padded
    seq_idx = torch.tensor([[0] * 7 + [1] * 2], dtype=torch.int32)
    _, final = ssmkernels.causal_conv1d(**inp, seq_idx=seq_idx, initial_states=init, return_final_states=True, **REF)
    assert torch.equal(final[..., 0], torch.zeros(1, 5, **f64))
    torch.testing.assert_close(final[..., 1:], inp["x"][..., 7:])
    # a single short sequence continues from the initial states
    _, final = ssmkernels.causal_conv1d(inp["x"][..., :2], inp["weight"], initial_states=init,
                                        return_final_states=True, **REF)
    torch.testing.assert_close(final, torch.cat([init[..., 2:], inp["x"][..., :2]], -1))


def test_law4_ssd_varlen_equals_seq_idx_and_loop():
    inp = ssd_inputs(b=1, l=sum(LENGTHS))
    inp.pop("z")
    init = torch.randn(len(LENGTHS), 4, 3, 5, **f64)
    out, varlen = ssmkernels.ssd_chunk_scan(**inp, chunk_size=16, dt_softplus=True, initial_states=init,
                                            cu_seqlens=_cu(LENGTHS), return_varlen_states=True, **REF)
    cu = _cu(LENGTHS).tolist()
    for j, (s, e) in enumerate(zip(cu, cu[1:])):
        o, st = ssmkernels.ssd_chunk_scan(inp["x"][:, s:e], inp["dt"][:, s:e], inp["A"], inp["B"][:, s:e],
                                          inp["C"][:, s:e], 16, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True,
                                          initial_states=init[j:j + 1], return_final_states=True, **REF)
        torch.testing.assert_close(out[:, s:e], o)
        torch.testing.assert_close(varlen[j:j + 1], st)
    assert torch.equal(varlen[1], init[1]), "an empty sequence keeps its initial state"
    no_init = ssmkernels.ssd_chunk_scan(**inp, chunk_size=16, dt_softplus=True, cu_seqlens=_cu(LENGTHS), **REF)
    by_idx = ssmkernels.ssd_chunk_scan(**inp, chunk_size=16, dt_softplus=True, seq_idx=_seq_idx(LENGTHS), **REF)
    torch.testing.assert_close(by_idx, no_init, rtol=1e-12, atol=1e-12)


def test_law4_selective_scan_varlen_equals_loop():
    lengths = [4, 0, 9, 1]
    inp = scan_inputs(b=1, l=sum(lengths))
    init = torch.randn(len(lengths), 6, 4, **f64)
    out, last = ssmkernels.selective_scan(**inp, delta_softplus=True, return_last_state=True, initial_state=init,
                                          cu_seqlens=_cu(lengths), **REF)
    cu = _cu(lengths).tolist()
    for j, (s, e) in enumerate(zip(cu, cu[1:])):
        part = {k: (v[..., s:e] if v.dim() == 3 else v) for k, v in inp.items()}
        o, st = ssmkernels.selective_scan(**part, delta_softplus=True, return_last_state=True,
                                          initial_state=init[j:j + 1], **REF)
        torch.testing.assert_close(out[..., s:e], o)
        torch.testing.assert_close(last[j:j + 1], st)


# ------------------------------------------------------------------- law 5: batch invariance
def test_law5_batch_invariance_all_primitives():
    ssd = ssd_inputs(b=3)
    out = ssmkernels.ssd_chunk_scan(**ssd, chunk_size=16, dt_softplus=True, **REF)
    row = {k: (v[1:2] if v.dim() > 1 and v.shape[0] == 3 else v) for k, v in ssd.items()}
    torch.testing.assert_close(ssmkernels.ssd_chunk_scan(**row, chunk_size=16, dt_softplus=True, **REF), out[1:2],
                               rtol=1e-12, atol=1e-12)
    conv = conv_inputs(b=3)
    out = ssmkernels.causal_conv1d(**conv, **REF)
    torch.testing.assert_close(ssmkernels.causal_conv1d(conv["x"][1:2], conv["weight"], conv["bias"], **REF), out[1:2],
                               rtol=1e-12, atol=1e-12)
    scan = scan_inputs(b=3)
    out = ssmkernels.selective_scan(**scan, **REF)
    row = {k: (v[1:2] if v.dim() == 3 else v) for k, v in scan.items()}
    torch.testing.assert_close(ssmkernels.selective_scan(**row, **REF), out[1:2], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- law 6: SSD = selective scan
def test_law6_ssd_equals_selective_scan_with_broadcast_A():
    b, l, h, p, g, n = 2, 19, 4, 3, 2, 5
    inp = ssd_inputs(b=b, l=l, h=h, p=p, g=g, n=n)
    ssd = ssmkernels.ssd_chunk_scan(**inp, chunk_size=16, dt_softplus=True, **REF)
    d = h * p
    u = inp["x"].reshape(b, l, d).transpose(1, 2)
    delta = inp["dt"].repeat_interleave(p, dim=2).transpose(1, 2)
    A = inp["A"].repeat_interleave(p)[:, None].expand(d, n)
    B = inp["B"].permute(0, 2, 3, 1)  # (b, g, n, l)
    C = inp["C"].permute(0, 2, 3, 1)
    scan = ssmkernels.selective_scan(u, delta, A, B, C, D=inp["D"].repeat_interleave(p),
                                     z=inp["z"].reshape(b, l, d).transpose(1, 2),
                                     delta_bias=inp["dt_bias"].repeat_interleave(p), delta_softplus=True, **REF)
    torch.testing.assert_close(scan.transpose(1, 2).reshape(b, l, h, p), ssd, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------- state update details
def test_state_update_pad_slots_and_indices():
    h, p, n = 2, 3, 4
    state = torch.randn(5, h, p, n, **f64)
    before = state.clone()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    x, dt = torch.randn(3, h, p, **f64), torch.rand(3, h, p, **f64)
    A = -torch.rand(h, p, n, **f64)
    B, C = torch.randn(3, 1, n, **f64), torch.randn(3, 1, n, **f64)
    out = ssmkernels.selective_state_update(state, x, dt, A, B, C, state_batch_indices=idx, **REF)
    assert torch.equal(out[1], torch.zeros(h, p, **f64))
    for untouched in (1, 2, 4):
        assert torch.equal(state[untouched], before[untouched])
    expected = torch.exp(A * dt[0, ..., None]) * before[3] + (dt[0] * x[0])[..., None] * B[0]
    torch.testing.assert_close(state[3], expected)


def test_state_update_multi_token_equals_single_steps():
    h, p, n, t = 2, 3, 4, 3
    state1 = torch.randn(2, h, p, n, **f64)
    state2 = state1.clone()
    x, dt, z = torch.randn(2, t, h, p, **f64), torch.rand(2, t, h, p, **f64), torch.randn(2, t, h, p, **f64)
    A = -torch.rand(h, p, n, **f64)
    B, C = torch.randn(2, t, 2, n, **f64), torch.randn(2, t, 2, n, **f64)
    multi = ssmkernels.selective_state_update(state1, x, dt, A, B, C, z=z, **REF)
    for j in range(t):
        y = ssmkernels.selective_state_update(state2, x[:, j], dt[:, j], A, B[:, j], C[:, j], z=z[:, j], **REF)
        torch.testing.assert_close(multi[:, j], y)
    torch.testing.assert_close(state1, state2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_references_run_in_low_precision(dtype):
    inp = {k: v.to(dtype) for k, v in ssd_inputs().items()}
    out, final = ssmkernels.ssd_chunk_scan(**inp, chunk_size=16, dt_softplus=True, return_final_states=True, **REF)
    assert out.dtype == dtype and final.dtype == torch.float32 and torch.isfinite(out).all()
    _, last = ssmkernels.selective_scan(**{k: v.to(dtype) for k, v in scan_inputs().items()}, return_last_state=True,
                                        **REF)
    assert last.dtype == torch.float32


def test_dt_limit_clamps():
    dt = torch.tensor([[[-5.0, 0.0, 5.0]]], **f64)
    out = ssd_ref.process_dt(dt, None, True, (0.01, 1.0))
    assert float(out.min()) == pytest.approx(0.01) and float(out.max()) == 1.0
    assert torch.equal(ssd_ref.process_dt(dt, None, False, (0.0, math.inf)), dt)
