"""A PostgreSQL primary and its streaming replica, started by the tests on free loopback ports.

The machine's own server (127.0.0.1:5432) allows no replication connections (its pg_hba.conf
has no ``replication`` line, and tests must not change it), so this starts a primary of its own
with ``initdb`` (whose trust pg_hba.conf does allow them), copies it with
``pg_basebackup -R`` (which writes the standby's connection settings), and starts the copy as a
hot standby. PostgreSQL refuses to run as root: when the tests run as root, every server
command runs as the ``postgres`` OS user. Everything lives in one temporary directory, removed
by :meth:`ReplicaPair.stop` together with both servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg


def _server_programs() -> Path:
    """PG_BIN, else the newest Debian PostgreSQL's programs (initdb is not on PATH there)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: [int(part) for part in path.parent.name.split(".") if part.isdigit()],
    )
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


BIN = _server_programs()
# Settings for a throwaway cluster: no fsync (nothing here must survive a crash), small memory.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    " -c shared_buffers=16MB -c max_connections=40 -c wal_level=replica -c max_wal_senders=4"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ReplicaPair:
    """A primary and a hot standby streaming from it, with database ``billing`` on both."""

    directory: Path
    primary_port: int
    replica_port: int
    as_user: list[str]

    def url(self, port: int, *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{port}/billing"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary_port)

    @property
    def replica_url(self) -> str:
        return self.url(self.replica_port)

    def connect(self, port: int) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the server on ``port``, for its control functions."""
        return psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True)

    def run(self, *command: str) -> None:
        """A PostgreSQL program of BIN, as the user that owns the clusters; raises RuntimeError
        with its output (and the servers' logs) if it fails."""
        done = subprocess.run(
            [*self.as_user, str(BIN / command[0]), *command[1:]],
            check=False,
            capture_output=True,
            text=True,
            cwd=self.directory,
        )
        if done.returncode != 0:
            logs = "".join(
                f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                for log in sorted(self.directory.glob("*.log"))
            )
            raise RuntimeError(
                f"{command[0]} exited with {done.returncode}:\n{done.stdout}{done.stderr}{logs}"
            )

    def pg_ctl(self, name: str, *args: str, port: int | None = None) -> None:
        options = (
            []
            if port is None
            else [
                "-o",
                f"{SERVER_OPTIONS} -c port={port} -c unix_socket_directories={self.directory}",
            ]
        )
        self.run(
            "pg_ctl",
            "-D",
            str(self.directory / name),
            "-l",
            str(self.directory / f"{name}.log"),
            "-w",
            "-t",
            "60",
            *options,
            *args,
        )

    def pause_replay(self) -> None:
        """Stop the replica applying WAL (it still receives it), and wait until it has."""
        with self.connect(self.replica_port) as connection:
            connection.execute("SELECT pg_wal_replay_pause()")
            self._wait(connection, "SELECT pg_get_wal_replay_pause_state() = 'paused'")

    def resume_replay(self) -> None:
        """Apply WAL again, and wait until the replica has replayed all the primary has written."""
        with self.connect(self.replica_port) as connection:
            connection.execute("SELECT pg_wal_replay_resume()")
        self.wait_replayed()

    def wait_replayed(self) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        with self.connect(self.primary_port) as primary:
            row = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        with self.connect(self.replica_port) as replica:
            self._wait(replica, f"SELECT pg_last_wal_replay_lsn() >= '{row[0]}'::pg_lsn")

    @staticmethod
    def _wait(connection: psycopg.Connection[tuple[object, ...]], query: str) -> None:
        deadline = time.monotonic() + 30
        while not (row := connection.execute(query).fetchone()) or row[0] is not True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not reach: {query}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop both servers (at once: nothing in them is kept) and remove the directory."""
        for name in ("replica", "primary"):
            if (self.directory / name / "postmaster.pid").exists():
                subprocess.run(
                    [
                        *self.as_user,
                        str(BIN / "pg_ctl"),
                        "-D",
                        str(self.directory / name),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                    check=False,
                    capture_output=True,
                )
        shutil.rmtree(self.directory, ignore_errors=True)


def start_replica_pair() -> ReplicaPair:
    """A new primary on a free port with an empty database ``billing``, and a hot standby of it
    on another, streaming; raises RuntimeError (with the programs' output) on failure."""
    directory = Path(tempfile.mkdtemp(prefix="billing-replica-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    primary_port = _free_port()
    replica_port = _free_port()
    while replica_port == primary_port:
        replica_port = _free_port()
    pair = ReplicaPair(directory, primary_port, replica_port, as_user)
    try:
        pair.run(
            "initdb",
            "-D",
            str(directory / "primary"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "--encoding=UTF8",
            "--locale=C",
        )
        pair.pg_ctl("primary", "start", port=pair.primary_port)
        pair.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(pair.primary_port),
            "-U",
            "postgres",
            "-D",
            str(directory / "replica"),
            "--write-recovery-conf",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        )
        pair.pg_ctl("replica", "start", port=pair.replica_port)
        with pair.connect(pair.primary_port) as primary:
            primary.execute("CREATE DATABASE billing")
        pair.wait_replayed()
    except BaseException:
        pair.stop()
        raise
    return pair
