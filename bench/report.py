"""The benchmark's report: ratio tables (text and Markdown), target verdicts, PNG plots.

Every ratio compares medians measured in the same run:
- "vs direct": against the direct pcscd socket (measured once, without delay: the host's own
  applications see that, whatever the guest's link);
- "vs ssh -T -R": against the Nagle-fixed ssh socket forward at the same link delay.
Time ratios above 1 mean slower; throughput ratios above 1 mean more calls per second.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import ORDER, PATHS

Record = dict[str, Any]

REFERENCE_SSH = "ssh-T-R"
BRIDGES = [name for name in ORDER if PATHS[name].bridge]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str  # "us" (a time in microseconds), "rate" (calls/s), "text"
    get: Callable[[Record], Any]


def _latency(kind: str, stat: str) -> Callable[[Record], Any]:
    return lambda r: r.get("latency", {}).get(kind, {}).get(stat)


def _session(kind: str) -> Callable[[Record], Any]:
    def get(r: Record) -> float | None:
        value = r.get("sessions", {}).get(kind, {}).get("median")
        return None if value is None else value * 1e6

    return get


def _throughput(level: str) -> Callable[[Record], Any]:
    return lambda r: r.get("throughput", {}).get(level, {}).get("calls_per_s")


def _event(stat: str) -> Callable[[Record], Any]:
    def get(r: Record) -> float | None:
        value = r.get("events", {}).get(stat, {}).get("median")
        return None if value is None else value * 1e3

    return get


def _correctness(r: Record) -> str | None:
    levels = r.get("throughput")
    if not levels:
        return None
    wrong = sum(levels[k].get("wrong", 0) for k in levels)
    lost = sum(levels[k].get("lost", 0) for k in levels)
    errors = sum(levels[k].get("errors", 0) for k in levels)
    return f"{wrong}/{lost}/{errors}"


LATENCY_LABELS = {
    "transmit_short": "Transmit 32 B",
    "transmit_4k": "Transmit 4 KiB",
    "get_status_change_0": "GetStatusChange(0)",
    "list_readers": "ListReaders",
    "connect_disconnect": "Connect+Disconnect",
    "begin_end_transaction": "Begin+EndTransact.",
}

METRICS: list[Metric] = []
for _kind, _label in LATENCY_LABELS.items():
    METRICS.append(Metric(f"{_kind}.median", f"{_label} (median)", "us", _latency(_kind, "median")))
    METRICS.append(Metric(f"{_kind}.p99", "  p99", "us", _latency(_kind, "p99")))
METRICS += [
    Metric("opensc_tool_a", "opensc-tool -a (wall)", "us", _session("opensc_tool_a")),
    Metric("pcsc_scan_r", "pcsc_scan -r (wall)", "us", _session("pcsc_scan_r")),
    Metric("pyscard_session", "pyscard session", "us", _session("pyscard_session")),
    Metric("tp1", "1 client: calls/s", "rate", _throughput("1")),
    Metric("tp8", "8 clients: calls/s", "rate", _throughput("8")),
    Metric("tp64", "64 clients: calls/s", "rate", _throughput("64")),
    Metric("correct", "wrong/lost/errors (all)", "text", _correctness),
    Metric("event", "card event seen after", "us", _event("seen_ms")),
    Metric("event_added", "  added over direct", "added", _event("added_ms")),
]


# ------------------------------------------------------------------------------ formatting


def fmt_us(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) < 100:
        return f"{value:.1f} us"
    if abs(value) < 1000:
        return f"{value:.0f} us"
    if abs(value) < 10_000:
        return f"{value / 1000:.2f} ms"
    if abs(value) < 1_000_000:
        return f"{value / 1000:.1f} ms"
    return f"{value / 1e6:.2f} s"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f}k/s"
    return f"{value:.0f}/s"


def fmt_ratio(value: float | None) -> str:
    if value is None or math.isnan(value) or math.isinf(value):
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_value(metric: Metric, value: Any) -> str:
    if value is None:
        return "-"
    if metric.kind == "rate":
        return fmt_rate(value)
    if metric.kind == "text":
        return str(value)
    if metric.kind == "added":
        return ("+" if value >= 0 else "") + fmt_us(value)
    return fmt_us(value)


def mb(kib: int | None) -> str:
    return "-" if kib is None else f"{kib * 1024 / 1e6:.1f} MB"


# ------------------------------------------------------------------------------ lookup


class Results:
    def __init__(self, results: dict[str, Any]) -> None:
        self.raw = results
        self.paths: list[str] = [p for p in ORDER if p in results["meta"]["paths"]]
        self.delays: list[float] = results["meta"]["delays_ms"]
        self.runs: dict[tuple[str, float], Record] = {
            (r["path"], r["delay_ms"]): r for r in results["runs"] if not r.get("error")
        }

    def get(self, path: str, delay: float) -> Record | None:
        return self.runs.get((path, delay))

    def value(self, metric: Metric, path: str, delay: float) -> Any:
        record = self.get(path, delay)
        return None if record is None else metric.get(record)

    def ratio(self, metric: Metric, path: str, delay: float, ref_path: str) -> float | None:
        if metric.kind not in ("us", "rate"):
            return None
        ref_delay = 0.0 if ref_path == "direct" else delay
        value = self.value(metric, path, delay)
        ref = self.value(metric, ref_path, ref_delay)
        if value is None or not ref:
            return None
        return value / ref

    def applies(self, path: str, delay: float) -> bool:
        return delay == 0 or PATHS[path].delayable


# ------------------------------------------------------------------------------ targets


def _verdict(ok: list[bool]) -> bool | None:
    return None if not ok else all(ok)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on this run's medians (never asserted anywhere)."""
    res = Results(results)
    by_key = {m.key: m for m in METRICS}
    targets: list[dict[str, Any]] = []

    def add(ident: str, text: str, checks: list[tuple[bool, str]]) -> None:
        targets.append(
            {
                "id": ident,
                "target": text,
                "met": _verdict([ok for ok, _ in checks]),
                "details": [("met: " if ok else "MISSED: ") + text for ok, text in checks],
            }
        )

    # 1. Reader lists and states are local: <= 3 x direct at any delay.
    checks = []
    for kind in ("list_readers", "get_status_change_0"):
        metric = by_key[f"{kind}.median"]
        for path in BRIDGES:
            for delay in res.delays:
                ratio = res.ratio(metric, path, delay, "direct")
                if ratio is not None and res.applies(path, delay):
                    checks.append(
                        (
                            ratio <= 3,
                            f"{path} at {delay:g} ms: {LATENCY_LABELS[kind]} "
                            f"{fmt_us(res.value(metric, path, delay))} = "
                            f"{fmt_ratio(ratio)} x direct",
                        )
                    )
    add(
        "local-state",
        "SCardListReaders and SCardGetStatusChange(0) through the bridge no slower than "
        "direct pcscd x 3 at any link delay",
        checks,
    )

    # 2. At 5 ms: sessions take at most half the time of ssh -T -R.
    checks = []
    for key in ("pyscard_session", "opensc_tool_a"):
        metric = by_key[key]
        for path in ("bridge-tcp", "bridge-ssh"):
            ratio = res.ratio(metric, path, 5.0, REFERENCE_SSH)
            if ratio is not None:
                checks.append(
                    (
                        ratio <= 0.5,
                        f"{path}: {metric.label} {fmt_us(res.value(metric, path, 5.0))} = "
                        f"{fmt_ratio(ratio)} x ssh -T -R "
                        f"({fmt_us(res.value(metric, REFERENCE_SSH, 5.0))})",
                    )
                )
    add(
        "sessions-5ms",
        "with 5 ms one-way delay the pyscard session and `opensc-tool -a` take at most half "
        "the time they take over ssh -T -R",
        checks,
    )

    # 3. At 5 ms one SCardTransmit costs one round trip.
    checks = []
    metric = by_key["transmit_short.median"]
    for path in ("bridge-tcp", "bridge-ssh"):
        at5 = res.value(metric, path, 5.0)
        if at5 is None:
            continue
        at0 = res.value(metric, path, 0.0) or 0.0
        trips = (at5 - at0) / 10_000
        checks.append(
            (
                trips < 1.5,
                f"{path}: Transmit {fmt_us(at5)} at 5 ms vs {fmt_us(at0)} on loopback: "
                f"{trips:.2f} round trips of 10 ms",
            )
        )
    add("transmit-rtt", "with 5 ms one-way delay one SCardTransmit costs one round trip", checks)

    # 4. Loopback Transmit: SSH link <= 1.5 x ssh -T -R; unix link <= 2 x socat.
    checks = []
    for kind in ("transmit_short", "transmit_4k"):
        metric = by_key[f"{kind}.median"]
        for path, ref, limit in (("bridge-ssh", REFERENCE_SSH, 1.5), ("bridge-unix", "socat", 2)):
            ratio = res.ratio(metric, path, 0.0, ref)
            if ratio is not None:
                checks.append(
                    (
                        ratio <= limit,
                        f"{path}: {LATENCY_LABELS[kind]} {fmt_us(res.value(metric, path, 0.0))}"
                        f" = {fmt_ratio(ratio)} x {ref} ({fmt_us(res.value(metric, ref, 0.0))}),"
                        f" limit {limit:g}",
                    )
                )
    add(
        "loopback-transmit",
        "on loopback SCardTransmit over the SSH link within 1.5 x ssh -T -R, over a unix link "
        "within 2 x socat",
        checks,
    )

    # 5. 64 clients: every response right, and throughput >= ssh -T -R.
    correct, faster = [], []
    metric = by_key["tp64"]
    for path in BRIDGES:
        for delay in res.delays:
            record = res.get(path, delay)
            if record is None or "64" not in record.get("throughput", {}):
                continue
            level = record["throughput"]["64"]
            bad = level["wrong"] + level["lost"] + level["errors"]
            correct.append(
                (
                    bad == 0,
                    f"{path} at {delay:g} ms: {level['calls']} calls, {level['wrong']} wrong, "
                    f"{level['lost']} lost, {level['errors']} errors",
                )
            )
            ratio = res.ratio(metric, path, delay, REFERENCE_SSH)
            if ratio is not None:
                faster.append(
                    (
                        ratio >= 1,
                        f"{path} at {delay:g} ms: {fmt_rate(level['calls_per_s'])} = "
                        f"{fmt_ratio(ratio)} x ssh -T -R "
                        f"({fmt_rate(res.value(metric, REFERENCE_SSH, delay))})",
                    )
                )
    add(
        "concurrency-correct",
        "64 concurrent clients through the bridge: zero wrong or lost responses",
        correct,
    )
    add(
        "concurrency-throughput",
        "64 concurrent clients through the bridge: throughput at least that of ssh -T -R",
        faster,
    )

    # 6. Peak RSS under the 64-client load.
    checks = []
    for path in BRIDGES:
        for delay in res.delays:
            record = res.get(path, delay)
            if record is None or "rss" not in record:
                continue
            for role, limit in (("guest", 40e6), ("host", 60e6)):
                kib = record["rss"].get(role, {}).get("peak_rss_kib")
                if kib is not None:
                    checks.append(
                        (
                            kib * 1024 < limit,
                            f"{path} at {delay:g} ms: {role} {mb(kib)} "
                            f"(limit {limit / 1e6:.0f} MB)",
                        )
                    )
    add("memory", "guest server peak RSS under 40 MB, host agent under 60 MB", checks)
    return targets


