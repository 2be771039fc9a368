"""The harness behind ``python -m ssmkernels check`` and ``bench`` (and ``benchmarks/``).

- ``checks``: correctness cases (every primitive and feature at small shapes) and the runner that
  compares a backend against the float64 reference by the SPEC rule (``_core.tolerance``).
- ``cases``: named benchmark cases per primitive (the shapes of issue 3), with bytes and FLOPs.
- ``timing``: CUDA-event median timing, the GPU's measured copy bandwidth and bf16 matmul peak.
- ``peers``: the peer libraries (causal_conv1d, mamba_ssm without its ``__init__``, fla), when importable.
- ``report``: the console table, JSON, Markdown and the PNG plot.
- ``runner``: runs benchmark cases on every backend and peer, side by side.

Nothing here is imported by the public API; importing this package needs no GPU.
"""
