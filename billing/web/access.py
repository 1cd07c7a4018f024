"""Who is signed in to the customer page, and the guards on its forms.

- The page signs in with an API key. The key itself is never stored. The session lives on the
  server (``billing.accounts.page_sessions``); its cookie (HttpOnly, SameSite=Lax, Secure unless
  configured otherwise, limited to ``/billing``) carries only a random token. Signing in starts
  a new session (the token from before is dead), signing out deletes it, and it ends by itself
  when idle or old, or when its key is revoked, disabled, expired or rotated.
- Every form carries a CSRF token (Flask-WTF's, signed, its secret kept in the session); a POST
  to the page without the right one is refused with 400 and changes nothing. Only the page is
  checked: the APIs authenticate each request with a bearer token or a signature, not a cookie.
- Sign-in attempts are rate-limited per client IP with the `limits` library: in memory on the
  embedded default, in Redis when ``REDIS_URL`` is set (so every API process shares the window).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request, session
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf  # type: ignore[import-untyped]
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session

from billing.accounts import keys, page_sessions
from billing.core.errors import BillingError, InvalidRequest
from billing.core.settings import Settings
from billing.http import context
from billing.web.page_session import CookieSession, ServerSideSessions

log = logging.getLogger(__name__)

COOKIE_NAME = "billing_session"
COOKIE_PATH = "/billing"
CSRF_FIELD = "csrf_token"

csrf = CSRFProtect()


class CsrfRefused(InvalidRequest):
    """A form was posted without this session's CSRF token."""

    code = "csrf_failed"


class NotSignedIn(BillingError):
    """The page's session is not signed in, or its key may no longer sign in."""

    status = 401
    code = "not_signed_in"


class TooManySignIns(BillingError):
    """Too many sign-in attempts from one client IP within the window."""

    status = 429
    code = "rate_limit_exceeded"
    type = "requests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SignIn:
    """The signed-in key and its account."""

    key: keys.ApiKey
    account_id: str


def init_app(app: Flask, settings: Settings) -> None:
    """Configure the page's sessions, their cookie and the sign-in limiter of ``app``."""
    # The key that signs CSRF tokens: derived from the server secret, so that a token can
    # never be confused with an API key hash.
    app.secret_key = hmac.new(settings.hmac_key, b"billing.web session", hashlib.sha256).digest()
    app.session_interface = ServerSideSessions()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=COOKIE_PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        # The page checks its own posts (check_csrf); the APIs are never checked.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_FIELD_NAME=CSRF_FIELD,
        # A token is good for as long as its session, and needs no Referer header on HTTPS.
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=False,
    )
    app.extensions["billing_web_lifetimes"] = page_sessions.Lifetimes(
        idle=dt.timedelta(minutes=settings.billing_session_idle_minutes),
        absolute=dt.timedelta(hours=settings.billing_session_hours),
    )
    csrf.init_app(app)
    storage: Storage
    if settings.redis_url:
        storage = RedisStorage(
            settings.redis_url,
            key_prefix="billing-web",
            wrap_exceptions=True,
            socket_timeout=1,
            socket_connect_timeout=1,
        )
    else:
        storage = MemoryStorage()
    app.extensions["billing_web_limiter"] = SignInLimiter(
        storage, parse(settings.billing_sign_in_rate_limit)
    )


class SignInLimiter:
    """Counts sign-in attempts per client IP in a moving window."""

    def __init__(self, storage: Storage, limit: RateLimitItem) -> None:
        self.storage = storage
        self.limit = limit
        self.strategy = MovingWindowRateLimiter(storage)

    def hit(self, client: str) -> None:
        """Count an attempt from ``client``; raises TooManySignIns once over the limit."""
        try:
            allowed = self.strategy.hit(self.limit, "sign-in", client)
            if allowed:
                return
            reset = self.strategy.get_window_stats(self.limit, "sign-in", client).reset_time
        except Exception:  # limits wraps every storage failure in its own StorageError
            # Redis may be gone (DESIGN section 2). A key is 48 random characters, so an
            # unlimited attempt rate is no real risk, while refusing every sign-in would stop
            # customers from paying: let the attempt through, loudly.
            log.warning("sign-in rate limit unavailable; attempt allowed", exc_info=True)
            return
        raise TooManySignIns(
            "Too many sign-in attempts from your address. Wait a minute, then try again.",
            retry_after=max(int(reset - time.time()) + 1, 1),
        )

    def reset(self) -> None:
        """Forget every window (tests)."""
        self.storage.reset()


