"""The Celery app, built from the same factory as the API: ``celery -A workers.app worker``."""

from celery import Celery

from billing.app import create_app

flask_app = create_app()
celery: Celery = flask_app.extensions["celery"]
