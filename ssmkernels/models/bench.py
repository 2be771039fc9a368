"""End-to-end measurements of the hybrid model: training tokens/s, decode tokens/s and memory vs context.

Plain functions returning dicts (one row per measurement), meant to be called by the CLI's
``bench`` / ``model`` subcommands and by plotting scripts:

- :func:`training_throughput` -- forward + backward (+ optimizer step) tokens/s at a given length.
- :func:`decode_throughput` -- one decode configuration: tokens/s, ms per step (percentiles),
  cache bytes (Mamba states vs KV caches) and peak device memory.
- :func:`decode_sweep` -- :func:`decode_throughput` over contexts x batch sizes x CUDA graphs.
- :func:`matched_transformer_config` -- an attention + MLP model of about the same parameter count
  (the baseline whose per-token cost grows with context).
- :func:`environment` -- device name, versions and a timestamp to store with every result.

Decode at context ``C`` starts from a *synthetic* context by default: the cache is filled with
random states / keys / values for ``C`` positions instead of prefilling ``C`` tokens. A decode
step costs the same whatever the cached values are, and a 64K prefill of a Transformer baseline
would dominate the benchmark's run time. ``fill="prefill"`` prefills real tokens instead.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Iterable, Optional

import torch

from .config import HybridConfig
from .model import HybridLM


def environment() -> dict:
    """Device, versions and a UTC timestamp to record next to every measurement."""
    info = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - depends on the machine
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    import ssmkernels

    info["ssmkernels"] = ssmkernels.__version__
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _percentiles(times_s: list[float]) -> dict:
    ordered = sorted(times_s)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p10_ms": 1e3 * pick(0.1), "p50_ms": 1e3 * pick(0.5), "p90_ms": 1e3 * pick(0.9),
            "mean_ms": 1e3 * statistics.fmean(ordered)}


def count_parameters(cfg: HybridConfig) -> int:
    """Parameter count of ``HybridLM(cfg)`` (built on the meta device: no memory)."""
    return HybridLM(cfg, device="meta").num_parameters()


def matched_transformer_config(cfg: HybridConfig) -> HybridConfig:
    """A Transformer (``*-`` repeated: attention + MLP, same widths, heads and vocabulary) whose
    parameter count is the closest to ``cfg``'s."""
    target = count_parameters(cfg)
    best = None
    for pairs in range(1, 4 * cfg.n_layers + 1):
        candidate = cfg.replace(pattern="*-" * pairs)
        params = count_parameters(candidate)
        if best is None or abs(params - target) < abs(best[1] - target):
            best = (candidate, params)
        if params > target:
            break
    return best[0]


