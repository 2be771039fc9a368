"""SASS of the Triton SSD kernels, compiled for sm_90a on a machine without a GPU: per kernel the
opcode counts, registers and spills (ptxas), and the length of each loop body (instructions from a
label to the branch back to it). A way to see what a change does to the instruction mix before
spending GPU time: the forward scan's loop was 627 instructions per column block, most of them
integer (addresses and per-element predicates of 4-byte cp.async copies, Nsight Compute: ALU the
busiest pipe). Uses tests/lower_triton_for_sm90.py's compile-only driver and the nvdisasm that
ships with Triton.

    python scripts/triton_sass.py [--bwd] [--kernel _scan_kernel] [--dump DIR]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import lower_triton_for_sm90 as lowering  # noqa: E402  (installs the compile-only driver)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import ssmkernels  # noqa: E402

_OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"(\.L_x_\d+):")
_BACK = re.compile(r"BRA `\((\.L_x_\d+)\)")


def compiled_kernels(grad: bool):
    """[(name, cubin, ptx)] of every Triton kernel one SSD call (and its backward) launches, at the
    bench's P64 N128 chunk 256 bf16 with D, dt_bias, softplus (small b, l: shapes set only tiles)."""
    found = []
    run = JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        if kernel is not None:
            found.append((self.fn.__name__, kernel.asm.get("cubin"), kernel.asm.get("ptx")))
        return kernel

    JITFunction.run = capture
    b, l, h, p, g, n, chunk = 1, 512, 16, 64, 2, 128, 256
    bf16 = torch.bfloat16
    x, dt = torch.randn(b, l, h, p, dtype=bf16), torch.rand(b, l, h, dtype=bf16)
    A, B, C = -torch.rand(h), torch.randn(b, l, g, n, dtype=bf16), torch.randn(b, l, g, n, dtype=bf16)
    D, bias = torch.randn(h), torch.randn(h)
    leaves = (x, dt, A, B, C, D, bias)
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    out = ssmkernels.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, dt_bias=bias, dt_softplus=True, backend="triton")
    if grad:
        lowering.grad_all(out, leaves)
    JITFunction.run = run
    return found


def disassemble(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def registers_and_spills(ptx: str) -> str:
    report = lowering.ptxas_report(ptx)
    if report is None:
        return "ptxas not found"
    regs = re.findall(r"Used (\d+) registers", report)
    spills = lowering._SPILLS.findall(report)
    return f"{regs[0] if regs else '?'} registers, {max(map(int, spills)) if spills else '?'} B spill stores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bwd", action="store_true", help="also the backward's kernels")
    parser.add_argument("--kernel", help="only kernels of this name (e.g. _scan_kernel)")
    parser.add_argument("--dump", help="write each kernel's SASS into this folder")
    args = parser.parse_args()
    for index, (name, cubin, ptx) in enumerate(compiled_kernels(args.bwd)):
        if args.kernel and name != args.kernel:
            continue
        sass = disassemble(cubin)
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            (Path(args.dump) / f"{index:02d}_{name}.sass").write_text(sass)
        lines = sass.splitlines()
        labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
        loops = [i - labels[m.group(1)] for i, line in enumerate(lines)
                 if (m := _BACK.search(line)) and labels.get(m.group(1), i) < i]
        opcodes = collections.Counter(m.group(1) for line in lines if (m := _OPCODE.match(line)))
        print(f"[{index}] {name}: {sum(opcodes.values())} instructions, {registers_and_spills(ptx)}, "
              f"loop bodies {loops}")
        print("    " + ", ".join(f"{op} {count}" for op, count in opcodes.most_common(24)))


if __name__ == "__main__":
    main()
