"""The worker app for ``--profile`` runs (``celery -A bench.celery_profiled worker``): the
service's own ``workers.app``, with statement timing (``bench.sqltiming``) installed first."""

from typing import Any

from celery.signals import worker_shutdown

from bench import sqltiming

sqltiming.install()

from workers.app import celery, flask_app  # noqa: E402 - timing must be installed first

__all__ = ["celery", "flask_app"]


@worker_shutdown.connect
def _dump(**_: Any) -> None:
    sqltiming.dump()
