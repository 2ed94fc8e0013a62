"""One benchmark run: every selected path at every selected delay, measured the same way."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rig.pcscd_rig import PcscdRig, pcsc_client_env
from rig.sshd import LoopbackSshd

from .measure import KINDS, MeasureClient
from .paths import ORDER, PATHS, BenchEnv, RunningPath, open_path
from .procs import peak_rss_kib

EXPECTED_ATR = "3b:85:81:31:fe:45:80:73:b0:01:40:8c"
SESSION_KINDS: dict[str, str] = {
    "opensc_tool_a": "opensc-tool -a",
    "pcsc_scan_r": "pcsc_scan -r",
    "pyscard_session": "pyscard session (20 READ BINARY)",
}


@dataclass(frozen=True)
class Settings:
    # Latency and sessions are measured in `rounds`: each round sets every path up afresh and
    # measures them one after the other, so slow drifts of a shared 2-CPU machine and the luck
    # of where the scheduler places a path's processes are spread over all paths alike.
    rounds: int = 3
    max_calls: int = 400  # per latency kind and round
    min_calls: int = 10
    budget_s: float = 0.8  # per latency kind and round: stop early (after min_calls) when spent
    warmup: int = 10
    session_reps: int = 2  # per session kind and round
    session_budget_s: float = 3.0  # per session kind and round (after the first run)
    event_cycles: int = 4  # each: one insertion, one removal (in the last round)
    tp_levels: tuple[int, ...] = (1, 8, 64)
    tp_duration_s: float = 2.0
    tp_processes: int = 8  # 64 clients = 8 processes x 8 threads, each its own connection


FULL = Settings()
QUICK = Settings(
    rounds=1,
    max_calls=40,
    min_calls=5,
    budget_s=0.15,
    warmup=2,
    session_reps=1,
    session_budget_s=1.0,
    event_cycles=1,
    tp_duration_s=0.3,
)


def summarize(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "n": n,
        "median": statistics.median(ordered),
        "p99": ordered[min(n - 1, max(0, math.ceil(0.99 * n) - 1))],  # nearest rank
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
    }


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f} s] {text}", flush=True)


class Measurer:
    """Measures one running path with pyscard clients of its socket."""

    def __init__(
        self, env: BenchEnv, running: RunningPath, settings: Settings, say: Callable[[str], None]
    ) -> None:
        self.env, self.running, self.settings, self.say = env, running, settings, say
        self.rig = env.rig
        self.reader = self.rig.reader_names[0]  # holds the test card
        self.event_reader = self.rig.reader_names[1]  # empty; cards come and go here
        self.logs = running.folder
        self.clients: list[MeasureClient] = []

    def client(self, name: str, socket_path: str | None = None) -> MeasureClient:
        client = MeasureClient(
            socket_path or self.running.socket_path, self.logs / f"{name}.log", name
        )
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()

    # -- per-call latency
    def latency(self, main: MeasureClient) -> dict[str, Any]:
        """Per kind: {"samples_us": [...], "errors": n, "wrong": n}."""
        s = self.settings
        answer = main.request(
            "latency",
            timeout=len(KINDS) * (s.budget_s + 120),
            reader=self.reader,
            readers=len(self.rig.reader_names),
            max_calls=s.max_calls,
            min_calls=s.min_calls,
            budget_s=s.budget_s,
            warmup=s.warmup,
        )
        return dict(answer["kinds"])

    # -- sessions
    def sessions(self, main: MeasureClient) -> dict[str, Any]:
        """Per kind: {"durations_s": [...], "failures": [messages]}."""
        s = self.settings
        env = pcsc_client_env(self.running.socket_path)
        commands = {
            "opensc_tool_a": (["opensc-tool", "-a"], EXPECTED_ATR),
            "pcsc_scan_r": (["pcsc_scan", "-r"], self.reader),
        }
        results: dict[str, Any] = {}
        for kind in SESSION_KINDS:
            durations: list[float] = []
            failures: list[str] = []
            spent_from = time.monotonic()
            for _ in range(s.session_reps):
                if kind == "pyscard_session":
                    answer = main.request("session", timeout=120, reader=self.reader, reads=20)
                    if answer.get("ok"):
                        durations.append(answer["seconds"])
                    else:
                        failures.append(str(answer.get("error", "wrong answer")))
                else:
                    argv, expected = commands[kind]
                    started = time.perf_counter()
                    try:
                        done = subprocess.run(
                            argv, env=env, capture_output=True, text=True, timeout=120
                        )
                    except subprocess.TimeoutExpired:
                        failures.append("timed out after 120 s")
                        continue
                    elapsed = time.perf_counter() - started
                    if done.returncode == 0 and expected.lower() in done.stdout.lower():
                        durations.append(elapsed)
                    else:
                        failures.append(
                            f"status {done.returncode}: {(done.stdout + done.stderr)[-300:]}"
                        )
                if time.monotonic() - spent_from > s.session_budget_s:
                    break
            results[kind] = {"durations_s": durations, "failures": failures}
        return results

    # -- card events
    def events(self, main: MeasureClient) -> dict[str, Any]:
        try:
            return self._events(main)
        finally:
            if 1 in self.rig.cards:  # an interrupted cycle must not leave the card in
                self.rig.remove_card(1, wait=True)

    def _events(self, main: MeasureClient) -> dict[str, Any]:
        # A client of pcscd's own socket sees every change too: the reference.
        self.ref = self.client("reference", self.rig.socket_path)
        path_ms: list[float] = []
        ref_ms: list[float] = []
        added_ms: list[float] = []
        timeouts = 0
        for _ in range(self.settings.event_cycles):
            for client in (main, self.ref):
                client.send("watch", reader=self.event_reader, states=[True, False], timeout_s=8)
            for client in (main, self.ref):
                ready = client.read(30)
                if ready.get("present"):
                    raise RuntimeError(f"{self.event_reader} is not empty at the start")
            # Both are about to block in SCardGetStatusChange; pcscd polls vpcd every 400 ms,
            # so the moment of insertion within that period is random anyway.
            time.sleep(random.uniform(0.02, 0.1))
            for want in (True, False):
                changed_at = time.monotonic()
                if want:
                    self.rig.insert_card(1, wait=False)
                else:
                    self.rig.remove_card(1, wait=False)
                seen = {}
                for label, client in (("path", main), ("ref", self.ref)):
                    answer = client.read(30)
                    if answer.get("timeout"):
                        timeouts += 1
                    else:
                        seen[label] = answer["t"]
                if "path" in seen:
                    path_ms.append((seen["path"] - changed_at) * 1000)
                if "ref" in seen:
                    ref_ms.append((seen["ref"] - changed_at) * 1000)
                if len(seen) == 2:
                    added_ms.append((seen["path"] - seen["ref"]) * 1000)
            for client in (main, self.ref):
                client.read(30)  # done
        return {
            "seen_ms": {**summarize(path_ms), "unit": "ms"},
            "direct_seen_ms": {**summarize(ref_ms), "unit": "ms"},
            "added_ms": {**summarize(added_ms), "unit": "ms"},
            "timeouts": timeouts,
            "samples": {"path_ms": path_ms, "direct_ms": ref_ms, "added_ms": added_ms},
        }

    # -- concurrent clients
    def throughput(self, main: MeasureClient) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.settings
        helpers = [self.client(f"tp{index}") for index in range(1, s.tp_processes)]
        for helper in helpers:
            helper.wait_hello()
        processes = [main, *helpers]
        card = self.rig.cards[0]
        results: dict[str, Any] = {}
        samples: dict[str, Any] = {}
        for level in s.tp_levels:
            count = min(level, len(processes))
            per_process = level // count
            active = processes[:count]
            for index, process in enumerate(active):
                process.send("tp_prepare", reader=self.reader, threads=per_process, tag=f"p{index}")
            failures: list[str] = []
            for process in active:
                failures += process.read(180).get("failures", [])
            apdus_before = card.apdu_count
            start_at = time.monotonic() + 0.3
            for process in active:
                process.send("tp_go", start_at=start_at, duration=s.tp_duration_s)
            clients: list[dict[str, Any]] = []
            unanswered = 0
            for process in active:
                try:
                    answer = process.read(s.tp_duration_s + 120)
                except (TimeoutError, EOFError) as exc:
                    unanswered += per_process
                    failures.append(f"{process.name}: {exc}")
                    continue
                clients += answer["clients"]
                unanswered += answer["stuck"]
            # Responses still owed to the clients: APDUs the card answered that no client saw.
            time.sleep(0.05)
            card_apdus = card.apdu_count - apdus_before
            calls = sum(c.get("calls", 0) for c in clients)
            wrong = sum(c.get("wrong", 0) for c in clients)
            errors = sum(c.get("errors", 0) for c in clients)
            failures += [c["failure"] for c in clients if c.get("failure")]
            finished = [c["finished"] for c in clients if "finished" in c]
            span = (max(finished) - start_at) if finished else float("nan")
            pooled = [x for c in clients for x in c.get("samples_us", [])]
            results[str(level)] = {
                "clients": level,
                "processes": count,
                "threads_per_process": per_process,
                "duration_s": span,
                "calls": calls,
                "calls_per_s": calls / span if finished and span > 0 else 0.0,
                "wrong": wrong,
                "errors": errors,
                "lost": max(0, card_apdus - calls) + unanswered,
                "card_apdus": card_apdus,
                "clients_reporting": len([c for c in clients if "finished" in c]),
                "establish_retries": sum(c.get("establish_retries", 0) for c in clients),
                "failures": failures[:5],
                "call_us": summarize(pooled),
            }
            samples[str(level)] = pooled
        return results, samples

    def rss(self) -> dict[str, Any]:
        found = {**self.running.processes, **self.running.extra_processes()}
        return {
            role: {"pid": pid, "peak_rss_kib": peak_rss_kib(pid)} for role, pid in found.items()
        }


def measure_path(
    env: BenchEnv,
    name: str,
    delay_ms: float,
    settings: Settings,
    say: Callable[[str], None],
    *,
    last_round: bool,
) -> dict[str, Any]:
    """One round of one path: latency and sessions; in the last round also card events,
    concurrent clients and peak RSS. Raw figures; :func:`merge_rounds` summarizes them."""
    part: dict[str, Any] = {"error": None}
    started = time.monotonic()
    try:
        with open_path(name, env, delay_ms) as running:
            part["setup_s"] = time.monotonic() - started
            measurer = Measurer(env, running, settings, say)
            try:
                main = measurer.client("main")
                main.wait_hello()
                part["latency"] = measurer.latency(main)
                part["sessions"] = measurer.sessions(main)
                if last_round:
                    say("  card events")
                    part["events"] = measurer.events(main)
                    say(f"  concurrent clients {list(settings.tp_levels)}")
                    part["throughput"] = measurer.throughput(main)
                    part["rss"] = measurer.rss()
            finally:
                measurer.close()
                part["setup_retries"] = running.setup_retries
    except Exception as exc:
        part["error"] = f"{type(exc).__name__}: {exc}"
        say(f"  FAILED: {part['error'][:2000]}")
    part["elapsed_s"] = time.monotonic() - started
    return part


def merge_rounds(
    name: str, delay_ms: float, parts: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record of one path at one delay (summaries) and its raw samples."""
    record: dict[str, Any] = {"path": name, "delay_ms": delay_ms, "rounds": len(parts)}
    errors = [p["error"] for p in parts if p.get("error")]
    record["error"] = errors[0] if errors else None
    record["setup_s"] = [p.get("setup_s") for p in parts]
    record["elapsed_s"] = sum(p.get("elapsed_s", 0.0) for p in parts)
    record["setup_retries"] = [m for p in parts for m in p.get("setup_retries", [])]
    raw: dict[str, Any] = {"path": name, "delay_ms": delay_ms}
    done = [p for p in parts if "latency" in p and "sessions" in p]
    if done:
        record["latency"], raw["latency"] = {}, {}
        for kind in done[0]["latency"]:
            rounds = [p["latency"][kind] for p in done]
            pooled = [x for r in rounds for x in r["samples_us"]]
            record["latency"][kind] = {
                **summarize(pooled),
                "unit": "us",
                "errors": sum(r["errors"] for r in rounds),
                "wrong": sum(r["wrong"] for r in rounds),
                "round_medians": [summarize(r["samples_us"]).get("median") for r in rounds],
            }
            raw["latency"][kind] = pooled
        record["sessions"] = {}
        for kind in done[0]["sessions"]:
            rounds = [p["sessions"][kind] for p in done]
            durations = [x for r in rounds for x in r["durations_s"]]
            failures = [m for r in rounds for m in r["failures"]]
            record["sessions"][kind] = {
                **summarize(durations),
                "unit": "s",
                "failures": len(failures),
                "failure_messages": failures[:3],
                "runs_s": durations,
            }
    last = parts[-1]
    if "events" in last:
        record["events"] = dict(last["events"])
        raw["events"] = record["events"].pop("samples")
    if "throughput" in last:
        record["throughput"], raw["throughput"] = last["throughput"]
    if "rss" in last:
        record["rss"] = last["rss"]
    return record, raw


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        text = (done.stdout or done.stderr).strip().splitlines()
        return text[0] if text else ""

    def dpkg(package: str) -> str:
        return first_line(["dpkg-query", "-W", "-f", "${Version}", package])

    import smartcard  # only for its version

    return {
        "python": platform.python_version(),
        "pyscard": getattr(smartcard, "__version__", "?"),
        "pcscd": dpkg("pcscd"),
        "libpcsclite1": dpkg("libpcsclite1"),
        "vsmartcard-vpcd": dpkg("vsmartcard-vpcd"),
        "openssh": first_line(["ssh", "-V"]),
        "socat": dpkg("socat"),
        "opensc": dpkg("opensc"),
        "pcsc-tools": dpkg("pcsc-tools"),
    }


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and files changed since (a dirty tree)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "modified": [line[3:] for line in changed.splitlines()],
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "affinity": sorted(os.sched_getaffinity(0)),
    }