# ------------------------------------------------------------------------------ text


def _header(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    lines = [
        "pcscbridge bench: "
        + ("quick settings (smoke test: few calls, figures are rough); " if meta["quick"] else "")
        + ("all processes pinned to CPU 0" if meta["pinned_to_cpu0"] else "not pinned (all CPUs)")
        + f"; {meta['machine']['cpus']} CPUs, {meta['machine']['cpu_model']}; load average "
        f"{meta['loadavg_1_5_15_before'][0]:.2f} before, {meta['loadavg_1_5_15_after'][1]:.2f} "
        "(5 min) after",
        f"run took {meta['duration_s']:.0f} s; pcscd {meta['versions']['pcscd']}, "
        f"{meta['versions']['openssh']}, Python {meta['versions']['python']}",
        f"code measured: commit {meta['source']['commit']}"
        + (
            f" with uncommitted changes to {', '.join(meta['source']['modified'])}"
            if meta["source"]["modified"]
            else ""
        ),
        "",
        "Paths:",
    ]
    for name in results["meta"]["paths"]:
        info = PATHS[name]
        lines.append(f"  {info.label:12} {info.description}")
    lines += [
        "",
        "Each cell: the median; below it the ratio vs direct pcscd (no delay) and vs ssh -T -R "
        "(same delay).",
        "Time ratios > 1 are slower; calls/s ratios > 1 are faster. n/a: a path of UNIX sockets "
        "only has no link to delay.",
        "wrong/lost/errors: responses with wrong data / never answered / failed calls, over "
        "the 1, 8 and 64-client runs.",
    ]
    return lines


def text_report(results: dict[str, Any]) -> str:
    res = Results(results)
    width, label_width = 13, 28
    lines = _header(results)
    for delay in res.delays:
        how = "plain loopback, no proxy" if delay == 0 else "userspace delay proxy in the link"
        lines += ["", f"== one-way link delay {delay:g} ms ({how})"]
        lines.append(" " * label_width + "".join(f"{PATHS[p].label:>{width}}" for p in res.paths))
        for metric in METRICS:
            values, ratios = [], []
            for path in res.paths:
                if not res.applies(path, delay):
                    values.append("n/a")
                    ratios.append("")
                    continue
                values.append(fmt_value(metric, res.value(metric, path, delay)))
                if metric.kind in ("us", "rate"):
                    rd = fmt_ratio(res.ratio(metric, path, delay, "direct"))
                    rs = fmt_ratio(res.ratio(metric, path, delay, REFERENCE_SSH))
                    ratios.append(f"{rd} {rs}")
                else:
                    ratios.append("")
            row = "".join(f"{v:>{width}}" for v in values)
            lines.append(f"{metric.label:<{label_width}}{row}")
            if any(ratios):
                lines.append(" " * label_width + "".join(f"{r:>{width}}" for r in ratios))
    lines += ["", "Peak RSS (VmHWM) after the 64-client load:"]
    for delay in res.delays:
        for path in res.paths:
            record = res.get(path, delay)
            if record is None or not record.get("rss"):
                continue
            parts = [f"{role} {mb(v['peak_rss_kib'])}" for role, v in record["rss"].items()]
            lines.append(f"  {PATHS[path].label:12} {delay:g} ms: " + ", ".join(parts))
    retried = [r for r in results["runs"] if r.get("setup_retries")]
    if retried:
        lines += ["", "Set up twice (the first bridge never showed the readers to its clients):"]
        for r in retried:
            lines += [
                f"  {r['path']} at {r['delay_ms']:g} ms: {m[:160]}" for m in r["setup_retries"]
            ]
    failed = [r for r in results["runs"] if r.get("error")]
    if failed:
        lines += ["", "Not measured (errors):"]
        lines += [f"  {r['path']} at {r['delay_ms']:g} ms: {r['error'][:200]}" for r in failed]
    lines += ["", "Targets (measured, never asserted):"]
    for target in results.get("targets", []):
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"  [{verdict}] {target['target']}")
        lines += [f"      {detail}" for detail in target["details"]]
    return "\n".join(lines)


