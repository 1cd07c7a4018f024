"""Gunicorn config for ``--profile`` runs (``-c python:bench.gunicorn_profile``): each worker
times its statements (``bench.sqltiming``) and writes them out when it exits."""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    from bench import sqltiming

    sqltiming.install()


def worker_exit(server: Any, worker: Any) -> None:
    from bench import sqltiming

    sqltiming.dump()
