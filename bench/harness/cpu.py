"""CPU time per component of a run, from /proc: the machine is shared, so what the components
used is told apart from what other processes on the machine used meanwhile."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.harness.processes import log, read_stat

CLK_TCK = os.sysconf("SC_CLK_TCK")

PG_BACKGROUND = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum",
    "logical replication",
    "stats collector",
    "archiver",
    "bin/postgres",
)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


@dataclass
class CpuSnapshot:
    at: float
    machine: tuple[int, int]
    by_pid: dict[int, tuple[str, int]]  # pid -> (group, ticks)


class CpuAccounting:
    """CPU time per component between two snapshots, from /proc (ticks of 1/CLK_TCK s)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.roles: dict[int, str] = {}  # pids we started, by component
        self.parents: dict[int, str] = {}  # children of these pids get the same component

    def group(self, pid: int, comm: str, ppid: int) -> str | None:
        if pid in self.roles:
            return self.roles[pid]
        if ppid in self.parents:
            return self.parents[ppid]
        if comm == "postgres":
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                return None
            if f" {self.database} " in cmdline:
                return "PostgreSQL backends of the bench"
            if any(word in cmdline for word in PG_BACKGROUND):
                return "PostgreSQL background (WAL writer, checkpointer...)"
            return None  # other databases: someone else's, counted in "other"
        if comm.startswith("redis-server"):
            return "Redis"
        return None

    def snapshot(self) -> CpuSnapshot:
        by_pid = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = read_stat(pid)
            if stat is None:
                continue
            group = self.group(pid, stat[0], stat[1])
            if group is not None:
                by_pid[pid] = (group, stat[2])
        return CpuSnapshot(time.time(), machine_ticks(), by_pid)

    @staticmethod
    def between(start: CpuSnapshot, end: CpuSnapshot, extra: dict[str, float]) -> dict[str, float]:
        """CPU seconds per component (and "machine busy", "wall") from start to end."""
        usage: dict[str, float] = defaultdict(float)
        for pid, (group, ticks) in end.by_pid.items():
            before = start.by_pid.get(pid, (group, 0))[1]
            usage[group] += (ticks - before) / CLK_TCK
        for group, seconds in extra.items():
            usage[group] += seconds
        busy = (end.machine[0] - start.machine[0]) / CLK_TCK
        usage["other processes on the machine"] = max(0.0, busy - sum(usage.values()))
        usage["machine busy (all cores)"] = busy
        usage["wall"] = end.at - start.at
        return dict(usage)


def wait_for_quiet(limit: float = 0.3, patience: float = 30.0) -> float:
    """Wait (a bounded while) until the machine is nearly idle; the busy cores last seen."""
    deadline = time.monotonic() + patience
    while True:
        before = machine_ticks()
        time.sleep(1.0)
        after = machine_ticks()
        busy = (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)
        if busy <= limit or time.monotonic() > deadline:
            if busy > limit:
                log(f"  the machine is busy with other work ({busy:.2f} cores): going ahead")
            return busy
        time.sleep(1.0)
