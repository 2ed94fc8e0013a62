"""The benchmark's report: ratio tables (text and Markdown) and target verdicts.

Every ratio compares medians measured in the same run:
- "vs direct": against the direct pcscd socket (measured once, without delay: the host's own
  applications see that, whatever the guest's link);
- "vs ssh -T -R": against the Nagle-fixed ssh socket forward at the same link delay.
Time ratios above 1 mean slower; throughput ratios above 1 mean more calls per second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .paths import ORDER, PATHS

Record = dict[str, Any]

REFERENCE_SSH = "ssh-T-R"
# Calls of the pyscard session that must reach the card, so cost a round trip over a link:
# connect, 2 SELECT, 20 READ BINARY, disconnect (establish, list readers and release do not).
SESSION_CARD_CALLS = 24
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

    def ratio_check(
        metric_key: str, path: str, delay: float, ref: str, limit: float, *, at_least: bool = False
    ) -> None:
        metric = by_key[metric_key]
        ratio = res.ratio(metric, path, delay, ref)
        if ratio is None:
            return
        ok = ratio >= limit if at_least else ratio <= limit
        value, reference = res.value(metric, path, delay), res.value(metric, ref, delay)
        shown = fmt_rate if metric.kind == "rate" else fmt_us
        checks.append(
            (
                ok,
                f"{path} at {delay:g} ms: {metric.label.strip()} {shown(value)} = "
                f"{fmt_ratio(ratio)} x {ref} ({shown(reference)}), limit {limit:g}",
            )
        )

    # 1. Loopback card calls over a unix link: no slower than ssh -T -R (Transmit also 2 x socat).
    checks: list[tuple[bool, str]] = []
    for kind in ("transmit_short", "transmit_4k", "connect_disconnect", "begin_end_transaction"):
        ratio_check(f"{kind}.median", "bridge-unix", 0.0, REFERENCE_SSH, 1.0)
    for kind in ("transmit_short", "transmit_4k"):
        ratio_check(f"{kind}.median", "bridge-unix", 0.0, "socat", 2.0)
    add(
        "loopback-calls",
        "loopback, unix link: Transmit 32 B and 4 KiB, Connect+Disconnect, Begin+EndTransaction "
        "<= 1.0 x ssh -T -R; Transmit <= 2 x socat",
        checks,
    )

    # 2. Over SSH (paramiko): Transmit <= 1.3 x ssh -T -R.
    checks = []
    for kind in ("transmit_short", "transmit_4k"):
        ratio_check(f"{kind}.median", "bridge-ssh", 0.0, REFERENCE_SSH, 1.3)
    add("ssh-transmit", "bridge over SSH (paramiko): Transmit <= 1.3 x ssh -T -R", checks)

    # 3. Reader lists and states are local: <= 3 x direct at any delay.
    checks = []
    for kind in ("list_readers", "get_status_change_0"):
        for path in BRIDGES:
            for delay in res.delays:
                if res.applies(path, delay):
                    ratio_check(f"{kind}.median", path, delay, "direct", 3.0)
    add(
        "local-state",
        "ListReaders and GetStatusChange(0) <= 3 x direct pcscd, at any link delay",
        checks,
    )

    # 4. 64 clients: unix and tcp links at least ssh -T -R's calls/s; nothing wrong or lost.
    correct: list[tuple[bool, str]] = []
    checks = []
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
            if path in ("bridge-unix", "bridge-tcp"):
                ratio_check("tp64", path, delay, REFERENCE_SSH, 1.0, at_least=True)
    add("concurrency-correct", "64 concurrent clients: 0 wrong, 0 lost", correct)
    add(
        "concurrency-throughput",
        "64 concurrent clients: bridge over unix and tcp links >= 1.0 x ssh -T -R calls/s",
        checks,
    )

    # 5. 5 ms one-way delay: only card calls cost a round trip.
    checks = []
    trips = SESSION_CARD_CALLS * 2 * 5.0 * 1000  # us
    for path in ("bridge-tcp", "bridge-ssh"):
        value = res.value(by_key["pyscard_session"], path, 5.0)
        if value is not None:
            checks.append(
                (
                    value <= trips * 1.1,
                    f"{path}: pyscard session {fmt_us(value)}; {SESSION_CARD_CALLS} calls must "
                    f"reach the card: {fmt_us(trips)} + 10 % = {fmt_us(trips * 1.1)}",
                )
            )
        ratio_check("transmit_short.median", path, 5.0, REFERENCE_SSH, 1.05)
    add(
        "delay-5ms",
        f"5 ms one-way delay: the pyscard session within ({SESSION_CARD_CALLS} card calls) x RTT "
        "+ 10 %, and Transmit <= 1.05 x a raw forward (ssh -T -R)",
        checks,
    )

    # 6. Peak RSS after the 64-client load.
    checks = []
    limits = {"guest": 30e6, "host": 35e6}
    for path in BRIDGES:
        for delay in res.delays:
            record = res.get(path, delay)
            if record is None or "rss" not in record:
                continue
            for role, kib_record in record["rss"].items():
                kib = kib_record.get("peak_rss_kib")
                limit = 50e6 if path == "bridge-ssh" and role == "host" else limits.get(role)
                if kib is not None and limit is not None:
                    checks.append(
                        (
                            kib * 1024 <= limit,
                            f"{path} at {delay:g} ms: {role} {mb(kib)} "
                            f"(limit {limit / 1e6:.0f} MB)",
                        )
                    )
    add(
        "memory",
        "peak RSS after the 64-client load: guest <= 30 MB, host <= 35 MB (ssh 50)",
        checks,
    )

    # 7. Event latency on loopback: <= 1 ms after a direct client sees it.
    checks = []
    for path in BRIDGES:
        added = res.value(by_key["event_added"], path, 0.0)
        if added is not None:
            checks.append(
                (added <= 1000, f"{path} at 0 ms: a card insertion seen {fmt_us(added)} later")
            )
    add("event", "a card insertion reaches a guest client <= 1 ms after a direct one", checks)
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


@dataclass(frozen=True)
class Cell:
    """One path's cell of a metric row: the value, and for times and rates the ratios
    (vs direct, vs ssh -T -R)."""

    value: str
    ratios: tuple[str, str] | None = None


def _rows(res: Results, delay: float) -> Iterator[tuple[Metric, list[Cell]]]:
    """The ratio table at one delay: a row of cells (one per path) for every metric."""
    for metric in METRICS:
        cells = []
        for path in res.paths:
            if not res.applies(path, delay):
                cells.append(Cell("n/a"))
                continue
            ratios = None
            if metric.kind in ("us", "rate"):
                ratios = (
                    fmt_ratio(res.ratio(metric, path, delay, "direct")),
                    fmt_ratio(res.ratio(metric, path, delay, REFERENCE_SSH)),
                )
            cells.append(Cell(fmt_value(metric, res.value(metric, path, delay)), ratios))
        yield metric, cells


def _peak_rss(res: Results) -> Iterator[tuple[str, float, str]]:
    """(path label, delay, "guest N MB, host N MB, ...") for every run that measured RSS."""
    for delay in res.delays:
        for path in res.paths:
            record = res.get(path, delay)
            if record is None or not record.get("rss"):
                continue
            parts = [f"{role} {mb(v['peak_rss_kib'])}" for role, v in record["rss"].items()]
            yield PATHS[path].label, delay, ", ".join(parts)


def _targets(
    results: dict[str, Any], verdicts: dict[bool | None, str], target: str, detail: str
) -> list[str]:
    """Each target as ``target`` formatted with its verdict and text, then its details."""
    lines = []
    for judged in results.get("targets", []):
        lines.append(target.format(verdict=verdicts[judged["met"]], target=judged["target"]))
        lines += [detail.format(detail=text) for text in judged["details"]]
    return lines


def text_report(results: dict[str, Any]) -> str:
    res = Results(results)
    width, label_width = 13, 28
    lines = _header(results)
    for delay in res.delays:
        how = "plain loopback, no proxy" if delay == 0 else "userspace delay proxy in the link"
        lines += ["", f"== one-way link delay {delay:g} ms ({how})"]
        lines.append(" " * label_width + "".join(f"{PATHS[p].label:>{width}}" for p in res.paths))
        for metric, cells in _rows(res, delay):
            row = "".join(f"{cell.value:>{width}}" for cell in cells)
            lines.append(f"{metric.label:<{label_width}}{row}")
            ratios = [" ".join(cell.ratios) if cell.ratios else "" for cell in cells]
            if any(ratios):
                lines.append(" " * label_width + "".join(f"{r:>{width}}" for r in ratios))
    lines += ["", "Peak RSS (VmHWM) after the 64-client load:"]
    lines += [f"  {label:12} {delay:g} ms: {rss}" for label, delay, rss in _peak_rss(res)]
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
    verdicts = {True: "MET", False: "MISSED", None: "not measured"}
    lines += _targets(results, verdicts, "  [{verdict}] {target}", "      {detail}")
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
        for metric, cells in _rows(res, delay):
            shown = [
                f"{cell.value}<br>*{cell.ratios[0]} · {cell.ratios[1]}*"
                if cell.ratios and cell.value != "-"
                else cell.value
                for cell in cells
            ]
            lines.append(f"| {metric.label.strip()} | " + " | ".join(shown) + " |")
    lines += ["", "## Peak RSS after the 64-client load", ""]
    lines += [f"- {label} at {delay:g} ms: {rss}" for label, delay, rss in _peak_rss(res)]
    lines += ["", "## Targets", ""]
    verdicts = {True: "met", False: "**missed**", None: "not measured"}
    lines += _targets(results, verdicts, "- {verdict}: {target}", "  - {detail}")
    return "\n".join(lines) + "\n"
