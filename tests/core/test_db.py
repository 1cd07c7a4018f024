"""A failed statement's error, as a logged traceback shows it, carries none of the values it
was given (issue 10, observation 10): neither its parameters nor PostgreSQL's DETAIL."""

from __future__ import annotations

import logging
import traceback

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

EMAIL = "private.person@example.test"
NAME = "Private Person"


@pytest.fixture
def people(db: Session) -> Session:
    """A table of the test's own, in the test's rolled-back transaction, holding one row."""
    db.execute(text("CREATE TEMP TABLE people (name text NOT NULL, email text UNIQUE)"))
    db.execute(text("INSERT INTO people VALUES (:name, :email)"), {"name": NAME, "email": EMAIL})
    return db


@pytest.mark.parametrize(
    ("values", "constraint"),
    [({"name": NAME, "email": EMAIL}, "people_email_key"), ({"name": None, "email": EMAIL}, None)],
    ids=["unique violation", "not-null violation"],
)
def test_a_failed_insert_hides_the_values_it_was_given(
    people: Session,
    caplog: pytest.LogCaptureFixture,
    values: dict[str, str | None],
    constraint: str | None,
) -> None:
    with pytest.raises(IntegrityError) as failure, people.begin_nested():
        people.execute(text("INSERT INTO people VALUES (:name, :email)"), values)
    with caplog.at_level(logging.ERROR):
        logging.getLogger("billing.test").error("insert failed", exc_info=failure.value)

    shown = "".join(traceback.format_exception(failure.value)) + caplog.text
    assert EMAIL not in shown and NAME not in shown
    assert "[SQL parameters hidden due to hide_parameters=True]" in shown
    assert "DETAIL:  [hidden: it repeats row values]" in shown
    assert "INSERT INTO people" in shown  # the statement itself is still there to debug
    # What the code may act on is unchanged: the type, the constraint, the full diagnostics.
    diagnostics = failure.value.orig.diag  # type: ignore[union-attr]
    assert diagnostics.constraint_name == constraint
    assert EMAIL in (diagnostics.message_detail or "")
