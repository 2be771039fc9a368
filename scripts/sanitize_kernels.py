"""Run every primitive once, forward and backward, on every kernel backend, at small shapes with the
features that index memory in unusual ways: odd lengths, both conv layouts, seq_idx, cu_seqlens with an
empty sequence and per-sequence initial states, grouped B/C, index maps with a padding slot, circular
conv states, multi-token decode, 16-bit decode states.

Meant to run under ``compute-sanitizer --tool memcheck`` (``python -m ssmkernels robustness --only
sanitizer`` does that, with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), so it stays small: one call per case.
Also runs on a CPU with ``TRITON_INTERPRET=1`` (``--device cpu``) to check the script itself.

    python scripts/sanitize_kernels.py [--device cuda] [--backends triton,cuda] [--dtype bfloat16] [--case TEXT,...]

Prints one line per case and backend (ok / skip with the reason / FAIL with the error); every output
and gradient must be finite. Exit code 1 when a case failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ssmkernels  # noqa: E402
from ssmkernels import BackendUnavailable  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Inputs:
    """Random tensors on one device in one dtype (float32 for the parameters kept in float32)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def r(self, *shape, dtype=None, grad=False) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device).to(dtype or self.dtype)
        return t.requires_grad_(grad)

    def negative(self, *shape, grad=False) -> torch.Tensor:
        return (-torch.rand(*shape, device=self.device) - 0.2).requires_grad_(grad)

    def ints(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(t, torch.Tensor)]


def _backward_and_check(result, leaves: list[torch.Tensor]) -> None:
    """Backward of a random weighting of every output (states included), then all must be finite."""
    outs = _outputs(result)
    for i, t in enumerate(outs):
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(f"output {i} {tuple(t.shape)} has non-finite values")
    if leaves:
        loss = sum((t.float() * torch.randn(t.shape, device=t.device)).sum() for t in outs if t.requires_grad)
        loss.backward()
        for i, leaf in enumerate(leaves):
            if leaf.grad is None:
                raise AssertionError(f"input {i} {tuple(leaf.shape)} got no gradient")
            if not bool(torch.isfinite(leaf.grad).all()):
                raise AssertionError(f"gradient of input {i} {tuple(leaf.shape)} has non-finite values")


# ----------------------------------------------------------------------------- cases
# Each case: (name, function(inputs, backend) -> None). Shapes are small and lengths odd.
def conv_channel_first(t: Inputs, backend: str) -> None:
    b, d, l, w = 2, 40, 77, 4
    x, weight, bias, init = t.r(b, d, l, grad=True), t.r(d, w, grad=True), t.r(d, grad=True), t.r(b, d, w - 1, grad=True)
    result = ssmkernels.causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True,
                                      activation="silu", backend=backend)
    _backward_and_check(result, [x, weight, bias, init])


def conv_channel_last_seq_idx(t: Inputs, backend: str) -> None:
    b, d, l, w = 2, 40, 77, 3
    x = t.r(b, l, d).transpose(1, 2).requires_grad_(True)
    seq_idx = t.ints([[0] * 30 + [1] * 47, [0] * 5 + [1] * 2 + [2] * 70])
    weight, bias, init = t.r(d, w, grad=True), t.r(d, grad=True), t.r(b, d, w - 1, grad=True)
    result = ssmkernels.causal_conv1d(x, weight, bias, seq_idx, init, True, activation="silu", backend=backend)
    _backward_and_check(result, [x, weight, bias, init])


def conv_cu_seqlens(t: Inputs, backend: str) -> None:
    d, w = 40, 4
    cu = t.ints([0, 13, 13, 14, 61])  # an empty and a one-token sequence
    x, weight, bias = t.r(1, d, 61, grad=True), t.r(d, w, grad=True), t.r(d, grad=True)
    init = t.r(4, d, w - 1, grad=True)
    result = ssmkernels.causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True,
                                      activation="silu", cu_seqlens=cu, backend=backend)
    _backward_and_check(result, [x, weight, bias, init])


def conv_update_indices_circular(t: Inputs, backend: str) -> None:
    d, w, slots, s = 40, 4, 5, 6
    state = t.r(slots, d, s)
    weight, bias = t.r(d, w), t.r(d)
    indices = t.ints([3, -1, 0])  # a padding slot in the middle
    seqlens = t.ints([7, 0, 2])
    out = ssmkernels.causal_conv1d_update(t.r(3, d), state, weight, bias, "silu", conv_state_indices=indices,
                                          backend=backend)
    out3 = ssmkernels.causal_conv1d_update(t.r(3, d, 3), state, weight, bias, "silu", cache_seqlens=seqlens,
                                           conv_state_indices=indices, backend=backend)
    _backward_and_check((out, out3, state), [])


