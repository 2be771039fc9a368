"""Host-side profile of one eager decode step of the ~125M hybrid (and of the matched Transformer).

    python scripts/profile_decode_step.py [--batch 1] [--context 2048] [--steps 5] [--top 30]

Prints the mean eager step time of both models and the hybrid's cProfile listing, sorted by own
time. Eager decode is host-bound at batch 1, so a Python or library call that stalls the host (a
synchronisation, a plan built per call) shows up here at once; it found cuDNN attention building a
plan for every new key length (34 ms per call on an H100). On a machine without a GPU it runs the
tiny config in float32.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from ssmkernels.models import HybridConfig, HybridLM
from ssmkernels.models.bench import fill_synthetic_context, matched_transformer_config


def eager_steps(model: HybridLM, batch: int, context: int, steps: int, profiler=None) -> float:
    """Mean ms per eager decode step after ``context`` synthetic cached positions."""
    device = model.embeddings.weight.device
    cache = model.new_cache(batch, context + 2 * steps + 8)
    fill_synthetic_context(model, cache, context)
    token = torch.randint(0, model.cfg.vocab_size, (batch, 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(steps):  # warm-up: kernels compiled, autotuned, plans cached
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        sync()
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        sync()
        if profiler is not None:
            profiler.disable()
    return 1e3 * (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    cfg = HybridConfig.small_125m() if on_gpu else HybridConfig.tiny()
    profiler = cProfile.Profile()
    for name, model_cfg in (("hybrid", cfg), ("transformer", matched_transformer_config(cfg))):
        model = HybridLM(model_cfg).to(device, dtype).eval()
        ms = eager_steps(model, args.batch, args.context, args.steps, profiler if name == "hybrid" else None)
        print(f"{name:<12} {model_cfg.pattern}  batch {args.batch} context {args.context}: eager step {ms:.2f} ms")
        del model
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
