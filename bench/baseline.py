"""The raw baseline: the rows the pipeline stored, inserted again with plain batched INSERTs.

Each process loads its share of the stored rows (untimed), waits for the start signal, then
inserts them in multi-row ``INSERT ... VALUES (...), (...)`` statements of ``batch`` rows through
psycopg, committing each batch (as each ingest request commits its batch).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

BASELINE_TABLE = "usage_events_baseline"
# What an ingest stores (every column set at ingest; the rest is settlement's).
COLUMNS = (
    "request_id",
    "content_hash",
    "account_id",
    "key_id",
    "model",
    "usage_raw",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "outcome",
    "occurred_at",
    "received_at",
    "status",
)


def create_table(conn: psycopg.Connection[Any]) -> None:
    """A copy of usage_events: same columns, defaults, checks and indexes, and the same FKs."""
    conn.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
    conn.execute(f"CREATE TABLE {BASELINE_TABLE} (LIKE usage_events INCLUDING ALL)")
    # LIKE copies no foreign keys; the pipeline's table checks these on every insert.
    for column, target in (
        ("account_id", "accounts"),
        ("key_id", "api_keys"),
        ("price_version_id", "price_versions"),
        ("ledger_entry_id", "ledger_entries"),
    ):
        conn.execute(
            f"ALTER TABLE {BASELINE_TABLE} ADD FOREIGN KEY ({column}) REFERENCES {target} (id)"
        )


def load_rows(dsn: str, where: str, share: int, shares: int) -> list[tuple[Any, ...]]:
    """The ingest columns of the stored events ``where`` selects: share ``share`` of ``shares``."""
    # As the ingest stored them: settlement has since set status, which an ingest stores pending.
    stored = {"usage_raw": "usage_raw::text", "status": "'pending'"}
    columns = ", ".join(stored.get(c, c) for c in COLUMNS)
    query = (
        f"SELECT {columns} FROM usage_events WHERE {where}"  # noqa: S608 - our own constants
        f" AND id % {shares} = {share} ORDER BY id"
    )
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(query).fetchall())


def insert_rows(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]], batch: int) -> None:
    """Insert ``rows`` in multi-row INSERTs of ``batch`` rows, one transaction per batch."""
    row_sql = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    head = f"INSERT INTO {BASELINE_TABLE} ({', '.join(COLUMNS)}) VALUES "  # noqa: S608
    statements: dict[int, str] = {}
    for begin in range(0, len(rows), batch):
        chunk = rows[begin : begin + batch]
        sql = statements.get(len(chunk))
        if sql is None:
            sql = statements[len(chunk)] = head + ", ".join([row_sql] * len(chunk))
        conn.execute(sql, [value for row in chunk for value in row])
        conn.commit()


def worker(out: Any, start: Any, dsn: str, where: str, share: int, shares: int, batch: int) -> None:
    """One inserting process of a baseline run; puts its row count and times on ``out``."""
    result: dict[str, Any] = {}
    try:
        rows = load_rows(dsn, where, share, shares)
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT 1")
            conn.commit()
            cpu0 = time.process_time()
            start.wait(timeout=120)
            result["t_first"] = time.time()
            insert_rows(conn, rows, batch)
            result["t_last"] = time.time()
            result["cpu_seconds"] = time.process_time() - cpu0
            result["rows"] = len(rows)
            out.put(result)
            # Keep the connection (and so its server process) until the parent has read the
            # CPU time of the server processes.
            start.wait(timeout=120)
    except Exception as error:  # reported to the parent, which fails the run
        result["exception"] = repr(error)
        out.put(result)