def scan_shared(t: Inputs, backend: str) -> None:
    b, d, l, n = 2, 24, 77, 16
    u, delta, z = t.r(b, d, l, grad=True), (0.5 * t.r(b, d, l)).requires_grad_(True), t.r(b, d, l, grad=True)
    A, B, C = t.negative(d, n, grad=True), t.r(b, n, l, grad=True), t.r(b, n, l, grad=True)
    D, bias = t.r(d, dtype=torch.float32, grad=True), t.r(d, dtype=torch.float32, grad=True)
    init = t.r(b, d, n, dtype=torch.float32, grad=True)
    result = ssmkernels.selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=init, backend=backend)
    _backward_and_check(result, [u, delta, z, A, B, C, D, bias, init])


def scan_grouped(t: Inputs, backend: str) -> None:
    b, d, l, n, g = 2, 24, 33, 8, 3
    u, delta = t.r(b, d, l, grad=True), (0.5 * t.r(b, d, l)).requires_grad_(True)
    A, B, C = t.negative(d, n, grad=True), t.r(b, g, n, l, grad=True), t.r(b, g, n, l, grad=True)
    result = ssmkernels.selective_scan(u, delta, A, B, C, None, None, None, True, True, backend=backend)
    _backward_and_check(result, [u, delta, A, B, C])


def scan_cu_seqlens(t: Inputs, backend: str) -> None:
    d, n = 24, 16
    cu = t.ints([0, 20, 20, 21, 70])
    u, delta, z = t.r(1, d, 70, grad=True), (0.5 * t.r(1, d, 70)).requires_grad_(True), t.r(1, d, 70, grad=True)
    A, B, C = t.negative(d, n, grad=True), t.r(1, n, 70, grad=True), t.r(1, n, 70, grad=True)
    D = t.r(d, dtype=torch.float32, grad=True)
    init = t.r(4, d, n, dtype=torch.float32, grad=True)
    result = ssmkernels.selective_scan(u, delta, A, B, C, D, z, None, True, True, initial_state=init, cu_seqlens=cu,
                                       backend=backend)
    _backward_and_check(result, [u, delta, z, A, B, C, D, init])


def _ssd_tensors(t: Inputs, b: int, l: int, h: int = 4, p: int = 16, g: int = 2, n: int = 32):
    return dict(x=t.r(b, l, h, p, grad=True), dt=(0.5 * t.r(b, l, h)).requires_grad_(True), A=t.negative(h, grad=True),
                B=t.r(b, l, g, n, grad=True), C=t.r(b, l, g, n, grad=True),
                D=t.r(h, dtype=torch.float32, grad=True), z=t.r(b, l, h, p, grad=True),
                dt_bias=t.r(h, dtype=torch.float32, grad=True))


def ssd_states(t: Inputs, backend: str) -> None:
    b, l = 2, 77
    i = _ssd_tensors(t, b, l)
    init = t.r(b, 4, 16, 32, dtype=torch.float32, grad=True)
    result = ssmkernels.ssd_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], 32, D=i["D"], z=i["z"],
                                       dt_bias=i["dt_bias"], initial_states=init, dt_softplus=True,
                                       return_final_states=True, backend=backend)
    _backward_and_check(result, [*i.values(), init])


def ssd_seq_idx_D_per_channel(t: Inputs, backend: str) -> None:
    b, l = 2, 70
    i = _ssd_tensors(t, b, l)
    D = t.r(4, 16, dtype=torch.float32, grad=True)
    seq_idx = t.ints([[0] * 17 + [1] * 53, [0] * 64 + [1] * 6])
    result = ssmkernels.ssd_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], 16, D=D, seq_idx=seq_idx,
                                       dt_softplus=True, return_final_states=True, backend=backend)
    _backward_and_check(result, [i["x"], i["dt"], i["A"], i["B"], i["C"], D])


def ssd_cu_seqlens(t: Inputs, backend: str) -> None:
    i = _ssd_tensors(t, 1, 90)
    cu = t.ints([0, 33, 33, 34, 90])  # empty and one-token sequences, boundaries off the chunk grid
    init = t.r(4, 4, 16, 32, dtype=torch.float32, grad=True)
    result = ssmkernels.ssd_chunk_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], 32, D=i["D"], z=i["z"],
                                       dt_bias=i["dt_bias"], initial_states=init, cu_seqlens=cu, dt_softplus=True,
                                       return_final_states=True, return_varlen_states=True, backend=backend)
    _backward_and_check(result, [*i.values(), init])


