"""Benchmark of the usage-metering pipeline: ``python -m bench.metering`` (``make bench``).

Real processes on this machine: gunicorn serving the API, Celery workers (solo pool) settling,
Celery beat running the sweep, PostgreSQL and Redis, and a load generator of a few processes
posting batches to ``POST /gateway/v1/usage`` over HTTP on 127.0.0.1. Phases, in one run:

1. throughput: ``--events`` events in batches of ``--batch`` from ``--senders`` closed-loop
   senders, as fast as they are accepted; timed from the first post to the moment the database
   holds no pending event (polled), so "end to end" means accepted *and* settled;
2. latency: an open-loop offered load of ``--rate`` events/s (``--latency-batch`` events per
   request on an absolute schedule) for ``--latency-seconds``; settlement latency per event is
   ``settled_at - received_at`` from the database (percentile_cont), HTTP latency from the client;
3. baseline: the rows the throughput phase stored, inserted again into a copy of usage_events
   (same columns, values, checks, indexes and foreign keys) with multi-row INSERTs of ``--batch``
   rows through psycopg, from 1 process and from ``--senders`` processes, each ``--baseline-runs``
   times (the fastest is the ratio's denominator).

CPU time per process (from /proc) is recorded for every phase, and the machine's other load too:
the machine is shared, and a phase disturbed by other work is marked as such. The results (with
the machine, the configuration, the targets and pass/FAIL marks) replace the marked section of
BENCHMARKS.md. ``--profile`` also samples the API and worker processes with py-spy and has them
time their statements (``bench.sqltiming``), and replaces only the profile section: its numbers
are perturbed by the sampling, so the results section comes from plain runs.

Every process started here is stopped at the end, whatever happens; loops are bounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests

from bench import baseline, loadgen

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REPORT = ROOT / "BENCHMARKS.md"
SECTION = "metering"
PROFILE_SECTION = "metering-profile"

GATEWAY_TOKEN = "bench-gateway-token"  # noqa: S105 - a local benchmark's bootstrap token
ADMIN_TOKEN = "bench-admin-token"  # noqa: S105
SECRET_KEY = "bench-server-secret"  # noqa: S105

TARGET_E2E = 15_000.0
TARGET_RATIO = 0.5
TARGET_P99 = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Config:
    """What one run does; every field is a command-line option."""

    events: int
    batch: int
    senders: int
    gunicorn_workers: int
    gunicorn_threads: int
    celery_workers: int
    rate: int
    latency_batch: int
    latency_seconds: float
    latency_threads: int
    baseline_runs: int
    accounts: int
    keys_per_account: int
    database: str
    pg: str
    redis_url: str
    profile: bool
    write: bool

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.pg}/{self.database}"

    @property
    def sqlalchemy_url(self) -> str:
        return f"postgresql+psycopg://{self.pg}/{self.database}"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metering", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--events", type=int, default=150_000, help="events of the throughput phase")
    add("--batch", type=int, default=1000, help="events per request (and baseline rows per INSERT)")
    add("--senders", type=int, default=4, help="concurrent load generator processes")
    add("--gunicorn-workers", type=int, default=2)
    add("--gunicorn-threads", type=int, default=2, help="threads per gunicorn worker (gthread)")
    add("--celery-workers", type=int, default=2, help="Celery worker processes (solo pool)")
    add("--rate", type=int, default=1000, help="offered load of the latency phase, events/s")
    add("--latency-batch", type=int, default=100, help="events per request, latency phase")
    add("--latency-seconds", type=float, default=20.0)
    add("--latency-threads", type=int, default=4, help="connections of the paced sender")
    add("--baseline-runs", type=int, default=3, help="repetitions of each baseline (best kept)")
    add("--accounts", type=int, default=10)
    add("--keys-per-account", type=int, default=5)
    add("--database", default="billing_bench", help="dropped and created anew")
    add("--pg", default="postgres@127.0.0.1:5432", help="user@host:port of PostgreSQL")
    add("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis db of its own: flushed")
    add("--profile", action="store_true", help="py-spy and statement timing (perturbs numbers)")
    add("--no-write", dest="write", action="store_false", help="do not touch BENCHMARKS.md")
    options = parser.parse_args(argv)
    if options.events % options.batch:
        parser.error("--events must be a multiple of --batch")
    if not re.fullmatch(r"\w+", options.database):
        parser.error("--database must be a plain identifier")
    return Config(**vars(options))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- processes --------------------------------------------------------------------------


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


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat and stat[1] == pid:
                found.append(int(entry.name))
    return sorted(found)


# --- CPU accounting ---------------------------------------------------------------------


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime in ticks) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = data[data.index("(") + 1 : data.rindex(")")]
    rest = data[data.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[11]) + int(rest[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


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


# --- the database -----------------------------------------------------------------------


def recreate_database(config: Config) -> None:
    with psycopg.connect(f"postgresql://{config.pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{config.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{config.database}"')


def settings_for(config: Config, data_dir: Path) -> Any:
    from billing.core.settings import Settings

    return Settings(
        _env_file=None,
        database_url=config.sqlalchemy_url,
        redis_url=config.redis_url,
        secret_key=SECRET_KEY,
        billing_admin_token=ADMIN_TOKEN,
        billing_gateway_token=GATEWAY_TOKEN,
        data_dir=data_dir,
        log_level="WARNING",
    )


def prepare_database(config: Config, data_dir: Path) -> tuple[list[str], Any]:
    """Migrate, load the default prices, open funded accounts with keys; the key ids and the
    Celery client of the bench's Redis."""
    from billing.accounts import accounts, keys
    from billing.app import create_app
    from billing.catalog import catalog
    from billing.core.db import utcnow
    from billing.core.migrate import upgrade
    from billing.core.money import parse_usd
    from billing.ledger import ledger

    recreate_database(config)
    upgrade(config.sqlalchemy_url)
    app = create_app(settings_for(config, data_dir))
    runtime = app.extensions["billing"]
    key_ids = []
    with runtime.transaction() as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
        for a in range(config.accounts):
            account = accounts.create_account(
                session, name=f"bench account {a}", email=None, now=utcnow()
            )
            ledger.post(
                session,
                ledger.Posting(
                    account.id,
                    ledger.EntryKind.ADJUSTMENT,
                    parse_usd("10000000"),
                    "benchmark credit",
                    "bench",
                ),
                now=utcnow(),
            )
            for k in range(config.keys_per_account):
                key, _secret = keys.issue_key(
                    session,
                    account_id=account.id,
                    settings=keys.KeySettings(
                        name=f"bench key {k}",
                        rate_limit=None,
                        monthly_cap_nanos=None,
                        allowed_models=None,
                        expires_at=None,
                    ),
                    hmac_key=runtime.settings.hmac_key,
                    now=utcnow(),
                )
                key_ids.append(key.id)
    runtime.engine.dispose()
    return key_ids, app.extensions["celery"]


