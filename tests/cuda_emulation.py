"""CUDA kernels in host emulation, as stand-ins for ``ssmkernels._C`` in CPU tests.

csrc/emulation.h compiles a kernel's own code as host C++ (one std::thread per CUDA thread,
barriers for __syncthreads and shuffles); each primitive's emulation.cc includes it. The fixtures in
conftest.py build a library once per session and put it behind the real op layer (``ext``,
``native``, ``dispatch``), so CPU tests check the kernels' algorithm and indexing:
- csrc/selective_scan/emulation.cc: the selective-scan kernels (and so the SSD CUDA backend, which
  runs on them);
- csrc/state_update/emulation.cc: the state-update kernel with its launcher (the choice of pack
  width, lanes, grid and B/C path included).
Slow: hundreds of OS threads per block, so only small cases.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ssmkernels._core import build, dispatch, ext, native

_P, _I64, _I32, _BOOL = ctypes.c_size_t, ctypes.c_int64, ctypes.c_int, ctypes.c_bool


class EmulatedParams(ctypes.Structure):
    """Field for field the layout of ssmk::scan::Params (csrc/selective_scan/selective_scan.h)."""
    _fields_ = ([(f, _I64) for f in "batch dim seqlen dstate num_seqs chunks_per_row".split()]
                + [("dtype", _I32), ("bc_dtype", _I32)]
                + [(f, _BOOL) for f in "b_fixed c_fixed softplus".split()]
                + [(f, _I64) for f in "channels_per_b_group channels_per_c_group".split()]
                + [(f, _P) for f in ("u delta z out A B C D delta_bias initial_state last_state checkpoints "
                                     "cu_seqlens out_pre").split()]
                + [(f, _I64) for f in ("x_batch_stride x_d_stride B_batch_stride B_group_stride B_n_stride "
                                       "C_batch_stride C_group_stride C_n_stride").split()]
                + [(f, _P) for f in "dout dlast_state du ddelta dz dinitial_state dA_part dD_part dbias_part dB dC".split()]
                + [(f, _I64) for f in ("dB_batch_stride dB_group_stride dB_n_stride dC_batch_stride dC_group_stride "
                                       "dC_n_stride").split()]
                + [(f, _I64) for f in "channel_begin channel_count".split()] + [("bc_grad_per_channel", _BOOL)]
                + [("tile_states", _P), ("stream", _P)])


def _compile(directory: Path, source: str, name: str) -> ctypes.CDLL:
    """g++-compile csrc/<source> into ``directory``; skips the test when g++ or the CUDA headers are
    missing."""
    compiler, nvcc = shutil.which("g++"), build.find_nvcc()
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    include = next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)
    if compiler is None or include is None:
        pytest.skip("the CUDA emulation needs g++ and the CUDA toolkit's headers")
    root = build.source_root()
    library = directory / f"lib{name}.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{root / 'csrc'}",
                    f"-I{include}", str(root / "csrc" / source), "-o", str(library)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def build_scan_module(directory: Path):
    """A module object with the extension's selective-scan entry points, emulated."""
    lib = _compile(directory, "selective_scan/emulation.cc", "scan_emulation")
    for name in ("emu_params_size", "emu_params_stream_offset"):
        getattr(lib, name).restype = ctypes.c_size_t
    lib.emu_backward_workspace.restype = ctypes.c_int64
    layout = (lib.emu_params_size(), lib.emu_params_stream_offset())
    mirror = (ctypes.sizeof(EmulatedParams), EmulatedParams.stream.offset)
    assert layout == mirror, (f"EmulatedParams (size, stream offset) {mirror} differs from ssmk::scan::Params "
                              f"{layout}: update its fields to csrc/selective_scan/selective_scan.h")

    class Module:
        selective_scan_chunk = 2048
        SelectiveScanParams = EmulatedParams

        def selective_scan_fwd(self, params):
            lib.emu_forward(ctypes.byref(params))

        def selective_scan_bwd(self, params):
            lib.emu_backward(ctypes.byref(params))

        def selective_scan_bwd_workspace(self, params):
            return lib.emu_backward_workspace(ctypes.byref(params))

    return Module()


def build_state_update_module(directory: Path):
    """A module object with the extension's state-update entry point, emulated."""
    lib = _compile(directory, "state_update/emulation.cc", "state_update_emulation")
    lib.emu_state_update.restype = ctypes.c_char_p
    lib.emu_state_update.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.POINTER(ctypes.c_uint64),
                                     ctypes.c_int]
    lib.emu_state_update_max_dstate.restype = ctypes.c_long

    class Module:
        state_update_binding_version = lib.emu_state_update_binding_version()
        state_update_max_dstate = lib.emu_state_update_max_dstate()
        launches = 0

        def state_update(self, params, addresses, stream):
            """binding.cpp's function: the same tuples, the launcher's errors as ValueError."""
            values = (ctypes.c_int64 * len(params))(*params)
            pointers = (ctypes.c_uint64 * len(addresses))(*addresses)
            error = lib.emu_state_update(values, len(params), pointers, len(addresses))
            if error:
                raise ValueError(error.decode())
            type(self).launches += 1

    return Module()


def install(module, monkeypatch) -> None:
    """Serve ``backend="cuda"`` with the emulated module, for CPU tensors."""
    from ssmkernels.ops.state_update import cuda as state_update_cuda

    # The state update binds the extension's function and the stream getter on first use.
    monkeypatch.setattr(state_update_cuda, "_kernel", lambda params, addresses, stream: ext.module().state_update(
        params, addresses, stream))
    monkeypatch.setattr(state_update_cuda, "_raw_stream", lambda device_index: 0)
    monkeypatch.setattr(ext, "_module", module)
    monkeypatch.setattr(ext, "_error", None)
    monkeypatch.setattr(ext, "_tried", True)
    monkeypatch.setattr(native, "stream_of", lambda t: 0)
    monkeypatch.setattr(dispatch, "cuda_device_reason", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
