"""The customer page at ``/billing``: sign in with an API key, see the balance, the keys, the
usage of the last 30 days and recent ledger entries, and top up with Stripe.

Views parse the form, call one domain function and render a template. Domain errors are shown
on the page with their HTTP status, except on the endpoints the page's scripts call
(``JSON_ENDPOINTS``): those answer in the API's error shape (``billing.http.errors``).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from billing.accounts import keys
from billing.accounts.accounts import Account, get_account
from billing.accounts.key_states import KeyState
from billing.core.errors import BillingError, InvalidRequest
from billing.core.money import MoneyFormatError, Nanos, format_dollars, parse_usd
from billing.http import errors
from billing.http.context import now, report_session, session, settings
from billing.ledger import ledger
from billing.payments import spend, top_ups
from billing.payments.stripe_api import StripeNotConfigured
from billing.runtime import current_runtime
from billing.web import access
from billing.web.chart import UsageChart, legend_colour, usage_chart

log = logging.getLogger(__name__)

web = Blueprint(
    "web",
    __name__,
    url_prefix="/billing",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
# The session first, then its CSRF token on every POST; nothing outside /billing is checked.
web.before_request(access.load_session)
web.before_request(access.check_csrf)
web.after_request(access.store_session)

CHART_DAYS = 30
LEDGER_ROWS = 20
STATE_LABELS = {
    KeyState.ACTIVE: "Active",
    KeyState.INSUFFICIENT_BALANCE: "Blocked: no balance left (402)",
    KeyState.MONTHLY_QUOTA_EXCEEDED: "Blocked: monthly spend cap reached (429)",
    KeyState.SUSPENDED: "Suspended: content policy violations (451)",
    KeyState.EXPIRED: "Expired (401)",
    KeyState.DISABLED: "Disabled (401)",
    KeyState.REVOKED: "Revoked (401)",
}
# Called by the page's scripts, which show ``error.message`` of a failure beside the form.
JSON_ENDPOINTS = frozenset({"web.pay_with_card", "web.balance"})


web.add_app_template_filter(format_dollars, "usd")


@web.context_processor
def _page_globals() -> dict[str, Any]:
    # csrf_token() itself is Flask-WTF's template global.
    return {"csrf_field": access.CSRF_FIELD}


@web.after_request
def _no_store(response: Response) -> Response:
    # Balances and keys are private and change; a shared cache or the back button must not
    # show someone an old or another's page.
    if not request.path.startswith("/billing/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def amounts(account: Account) -> dict[str, Nanos]:
    """Balance, held and available amounts of ``account``: the holds are those in PostgreSQL
    and, when Redis is reachable, those placed through it (``Runtime.funds``)."""
    funds = current_runtime().funds(account)
    return {
        "balance": funds.balance_nanos,
        "held": funds.held_nanos,
        "available": funds.available_nanos,
    }


@web.get("")
@web.get("/")
def page() -> ResponseReturnValue:
    """The account page when signed in, else the sign-in form."""
    signed = access.signed_in()
    if signed is None:
        return render_template("billing/sign_in.html")
    return _account_page(signed)


@web.post("/sign-in")
def sign_in() -> ResponseReturnValue:
    """Sign in with an API key; a bad key shows the form again with the reason."""
    secret = request.form.get("api_key", "")
    if not secret.strip():
        return render_template("billing/sign_in.html", error="Enter your API key."), 400
    try:
        access.sign_in(session(), secret, settings=settings(), now=now())
    except keys.InvalidApiKey:
        return render_template(
            "billing/sign_in.html",
            error="That API key is not valid. Check it and try again.",
        ), 401
    return redirect(url_for("web.page"), code=303)


@web.post("/sign-out")
def sign_out() -> ResponseReturnValue:
    """End the session; a copy of its cookie signs nothing in any more."""
    access.sign_out(session())
    return redirect(url_for("web.page"), code=303)


@web.post("/top-up")
def top_up() -> ResponseReturnValue:
    """Start a top-up: the card form (PaymentIntent mode) or a redirect to Stripe Checkout."""
    signed = access.signed_in()
    if signed is None:
        return redirect(url_for("web.page"), code=303)
    amount = _amount_from_form()
    if settings().topup_mode == "payment_intent" and not settings().stripe_publishable_key:
        # The card form cannot work without it: refuse before Stripe is asked for anything.
        raise StripeNotConfigured("Payments are not configured: STRIPE_PUBLISHABLE_KEY is not set.")
    started = top_ups.start_top_up(
        session(), account_id=signed.account_id, amount_nanos=amount, settings=settings(), now=now()
    )
    if started.mode == "checkout":
        assert started.checkout_url is not None
        return redirect(started.checkout_url, code=303)
    account = get_account(session(), signed.account_id)
    return render_template(
        "billing/pay.html",
        amount=amount,
        started=started,
        stripe_js_url=settings().stripe_js_url,
        amounts=amounts(account),
    )


@web.post("/top-up/<payment_id>/card")
def pay_with_card(payment_id: str) -> ResponseReturnValue:
    """Pay a started top-up with the card token Stripe.js made on the pay page; answers the
    PaymentIntent's status (``requires_action``: the page lets Stripe.js authenticate it)."""
    signed = access.require_sign_in()
    token = request.form.get("token", "")
    if not token.startswith("tok_"):
        raise InvalidRequest("token must be a card token made by Stripe.js.", param="token")
    intent = top_ups.pay_top_up(
        session(),
        account_id=signed.account_id,
        payment_id=payment_id,
        token=token,
        settings=settings(),
        now=now(),
    )
    return jsonify({"status": intent.get("status")})


