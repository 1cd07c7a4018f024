"""The metering sections of BENCHMARKS.md: the results against their targets, and the profile of
a ``--profile`` run."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from bench.harness.profiling import Profiler, profile_tables
from bench.harness.report import cpu_table, mark, percentile
from bench.metering.config import Config
from bench.metering.phases import Baseline, Latency, Throughput
from bench.metering.plans import Plans, render_plans

TARGET_E2E = 15_000.0
TARGET_RATIO = 0.5
TARGET_P99 = 1.0


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


def render(
    config: Config,
    throughput: Throughput,
    latency: Latency,
    baselines: list[Baseline],
    machine: list[tuple[str, str]],
    runtime_seconds: float,
    argv: Sequence[str],
    plans: Plans,
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
        " in all. Written by `bench/metering/`; replaced by the next run.",
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
    lines += render_plans(plans)
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


def render_profile(profiler: Profiler, sql: Any, throughput: Throughput) -> str:
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
        *profile_tables(profiler, sql, throughput.events),
    ]
    return "\n".join(lines)
