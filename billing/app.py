"""The application factory: the one place the API and the workers are assembled."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery, Task
from flask import Flask, Response, g
from flask_openapi3 import Info, OpenAPI
from kombu import Queue
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from billing.api import SECURITY_SCHEMES, register
from billing.api.hot import AuthorizeFastPath
from billing.api.ops import instrument
from billing.api.schemas import ErrorOut
from billing.core.db import make_engine, make_read_engine, make_sessionmaker
from billing.core.settings import Settings
from billing.http import inputs
from billing.http.errors import commit_failed
from billing.http.headers import SecurityHeaders
from billing.runtime import WEBHOOKS_QUEUE, WEBHOOKS_TASK, Runtime, current_runtime
from billing.web import init_app as init_web

__all__ = ["MAINTENANCE_QUEUE", "MAINTENANCE_TASKS", "create_app"]


# Beat's long or outward-calling tasks: the hourly reconciliation (minutes on a large ledger) and
# the Stripe calls (network timeouts). On a queue of their own they never occupy a worker that
# settlement is waiting for.
MAINTENANCE_QUEUE = "maintenance"
MAINTENANCE_TASKS = (
    "workers.tasks.reconcile_ledger",
    "workers.tasks.reconcile_stripe",
    "workers.tasks.auto_recharge",
)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app (and its Celery app) from ``settings`` (default: the environment)."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = OpenAPI(
        __name__,
        info=Info(
            title="LLM API billing",
            version="0.1.0",
            description="Prepaid usage metering and billing for an OpenAI-compatible LLM API.",
        ),
        security_schemes=SECURITY_SCHEMES,
        doc_prefix="/docs",
        validation_error_status=400,
        validation_error_model=ErrorOut,
    )
    engine = make_engine(settings.sqlalchemy_url)
    client = None
    if settings.redis_url:
        # Short timeouts: Redis is never worth stalling a request for (DESIGN invariant 6).
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=1, socket_connect_timeout=1
        )
    sessions = make_sessionmaker(engine)
    read_url = settings.sqlalchemy_read_url
    replica = make_sessionmaker(make_read_engine(read_url)) if read_url else None
    runtime = Runtime(settings, engine, sessions, redis=client, replica_sessions=replica)
    app.extensions["billing"] = runtime
    instrument(app)
    inputs.init_app(app, max_content_length=settings.max_content_length)
    app.after_request(_commit_on_success)
    app.teardown_request(_close_session)
    register(app)
    app.wsgi_app = AuthorizeFastPath(app.wsgi_app, runtime)  # type: ignore[method-assign]
    init_web(app, settings)
    # Outermost, so that every answer carries them, the fast path's included.
    app.wsgi_app = SecurityHeaders(app.wsgi_app, settings)  # type: ignore[method-assign]
    runtime.celery = celery_init_app(app)
    return app


def _commit_on_success(response: Response) -> Response:
    # The request owns the transaction: domain code only flushes.
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        try:
            if response.status_code < 400:
                session.commit()
                current_runtime().after_commit(session)
        except SQLAlchemyError as exc:
            return commit_failed(exc)
        finally:
            session.close()
    return response


def _close_session(_exc: BaseException | None) -> None:
    for name in ("db_session", "report_session"):
        session: Session | None = g.pop(name, None)
        if session is not None:
            session.close()


def celery_init_app(app: Flask) -> Celery[Any]:
    """Attach a Celery app whose tasks run inside a Flask app context (the Flask pattern)."""

    # Celery 5.6's Task is generic only in its type stubs (celery-types), not at run time.
    class FlaskTask(Task):  # type: ignore[type-arg]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    settings: Settings = app.extensions["billing"].settings
    celery: Celery[Any] = Celery(app.name, task_cls=FlaskTask)
    celery.conf.update(
        broker_url=settings.broker_url or "memory://",
        result_backend=settings.redis_url,
        # Webhook delivery waits on receivers (up to WEBHOOK_TIMEOUT_SECONDS a request), so it
        # has a queue of its own, consumed by its own workers: a slow receiver never holds up
        # settlement, which stays on the default queue with the other short tasks. Any number
        # of workers may consume each queue. A worker started without --queues consumes all.
        task_default_queue="celery",
        task_queues=[Queue("celery"), Queue(WEBHOOKS_QUEUE), Queue(MAINTENANCE_QUEUE)],
        task_routes={
            WEBHOOKS_TASK: {"queue": WEBHOOKS_QUEUE},
            **{name: {"queue": MAINTENANCE_QUEUE} for name in MAINTENANCE_TASKS},
        },
        # Embedded default: no broker, so tasks run in-process when sent.
        task_always_eager=settings.embedded,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A broker down for long (the default gives up after 100 attempts, about 50 minutes)
        # would stop the worker for good; reconnecting is always right.
        broker_connection_max_retries=None,
        include=["workers.tasks"],
        # The sweep settles whatever a lost trigger left pending and catches the mirror up.
        beat_schedule={
            "sweep": {"task": "workers.tasks.sweep", "schedule": 5.0},
            "reconcile-ledger": {"task": "workers.tasks.reconcile_ledger", "schedule": 3600.0},
            # A hold past its expiry counts (conservatively) until this releases it.
            "expire-holds": {"task": "workers.tasks.expire_holds", "schedule": 10.0},
            # Retries fall due on the schedule of billing.notify.delivery; this sends them (and any
            # delivery whose after-commit trigger was lost).
            "deliver-webhooks": {
                "task": WEBHOOKS_TASK,
                "schedule": 5.0,
                "options": {"queue": WEBHOOKS_QUEUE},
            },
            # Idempotent and cheap, so it runs often rather than once at 00:00 UTC on the 1st,
            # which a beat that is down at that moment would miss.
            "monthly-rollover": {"task": "workers.tasks.monthly_rollover", "schedule": 60.0},
            # Stripe (billing.payments): a payment whose webhook was lost is credited within
            # 10 minutes; balances are checked for auto-recharge every minute.
            "reconcile-stripe": {"task": "workers.tasks.reconcile_stripe", "schedule": 600.0},
            "auto-recharge": {"task": "workers.tasks.auto_recharge", "schedule": 60.0},
        },
    )
    celery.set_default()
    app.extensions["celery"] = celery
    return celery
