"""``python -m bench.metering``: one run, every process it started stopped whatever happens;
the results printed and written to their section of BENCHMARKS.md."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import suppress

import redis

from bench.harness.cpu import CpuAccounting
from bench.harness.environment import service_env
from bench.harness.processes import Services, begin_run, children_of, log
from bench.harness.profiling import Profiler, read_sql_stats
from bench.harness.report import REPORT, machine_description, write_report
from bench.metering.config import parse_args
from bench.metering.database import (
    ALL_TABLES,
    STEADY_STATE_TABLES,
    checkpoint,
    prepare_database,
    vacuum,
)
from bench.metering.phases import (
    baseline_phase,
    latency_phase,
    start_services,
    throughput_phase,
    warm_up,
)
from bench.metering.plans import collect as collect_plans
from bench.metering.results import render, render_profile

SECTION = "metering"
PROFILE_SECTION = "metering-profile"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    began = time.monotonic()
    workdir = begin_run("billing-bench-")
    redis.Redis.from_url(config.redis_url).flushdb()
    env = service_env(workdir, config.sqlalchemy_url, config.redis_url)
    env["BENCH_SQL_STATS_DIR"] = str(workdir)
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
        log("report query plans (EXPLAIN)")
        plans = collect_plans(config, key_ids)
        machine = machine_description(config.dsn, config.redis_url)
        machine.append(
            (
                "shared by",
                "API, PostgreSQL, Redis, Celery workers and the load generator, all on"
                ' these cores (and whatever else runs on the machine: see "other processes")',
            )
        )
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
    report = render(
        config, throughput, latency, baselines, machine, time.monotonic() - began, argv, plans
    )
    print("\n" + report + "\n", flush=True)
    if config.write and not config.profile:  # a profiled run's numbers are perturbed
        write_report(SECTION, report)
        log(f"results written to {REPORT}")
    if profiler:
        sql = read_sql_stats(workdir, kinds, profiler.window)
        profile = "### Profile data (`make bench BENCH_ARGS=--profile`)\n\n" + render_profile(
            profiler, sql, throughput
        )
        print(profile + "\n", flush=True)
        if config.write:
            write_report(PROFILE_SECTION, profile)
    log(f"done in {time.monotonic() - began:.0f} s (logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
