"""Faults the reliability tests inject: a TCP proxy that can cut PostgreSQL off, and a Redis
server of a test's own that it can restart. Fixtures here are shared by the whole suite
(``tests/conftest.py`` names this module a plugin).
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.engine import make_url

from tests.conftest import TEST_DATABASE_URL
from tests.reliability.conftest import free_port, stop, wait_until

# A TCP proxy that can cut PostgreSQL off


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``stop`` closes the listener and every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._running = threading.Event()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._running.set()
        self._spawn(self._accept_loop, listener)

    def stop(self) -> None:
        self._running.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=5)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
            with self._lock:
                if not self._running.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            self._spawn(self._pump, client, upstream)

    def _pump(self, left: socket.socket, right: socket.socket) -> None:
        peers = {left: right, right: left}
        try:
            while self._running.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._sockets -= {left, right}
            for sock in (left, right):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A running proxy to the test PostgreSQL, stopped at teardown."""
    url = make_url(TEST_DATABASE_URL)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    yield proxy
    proxy.stop()


# A Redis server of a test's own, to restart


@dataclass
class RedisServer:
    """A ``redis-server`` without persistence on a port of its own: a restart empties it."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it, and return once it answers PING."""
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, f"redis-server on port {self.port} to answer")
        client.close()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, as a crash or a restart without persistence loses everything."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port, socket_timeout=5).shutdown(nosave=True)
        stop(self.process)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running Redis server of the test's own, stopped at teardown."""
    server = RedisServer(free_port(), tmp_path / "redis-server.log")
    server.start()
    yield server
    server.stop()