@contextmanager
def connect(config: Config) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        yield conn


def any_pending(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM usage_events WHERE status = 'pending')"
    ).fetchone()
    return bool(row and row[0])


def wait_settled(
    conn: psycopg.Connection[Any], deadline: float, services: Services, interval: float = 0.05
) -> float:
    """Poll until no event is pending; the time it was first seen so."""
    checked = time.monotonic()
    while any_pending(conn):
        if time.monotonic() > deadline:
            raise RuntimeError("events still pending at the deadline: settlement stalled")
        if time.monotonic() - checked > 2:
            services.check()
            checked = time.monotonic()
        time.sleep(interval)
    return time.time()


def max_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(id), 0) FROM usage_events").fetchone()
    return int(row[0]) if row else 0


def statuses(conn: psycopg.Connection[Any], after: int) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM usage_events WHERE id > %s GROUP BY status", [after]
    ).fetchall()
    return {status: int(count) for status, count in rows}


# --- the service processes --------------------------------------------------------------


def start_services(
    config: Config, services: Services, celery: Any, cpu: CpuAccounting
) -> tuple[str, Service, list[Service]]:
    """gunicorn, the Celery workers and beat, each waited for; the API's base URL."""
    port = free_port()
    gunicorn = [
        str(BIN / "gunicorn"),
        "billing.wsgi:app",
        f"--bind=127.0.0.1:{port}",
        f"--workers={config.gunicorn_workers}",
        f"--threads={config.gunicorn_threads}",
        "--worker-class=gthread",
        "--keep-alive=30",
        "--timeout=120",
        "--log-level=warning",
    ]
    if config.profile:
        gunicorn.append("--config=python:bench.gunicorn_profile")
    api = services.start("gunicorn", gunicorn)
    app_module = "bench.celery_profiled" if config.profile else "workers.app"
    workers = []
    for n in range(config.celery_workers):
        workers.append(
            services.start(
                f"celery-worker-{n}",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    app_module,
                    "worker",
                    "--pool=solo",
                    f"--hostname=bench{n}@%h",
                    "--loglevel=INFO",
                    "--without-gossip",
                    "--without-mingle",
                ],
            )
        )
    beat = services.start(
        "celery-beat",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "beat",
            f"--schedule={services.workdir / 'beat-schedule'}",
            "--loglevel=INFO",
        ],
    )
    cpu.parents[api.process.pid] = "gunicorn API workers"
    cpu.roles[api.process.pid] = "gunicorn API workers"
    for worker in workers:
        cpu.roles[worker.process.pid] = "Celery workers (settlement)"
    cpu.roles[beat.process.pid] = "Celery beat"
    cpu.roles[os.getpid()] = "load generator and bench"

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        services.check()
        with suppress(requests.RequestException):
            if requests.get(f"{base}/healthz", timeout=2).ok:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not answer /healthz:\n{tail(api.log_path)}")
        time.sleep(0.2)
    names = {f"bench{n}@" for n in range(config.celery_workers)}
    while True:
        services.check()
        replies = celery.control.ping(timeout=0.5)
        seen = {name for name in names for reply in replies for host in reply if name in host}
        if seen == names:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"Celery workers did not answer a ping: {replies}")
    return base, api, workers