def state_update_mamba2_pad_slot(t: Inputs, backend: str) -> None:
    b, h, p, n, g, slots = 3, 4, 16, 32, 2, 5
    state = t.r(slots, h, p, n, dtype=torch.float32)
    A = t.negative(h)[:, None, None].expand(h, p, n)
    dt = t.r(b, h)[..., None].expand(b, h, p)
    D, bias = t.r(h, dtype=torch.float32)[:, None].expand(h, p), t.r(h, dtype=torch.float32)[:, None].expand(h, p)
    out = ssmkernels.selective_state_update(state, t.r(b, h, p), dt, A, t.r(b, g, n), t.r(b, g, n), D=D,
                                            z=t.r(b, h, p), dt_bias=bias, dt_softplus=True,
                                            state_batch_indices=t.ints([4, -1, 1]), pad_slot_id=-1, backend=backend)
    _backward_and_check((out, state), [])


def state_update_mamba1(t: Inputs, backend: str) -> None:
    b, d, n = 3, 24, 16
    state = t.r(b, d, n, dtype=torch.float32)
    out = ssmkernels.selective_state_update(state, t.r(b, d), t.r(b, d), t.negative(d, n), t.r(b, n), t.r(b, n),
                                            D=t.r(d, dtype=torch.float32), z=t.r(b, d), dt_softplus=True,
                                            backend=backend)
    _backward_and_check((out, state), [])


def state_update_multi_token_16bit_state(t: Inputs, backend: str) -> None:
    b, steps, h, p, n, g = 2, 3, 4, 16, 32, 1
    state = t.r(4, h, p, n, dtype=t.dtype if t.dtype != torch.float32 else torch.bfloat16)
    A = t.negative(h)[:, None, None].expand(h, p, n)
    out = ssmkernels.selective_state_update(state, t.r(b, steps, h, p), t.r(b, steps, h, p), A,
                                            t.r(b, steps, g, n), t.r(b, steps, g, n), dt_softplus=True,
                                            state_batch_indices=t.ints([2, -1]), backend=backend)
    _backward_and_check((out, state.float()), [])


CASES: list[tuple[str, Callable[[Inputs, str], None]]] = [
    ("causal_conv1d channel-first, initial+final states", conv_channel_first),
    ("causal_conv1d channel-last, seq_idx, states", conv_channel_last_seq_idx),
    ("causal_conv1d cu_seqlens (empty seq), states", conv_cu_seqlens),
    ("causal_conv1d_update pad slot, circular, 3 tokens", conv_update_indices_circular),
    ("selective_scan z D bias, initial+last state", scan_shared),
    ("selective_scan grouped B/C", scan_grouped),
    ("selective_scan cu_seqlens (empty seq), states", scan_cu_seqlens),
    ("ssd_chunk_scan initial+final states, l=77", ssd_states),
    ("ssd_chunk_scan seq_idx, D per channel", ssd_seq_idx_D_per_channel),
    ("ssd_chunk_scan cu_seqlens (empty seq), varlen states", ssd_cu_seqlens),
    ("selective_state_update mamba2, pad slot", state_update_mamba2_pad_slot),
    ("selective_state_update mamba1", state_update_mamba1),
    ("selective_state_update 3 tokens, 16-bit state, pad slot", state_update_multi_token_16bit_state),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: triton,cuda on a GPU; triton under TRITON_INTERPRET=1 on CPU)")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="input dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--case", default=None, help="only cases whose name contains one of these comma-separated texts")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in (args.case or "").split(",") if w.strip()]
    cases = [(name, case) for name, case in CASES if not wanted or any(w in name for w in wanted)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    elif device.type == "cuda":
        backends = ["triton", "cuda"]
    else:
        backends = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["reference"]
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"sanitize_kernels: {len(cases)} cases x backends {', '.join(backends)} on {device}, {dtype}", flush=True)
    counts = {"ok": 0, "skip": 0, "FAIL": 0}
    for backend in backends:
        for name, case in cases:
            torch.manual_seed(0)
            started = time.perf_counter()
            try:
                case(Inputs(device, dtype), backend)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                status, note = "ok", f"{time.perf_counter() - started:.2f} s"
            except BackendUnavailable as exc:
                status, note = "skip", str(exc).splitlines()[0]
            except Exception as exc:
                status, note = "FAIL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            counts[status] += 1
            print(f"  {backend:<9} {name:<56} {status:<4} {note}", flush=True)
    print(f"sanitize_kernels: {counts['ok']} ok, {counts['skip']} skipped, {counts['FAIL']} failed", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
