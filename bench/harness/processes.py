"""The processes a benchmark starts: services in their own process groups, stopped with their
children whatever happens, and load processes released together."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def begin_run(prefix: str) -> Path:
    """Have SIGTERM end the run through its ``finally`` blocks (which stop the services); a
    new directory for the run's logs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    log(f"logs in {workdir}")
    return workdir


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Services:
    """The processes this run started; ``stop`` ends every one of them (and its children)."""

    workdir: Path
    env: dict[str, str]
    running: list[Service] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> Service:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(  # noqa: S603 - our own command lines
                command,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its children
            )
        service = Service(name, process, log_path)
        self.running.append(service)
        return service

    def check(self) -> None:
        for service in self.running:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited:\n{tail(service.log_path)}")

    def stop(self) -> None:
        for service in reversed(self.running):
            if service.process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for service in reversed(self.running):
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{service.name} did not stop in time: killed")
                with suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait(timeout=10)
            # Children left in the group (none expected once the leader is gone).
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(service.process.pid, signal.SIGKILL)
        self.running.clear()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime in ticks) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = data[data.index("(") + 1 : data.rindex(")")]
    rest = data[data.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[11]) + int(rest[12])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat and stat[1] == pid:
                found.append(int(entry.name))
    return sorted(found)


def run_processes(
    target: Callable[..., None],
    arguments: list[tuple[Any, ...]],
    on_start: Callable[[], None],
    on_end: Callable[[], None] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Run ``target(out, start, *args)`` in one process per argument tuple, released together
    once each has prepared its work; (release time, their results).

    With ``on_end``, the processes wait on ``start`` once more after reporting, until
    ``on_end`` has run (to measure what they hold, such as their server connections)."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = context.Barrier(len(arguments) + 1)
    processes = [
        context.Process(target=target, args=(out, start, *args), daemon=True) for args in arguments
    ]
    for process in processes:
        process.start()
    try:
        # Each process waits on the barrier once its work is prepared: wait for all of them
        # (n_waiting) so that their set-up falls outside whatever on_start begins measuring.
        deadline = time.monotonic() + 300
        while start.n_waiting < len(processes):
            if time.monotonic() > deadline or not all(p.is_alive() for p in processes):
                if not out.empty():
                    failure = out.get()
                    raise RuntimeError(f"a load process failed: {failure.get('exception')}")
                raise RuntimeError("the load processes did not get ready")
            time.sleep(0.02)
        on_start()
        start.wait(timeout=300)
        released = time.time()
        results = [out.get(timeout=600) for _ in processes]
        if on_end is not None and not any("exception" in r for r in results):
            on_end()
            start.wait(timeout=60)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    failures = [r["exception"] for r in results if "exception" in r]
    if failures:
        raise RuntimeError(f"a load process failed: {failures[0]}")
    return released, results
