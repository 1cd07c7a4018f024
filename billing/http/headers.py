"""Security headers on every answer, whoever wrote it: Flask's routes, the authorize fast path
(``billing.api.hot``), static files, and every error (404, 405, 500).

A WSGI middleware around the whole app adds them, so no answer can leave without them:

- ``X-Content-Type-Options: nosniff`` (a browser never guesses a type we did not send),
  ``X-Frame-Options: DENY`` and ``frame-ancestors 'none'`` (nothing of ours is framed).
- The APIs and everything else: ``default-src 'none'``, so a JSON answer opened in a browser
  loads and runs nothing; ``Referrer-Policy: no-referrer``.
- The customer page (``/billing``): scripts, styles and images from this origin only, and no
  inline script or style attribute; Stripe.js from the ``STRIPE_JS_URL`` host alone (its
  frames too; with the real Stripe.js, the hosts Stripe's CSP guide names for it and for
  3-D Secure); connections to this
  origin and the Stripe API (``STRIPE_API_BASE``); forms post here (or to Stripe Checkout in
  checkout mode). Links to other sites carry only our origin.
- The API docs UI (``/docs``): its package ships an inline bootstrap script and style, so
  inline is allowed there, and nothing loads or connects beyond this origin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from billing.core.settings import Settings

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PAGE_PREFIX = "/billing"
DOCS_PREFIX = "/docs"
STRIPE_JS = "https://js.stripe.com"
STRIPE_JS_HOSTS = "https://*.js.stripe.com"
STRIPE_3DS = "https://hooks.stripe.com"
STRIPE_CHECKOUT = "https://checkout.stripe.com"

API_POLICY = "default-src 'none'; frame-ancestors 'none'"
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'"
)


def origin(url: str) -> str:
    """The origin (``scheme://host[:port]``) of ``url``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def page_policy(settings: Settings) -> str:
    """The customer page's Content-Security-Policy under ``settings``."""
    stripe_js = [origin(settings.stripe_js_url)]
    frames = stripe_js
    if stripe_js == [STRIPE_JS]:
        # Stripe's CSP guide: the real Stripe.js also loads from its own subdomains, and
        # 3-D Secure runs in frames of hooks.stripe.com.
        stripe_js = [STRIPE_JS, STRIPE_JS_HOSTS]
        frames = [*stripe_js, STRIPE_3DS]
    forms = ["'self'", STRIPE_CHECKOUT] if settings.topup_mode == "checkout" else ["'self'"]
    directives = {
        "default-src": ["'none'"],
        "script-src": ["'self'", *stripe_js],
        "style-src": ["'self'"],
        "img-src": ["'self'"],
        "connect-src": ["'self'", origin(settings.stripe_api_base)],
        "frame-src": frames,
        "form-action": forms,
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


def _headers(policy: str, referrer: str) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", policy),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", referrer),
    ]


class SecurityHeaders:
    """WSGI middleware adding the headers above to every answer of ``app``."""

    def __init__(self, app: WSGIApplication, settings: Settings) -> None:
        self.app = app
        self.page = _headers(page_policy(settings), "strict-origin-when-cross-origin")
        self.docs = _headers(DOCS_POLICY, "no-referrer")
        self.api = _headers(API_POLICY, "no-referrer")

    def headers_for(self, path: str) -> list[tuple[str, str]]:
        """The security headers of an answer to ``path``."""
        if _under(path, PAGE_PREFIX):
            return self.page
        if _under(path, DOCS_PREFIX):
            return self.docs
        return self.api

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        extra = self.headers_for(environ.get("PATH_INFO", ""))

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            return start_response(status, [*headers, *extra], exc_info)

        return self.app(environ, start)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
