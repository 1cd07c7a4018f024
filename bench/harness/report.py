"""BENCHMARKS.md: each benchmark replaces its own marked section; the Markdown pieces the
sections share (pass/FAIL marks, CPU tables, the machine they ran on)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psycopg
import redis

from bench.harness.processes import ROOT

REPORT = ROOT / "BENCHMARKS.md"


def mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (what percentile_cont does)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cpu_table(usage: dict[str, float], events: int | None = None, unit: str = "event") -> list[str]:
    """A markdown table of CPU per component; with ``events``, also CPU microseconds per event."""
    wall = usage["wall"]
    cores = os.cpu_count() or 1
    per = f" µs per {unit} |" if events else ""
    lines = [
        f"| process | CPU s | cores busy (of {cores}) |{per}",
        "|---|---:|---:|" + ("---:|" if events else ""),
    ]
    skip = {"wall", "machine busy (all cores)"}
    for name, seconds in sorted(
        ((n, s) for n, s in usage.items() if n not in skip and s >= 0.05),
        key=lambda item: -item[1],
    ):
        cell = f" {seconds / events * 1e6:,.0f} |" if events else ""
        lines.append(f"| {name} | {seconds:.1f} | {seconds / wall:.2f} |{cell}")
    busy = usage["machine busy (all cores)"]
    cell = f" {busy / events * 1e6:,.0f} |" if events else ""
    lines.append(
        f"| **machine total** ({wall:.1f} s wall) | {busy:.1f} | {busy / wall:.2f} |{cell}"
    )
    return lines


def nproc() -> str:
    """The cores this process may use, as `nproc` counts them."""
    try:
        count = subprocess.run(
            ["nproc"],  # noqa: S607 - coreutils, on the PATH
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        count = ""
    return count or str(os.cpu_count())


def machine_description(dsn: str, redis_url: str) -> list[tuple[str, str]]:
    """(name, value) of the CPU, memory, kernel, PostgreSQL at ``dsn``, Redis and Python."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SELECT version()").fetchone()
        pg_settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN"
                " ('shared_buffers', 'synchronous_commit', 'fsync', 'autovacuum', 'wal_level',"
                " 'max_connections')"
            ).fetchall()
        )
    server = redis.Redis.from_url(redis_url).info("server")
    shared_buffers = int(re.sub(r"\D", "", pg_settings.get("shared_buffers", "0")) or 0)
    return [
        (
            "CPU",
            f"{nproc()} cores (`nproc`), {model[1] if model else '?'}"
            + (f" @ {float(mhz[1]):.0f} MHz" if mhz else ""),
        ),
        ("memory", f"{int(mem[1]) / 1024 / 1024:.1f} GiB" if mem else "?"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        (
            "PostgreSQL",
            (version[0].split(" on ")[0] if version else "?")
            + f" (shared_buffers {shared_buffers * 8 // 1024} MB, synchronous_commit"
            f" {pg_settings.get('synchronous_commit')}, fsync {pg_settings.get('fsync')},"
            f" autovacuum {pg_settings.get('autovacuum')})",
        ),
        ("Redis", str(server.get("redis_version", "?"))),
        ("Python", platform.python_version()),
    ]


def replace_section(document: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(document):
        return pattern.sub(lambda _match: block, document, count=1)
    return document.rstrip() + "\n\n" + block + "\n"


def write_report(name: str, body: str) -> None:
    document = (
        REPORT.read_text()
        if REPORT.exists()
        else (
            "# Benchmarks\n\nMeasured on this project's machine; each section is written by the"
            " harness named in it and replaced by its next run.\n"
        )
    )
    REPORT.write_text(replace_section(document, name, body).rstrip() + "\n")
