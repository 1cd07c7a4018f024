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