# --- load -------------------------------------------------------------------------------


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


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (what percentile_cont does)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def check_load(results: list[dict[str, Any]], expected: int) -> int:
    accepted = int(sum(r["accepted"] for r in results))
    errors = [r["first_error"] for r in results if r["first_error"]]
    if accepted != expected or errors:
        raise RuntimeError(f"{accepted} of {expected} events accepted; first error: {errors[:1]}")
    return accepted


def warm_up(config: Config, base: str, key_ids: list[str], services: Services) -> None:
    """A few batches through every API worker and thread, settled, before any clock starts."""
    session = requests.Session()
    bodies = loadgen.batch_bodies("warm", 2 * config.gunicorn_workers * 2, 200, key_ids, 7)
    for body in bodies:
        response = session.post(
            f"{base}/gateway/v1/usage",
            data=body,
            headers={
                "Authorization": f"Bearer {GATEWAY_TOKEN}",
                "Content-Type": "application/json",
            },
            timeout=60,
        )
        if response.status_code != 202 or response.json()["accepted"] != 200:
            raise RuntimeError(f"warm-up refused: {response.status_code} {response.text[:500]}")
    with connect(config) as conn:
        wait_settled(conn, time.monotonic() + 60, services)


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


def checkpoint(config: Config) -> None:
    """Every timed phase starts from a fresh checkpoint."""
    with connect(config) as conn:
        conn.execute("CHECKPOINT")


def vacuum(config: Config, tables: Sequence[str]) -> None:
    """Autovacuum is off on this server: the harness stands in for it between phases."""
    with connect(config) as conn:
        for table in tables:
            conn.execute(f"VACUUM (ANALYZE) {table}")


# Before the throughput phase the database is in the state a production one is in between
# bursts: usage_events analysed with (almost) nothing pending, so the claim query takes the
# ordered partial index. ledger_entries is left unanalysed (the planner then assumes a table of
# some size, as a production ledger is): statistics of its few warm-up rows would have every
# worker plan the foreign-key check of settlement's UPDATE as a sequential scan, whose cost then
# grows with the ledger during the run (autovacuum's re-analyses prevent that in production).
STEADY_STATE_TABLES = ("usage_events", "usage_rollups")
ALL_TABLES = ("usage_events", "usage_rollups", "accounts", "ledger_entries")


