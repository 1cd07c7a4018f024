"""Statement timing for ``--profile`` runs, installed into the API and worker processes.

pg_stat_statements is not loaded on this server, so the processes time their own statements:
the client-side time of each DBAPI call (SQLAlchemy cursor events: parameter adaptation, round
trip, server time, waits on locks) and the CPU time the PostgreSQL server process of the
connection spent on it (from ``/proc/<backend pid>/schedstat``, in nanoseconds: the server runs
on this machine). Commits are timed the same way (Session before/after commit: the final flush
and COMMIT). Totals are kept per second and per statement, so the harness can cut out one
phase, and written as JSON to ``$BENCH_SQL_STATS_DIR/sql-<pid>.json`` when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

# (second, statement) -> [calls, client seconds, rows, server CPU seconds]
_stats: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0.0])
_installed = False
_dumped = False
_SPACES = re.compile(r"\s+")
_CASTS = "TIMESTAMP WITH TIME ZONE|TIMESTAMP|VARCHAR|JSONB|JSON|BIGINT|INTEGER|DATE|NUMERIC|TEXT"
# A bound parameter with its optional cast: %(name)s::VARCHAR, $1::TIMESTAMP WITH TIME ZONE.
_PLACEHOLDER = re.compile(rf"(%\([^)]*\)s|%s|\$\d+)(::({_CASTS})(\(\d+\))?(\[\])?)?")
_GROUP = re.compile(r"\((\?, )*\?\)")
_GROUPS = re.compile(r"\(\?\.\.\)(, \(\?\.\.\))+")
COMMIT = "COMMIT (session commit: final flush + COMMIT)"


def _key(statement: str, executemany: bool) -> str:
    text = _SPACES.sub(" ", statement).strip()
    text = _PLACEHOLDER.sub("?", text)
    text = _GROUP.sub("(?..)", text)
    text = _GROUPS.sub("(?..), ...", text)
    text = text if len(text) <= 200 else text[:197] + "..."
    return text + ("  [executemany]" if executemany else "")


def _server_cpu(backend_pid: int | None) -> float:
    """CPU seconds the server process has used so far (0 if unknown)."""
    if not backend_pid:
        return 0.0
    try:
        with open(f"/proc/{backend_pid}/schedstat") as file:
            return int(file.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _backend_pid(info: dict[str, Any], dbapi_connection: Any) -> int | None:
    if "bench_backend_pid" not in info:
        try:
            info["bench_backend_pid"] = int(dbapi_connection.info.backend_pid)
        except Exception:
            info["bench_backend_pid"] = None
    pid: int | None = info["bench_backend_pid"]
    return pid


def _record(key: str, client: float, rows: int, server: float) -> None:
    bucket = _stats[(int(time.time()), key)]
    bucket[0] += 1
    bucket[1] += client
    bucket[2] += rows
    bucket[3] += server


def _before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
    pid = _backend_pid(conn.info, conn.connection.dbapi_connection)
    conn.info.setdefault("bench_started", []).append((time.perf_counter(), _server_cpu(pid)))


def _after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
    started, cpu = conn.info["bench_started"].pop()
    client = time.perf_counter() - started
    server = _server_cpu(conn.info.get("bench_backend_pid")) - cpu
    rows = len(params) if many and isinstance(params, list | tuple) else 1
    _record(_key(statement, many), client, rows, server)


def _before_commit(session: Session) -> None:
    try:
        connection = session.connection()
        pid = _backend_pid(connection.info, connection.connection.dbapi_connection)
    except Exception:
        pid = None
    session.info["bench_commit"] = (time.perf_counter(), pid, _server_cpu(pid))


def _after_commit(session: Session) -> None:
    started = session.info.pop("bench_commit", None)
    if started is not None:
        began, pid, cpu = started
        _record(COMMIT, time.perf_counter() - began, 1, _server_cpu(pid) - cpu)


def dump() -> None:
    """Write the totals (once) to the stats directory named by the environment."""
    global _dumped
    directory = os.environ.get("BENCH_SQL_STATS_DIR")
    if _dumped or not directory:
        return
    _dumped = True
    rows = [[second, key, *values] for (second, key), values in _stats.items()]
    path = os.path.join(directory, f"sql-{os.getpid()}.json")
    with open(path, "w") as file:
        json.dump(rows, file)


def install() -> None:
    """Time every statement and commit of this process from now on."""
    global _installed
    if _installed:
        return
    _installed = True
    event.listen(Engine, "before_cursor_execute", _before)
    event.listen(Engine, "after_cursor_execute", _after)
    event.listen(Session, "before_commit", _before_commit)
    event.listen(Session, "after_commit", _after_commit)
    atexit.register(dump)
