"""Command line: ``python -m ssmkernels {info,check,bench,build,warmup,demo}`` (also ``ssmkernels ...``).

- ``info``    versions, GPU, the CUDA extension, settings, and which backend serves which primitive.
- ``check``   every primitive and feature on every available backend against the float64 reference.
- ``bench``   the benchmark harness (needs a GPU; ``--dry-run`` lists the cases anywhere).
- ``build``   compile the CUDA extension ahead of time (JIT cache, or ``--inplace`` into the package).
- ``warmup``  run each primitive once on a backend so that kernels are compiled before real work.
- ``demo``    not available yet.
- ``robustness`` first-call times, batch invariance, prefill vs decode, long sequences, compute-sanitizer.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

PRIMITIVE_ALIASES = {
    "causal_conv1d": "causal_conv1d", "conv": "causal_conv1d", "conv1d": "causal_conv1d",
    "selective_scan": "selective_scan", "scan": "selective_scan", "mamba1": "selective_scan",
    "ssd": "ssd", "ssd_chunk_scan": "ssd", "mamba2": "ssd",
    "state_update": "state_update", "selective_state_update": "state_update", "decode": "state_update",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
ENV_VARS = ("SSMKERNELS_BACKEND", "SSMKERNELS_DETERMINISTIC", "SSMKERNELS_DISABLE_JIT", "SSMKERNELS_CACHE_DIR",
            "SSMKERNELS_CUDA_ARCHS", "SSMKERNELS_CUDA", "SSMKERNELS_POISON_OUTPUTS", "TRITON_INTERPRET")


def _print(*args) -> None:
    print(*args, flush=True)


def _split(values: list[str] | None) -> list[str]:
    """``--x a --x b,c`` -> ``[a, b, c]``."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _primitives(values: list[str] | None) -> list[str] | None:
    names = _split(values)
    unknown = [n for n in names if n not in PRIMITIVE_ALIASES]
    if unknown:
        raise SystemExit(f"unknown primitive {unknown[0]!r}; expected one of "
                         f"{', '.join(sorted(set(PRIMITIVE_ALIASES.values())))} (or an alias: "
                         f"{', '.join(k for k, v in PRIMITIVE_ALIASES.items() if k != v)})")
    return [PRIMITIVE_ALIASES[n] for n in names] or None


def _backends(values: list[str] | None) -> list[str] | None:
    from ._core.config import BACKENDS

    names = _split(values)
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return names or None


def _dtypes(values: list[str] | None) -> list[torch.dtype] | None:
    names = _split(values)
    for name in names:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names] or None