@dataclass
class Throughput:
    events: int
    ingest_seconds: float
    e2e_seconds: float
    request_latencies: list[float]
    settled_during_ingest: int
    settle_batches: int
    cpu: dict[str, float]
    first_id: int
    last_id: int
    loadgen_cpu: float
    cpu_ingesting: dict[str, float]
    cpu_draining: dict[str, float]

    @property
    def ingest_rate(self) -> float:
        return self.events / self.ingest_seconds

    @property
    def e2e_rate(self) -> float:
        return self.events / self.e2e_seconds


def throughput_phase(
    config: Config,
    base: str,
    key_ids: list[str],
    services: Services,
    cpu: CpuAccounting,
    profiler: Profiler | None,
) -> Throughput:
    batches, extra = divmod(config.events // config.batch, config.senders)
    shares = [batches + (1 if s < extra else 0) for s in range(config.senders)]
    log(
        f"throughput: {config.events} events, {config.senders} senders,"
        f" {config.events // config.batch} batches of {config.batch}"
    )
    with connect(config) as conn:
        before = max_id(conn)
    wait_for_quiet()
    url = f"{base}/gateway/v1/usage"
    arguments = [
        (url, GATEWAY_TOKEN, f"tp-s{s}", shares[s], config.batch, key_ids, 1000 + s)
        for s in range(config.senders)
    ]
    snapshots: list[CpuSnapshot] = []

    def on_start() -> None:
        if profiler:
            profiler.start()
        snapshots.append(cpu.snapshot())

    t0, results = run_processes(loadgen.closed_loop_sender, arguments, on_start)
    mid_snapshot = cpu.snapshot()  # the senders are done: from here on, settlement drains
    ingest_end = max(r["t_last"] for r in results)
    accepted = check_load(results, config.events)
    log(f"  ingested in {ingest_end - t0:.2f} s; waiting for settlement")
    with connect(config) as conn:
        settled_at = wait_settled(conn, time.monotonic() + 240, services)
        end_snapshot = cpu.snapshot()
        if profiler:
            profiler.stop()
        counts = statuses(conn, before)
        if counts != {"settled": accepted}:
            raise RuntimeError(f"events after the throughput phase: {counts}")
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE settled_at <= to_timestamp(%s)),"
            " count(DISTINCT settled_at), min(id), max(id)"
            " FROM usage_events WHERE id > %s",
            [ingest_end, before],
        ).fetchone()
        assert row is not None
    loadgen_cpu = sum(r["cpu_seconds"] for r in results)
    usage = CpuAccounting.between(
        snapshots[0], end_snapshot, {"load generator and bench": loadgen_cpu}
    )
    latencies = [latency for r in results for latency in r["latencies"]]
    ingesting = CpuAccounting.between(
        snapshots[0], mid_snapshot, {"load generator and bench": loadgen_cpu}
    )
    draining = CpuAccounting.between(mid_snapshot, end_snapshot, {})
    return Throughput(
        events=accepted,
        ingest_seconds=ingest_end - t0,
        e2e_seconds=settled_at - t0,
        request_latencies=latencies,
        settled_during_ingest=int(row[0]),
        settle_batches=int(row[1]),
        cpu=usage,
        first_id=int(row[2]),
        last_id=int(row[3]),
        loadgen_cpu=loadgen_cpu,
        cpu_ingesting=ingesting,
        cpu_draining=draining,
    )


@dataclass
class Latency:
    events: int
    offered_rate: float
    settle_p50: float
    settle_p99: float
    settle_max: float
    http_p50: float
    http_p99: float
    http_max: float
    late_sends: int
    max_send_delay: float
    cpu: dict[str, float]


