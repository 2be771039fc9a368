"""Benchmark output: the console table, JSON (results + metadata), Markdown and a PNG bar chart."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ORDER = ("ssmkernels:cuda", "ssmkernels:triton", "ssmkernels:reference")


@dataclass
class Row:
    case: str
    primitive: str
    mode: str
    shape: str
    impl: str  # "ssmkernels:<backend>" or a peer's label
    status: str  # "ok", "unavailable" or "error"
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    min_ms: float | None = None
    reps: int | None = None
    bytes: int = 0
    flops: int = 0
    gbps: float | None = None
    tflops: float | None = None
    pct_copy_bw: float | None = None
    pct_matmul_peak: float | None = None
    wall_us_per_call: float | None = None
    queued_gpu_us: float | None = None  # GPU time per call, host taken out (runner._queued_or_none)
    queued_pct_copy_bw: float | None = None
    speedup_vs_best_peer: float | None = None
    note: str = ""

    @property
    def ours(self) -> bool:
        return self.impl.startswith("ssmkernels:")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _queued(row: Row) -> str:
    if row.queued_gpu_us is None:
        return "-"
    pct = "" if row.queued_pct_copy_bw is None else f" ({row.queued_pct_copy_bw:.0f}%)"
    return f"{row.queued_gpu_us:.1f}{pct}"


def _cells(row: Row) -> list[str]:
    if row.status != "ok":
        return [row.case, row.impl, f"{row.status}: {row.reason}"]
    spread = f"{row.p20_ms:.3f}-{row.p80_ms:.3f}" if row.p20_ms is not None else "-"
    return [row.case, row.impl, _num(row.median_ms, ".3f"), spread, _num(row.gbps, ".0f"),
            _num(row.pct_copy_bw, ".0f"), _num(row.tflops, ".1f"), _num(row.pct_matmul_peak, ".1f"),
            _num(row.wall_us_per_call, ".1f"), _queued(row),
            "-" if row.speedup_vs_best_peer is None else f"{row.speedup_vs_best_peer:.2f}x", row.note]


HEADERS = ["case", "impl", "median ms", "p20-p80 ms", "GB/s", "%copy", "TFLOP/s", "%mm", "wall us/call",
           "queued GPU us (%copy)", "vs best peer", "note"]


def table(rows: list[Row]) -> str:
    """Aligned text table; unavailable/errored implementations get one line with the reason."""
    ok = [_cells(r) for r in rows if r.status == "ok"]
    widths = [max([len(h)] + [len(c[i]) for c in ok]) for i, h in enumerate(HEADERS)]
    widths[0] = max([widths[0]] + [len(r.case) for r in rows])
    widths[1] = max([widths[1]] + [len(r.impl) for r in rows])
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for row in rows:
        if previous is not None and row.case != previous:
            lines.append("")
        previous = row.case
        cells = _cells(row)
        if row.status != "ok":
            lines.append(f"{cells[0].ljust(widths[0])}  {cells[1].ljust(widths[1])}  {cells[2]}")
        else:
            lines.append("  ".join(c.rjust(w) if 2 <= i <= 10 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines)


def write_json(path: str | Path, meta: dict[str, Any], rows: list[Row]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=2) + "\n")


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    peaks = meta.get("peaks") or {}
    lines = ["# ssmkernels benchmark", ""]
    lines.append(f"- GPU: {meta.get('gpu')}")
    lines.append(f"- when: {meta.get('timestamp')}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()))
    lines.append("- peers: " + ", ".join(f"{k} {v}" for k, v in (meta.get("peers") or {}).items()))
    if peaks:
        lines.append(f"- measured peaks: copy {peaks.get('copy_gbps', 0):.0f} GB/s, "
                     f"bf16 matmul {peaks.get('matmul_tflops', 0):.0f} TFLOP/s "
                     f"({peaks.get('matmul_n')}^3)")
    lines.append(f"- timing: {meta.get('timing')}")
    lines.append("")
    for primitive in dict.fromkeys(r.primitive for r in rows):
        lines += [f"## {primitive}", ""]
        lines.append("| case | shape | impl | median ms | p20-p80 ms | GB/s | % copy BW | TFLOP/s | % bf16 mm "
                     "| wall us/call | queued GPU us (% copy) | vs best peer |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            if row.primitive != primitive:
                continue
            if row.status != "ok":
                lines.append(f"| {row.case} | {row.shape} | {row.impl} | {row.status}: "
                             f"{row.reason.replace('|', '/')} | | | | | | | | |")
                continue
            cells = _cells(row)
            lines.append(f"| {row.case} | {row.shape} | {row.impl} | " + " | ".join(cells[2:11]) + " |")
        lines.append("")
    notes = sorted({f"{r.impl}: {r.note}" for r in rows if r.note})
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_markdown(path: str | Path, meta: dict[str, Any], rows: list[Row]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown(meta, rows))


def write_plot(path: str | Path, meta: dict[str, Any], rows: list[Row]) -> str | None:
    """Horizontal bars of the median time per case and implementation (log scale). Returns an
    error message instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install matplotlib (or pip install 'ssmkernels[plot]')"
    ok = [r for r in rows if r.status == "ok" and r.median_ms]
    if not ok:
        return "nothing to plot: no implementation ran"
    cases = list(dict.fromkeys(r.case for r in ok))
    impls = sorted(dict.fromkeys(r.impl for r in ok), key=lambda i: (ORDER.index(i) if i in ORDER else len(ORDER), i))
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.45 * len(cases) * max(1, len(impls)) ** 0.5 + 1.5)))
    for k, impl in enumerate(impls):
        ys, xs = [], []
        for i, case in enumerate(cases):
            match = [r for r in ok if r.case == case and r.impl == impl]
            if match:
                ys.append(i + k * height)
                xs.append(match[0].median_ms)
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time per call (ms, log scale; shorter is faster)")
    ax.set_title(f"ssmkernels bench on {meta.get('gpu', '?')}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