@web.get("/balance")
def balance() -> ResponseReturnValue:
    """The signed-in account's amounts and key states as JSON; with ``?payment=<id>`` also that
    payment's status (the pay page polls it until the webhook has credited the payment)."""
    signed = access.require_sign_in()
    account = get_account(session(), signed.account_id)
    moment = now()
    body: dict[str, Any] = {
        **{f"{name}_usd": format_dollars(value) for name, value in amounts(account).items()},
        "keys": [
            {"masked_key": key.masked, "state": key.state_at(moment).value}
            for key in keys.list_keys(session(), account.id)
        ],
    }
    payment_id = request.args.get("payment")
    if payment_id:
        payment = top_ups.get_payment(session(), account_id=account.id, payment_id=payment_id)
        body["payment"] = {
            "id": payment.id,
            "status": payment.status,
            "failure_message": payment.failure_message,
        }
    return jsonify(body)


def _amount_from_form() -> Nanos:
    """The top-up amount chosen: a preset, or the custom amount; raises InvalidRequest if it is
    not an amount (its limits are the domain's: ``billing.payments.top_ups``)."""
    choice = request.form.get("amount", "")
    text = request.form.get("custom_amount", "").strip() if choice == "custom" else choice
    text = text.removeprefix("$").strip()
    if not text:
        raise InvalidRequest("Choose an amount, or enter one.", param="amount")
    try:
        amount = parse_usd(text)
    except MoneyFormatError:
        raise InvalidRequest(
            f"{text!r} is not an amount in dollars, such as 20 or 20.50.", param="amount"
        ) from None
    return amount


def _usage_chart(account_id: str, *, today: dt.date) -> UsageChart | None:
    """The account's usage of the last CHART_DAYS days up to ``today``; None when the replica
    it is read from is out of reach (the rest of the page reads the primary and still shows).

    The chart may lag on a replica; the amounts, keys and ledger beside it read the primary, so
    a payment just made shows at once.
    """
    first_day = today - dt.timedelta(days=CHART_DAYS - 1)
    reader = report_session()
    try:
        costs = spend.daily_costs(
            reader, account_id, start=first_day, end=today + dt.timedelta(days=1)
        )
    except OperationalError:
        if reader is session():  # the primary itself: nothing on the page can be shown
            raise
        log.warning("replica unavailable: the usage chart is left out", exc_info=True)
        return None
    return usage_chart(costs, first_day=first_day, days=CHART_DAYS)


def _account_page(signed: access.SignIn, *, error: str | None = None) -> str:
    db, moment = session(), now()
    account = get_account(db, signed.account_id)
    payment = None
    if payment_id := request.args.get("payment"):  # back from paying (card form or Checkout)
        try:
            payment = top_ups.get_payment(db, account_id=account.id, payment_id=payment_id)
        except top_ups.PaymentNotFound:
            payment = None
    chart = _usage_chart(account.id, today=moment.astimezone(dt.UTC).date())
    account_keys = [(key, key.state_at(moment)) for key in keys.list_keys(db, account.id)]
    return render_template(
        "billing/account.html",
        account=account,
        amounts=amounts(account),
        keys=account_keys,
        state_labels=STATE_LABELS,
        chart=chart,
        legend=[]
        if chart is None
        else [(model, legend_colour(chart.table.models, model)) for model in chart.table.models],
        entries=ledger.entries(db, account.id, before=None, limit=LEDGER_ROWS),
        presets=settings().topup_presets,
        topup_min=settings().topup_min,
        topup_max=settings().topup_max,
        signed_key=signed.key,
        error=error,
        payment=payment,
    )


@web.errorhandler(BillingError)
def _billing_error(exc: BillingError) -> ResponseReturnValue:
    if request.endpoint in JSON_ENDPOINTS:
        return errors.billing_error_response(exc)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    if isinstance(exc, access.CsrfRefused | access.TooManySignIns):
        return render_template("billing/error.html", message=exc.message), exc.status, headers
    signed = access.signed_in()
    if signed is None:
        return render_template("billing/sign_in.html", error=exc.message), exc.status, headers
    return _account_page(signed, error=exc.message), exc.status, headers


@web.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return render_template("billing/error.html", message=exc.description or exc.name), status