def latency_phase(
    config: Config, base: str, key_ids: list[str], services: Services, cpu: CpuAccounting
) -> Latency:
    interval = config.latency_batch / config.rate
    batches = round(config.latency_seconds / interval)
    log(
        f"latency: {config.rate} events/s offered as {config.latency_batch}-event batches"
        f" every {interval * 1000:.0f} ms for {batches * interval:.0f} s"
    )
    with connect(config) as conn:
        before = max_id(conn)
    wait_for_quiet()
    arguments = [
        (
            f"{base}/gateway/v1/usage",
            GATEWAY_TOKEN,
            "lat",
            batches,
            config.latency_batch,
            interval,
            config.latency_threads,
            key_ids,
            2000,
        )
    ]
    snapshots: list[CpuSnapshot] = []
    _t0, results = run_processes(
        loadgen.paced_sender, arguments, lambda: snapshots.append(cpu.snapshot())
    )
    end_snapshot = cpu.snapshot()
    (result,) = results
    accepted = check_load(results, batches * config.latency_batch)
    with connect(config) as conn:
        wait_settled(conn, time.monotonic() + 120, services)
        counts = statuses(conn, before)
        if counts != {"settled": accepted}:
            raise RuntimeError(f"events after the latency phase: {counts}")
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY s), max(s)"
            " FROM (SELECT extract(epoch FROM settled_at - received_at)::float8 AS s"
            "       FROM usage_events WHERE id > %s) AS latencies",
            [before],
        ).fetchone()
        assert row is not None
    usage = CpuAccounting.between(
        snapshots[0], end_snapshot, {"load generator and bench": result["cpu_seconds"]}
    )
    latencies = result["latencies"]
    return Latency(
        events=accepted,
        offered_rate=accepted / result["offered_seconds"],
        settle_p50=float(row[0]),
        settle_p99=float(row[1]),
        settle_max=float(row[2]),
        http_p50=percentile(latencies, 0.5),
        http_p99=percentile(latencies, 0.99),
        http_max=max(latencies),
        late_sends=result["late_sends"],
        max_send_delay=result["max_send_delay"],
        cpu=usage,
    )


@dataclass
class Baseline:
    processes: int
    rows: int
    seconds: float
    cpu: dict[str, float]
    rates: list[float]  # every repetition's rows/s; this one is the fastest

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def take_snapshot(cpu: CpuAccounting, into: list[CpuSnapshot]) -> None:
    into.append(cpu.snapshot())


def baseline_phase(config: Config, throughput: Throughput, cpu: CpuAccounting) -> list[Baseline]:
    """Each baseline ``--baseline-runs`` times, the fastest kept: the least disturbed by
    whatever else runs on the machine (a conservative denominator for the ratio)."""
    where = f"id BETWEEN {throughput.first_id} AND {throughput.last_id}"
    best_runs = []
    for processes in sorted({1, config.senders}):
        runs: list[Baseline] = []
        for _repetition in range(max(1, config.baseline_runs)):
            with connect(config) as conn:
                baseline.create_table(conn)
            checkpoint(config)
            wait_for_quiet(patience=10.0)
            arguments = [
                (config.dsn, where, share, processes, config.batch) for share in range(processes)
            ]
            snapshots: list[CpuSnapshot] = []
            take = functools.partial(take_snapshot, cpu, snapshots)
            t0, results = run_processes(baseline.worker, arguments, take, take)
            rows = sum(r["rows"] for r in results)
            if rows != throughput.events:
                raise RuntimeError(f"baseline inserted {rows} rows, not {throughput.events}")
            seconds = max(r["t_last"] for r in results) - t0
            usage = CpuAccounting.between(
                snapshots[0],
                snapshots[1],
                {"baseline inserting processes": sum(r["cpu_seconds"] for r in results)},
            )
            runs.append(Baseline(processes, rows, seconds, usage, []))
            log(f"baseline, {processes} process(es): {rows / seconds:,.0f} rows/s")
        best = max(runs, key=lambda run: run.rate)
        best.rates = [run.rate for run in runs]
        best_runs.append(best)
    with connect(config) as conn:
        conn.execute(f"DROP TABLE {baseline.BASELINE_TABLE}")
    return best_runs


# --- profiling (--profile) ----------------------------------------------------------------


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


