"""``--profile``: py-spy samples of the API and worker processes, and the statement timings
they write themselves (``bench.sqltiming``), rendered as Markdown tables."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter, defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.processes import BIN, ROOT, Service, Services, children_of

# The kinds of process profiled, and their titles in the report.
KINDS = (("API", "gunicorn API workers"), ("worker", "Celery workers"))


class Profiler:
    """py-spy record on the API workers and the Celery workers, for the throughput phase."""

    def __init__(self, services: Services, api: Service, workers: list[Service]) -> None:
        self.services = services
        self.targets = [("API", pid) for pid in children_of(api.process.pid)]
        self.targets += [("worker", w.process.pid) for w in workers]
        self.recorders: list[tuple[str, int, subprocess.Popen[bytes], Path]] = []
        self.window: tuple[float, float] = (0.0, 0.0)
        self.rate = 100

    def start(self) -> None:
        for kind, pid in self.targets:
            output = self.services.workdir / f"py-spy-{kind}-{pid}.txt"
            process = subprocess.Popen(  # noqa: S603 - our own command line
                [
                    str(BIN / "py-spy"),
                    "record",
                    f"--pid={pid}",
                    f"--rate={self.rate}",
                    "--nonblocking",
                    "--gil",
                    "--format=raw",
                    f"--output={output}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=(self.services.workdir / "py-spy.log").open("ab"),
                start_new_session=True,
            )
            self.recorders.append((kind, pid, process, output))
        time.sleep(1.0)  # attached before the clock starts
        self.window = (time.time(), 0.0)

    def stop(self) -> None:
        self.window = (self.window[0], time.time())
        for _kind, _pid, process, _output in self.recorders:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for _kind, _pid, process, _output in self.recorders:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def kill(self) -> None:
        for _kind, _pid, process, _output in self.recorders:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short_file(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if str(ROOT) in path:
        return path.split(str(ROOT) + "/", 1)[1]
    return path


def area(path: str) -> str:
    """The library (or part of the service) a file belongs to."""
    path = short_file(path)
    top = path.split("/", 1)[0]
    areas = {
        "billing": "billing (service code)",
        "workers": "billing (service code)",
        "sqlalchemy": "SQLAlchemy",
        "psycopg": "psycopg",
        "psycopg_binary": "psycopg",
        "json": "json (stdlib)",
        "flask": "Flask/Werkzeug",
        "werkzeug": "Flask/Werkzeug",
        "flask_openapi3": "Flask/Werkzeug",
        "celery": "Celery/kombu",
        "kombu": "Celery/kombu",
        "billiard": "Celery/kombu",
        "redis": "redis-py",
        "gunicorn": "gunicorn",
        "pydantic": "pydantic",
        "decimal.py": "decimal",
        "logging": "logging",
    }
    return areas.get(top, "other Python (stdlib, ...)" if "/" not in path else top)


@dataclass
class StackProfile:
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)
    processes: int = 0


def read_stacks(paths: list[Path]) -> StackProfile:
    profile = StackProfile()
    for path in paths:
        if not path.exists():
            continue
        profile.processes += 1
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = []
            for frame in stack.split(";"):
                match = FRAME.match(frame)
                if match:
                    frames.append((match["func"], match["file"]))
            if not frames:
                continue
            profile.samples += count
            leaf_func, leaf_file = frames[-1]
            profile.self_time[f"{leaf_func} ({short_file(leaf_file)})"] += count
            profile.areas[area(leaf_file)] += count
            seen = set()
            for func, file in frames:
                name = f"{func} ({short_file(file)})"
                if name not in seen:
                    seen.add(name)
                    profile.inclusive[name] += count
    return profile


def read_sql_stats(directory: Path, pids: dict[int, str], window: tuple[float, float]) -> Any:
    """Statement totals of the window, by process kind:
    {kind: {statement: [calls, client s, rows, server CPU s]}}."""
    totals: dict[str, dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0.0, 0, 0.0])
    )
    for path in directory.glob("sql-*.json"):
        pid = int(path.stem.split("-")[1])
        kind = pids.get(pid)
        if kind is None:
            continue
        for second, key, *values in json.loads(path.read_text()):
            if window[0] - 1 <= second <= window[1]:
                bucket = totals[kind][key]
                for position, value in enumerate(values):
                    bucket[position] += value
    return totals


def profile_tables(profiler: Profiler, sql: Any, events: int) -> list[str]:
    """Markdown, for each kind of process: where its samples fell (by library, by function)
    and, from ``read_sql_stats``, its statements; per-event figures divide by ``events``."""
    start, end = profiler.window
    seconds = end - start
    lines: list[str] = []
    for kind, title in KINDS:
        paths = [out for k, _pid, _p, out in profiler.recorders if k == kind]
        stacks = read_stacks(paths)
        if not stacks.samples:
            lines += [f"#### {title}: no samples", ""]
            continue
        busy = stacks.samples / profiler.rate / seconds / stacks.processes
        lines += [
            f"#### {title} ({stacks.processes} processes): {stacks.samples} samples, each"
            f" process holding the GIL {busy:.0%} of the time",
            "",
            "Time by library of the innermost frame:",
            "",
            "| library | share |",
            "|---|---:|",
        ]
        for name, count in stacks.areas.most_common(10):
            lines.append(f"| {name} | {count / stacks.samples:.0%} |")
        lines += ["", "Top functions, self time:", "", "| function | self |", "|---|---:|"]
        for name, count in stacks.self_time.most_common(15):
            lines.append(f"| `{name}` | {count / stacks.samples:.1%} |")
        lines += [
            "",
            "Service code, inclusive time:",
            "",
            "| function | inclusive |",
            "|---|---:|",
        ]
        service = [
            (name, count)
            for name, count in stacks.inclusive.most_common()
            if name.split("(")[-1].startswith(("billing/", "workers/"))
        ]
        for name, count in service[:15]:
            lines.append(f"| `{name}` | {count / stacks.samples:.1%} |")
        lines.append("")
        statements = sql.get(kind, {})
        if statements:
            server_total = sum(values[3] for values in statements.values())
            lines += [
                f"Statements of the {title}: client-side time (adaptation, round trip, server"
                " work and lock waits) and CPU of the PostgreSQL server process on them"
                f" ({server_total:.1f} s in all,"
                f" {server_total / events * 1e6:,.0f} µs per event):",
                "",
                "| statement | calls | rows | client s | ms/call | share of phase"
                " | server CPU s | server µs/event |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            ranked = sorted(statements.items(), key=lambda item: -item[1][1])
            for key, (calls, total, rows, server) in ranked[:12]:
                text = key.replace("|", "\\|")
                lines.append(
                    f"| `{text}` | {calls:,.0f} | {rows:,.0f} | {total:.2f} |"
                    f" {1000 * total / calls:.2f} | {total / seconds:.0%} | {server:.2f} |"
                    f" {server / events * 1e6:,.1f} |"
                )
            lines.append("")
    return lines
