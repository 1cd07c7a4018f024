"""The README's list of webhook event types is the list the API accepts (issue 10,
observation 11): parsed from the README, each registered through the admin API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask.testing import FlaskClient

README = Path(__file__).resolve().parents[2] / "README.md"
ENDPOINTS = "/admin/v1/webhook-endpoints"


def readme_event_types() -> list[str]:
    """The first column of the event-type table under "### Gateway webhooks"."""
    text = README.read_text()
    start = text.index("\n### Gateway webhooks\n")
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(text, start + 2)
    section = text[start : end.start() if end else len(text)]
    return re.findall(r"^\| `([a-z_.]+)` \|", section, re.MULTILINE)


LISTED = readme_event_types()


def test_the_readme_lists_event_types() -> None:
    assert len(LISTED) >= 5, LISTED  # the parse found the table
    assert len(set(LISTED)) == len(LISTED)
    assert {"topup.succeeded", "auto_recharge.failed", "key.state_changed"} <= set(LISTED)


@pytest.mark.parametrize("event_type", LISTED)
def test_every_event_type_the_readme_lists_is_accepted(admin: FlaskClient, event_type: str) -> None:
    response = admin.post(
        ENDPOINTS, json={"url": "https://gw.example.com/hooks", "event_types": [event_type]}
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["event_types"] == [event_type]


def test_the_default_subscription_is_exactly_the_readme_list(admin: FlaskClient) -> None:
    response = admin.post(ENDPOINTS, json={"url": "https://gw.example.com/hooks"})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["event_types"] == sorted(LISTED)
