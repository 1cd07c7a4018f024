"""Flask's session for the customer page, kept on the server (``billing.accounts.page_sessions``).

The cookie carries only the session's random token. Flask opens a :class:`CookieSession` for
every request without touching the database; the page's own hooks (``billing.web.access``)
load it, store what changed in the request's transaction, and say which token the cookie
should carry. So Flask-WTF's CSRF token, which lives in ``flask.session``, is kept in the row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

if TYPE_CHECKING:
    import datetime as dt

    from billing.accounts.keys import ApiKey
    from billing.accounts.page_sessions import PageSession


class CookieSession(CallbackDict[str, Any], SessionMixin):
    """One request's view of its page session: the row's data once loaded, and its fate."""

    def __init__(self, token: str | None) -> None:
        def changed(_: CallbackDict[str, Any]) -> None:
            self.modified = True

        super().__init__(None, changed)
        self.token = token  # as the browser sent it: maybe stale, maybe not ours
        self.loaded = False  # the page's hooks looked the token up
        self.record: PageSession | None = None
        self.key: ApiKey | None = None  # the key it is signed in with
        self.issued: str | None = None  # a new token for the cookie
        self.ends_at: dt.datetime | None = None  # when a signed-in cookie may be dropped
        self.modified = False

    def resume(self, record: PageSession, key: ApiKey | None) -> None:
        """Take on a stored session's data and key, without counting that as a change."""
        self.record, self.key = record, key
        self.update(record.data)
        self.modified = False

    def forget(self) -> None:
        """Drop the session and its data: the next answer removes the cookie."""
        self.record = self.key = self.issued = self.ends_at = None
        self.clear()
        self.modified = False


class ServerSideSessions(SessionInterface):
    """Sessions whose cookie is an opaque token; the row behind it is the page's to load."""

    def open_session(self, app: Flask, request: Request) -> CookieSession:
        return CookieSession(request.cookies.get(self.get_cookie_name(app)))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, CookieSession)
        if not session.loaded:
            return
        name, path = self.get_cookie_name(app), self.get_cookie_path(app)
        # A new row is written in the request's transaction, which commits only on success:
        # an error answer hands out no token that was never stored.
        if session.issued is not None and response.status_code < 400:
            response.set_cookie(
                name,
                session.issued,
                expires=session.ends_at,
                path=path,
                httponly=self.get_cookie_httponly(app),
                secure=self.get_cookie_secure(app),
                samesite=self.get_cookie_samesite(app),
            )
            response.vary.add("Cookie")
        elif session.token is not None and session.record is None:
            response.delete_cookie(
                name,
                path=path,
                httponly=self.get_cookie_httponly(app),
                secure=self.get_cookie_secure(app),
                samesite=self.get_cookie_samesite(app),
            )
