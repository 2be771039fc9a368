"""Trim a peer's CUDA build (causal_conv1d or mamba_ssm sdist) for side-by-side benchmarks.

    python scripts/patch_peer_build.py SRC_DIR [--all-dtypes]

- Always: compile for sm_90 only (the peers' default list has nine architectures).
- Unless ``--all-dtypes``: keep only the bfloat16-input template instances (bfloat16 weights for
  causal_conv1d, float32 ``A`` for mamba_ssm's selective scan), which is what the benchmark cases
  call. The peers' full builds took ~7 min (causal_conv1d) and ~3 min (mamba_ssm) on 16 cores; most
  of that is the nine and six dtype combinations. The kernels themselves are untouched; another
  dtype raises the peer's own "not implemented" error.

Idempotent: each edit leaves a marker in the file and is skipped the second time.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

MARK = "ssmkernels patch_peer_build"


def _patch(path: Path, tag: str, edit) -> None:
    """Apply `edit` once: the edited file carries "MARK: tag" and is left alone after that."""
    text = path.read_text()
    if f"{MARK}: {tag}" in text:
        return
    new = edit(text)
    if new == text:
        raise SystemExit(f"{path}: nothing to patch (has the peer's source changed?)")
    path.write_text(new)
    print(f"patched {path}")


def sm90_only(setup_py: Path) -> None:
    # Filter cc_flag before the compile arguments are built from it (a filter placed just before
    # ext_modules.append, after them, changed nothing: nine architectures were compiled).
    marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
    patch = ('    cc_flag = [f for f in cc_flag if f != "-gencode" and not f.startswith("arch=")] '
             f'+ ["-gencode", "arch=compute_90,code=sm_90"]  # {MARK}: sm_90 only\n')
    _patch(setup_py, "sm_90 only", lambda text: text.replace(marker, patch + marker, 1))


def _only_instances(path: Path, keep: str) -> None:
    """Drop explicit instantiations `template void f<...>(...)` whose arguments are not `keep`."""
    def edit(text: str) -> str:
        lines = []
        for line in text.splitlines(keepends=True):
            match = re.match(r"template void \w+<(.+?)>\(", line)
            if match and match.group(1).replace(" ", "") != keep.replace(" ", ""):
                continue
            lines.append(line)
        return "".join(lines) + f"\n// {MARK}: one instance\n"
    _patch(path, "one instance", edit)


def _only_dispatch(path: Path, first_use: str, macros: dict[str, tuple[str, str]]) -> None:
    """Redefine dispatch macros (name -> (scalar type, C++ type)) before `first_use`."""
    defs = [f"// {MARK}: one dtype per dispatch\n"]
    for name, (scalar, cpp_type) in macros.items():
        variable = "input_t" if "ITYPE" in name else "weight_t"
        defs.append(
            f"#undef {name}\n#define {name}(TYPE, NAME, ...) \\\n"
            f"    if (TYPE == at::ScalarType::{scalar}) {{ using {variable} = {cpp_type}; __VA_ARGS__(); }} \\\n"
            f"    else {{ AT_ERROR(#NAME, \" built for {scalar} only ({MARK})\"); }}\n")
    _patch(path, "one dtype per dispatch", lambda text: text.replace(first_use, "".join(defs) + first_use, 1))


def bf16_only(src: Path) -> None:
    if (src / "csrc" / "causal_conv1d.cpp").exists():
        for name in ("causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"):
            _only_instances(src / "csrc" / name, "at::BFloat16, at::BFloat16")
        _only_dispatch(src / "csrc" / "causal_conv1d.cpp", "template<typename input_t, typename weight_t>",
                       {"DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16": ("BFloat16", "at::BFloat16"),
                        "DISPATCH_WTYPE_FLOAT_AND_HALF_AND_BF16": ("BFloat16", "at::BFloat16")})
    elif (src / "csrc" / "selective_scan" / "selective_scan.cpp").exists():
        scan = src / "csrc" / "selective_scan"
        _only_instances(scan / "selective_scan_fwd_bf16.cu", "at::BFloat16, float")
        _only_dispatch(scan / "selective_scan.cpp", "template<typename input_t, typename weight_t>",
                       {"DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16": ("BFloat16", "at::BFloat16"),
                        "DISPATCH_WTYPE_FLOAT_AND_COMPLEX": ("Float", "float")})
        kept = ("selective_scan.cpp", "selective_scan_fwd_bf16.cu", "selective_scan_bwd_bf16_real.cu")

        def drop_sources(text: str) -> str:
            def keep(match: re.Match) -> str:
                return match.group(0) if match.group(1) in kept else ""
            return re.sub(r'\s*"csrc/selective_scan/([\w.]+)",', keep, text) + f"\n# {MARK}: bf16 sources only\n"
        _patch(src / "setup.py", "bf16 sources only", drop_sources)
    else:
        raise SystemExit(f"{src}: neither causal_conv1d nor mamba_ssm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the unpacked sdist folder")
    parser.add_argument("--all-dtypes", action="store_true", help="keep every dtype instance")
    args = parser.parse_args()
    sm90_only(args.src / "setup.py")
    if not args.all_dtypes:
        bf16_only(args.src)


if __name__ == "__main__":
    main()