# ----------------------------------------------------------------------------- info
def representative_calls(device: torch.device) -> list[tuple[str, str, dict]]:
    """(label, primitive, features) of a typical call of each public function, with the keys each
    op.py puts in its features dict (see ``ssmkernels/ops/<p>/op.py``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [
        ("causal_conv1d", "causal_conv1d",
         {"dtype": dtype, "weight_dtype": dtype, "width": 4, "layout": "channel_first", "seq_idx": False,
          "cu_seqlens": False, "initial_states": False, "final_states": False}),
        ("causal_conv1d_update", "causal_conv1d",
         {"dtype": dtype, "state_dtype": dtype, "width": 4, "state_len": 3, "tokens": 1,
          "cache_seqlens": False, "indices": False}),
        ("selective_scan", "selective_scan",
         {"dtype": dtype, "d_state": 16, "bc_layout": "shared", "z": True, "cu_seqlens": False,
          "initial_state": False, "needs_grad": True}),
        ("ssd_chunk_scan", "ssd",
         {"dtype": dtype, "headdim": 64, "d_state": 128, "ngroups": 8, "chunk_size": 256, "seq_idx": False,
          "cu_seqlens": False, "initial_states": False, "z": False, "D_per_channel": False}),
        ("selective_state_update", "state_update",
         {"dtype": dtype, "state_dtype": torch.float32, "form": "mamba2", "tokens": 1, "d_state": 128,
          "indices": False}),
    ]


def extension_status() -> tuple[bool, str]:
    """(loaded, description) of the CUDA extension, without compiling it (``info`` must be quick)."""
    from ._core import config, ext

    if not getattr(ext, "_tried", False):
        shipped = importlib.util.find_spec("ssmkernels._C") is not None
        try:
            cached = sorted((ext.jit_dir() / "lib").glob("_C*"))
        except Exception as exc:  # no nvcc: no cache key either
            cached, why = [], str(exc)
        else:
            why = ""
        if not shipped and not cached:
            how = ("SSMKERNELS_DISABLE_JIT=1 forbids compiling it at run time"
                   if config.jit_disabled() else "it is compiled on first CUDA use (minutes)")
            extra = f" ({why})" if why else ""
            return False, (f"not built: no prebuilt ssmkernels._C and no cached build{extra}; {how}, "
                           f"or run `python -m ssmkernels build`")
    error = ext.load_error()
    if error:
        return False, f"unavailable: {error}"
    module = sys.modules.get("ssmkernels._C")
    where = getattr(module, "__file__", "?")
    kernels = sorted(name for name in dir(module) if not name.startswith("_"))
    return True, f"loaded from {where} (functions: {', '.join(kernels) or 'none'})"


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)"
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    return (f"{props.name}, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB" + (f" (device 0 of {count})" if count > 1 else ""))


def versions() -> dict[str, str]:
    from . import __version__
    from ._core import build

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - depends on the machine
        triton_version = f"not importable ({type(exc).__name__})"
    nvcc = build.find_nvcc()
    return {
        "ssmkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "nvcc": build.nvcc_version(nvcc) if nvcc else "not found",
        "platform": platform.platform(),
    }


def _triton_kernels_status(primitive: str, features: dict) -> str:
    """What the Triton module itself says about a call, whatever the device (defining Triton kernels
    needs no GPU). The CUDA module is not asked: that could compile the extension."""
    from ._core import dispatch

    if dispatch.triton_import_error():
        return "triton is not importable"
    try:
        reason = importlib.import_module(f"ssmkernels.ops.{primitive}.triton").unsupported(features)
    except Exception as exc:
        return f"error while asking it: {type(exc).__name__}: {exc}"
    return "kernels available" if reason is None else reason


def cmd_info(args) -> int:
    from ._core import config, dispatch

    _print("ssmkernels: fused state-space-model kernels")
    for key, value in versions().items():
        _print(f"  {key:<11} {value}")
    _print(f"  {'GPU':<11} {gpu_description()}")
    loaded, ext_text = extension_status()
    _print(f"  {'extension':<11} {ext_text}")
    _print(f"  {'cache dir':<11} {config.cache_dir()}")
    _print("settings:")
    for name in ENV_VARS:
        _print(f"  {name:<26} {os.environ.get(name, '(unset)')}")
    extra = sorted(k for k in os.environ if k.startswith("SSMKERNELS_") and k not in ENV_VARS)
    for name in extra:
        _print(f"  {name:<26} {os.environ[name]}  (not a known setting)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    _print(f"backends for a typical {dtype} call on {device}:")
    for label, primitive, features in representative_calls(device):
        for backend in config.BACKENDS:
            if backend == "cuda" and device.type == "cuda" and not loaded:
                reason = f"the CUDA extension is {ext_text}"
            else:
                try:
                    reason = dispatch.unavailable_reason(primitive, backend, device, features)
                except Exception as exc:  # a backend module that fails to import says so here
                    reason = f"error while asking it: {type(exc).__name__}: {exc}"
            status = "available" if reason is None else f"unavailable: {reason}"
            if backend == "triton" and reason and reason == dispatch.triton_device_reason(device):
                status += f" [on a GPU: {_triton_kernels_status(primitive, features)}]"
            _print(f"  {label:<23} {backend:<10} {status}")
    if device.type == "cpu":
        _print("note: without a GPU, Triton kernels run only under TRITON_INTERPRET=1 (tests and `check`), "
               "and only when asked for by name; the default backend on CPU is the reference.")
    return 0


# ----------------------------------------------------------------------------- check
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


CHECK_HEADER = (f"{'#':>9}  {'primitive':<15}{'feature':<42}{'backend':<10}{'dtype':<9}{'max err':>9}  "
                f"{'tol':>9}  status")


def _check_row(index: int, total: int, res) -> str:
    from .bench.checks import dtype_name

    width = len(str(total))
    where = f"[{index:>{width}}/{total}]"
    note = ""
    if res.status == "SKIP":
        note = res.detail
    elif res.status == "FAIL":
        note = res.detail + (f" (worst: {res.worst})" if res.worst else "")
    else:
        note = f"worst: {res.worst}"
    note = f"{note}; {res.seconds:.2f} s" if res.status != "SKIP" else note
    return (f"{where:>9}  {res.case.primitive:<15}{res.case.feature[:41]:<42}{res.backend:<10}"
            f"{dtype_name(res.dtype):<9}{_fmt(res.error):>9}  {_fmt(res.tolerance):>9}  {res.status:<4}  {note}")


def cmd_check(args) -> int:
    from ._core import config
    from .bench import checks

    device = torch.device(args.device) if args.device else None
    the_plan = checks.plan(_primitives(args.primitive), _backends(args.backend), _dtypes(args.dtype),
                           quick=args.quick, device=device, features=args.feature, size=args.size)
    _print(f"ssmkernels check: {len(the_plan)} rows on {the_plan.device} ({the_plan.size} shapes"
           f"{', quick' if args.quick else ''}); rule: max|out - ref64| <= 2 * max|ref_dtype - ref64| + atol_dtype"
           f" (forward outputs and gradients)")
    if the_plan.device.type == "cpu" and not config.triton_interpret():
        _print("note: TRITON_INTERPRET=1 is not set, so Triton kernels are skipped on this CPU-only machine")
    if not len(the_plan):
        _print("nothing to check with these filters")
        return 2
    _print(CHECK_HEADER)
    started = time.perf_counter()
    results = checks.run_plan(the_plan, lambda i, n, r: _print(_check_row(i, n, r)))
    elapsed = time.perf_counter() - started

    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    _print("")
    _print("summary (pass / fail / skip):")
    keys = sorted({(r.case.primitive, r.backend) for r in results},
                  key=lambda k: (checks.PRIMITIVES.index(k[0]), checks.BACKENDS.index(k[1])))
    for primitive, backend in keys:
        rows = [r for r in results if r.case.primitive == primitive and r.backend == backend]
        tally = " / ".join(str(sum(r.status == s for r in rows)) for s in ("PASS", "FAIL", "SKIP"))
        reasons = sorted({r.detail for r in rows if r.status == "SKIP"})
        why = f"   skipped: {reasons[0]}" + (f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else "") \
            if reasons else ""
        _print(f"  {primitive:<15}{backend:<10}{tally:<14}{why}")
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        _print("")
        _print(f"FAILED ({len(failed)}):")
        for res in failed:
            _print(f"  {res.case.name} [{res.backend}, {checks.dtype_name(res.dtype)}]: {res.detail}"
                   + (f" (max err {res.error:.3e} > tol {res.tolerance:.3e} at {res.worst})"
                      if res.error is not None and res.tolerance is not None else ""))
    if args.json:
        import json

        records = [{"primitive": r.case.primitive, "feature": r.case.feature, "backend": r.backend,
                    "dtype": checks.dtype_name(r.dtype), "status": r.status, "max_error": r.error,
                    "tolerance": r.tolerance, "worst": r.worst, "detail": r.detail, "seconds": r.seconds}
                   for r in results]
        meta = {"device": str(the_plan.device), "size": the_plan.size, "gpu": gpu_description(), **versions()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
        _print(f"wrote {args.json}")
    _print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {elapsed:.1f} s")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from .bench import cases as bench_cases
    from .bench import runner

    selected = bench_cases.select(_primitives(args.primitive), _split(args.case))
    if not selected:
        _print("no benchmark case matches these filters; `python -m ssmkernels bench --dry-run` lists them")
        return 2
    if args.dry_run:
        _print(runner.describe_cases(selected, compare=args.compare))
        return 0
    if not torch.cuda.is_available():
        _print("ssmkernels bench needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
               "Use `python -m ssmkernels bench --dry-run` to list the cases, or `python -m ssmkernels check` "
               "to check correctness on the CPU.")
        return 2
    if args.profile:
        from .bench import profile

        return profile.main(selected, tuple(_backends(args.backend) or runner.KERNEL_BACKENDS), args.compare,
                            log=_print)
    return runner.main(selected, backends=_backends(args.backend), compare=args.compare, json_path=args.json,
                       markdown_path=args.markdown, plot_path=args.plot, warmup_ms=args.warmup_ms,
                       rep_ms=args.rep_ms, measure_peaks=not args.no_peaks, deterministic=args.deterministic,
                       log=_print)


# ----------------------------------------------------------------------------- build
def cmd_build(args) -> int:
    from ._core import build, ext

    if args.archs:
        os.environ["SSMKERNELS_CUDA_ARCHS"] = args.archs  # the JIT cache key includes the archs
    if args.jobs:
        os.environ["MAX_JOBS"] = str(args.jobs)
    if build.find_nvcc() is None:
        _print("cannot build: nvcc not found (install the CUDA toolkit, or set CUDACXX / CUDA_HOME)")
        return 2
    started = time.perf_counter()
    try:
        if args.inplace:
            package = Path(__file__).resolve().parent
            from ._core import config

            path = build.build(package, config.cache_dir() / "build-inplace" / "cmake", archs=args.archs,
                               jobs=args.jobs, verbose=args.verbose, log=_print)
        else:
            path = ext.build_cached(verbose=args.verbose, log=_print)
    except Exception as exc:
        _print(f"build failed after {time.perf_counter() - started:.1f} s: {exc}")
        return 1
    elapsed = time.perf_counter() - started
    _print(f"extension: {path}")
    _print(f"build time: {elapsed:.1f} s" + ("" if args.inplace else " (0 s means it was already cached)"))
    if args.archs and not args.inplace:
        _print(f"note: the cache is keyed by the archs; set SSMKERNELS_CUDA_ARCHS={args.archs} when using it")
    return 0


# ----------------------------------------------------------------------------- warmup
def cmd_warmup(args) -> int:
    from .bench import warmup

    if args.backend == "triton" and not torch.cuda.is_available():
        from ._core import config

        if not config.triton_interpret():
            _print("warmup of the triton backend needs a GPU (or TRITON_INTERPRET=1, which compiles nothing)")
            return 2
    return warmup.run(_primitives(args.primitive), args.backend, _dtypes(args.dtype), args.batch,
                      args.seqlen, log=_print)


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """Runs ``ssmkernels.demos.<name>.main(rest)`` when that package exists; says so when it does not."""
    try:
        import importlib

        demos = importlib.import_module("ssmkernels.demos")
        names = tuple(getattr(demos, "DEMOS", ()))
    except ImportError:
        names = ()
    if not names:
        _print("demos are not available yet: they need the reference hybrid model (ssmkernels.models), "
               "which is still being written. Meanwhile `python -m ssmkernels check` exercises every primitive.")
        return 2
    if not args.name or args.name not in names:
        _print(f"usage: python -m ssmkernels demo {{{','.join(names)}}} [options]; "
               f"`python -m ssmkernels demo NAME --help` lists a demo's options")
        return 2
    module = importlib.import_module(f"ssmkernels.demos.{args.name}")
    return int(module.main(list(args.rest)) or 0)


def cmd_model(args) -> int:
    """Runs the hybrid-model benchmarks (``python -m ssmkernels.models.bench``) with the given options."""
    from .models import bench as model_bench

    return int(model_bench.main(list(args.rest)) or 0)


def cmd_robustness(args) -> int:
    """Runs the robustness measurements (``ssmkernels.bench.robustness``) with the given options."""
    from .bench import robustness

    return int(robustness.main(list(args.rest)) or 0)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .bench.checks import SIZES

    parser = argparse.ArgumentParser(prog="python -m ssmkernels",
                                     description="ssmkernels: fused state-space-model kernels")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    info = sub.add_parser("info", help="versions, GPU, CUDA extension, settings and available backends")
    info.set_defaults(func=cmd_info)

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--primitive", "-p", action="append",
                         help="causal_conv1d, selective_scan, ssd, state_update (repeatable or comma-separated)")
    filters.add_argument("--backend", "-b", action="append", help="reference, triton, cuda")

    check = sub.add_parser("check", parents=[filters],
                           help="check every primitive/feature/backend against the float64 reference")
    check.add_argument("--dtype", "-d", action="append", help="float32, float16, bfloat16, float64")
    check.add_argument("--feature", "-k", help="only features whose name contains this text")
    check.add_argument("--quick", action="store_true", help="main features only, one dtype")
    check.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    check.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    check.add_argument("--size", choices=tuple(SIZES), help="input sizes (default: small on a GPU, tiny on CPU)")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", parents=[filters], help="benchmark the kernels (and peers with --compare)")
    bench.add_argument("--case", "-c", action="append", help="case names or substrings (repeatable)")
    bench.add_argument("--compare", action="store_true",
                       help="also time the peer libraries (causal_conv1d, mamba_ssm, fla, torch) when importable")
    bench.add_argument("--json", metavar="PATH", help="write results and metadata as JSON")
    bench.add_argument("--markdown", metavar="PATH", help="write a Markdown table")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    bench.add_argument("--dry-run", action="store_true", help="list the cases (works without a GPU)")
    bench.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement")
    bench.add_argument("--rep-ms", type=float, default=100.0, help="measured time per measurement")
    bench.add_argument("--deterministic", action="store_true",
                       help="also time each fwd+bwd case under set_deterministic(True) (its cost)")
    bench.add_argument("--profile", action="store_true",
                       help="instead of timing, list each implementation's GPU kernels by time (torch.profiler)")
    bench.add_argument("--no-peaks", action="store_true",
                       help="skip measuring the copy bandwidth and bf16 matmul peak")
    bench.set_defaults(func=cmd_bench)

    build = sub.add_parser("build", help="compile the CUDA extension ahead of time")
    build.add_argument("--inplace", action="store_true",
                       help="build into the package folder instead of the JIT cache")
    build.add_argument("--archs", help="CUDA archs, ';'-separated (default: SSMKERNELS_CUDA_ARCHS or 90a)")
    build.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: MAX_JOBS or all cores)")
    build.add_argument("--verbose", "-v", action="store_true", help="show the compiler output")
    build.set_defaults(func=cmd_build)

    warm = sub.add_parser("warmup", help="run each primitive once so its kernels are compiled")
    warm.add_argument("--primitive", "-p", action="append", help="which primitives (default: all)")
    warm.add_argument("--backend", "-b", default=None, help="reference, triton or cuda (default: as dispatch picks)")
    warm.add_argument("--dtype", "-d", action="append", help="dtypes (default: bfloat16 on GPU, float32 on CPU)")
    warm.add_argument("--batch", type=int, default=1, help="batch size of the warm-up calls")
    warm.add_argument("--seqlen", type=int, default=256, help="sequence length of the warm-up calls")
    warm.set_defaults(func=cmd_warmup)

    demo = sub.add_parser("demo", help="end-to-end demos (ssmkernels.demos), when available")
    demo.add_argument("name", nargs="?", help="which demo")
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="the demo's own options")
    demo.set_defaults(func=cmd_demo)

    model = sub.add_parser("model", help="end-to-end hybrid model benchmarks: training tokens/s, decode "
                                         "tokens/s and memory vs context (ssmkernels.models.bench)")
    model.add_argument("rest", nargs=argparse.REMAINDER, help="options of ssmkernels.models.bench (--out, --quick, ...)")
    model.set_defaults(func=cmd_model)

    robust = sub.add_parser("robustness", help="first-call times, batch invariance, prefill vs decode, 256K-token "
                                                "fwd+bwd vs float64, compute-sanitizer (ssmkernels.bench.robustness)")
    robust.add_argument("rest", nargs=argparse.REMAINDER, help="its options (--quick, --json PATH, --only NAME,...)")
    robust.set_defaults(func=cmd_robustness)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"] and argv[1:2] not in (["-h"], ["--help"]):
        # `model` hands every option to ssmkernels.models.bench (argparse's REMAINDER cannot take
        # options that come first).
        return cmd_model(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["robustness"]:  # its own parser, --help included
        return cmd_robustness(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
