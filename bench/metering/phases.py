"""The run, phase by phase: the service processes started and warmed up, then throughput,
latency and the raw baseline, each measured with the CPU it took."""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import requests

from bench import baseline, loadgen
from bench.harness.cpu import CpuAccounting, CpuSnapshot, wait_for_quiet
from bench.harness.environment import GATEWAY_TOKEN
from bench.harness.processes import BIN, Service, Services, free_port, log, run_processes, tail
from bench.harness.profiling import Profiler
from bench.harness.report import percentile
from bench.metering.config import Config
from bench.metering.database import checkpoint, connect, max_id, statuses, wait_settled


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
