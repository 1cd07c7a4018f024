"""The customer page at ``/billing`` (server-rendered HTML; see ``billing.web.views``)."""

from __future__ import annotations

from flask import Flask

from billing.core.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    """Serve the customer page from ``app``: its session cookie, sign-in limiter and routes."""
    from billing.web import access
    from billing.web.views import web

    access.init_app(app, settings)
    app.register_blueprint(web)
