"""The benchmark's PNG plots: per-call latency, sessions against delay, throughput against
concurrent clients (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .paths import ORDER, PATHS
from .report import LATENCY_LABELS, METRICS, Results


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """latency.png, sessions.png, throughput.png; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    res = Results(results)
    colors = {name: f"C{index}" for index, name in enumerate(ORDER)}
    written: list[Path] = []

    def save(fig: Any, axes: Any, name: str, ylabel: str | None = None) -> None:
        if ylabel is not None:
            axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # Per-call latency: one panel per delay, bars = medians, whiskers up to p99.
    fig, axes = plt.subplots(
        1, len(res.delays), figsize=(6 * len(res.delays), 4.8), squeeze=False, sharey=True
    )
    kinds = list(LATENCY_LABELS)
    for ax, delay in zip(axes[0], res.delays, strict=True):
        paths = [p for p in res.paths if res.applies(p, delay)]
        width = 0.8 / max(1, len(paths))
        for index, path in enumerate(paths):
            medians, errors = [], []
            for kind in kinds:
                record = res.get(path, delay)
                stats = (record or {}).get("latency", {}).get(kind, {})
                median, p99 = stats.get("median"), stats.get("p99")
                medians.append(median or float("nan"))
                errors.append(max(0.0, (p99 or 0) - (median or 0)))
            xs = [k + (index - (len(paths) - 1) / 2) * width for k in range(len(kinds))]
            ax.bar(xs, medians, width, label=PATHS[path].label, color=colors[path])
            ax.errorbar(
                xs, medians, yerr=[[0] * len(kinds), errors], fmt="none", ecolor="black", lw=0.6
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([LATENCY_LABELS[k] for k in kinds], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{delay:g} ms one-way delay")
        ax.grid(axis="y", which="both", alpha=0.3)
    save(fig, axes, "latency.png", "per-call latency, us (bar: median, line: to p99)")

    # Sessions against link delay.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), squeeze=False)
    for ax, (key, label) in zip(
        axes[0],
        [
            ("opensc_tool_a", "opensc-tool -a"),
            ("pcsc_scan_r", "pcsc_scan -r"),
            ("pyscard_session", "pyscard session"),
        ],
        strict=True,
    ):
        metric = next(m for m in METRICS if m.key == key)
        for path in res.paths:
            points = [
                (d, res.value(metric, path, d))
                for d in res.delays
                if res.applies(path, d) and res.value(metric, path, d) is not None
            ]
            if not points:
                continue
            if PATHS[path].delayable:
                ax.plot(
                    [p[0] for p in points],
                    [p[1] / 1000 for p in points],
                    marker="o",
                    label=PATHS[path].label,
                    color=colors[path],
                )
            else:
                ax.axhline(
                    points[0][1] / 1000,
                    ls="--",
                    lw=1,
                    label=f"{PATHS[path].label} (no link)",
                    color=colors[path],
                )
        ax.set_yscale("log")
        ax.set_xlabel("one-way link delay, ms")
        ax.set_ylabel("wall time, ms (median)")
        ax.set_title(label)
        ax.grid(which="both", alpha=0.3)
    save(fig, axes, "sessions.png")

    # Throughput against concurrent clients, one panel per delay.
    fig, axes = plt.subplots(
        1, len(res.delays), figsize=(5 * len(res.delays), 4.2), squeeze=False, sharey=True
    )
    for ax, delay in zip(axes[0], res.delays, strict=True):
        for path in res.paths:
            record = res.get(path, delay)
            if record is None or not res.applies(path, delay):
                continue
            levels = sorted(record.get("throughput", {}), key=int)
            ax.plot(
                [int(level) for level in levels],
                [record["throughput"][level]["calls_per_s"] for level in levels],
                marker="o",
                label=PATHS[path].label,
                color=colors[path],
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(f"{delay:g} ms one-way delay")
        ax.grid(which="both", alpha=0.3)
    save(fig, axes, "throughput.png", "SCardTransmit calls/s, all clients")
    return written