# ----------------------------------------------------------------------------- training
def training_throughput(model: HybridLM, batch_size: int, seqlen: int, steps: int = 10, warmup: int = 3,
                        backend: Optional[str] = None, optimizer: bool = True,
                        autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Tokens/s of training steps (forward, cross-entropy, backward, AdamW step when ``optimizer``).

    Args:
        model: a :class:`HybridLM` on the device and in the dtype to measure.
        batch_size, seqlen: the batch of random tokens.
        steps, warmup: timed steps after ``warmup`` untimed ones.
        backend: sets ``model.backend`` for the run (restored afterwards); None keeps it.
        autocast_dtype: run under ``torch.autocast`` with this dtype (e.g. bfloat16) when given.
    """
    device = model.embeddings.weight.device
    previous = model.backend
    if backend is not None:
        model.backend = backend
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer else None
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, seqlen + 1), device=device)
    times = []
    base = None
    try:
        for i in range(warmup + steps):
            if i == warmup:
                base = _reset_peak(device)
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.backend = previous
    tokens = batch_size * seqlen
    row = {"kind": "train", "pattern": model.cfg.pattern, "params": model.num_parameters(),
           "backend": backend or previous or "auto", "batch_size": batch_size, "seqlen": seqlen,
           "dtype": str(model.embeddings.weight.dtype).replace("torch.", ""),
           "tokens_per_s": tokens / statistics.median(times), **_percentiles(times),
           "peak_bytes": _peak(device), "baseline_bytes": base if device.type == "cuda" else None}
    return row


# ----------------------------------------------------------------------------- decode
@torch.no_grad()
def fill_synthetic_context(model: HybridLM, cache, context: int, scale: float = 0.1) -> None:
    """Put ``context`` positions of random states / keys / values in ``cache`` (no prefill)."""
    if context > cache.max_seqlen:
        raise ValueError(f"context {context} exceeds the cache's max_seqlen {cache.max_seqlen}")
    for state in cache.mamba.values():
        state.conv_state.normal_(0.0, scale)
        state.ssm_state.normal_(0.0, scale)
    for kv in cache.attention.values():
        kv.k[:, :, :context].normal_(0.0, scale)
        kv.v[:, :, :context].normal_(0.0, scale)
    cache.seqlen_offset = context


@torch.no_grad()
def decode_throughput(model: HybridLM, batch_size: int, context: int, new_tokens: int = 64, warmup: int = 8,
                      cuda_graph: bool = False, fill: str = "synthetic", prefill_chunk: int = 4096,
                      backend: Optional[str] = None) -> dict:
    """Greedy decode of ``new_tokens`` tokens per row after ``context`` cached positions.

    Returns tokens/s (``batch_size * steps / time``), per-step percentiles, the cache's bytes
    (Mamba states, KV caches) and the peak device memory during decode (CUDA only).
    """
    if fill not in ("synthetic", "prefill"):
        raise ValueError(f"fill must be 'synthetic' or 'prefill', got {fill!r}")
    device = model.embeddings.weight.device
    previous = model.backend
    if backend is not None:
        model.backend = backend
    model.eval()
    try:
        cache = model.new_cache(batch_size, context + warmup + new_tokens + 1)
        if fill == "synthetic":
            fill_synthetic_context(model, cache, context)
        else:
            prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, context), device=device)
            for start in range(0, context, prefill_chunk):
                model(prompt[:, start:start + prefill_chunk], cache=cache, logits_to_keep=1)
        step = model
        if cuda_graph:
            from .generation import DecodeGraph

            graph = DecodeGraph(model, cache)
            step = lambda ids, cache: graph(ids)  # noqa: E731
        token = torch.randint(0, model.cfg.vocab_size, (batch_size, 1), device=device)
        for _ in range(warmup):
            token = step(token, cache=cache)[:, -1:].argmax(-1)
        base = _reset_peak(device)
        times = []
        for _ in range(new_tokens):
            _sync(device)
            start = time.perf_counter()
            token = step(token, cache=cache)[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
    finally:
        model.backend = previous
    median = statistics.median(times)
    return {"kind": "decode", "pattern": model.cfg.pattern, "params": model.num_parameters(),
            "backend": backend or previous or "auto", "batch_size": batch_size, "context": context,
            "cuda_graph": cuda_graph, "fill": fill, "dtype": str(model.embeddings.weight.dtype).replace("torch.", ""),
            "tokens_per_s": batch_size / median, **_percentiles(times),
            "mamba_state_bytes": cache.mamba_nbytes(), "kv_cache_bytes": cache.attention_nbytes(),
            "cache_bytes_per_sequence": cache.nbytes() // batch_size,
            "peak_bytes": _peak(device), "baseline_bytes": base if device.type == "cuda" else None}


def decode_sweep(model: HybridLM, contexts: Iterable[int] = (1024, 2048, 4096, 8192, 16384, 32768, 65536),
                 batch_sizes: Iterable[int] = (1, 64), cuda_graphs: Iterable[bool] = (False, True),
                 new_tokens: int = 32, progress=None, **kwargs) -> list[dict]:
    """:func:`decode_throughput` over every (batch size, context, CUDA graph) combination; a
    configuration that runs out of memory is recorded with ``"error"`` instead of stopping the sweep.
    ``progress(row)`` is called after each configuration."""
    rows = []
    for batch_size in batch_sizes:
        for context in contexts:
            for graph in cuda_graphs:
                if graph and next(model.parameters()).device.type != "cuda":
                    continue  # CUDA graphs need the model on a GPU
                try:
                    row = decode_throughput(model, batch_size, context, new_tokens, cuda_graph=graph, **kwargs)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    # RuntimeError: torch.AcceleratorError too, e.g. "CUDA error: out of memory" from
                    # the driver when a graph's stream is created while the allocator holds the rest.
                    row = {"kind": "decode", "pattern": model.cfg.pattern, "batch_size": batch_size,
                           "context": context, "cuda_graph": graph, "error": f"{type(exc).__name__}: {exc}"[:200]}
                _release_memory()
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


@contextlib.contextmanager
def ssd_from(function):
    """Run the model's ``ssd_chunk_scan`` calls through ``function``, a drop-in with the same
    arguments but no ``backend`` (mamba_ssm's ``mamba_chunk_scan_combined``): the same model, with
    the peer's SSD kernels in place of ours (the Mamba blocks call ``ssmkernels.ssd_chunk_scan``)."""
    import ssmkernels

    original = ssmkernels.ssd_chunk_scan
    ssmkernels.ssd_chunk_scan = lambda *args, backend=None, **kwargs: function(*args, **kwargs)
    try:
        yield
    finally:
        ssmkernels.ssd_chunk_scan = original


def _peer_ssd():
    """mamba_ssm's ``mamba_chunk_scan_combined``, or the reason it cannot be imported here."""
    from ..bench import peers

    peer = peers.load()["mamba_ssm"]
    return peer.get("mamba_chunk_scan_combined") or f"mamba_ssm: {peer.why_missing('mamba_chunk_scan_combined')}"


def _release_memory() -> None:
    """Hand cached blocks (and finished CUDA graphs' pools) back to the driver between measurements,
    so that one configuration's peak does not starve the next (streams and graphs need driver memory
    outside the caching allocator)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the suite
def _try(fn, *args, **kwargs) -> dict:
    """Run one measurement; a backend that cannot serve it or memory that runs out becomes a row
    with ``"error"`` instead of ending the suite."""
    from .. import BackendUnavailable

    try:
        return fn(*args, **kwargs)
    except (BackendUnavailable, torch.OutOfMemoryError, NotImplementedError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "args": [a for a in args if isinstance(a, (int, str))],
                **{k: v for k, v in kwargs.items() if isinstance(v, (int, str, bool, type(None)))}}
    finally:
        _release_memory()


def _describe(row: dict) -> str:
    """One progress line for a training or decode row."""
    if "error" in row:
        return f"error: {row['error']}"
    text = f"{row['tokens_per_s']:,.0f} tok/s"
    if row.get("peak_bytes") is not None:
        text += f", peak {row['peak_bytes'] / 2**30:.2f} GiB"
    return text


def run_model_suite(out_dir=None, quick: bool = False, seqlen: int = 4096, train_batch: int = 4,
                    backends: Iterable[str] = ("cuda", "triton", "reference"),
                    contexts: Iterable[int] = (1024, 2048, 4096, 8192, 16384, 32768, 65536),
                    batch_sizes: Iterable[int] = (1, 64), dtype: torch.dtype = torch.bfloat16, decode: bool = True,
                    log=lambda message: print(message, flush=True)) -> dict:
    """The end-to-end measurements of issue #8 on the current device, returned and (with ``out_dir``)
    written as ``model_bench.json`` plus PNG plots when matplotlib is installed.

    - training tokens/s of the ~125M hybrid at ``seqlen`` on each backend, and of a Transformer of
      equal parameter count (SDPA attention; its MLP/attention do not depend on the backend);
    - decode tokens/s and memory vs context for the hybrid and the Transformer, per batch size,
      with and without CUDA graphs (graphs only on CUDA); ``decode=False`` skips this part.

    ``quick`` shrinks everything (tiny model, short lengths) to check the plumbing on a CPU.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        hybrid_cfg = HybridConfig.tiny()
        seqlen, train_batch, contexts, batch_sizes = min(seqlen, 64), 2, (16, 64), (1, 2)
        dtype = torch.float32
    else:
        hybrid_cfg = HybridConfig.small_125m()
    transformer_cfg = matched_transformer_config(hybrid_cfg)
    results = {"environment": environment(), "hybrid_pattern": hybrid_cfg.pattern,
               "transformer_pattern": transformer_cfg.pattern, "train": [], "decode": []}
    hybrid = HybridLM(hybrid_cfg).to(device, dtype)
    transformer = HybridLM(transformer_cfg).to(device, dtype)
    results["hybrid_params"], results["transformer_params"] = hybrid.num_parameters(), transformer.num_parameters()
    log(f"model bench on {results['environment']['device']}: hybrid {hybrid_cfg.pattern} "
        f"({results['hybrid_params']:,} parameters) vs transformer {transformer_cfg.pattern} "
        f"({results['transformer_params']:,}), {str(dtype).replace('torch.', '')}")

    def save() -> None:  # after every row, so a run that is cut short keeps what it measured
        if out_dir is not None:
            import json
            from pathlib import Path

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "model_bench.json").write_text(json.dumps(results, indent=2, default=str))

    def record_train(row: dict, label: str, **fields) -> None:
        row.update(fields)
        results["train"].append(row)
        log(f"  train {row['model']:<11} {label:<13} b{train_batch} L{seqlen}: {_describe(row)}")
        save()

    for backend in backends:
        slow = backend == "reference"
        record_train(_try(training_throughput, hybrid, train_batch, seqlen, steps=2 if slow else 10,
                          warmup=1 if slow else 3, backend=backend), backend, model="hybrid")
    # The same hybrid with mamba_ssm's SSD kernels (its Triton chunk scan; our conv and the rest).
    peer_ssd = _peer_ssd() if device.type == "cuda" else "peers are measured on the GPU only"
    if isinstance(peer_ssd, str):
        row = {"error": peer_ssd}
    else:
        with ssd_from(peer_ssd):
            row = _try(training_throughput, hybrid, train_batch, seqlen, backend="triton")
    record_train(row, "mamba_ssm SSD", model="hybrid", backend="triton, mamba_ssm SSD")
    record_train(_try(training_throughput, transformer, train_batch, seqlen), "(sdpa)", model="transformer")

    graphs = (False, True) if device.type == "cuda" else (False,)
    for name, model in (("hybrid", hybrid), ("transformer", transformer)) if decode else ():
        def progress(row: dict, name: str = name) -> None:
            row["model"] = name
            results["decode"].append(row)
            log(f"  decode {name:<11} b{row['batch_size']:<3} context {row['context']:>6} "
                f"{'graph' if row['cuda_graph'] else 'eager'}: {_describe(row)}")
            save()
        decode_sweep(model, contexts, batch_sizes, graphs, new_tokens=8 if quick else 32, progress=progress)

    if out_dir is not None:
        results["plots"] = plot_decode(results["decode"], out_dir)
    return results


def plot_decode(rows: list[dict], out_dir) -> list[str]:
    """Per batch size: decode ms/token and cache memory vs context, hybrid vs Transformer, with and
    without CUDA graphs. Returns the PNG paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from pathlib import Path

    paths = []
    ok = [r for r in rows if "error" not in r]
    for batch_size in sorted({r["batch_size"] for r in ok}):
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
        for model in ("hybrid", "transformer"):
            for graph in (False, True):
                series = sorted((r for r in ok if r["batch_size"] == batch_size and r.get("model") == model
                                 and r["cuda_graph"] == graph), key=lambda r: r["context"])
                if not series:
                    continue
                label = f"{model}{' + CUDA graph' if graph else ''}"
                ctx = [r["context"] for r in series]
                ax_time.plot(ctx, [r["p50_ms"] for r in series], marker="o", label=label)
                if not graph:
                    ax_mem.plot(ctx, [r["cache_bytes_per_sequence"] / 2**20 for r in series], marker="o", label=model)
        for ax, ylabel in ((ax_time, "ms per decode step (median)"), (ax_mem, "cache MiB per sequence")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"decode, batch {batch_size}")
        fig.tight_layout()
        path = Path(out_dir) / f"model_decode_b{batch_size}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    """``python -m ssmkernels.models.bench [--out DIR] [--quick]``: run :func:`run_model_suite`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="end-to-end hybrid model benchmarks (issue #8)")
    parser.add_argument("--out", default="model_bench", help="directory for model_bench.json and plots")
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths (plumbing check)")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--backends", default="cuda,triton,reference")
    parser.add_argument("--skip-decode", action="store_true", help="only the training rows")
    args = parser.parse_args(argv)
    results = run_model_suite(args.out, quick=args.quick, seqlen=args.seqlen,
                              backends=tuple(b for b in args.backends.split(",") if b), decode=not args.skip_decode)
    summary = {"train": [{k: r.get(k) for k in ("model", "backend", "tokens_per_s", "error")} for r in results["train"]],
               "plots": results.get("plots")}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