def render_profile(
    config: Config,
    profiler: Profiler,
    sql: Any,
    throughput: Throughput,
) -> str:
    start, end = profiler.window
    seconds = end - start
    lines = [
        f"Profiled run of {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        f" (`python -m bench.metering --profile`): `py-spy record --gil --nonblocking` at"
        f" {profiler.rate} Hz on every gunicorn worker and Celery worker for the throughput phase"
        f" ({seconds:.1f} s; {throughput.ingest_rate:,.0f} events/s ingest and"
        f" {throughput.e2e_rate:,.0f} events/s end to end under the profiler), and each of"
        " these processes timing its own statements (SQLAlchemy cursor events;"
        " pg_stat_statements is not loaded on this server). `--gil` samples the thread"
        " holding the GIL only: the samples are where the Python CPU goes, and samples / rate /"
        " duration is the share of the time a process held it. On this oversubscribed machine a"
        " thread that holds the GIL while it waits for a core is sampled too, which over-weights"
        " long calls (decoding a whole request body); /proc gives the CPU. Time waiting on"
        " PostgreSQL is not sampled: it shows in the statement tables.",
        "",
        "CPU by process during the profiled throughput phase (from /proc):",
        "",
        *cpu_table(throughput.cpu, throughput.events),
        "",
    ]
    for kind, title in (("API", "gunicorn API workers"), ("worker", "Celery workers")):
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
                f" {server_total / throughput.events * 1e6:,.0f} µs per event):",
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
                    f" {server / throughput.events * 1e6:,.1f} |"
                )
            lines.append("")
    return "\n".join(lines)


# --- the report -------------------------------------------------------------------------