def markdown_report(results: dict[str, Any]) -> str:
    res = Results(results)
    meta = results["meta"]
    lines = [
        "# pcscbridge bench results",
        "",
        f"- started {meta['started']}, took {meta['duration_s']:.0f} s; "
        f"{'quick settings' if meta['quick'] else 'full settings'}; "
        f"{'pinned to CPU 0' if meta['pinned_to_cpu0'] else 'not pinned'}",
        f"- {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}), kernel "
        f"{meta['machine']['kernel']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- code: commit {meta['source']['commit']}"
        + (
            f", modified: {', '.join(meta['source']['modified'])}"
            if meta["source"]["modified"]
            else ""
        ),
        "",
        "Cells: median, then *ratio vs direct · ratio vs ssh -T -R*. Time ratios > 1 are "
        "slower, calls/s ratios > 1 are faster.",
    ]
    for delay in res.delays:
        lines += ["", f"## {delay:g} ms one-way link delay", ""]
        lines.append("| metric | " + " | ".join(PATHS[p].label for p in res.paths) + " |")
        lines.append("|---|" + "---|" * len(res.paths))
        for metric in METRICS:
            cells = []
            for path in res.paths:
                if not res.applies(path, delay):
                    cells.append("n/a")
                    continue
                cell = fmt_value(metric, res.value(metric, path, delay))
                if metric.kind in ("us", "rate") and cell != "-":
                    rd = fmt_ratio(res.ratio(metric, path, delay, "direct"))
                    rs = fmt_ratio(res.ratio(metric, path, delay, REFERENCE_SSH))
                    cell += f"<br>*{rd} · {rs}*"
                cells.append(cell)
            lines.append(f"| {metric.label.strip()} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak RSS after the 64-client load", ""]
    for delay in res.delays:
        for path in res.paths:
            record = res.get(path, delay)
            if record is None or not record.get("rss"):
                continue
            parts = [f"{role} {mb(v['peak_rss_kib'])}" for role, v in record["rss"].items()]
            lines.append(f"- {PATHS[path].label} at {delay:g} ms: " + ", ".join(parts))
    lines += ["", "## Targets", ""]
    for target in results.get("targets", []):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[target["met"]]
        lines.append(f"- {verdict}: {target['target']}")
        lines += [f"  - {detail}" for detail in target["details"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots


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
    axes[0][0].set_ylabel("per-call latency, us (bar: median, line: to p99)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

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
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "sessions.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

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
    axes[0][0].set_ylabel("SCardTransmit calls/s, all clients")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