def plan(paths: list[str], delays: list[float]) -> list[tuple[str, float]]:
    """Every (path, delay) to measure: UNIX-socket-only paths only without delay."""
    configs = []
    for delay in delays:
        for name in ORDER:
            if name in paths and (delay == 0 or PATHS[name].delayable):
                configs.append((name, delay))
    return configs


@contextlib.contextmanager
def bench_env(paths: list[str]) -> Iterator[BenchEnv]:
    workdir = Path(tempfile.mkdtemp(prefix="pcscbench-"))
    try:
        with contextlib.ExitStack() as stack:
            rig = stack.enter_context(PcscdRig(2))
            rig.insert_card(0)
            sshd = None
            if any(PATHS[name].link == "ssh" for name in paths):
                sshd = stack.enter_context(LoopbackSshd())
            yield BenchEnv(workdir, rig, sshd)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    paths: list[str],
    delays: list[float],
    settings: Settings,
    *,
    quick: bool,
    pinned: bool,
    keep_logs: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    configs = plan(paths, delays)
    load_before = os.getloadavg()
    progress = Progress()
    started_wall = time.time()
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    with bench_env(paths) as env:
        try:
            for delay in delays:
                here = [(name, d) for name, d in configs if d == delay]
                parts: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in here}
                for round_index in range(settings.rounds):
                    last = round_index == settings.rounds - 1
                    for name, _ in here:
                        progress.say(
                            f"{name} at {delay:g} ms one-way delay, round "
                            f"{round_index + 1}/{settings.rounds}"
                        )
                        if parts[name] and parts[name][-1].get("error"):
                            continue  # failed once: not again
                        parts[name].append(
                            measure_path(env, name, delay, settings, progress.say, last_round=last)
                        )
                for name, _ in here:
                    record, raw = merge_rounds(name, delay, parts[name])
                    runs.append(record)
                    raw_runs.append(raw)
        finally:
            if keep_logs is not None:
                _keep_logs(env.workdir, keep_logs)
    if keep_logs is not None:
        with contextlib.suppress(OSError):
            (keep_logs / "pcscd.log").write_text(env.rig.last_log)
    results = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_wall)),
            "duration_s": time.monotonic() - started,
            "quick": quick,
            "pinned_to_cpu0": pinned,
            "paths": paths,
            "delays_ms": delays,
            "settings": asdict(settings),
            "machine": machine(),
            # Other work on the machine during the run makes every figure noisier.
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "versions": tool_versions(),
            "source": source_state(),
            "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
        },
        "paths": {name: asdict(PATHS[name]) for name in paths},
        "kinds": KINDS,
        "session_kinds": SESSION_KINDS,
        "runs": runs,
    }
    return results, {"runs": raw_runs}


def _keep_logs(workdir: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for log in workdir.rglob("*.log"):
        relative = log.relative_to(workdir)
        destination = target / str(relative).replace(os.sep, "__")
        with contextlib.suppress(OSError):
            shutil.copyfile(log, destination)