def run_text(command: list[str]) -> str:
    try:
        return subprocess.run(  # noqa: S603 - our own command lines
            command, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        return ""


def machine_description(config: Config) -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    with connect(config) as conn:
        version = conn.execute("SELECT version()").fetchone()
        pg_settings = dict(
            conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN"
                " ('shared_buffers', 'synchronous_commit', 'fsync', 'autovacuum', 'wal_level',"
                " 'max_connections')"
            ).fetchall()
        )
    server = redis.Redis.from_url(config.redis_url).info("server")
    nproc = run_text(["nproc"]) or str(os.cpu_count())
    shared_buffers = int(re.sub(r"\D", "", pg_settings.get("shared_buffers", "0")) or 0)
    return [
        (
            "CPU",
            f"{nproc} cores (`nproc`), {model[1] if model else '?'}"
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
        (
            "shared by",
            "API, PostgreSQL, Redis, Celery workers and the load generator, all on"
            ' these cores (and whatever else runs on the machine: see "other processes")',
        ),
    ]


def busy_summary(usage: dict[str, float]) -> str:
    """Cores busy in all, and by the main components, over a stretch of a phase."""
    wall = max(usage["wall"], 1e-9)
    names = {
        "gunicorn API workers": "API",
        "Celery workers (settlement)": "Celery",
        "PostgreSQL backends of the bench": "PostgreSQL",
        "other processes on the machine": "others",
    }
    parts = ", ".join(f"{short} {usage.get(name, 0.0) / wall:.2f}" for name, short in names.items())
    return f"{usage['machine busy (all cores)'] / wall:.2f} cores busy ({parts})"


def mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


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


def render(
    config: Config,
    throughput: Throughput,
    latency: Latency,
    baselines: list[Baseline],
    machine: list[tuple[str, str]],
    runtime_seconds: float,
    argv: Sequence[str],
) -> str:
    best = max(baselines, key=lambda b: b.rate)
    ratio = throughput.e2e_rate / best.rate
    during = throughput.settled_during_ingest
    drain_seconds = throughput.e2e_seconds - throughput.ingest_seconds
    command = " ".join(["python -m bench.metering", *argv]).strip()
    http = throughput.request_latencies
    lines = [
        "## Usage metering pipeline (`make bench`)",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: `{command}`, {runtime_seconds:.0f} s"
        " in all. Written by `bench/metering.py`; replaced by the next run.",
        "",
        "| metric | result | target | |",
        "|---|---:|---:|---|",
        f"| **end to end** (accepted and settled), {throughput.events:,} events"
        f" | **{throughput.e2e_rate:,.0f} events/s** ({throughput.e2e_seconds:.1f} s)"
        f" | ≥ {TARGET_E2E:,.0f} events/s | {mark(throughput.e2e_rate >= TARGET_E2E)} |",
        f"| **ratio** end to end / raw baseline ({best.processes} process(es))"
        f" | **{ratio:.2f}** | ≥ {TARGET_RATIO} | {mark(ratio >= TARGET_RATIO)} |",
        f"| **settlement latency p99** at {latency.offered_rate:,.0f} events/s offered"
        f" | **{latency.settle_p99 * 1000:,.0f} ms** | < {TARGET_P99 * 1000:.0f} ms"
        f" | {mark(latency.settle_p99 < TARGET_P99)} |",
        f"| settlement latency p50 / max at {latency.offered_rate:,.0f} events/s"
        f" | {latency.settle_p50 * 1000:,.0f} ms / {latency.settle_max * 1000:,.0f} ms | | |",
        f"| ingest only (answered 202; settlement running alongside), {throughput.events:,} events"
        f" | {throughput.ingest_rate:,.0f} events/s ({throughput.ingest_seconds:.1f} s) | | |",
        f"| HTTP latency p50 / p99, {config.latency_batch}-event batches at"
        f" {latency.offered_rate:,.0f} events/s"
        f" | {latency.http_p50 * 1000:,.0f} ms / {latency.http_p99 * 1000:,.0f} ms | | |",
        f"| HTTP latency p50 / p99, {config.batch}-event batches, throughput phase"
        f" | {percentile(http, 0.5) * 1000:,.0f} ms / {percentile(http, 0.99) * 1000:,.0f} ms"
        " | | |",
    ]
    for run in baselines:
        every = ", ".join(f"{rate / 1000:.1f}k" for rate in run.rates)
        lines.append(
            f"| raw baseline: batched INSERT of the same rows, {run.processes} process(es),"
            f" best of {len(run.rates)} | {run.rate:,.0f} rows/s ({run.seconds:.1f} s;"
            f" runs {every}) | | |"
        )
    phases = [("throughput", throughput.cpu), ("latency", latency.cpu)]
    phases += [(f"baseline ({run.processes} process(es))", run.cpu) for run in baselines]
    for phase, usage in phases:
        other = usage["other processes on the machine"] / usage["wall"]
        if other > 0.15:
            lines += [
                "",
                f"**Disturbed:** other processes on the machine used {other:.2f} cores during the"
                f" {phase} phase; its numbers may be lower than this machine gives when quiet.",
            ]
    lines += [
        "",
        "Throughput phase in detail: while the senders were posting"
        f" ({throughput.ingest_seconds:.1f} s), settlement kept up with"
        f" {during:,} events ({during / throughput.ingest_seconds:,.0f} events/s); the remaining"
        f" {throughput.events - during:,} were settled in the {drain_seconds:.1f} s after the last"
        f" 202 ({(throughput.events - during) / max(drain_seconds, 1e-9):,.0f} events/s), in"
        f" {throughput.settle_batches:,} settlement batches in all"
        f" ({throughput.events / max(throughput.settle_batches, 1):,.0f} events per batch)."
        f" While ingesting: {busy_summary(throughput.cpu_ingesting)}; while draining:"
        f" {busy_summary(throughput.cpu_draining)}."
        f" Latency phase: {latency.events:,} events, {latency.late_sends} sends late by more than"
        f" one interval (largest delay {latency.max_send_delay * 1000:.0f} ms).",
        "",
        'CPU by process during the throughput phase (from /proc; "cores busy" = CPU s / wall):',
        "",
        *cpu_table(throughput.cpu, throughput.events),
        "",
        "CPU by process during the latency phase:",
        "",
        *cpu_table(latency.cpu),
        "",
    ]
    for run in baselines:
        lines += [
            f"CPU during the raw baseline, {run.processes} process(es) (its fastest run):",
            "",
            *cpu_table(run.cpu, run.rows, "row"),
            "",
        ]
    lines += [
        "Machine:",
        "",
        *[f"- {name}: {value}" for name, value in machine],
        "",
        "Configuration:",
        "",
        f"- API: gunicorn `billing.wsgi:app`, {config.gunicorn_workers} workers x"
        f" {config.gunicorn_threads} threads (gthread, keep-alive): a worker per core, and a"
        " second thread so that one request's parsing overlaps another's database wait.",
        f"- settlement: {config.celery_workers} Celery worker process(es), `--pool=solo`, over"
        " the Redis broker (the ingest's coalesced `settle_usage` trigger; a drain that finds a"
        " backlog asks a second worker to help, hence 2), plus `celery beat` running the"
        " 5-second `sweep`.",
        f"- load: {config.senders} sender processes, `requests.Session` with keep-alive each,"
        f" closed loop, {config.batch} events per request, bodies serialised before the clock"
        f" starts; latency phase: one process, {config.latency_threads} connections, open loop"
        f" on an absolute schedule. Events carry `key_id`, a raw `usage` object (half Chat"
        f" Completions, half Responses API shaped), `occurred_at` and an outcome; models include"
        " an alias.",
        f"- data: {config.accounts} accounts x {config.keys_per_account} keys, default price"
        f" table, database `{config.database}` (dropped and created), Redis"
        f" `{config.redis_url}` (flushed). Autovacuum is off on this server, so the harness"
        " stands in for it: before the throughput phase `VACUUM ANALYZE` of usage_events and"
        " usage_rollups (nothing pending: the steady state between bursts) but not of the"
        " ledger (see the profile notes on planner hazards), before the latency phase of all"
        " four tables; a `CHECKPOINT` before each timed phase.",
        f"- baseline: the {throughput.events:,} stored rows (the 14 columns an ingest sets, same"
        " values) into `CREATE TABLE ... (LIKE usage_events INCLUDING ALL)` plus the same foreign"
        f" keys, multi-row `INSERT ... VALUES` of {config.batch} rows through psycopg, a commit"
        f" per batch; each baseline is run {config.baseline_runs} times into a fresh table, and the"
        " ratio divides by the fastest of all (the least disturbed: a conservative denominator).",
    ]
    return "\n".join(lines)


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


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="billing-bench-"))
    log(f"logs in {workdir}")
    redis.Redis.from_url(config.redis_url).flushdb()
    env = os.environ | {
        "DATABASE_URL": config.sqlalchemy_url,
        "REDIS_URL": config.redis_url,
        "SECRET_KEY": SECRET_KEY,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "DATA_DIR": str(workdir / "data"),
        "LOG_LEVEL": "WARNING",
        "BENCH_SQL_STATS_DIR": str(workdir),
        "PYTHONPATH": str(ROOT),
    }
    services = Services(workdir, env)
    cpu = CpuAccounting(config.database)
    profiler: Profiler | None = None
    try:
        log(f"database {config.database}: create, migrate, load prices, fund accounts")
        key_ids, celery = prepare_database(config, workdir / "data")
        log(
            f"starting gunicorn ({config.gunicorn_workers}x{config.gunicorn_threads}),"
            f" {config.celery_workers} Celery worker(s) and beat"
        )
        base, api, workers = start_services(config, services, celery, cpu)
        warm_up(config, base, key_ids, services)
        vacuum(config, STEADY_STATE_TABLES)
        checkpoint(config)
        if config.profile:
            profiler = Profiler(services, api, workers)
        throughput = throughput_phase(config, base, key_ids, services, cpu, profiler)
        log(
            f"  ingest {throughput.ingest_rate:,.0f} events/s,"
            f" end to end {throughput.e2e_rate:,.0f} events/s"
        )
        vacuum(config, ALL_TABLES)
        checkpoint(config)
        latency = latency_phase(config, base, key_ids, services, cpu)
        log(
            f"  settlement latency p50 {latency.settle_p50 * 1000:.0f} ms,"
            f" p99 {latency.settle_p99 * 1000:.0f} ms"
        )
        baselines = baseline_phase(config, throughput, cpu)
        machine = machine_description(config)
        kinds = {pid: "API" for pid in children_of(api.process.pid)}
        kinds |= {w.process.pid: "worker" for w in workers}
    except BaseException as error:
        log(f"run aborted ({error!r}): stopping the services")
        raise
    finally:
        log("stopping the services")
        if profiler:
            profiler.kill()
        services.stop()
        with suppress(redis.RedisError):
            redis.Redis.from_url(config.redis_url).flushdb()  # queued tasks, results, mirror
    report = render(config, throughput, latency, baselines, machine, time.monotonic() - began, argv)
    print("\n" + report + "\n", flush=True)
    if config.write and not config.profile:  # a profiled run's numbers are perturbed
        write_report(SECTION, report)
        log(f"results written to {REPORT}")
    if profiler:
        sql = read_sql_stats(workdir, kinds, profiler.window)
        profile = "### Profile data (`make bench BENCH_ARGS=--profile`)\n\n" + render_profile(
            config, profiler, sql, throughput
        )
        print(profile + "\n", flush=True)
        if config.write:
            write_report(PROFILE_SECTION, profile)
    log(f"done in {time.monotonic() - began:.0f} s (logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
