"""Model quotes remembered per process (``authorize.Quotes``): known names for their TTL,
unknown names never."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.enforcement.authorize import NeedsDatabase, Quotes

LITE = "doubao-seed-2-0-lite"


def test_a_known_name_is_remembered_for_its_ttl(db: Session) -> None:
    quotes = Quotes(ttl=0.5)
    quote = quotes.get(lambda: db, LITE, now=utcnow())
    assert quote is not None and quote.model_id == LITE
    assert quotes.get(None, LITE, now=utcnow()) == quote  # from memory, no session needed
    time.sleep(0.6)
    with pytest.raises(NeedsDatabase):
        quotes.get(None, LITE, now=utcnow())


def test_an_unknown_name_is_not_remembered(db: Session) -> None:
    quotes = Quotes()
    assert quotes.get(lambda: db, "no-such-model", now=utcnow()) is None
    with pytest.raises(NeedsDatabase):
        quotes.get(None, "no-such-model", now=utcnow())