def limiter() -> SignInLimiter:
    """The app's sign-in limiter."""
    return current_app.extensions["billing_web_limiter"]  # type: ignore[no-any-return]


def check_csrf() -> None:
    """Raise CsrfRefused unless a POST carries this session's CSRF token: the form field
    ``csrf_token``, or the header ``X-CSRFToken`` (Flask-WTF's ``CSRFProtect``)."""
    try:
        csrf.protect()
    except CSRFError as refused:
        raise CsrfRefused(
            "This form has expired or did not come from this page. Reload the page and try again.",
            param=CSRF_FIELD,
        ) from refused


def _new_csrf_token() -> None:
    """Give the (just cleared) session a new CSRF token."""
    g.pop(CSRF_FIELD, None)  # generate_csrf keeps the request's token in g: not the old one
    generate_csrf()


def _page() -> CookieSession:
    page = session._get_current_object()  # type: ignore[attr-defined]
    assert isinstance(page, CookieSession), "init_app installs ServerSideSessions"
    return page


def _lifetimes() -> page_sessions.Lifetimes:
    return current_app.extensions["billing_web_lifetimes"]  # type: ignore[no-any-return]


def load_session() -> None:
    """Resume the session the cookie names, if it is still alive (a before-request hook).

    Its data (the CSRF token) and its sign-in are then in ``flask.session`` and
    :func:`signed_in`; an ended session is deleted and the request goes on without one.
    """
    page = _page()
    if page.loaded or request.endpoint == "web.static":
        return
    found = None
    if page.token is not None:
        found = page_sessions.resume(
            context.session(),
            page.token,
            hmac_key=context.settings().hmac_key,
            lifetimes=_lifetimes(),
            now=context.now(),
        )
    # Only now: a lookup that failed (the database unreachable) must not drop the cookie.
    page.loaded = True
    if found is not None:
        page.resume(*found)


def store_session(response: Response) -> Response:
    """Store what the request changed in its session, in the request's transaction (an
    after-request hook): a first session for a visitor who now has something to keep."""
    page = _page()
    if not page.loaded or not page.modified:
        return response
    db, data = context.session(), dict(page)
    if page.record is not None:
        page_sessions.save_data(db, page.record, data)
    elif data:
        page.record, page.issued = page_sessions.start(
            db,
            key=None,
            data=data,
            hmac_key=context.settings().hmac_key,
            lifetimes=_lifetimes(),
            now=context.now(),
        )
    page.modified = False
    return response


def sign_in(db: Session, secret: str, *, settings: Settings, now: dt.datetime) -> SignIn:
    """Sign in with the API key ``secret``, in a new session (the old one ends).

    Raises TooManySignIns over the per-IP limit, and InvalidApiKey for a key that is unknown,
    revoked, disabled or expired (a key at 402, 429 or 451 may sign in: it may want to pay).
    """
    limiter().hit(request.remote_addr or "unknown")
    key = keys.find_key(db, secret.strip(), hmac_key=settings.hmac_key)
    if not key.usable(now):
        raise keys.InvalidApiKey("Incorrect API key provided.", param="api_key")
    page = _page()
    if page.record is not None:
        page_sessions.end(db, page.record)
    page.forget()
    lifetimes = _lifetimes()
    record, token = page_sessions.start(
        db, key=key, data={}, hmac_key=settings.hmac_key, lifetimes=lifetimes, now=now
    )
    page.resume(record, key)
    page.issued, page.ends_at = token, lifetimes.ends_at(record)
    _new_csrf_token()
    return SignIn(key=key, account_id=key.account_id)


def signed_in() -> SignIn | None:
    """The session's sign-in, checked when the request began (:func:`load_session`)."""
    key = _page().key
    return None if key is None else SignIn(key=key, account_id=key.account_id)


def require_sign_in() -> SignIn:
    """The session's sign-in, as :func:`signed_in`; raises NotSignedIn if there is none."""
    signed = signed_in()
    if signed is None:
        raise NotSignedIn("Not signed in.")
    return signed


def sign_out(db: Session) -> None:
    """End the session: its token signs nothing in any more, and the cookie is removed."""
    page = _page()
    if page.record is not None:
        page_sessions.end(db, page.record)
    page.forget()
    g.pop(CSRF_FIELD, None)
