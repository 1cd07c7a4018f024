"""The log check of ``tests/log_secrets.py`` fails a run whose logs leak, and only such a run:
each test here runs pytest on a small test file in a subprocess (pytester), with the check."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = "secrets or personal data in the logs of this run"

Run = Callable[[str], pytest.RunResult]


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run ``source`` as a test file under the log check, in a pytest process of its own."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))

    def run(source: str) -> pytest.RunResult:
        pytester.makepyfile(test_sub=source)
        try:
            return pytester.runpytest_subprocess(
                "-p", "tests.log_secrets", "-p", "no:cacheprovider"
            )
        finally:
            # The planted leaks must not reach the logs this run checks at its own end.
            for made in pytester.path.glob("runpytest-*"):
                if made.is_symlink():  # runpytest-current
                    made.unlink()
                else:
                    shutil.rmtree(made)

    return run


def test_a_clean_run_passes(run: Run) -> None:
    result = run(
        """
import logging

def test_clean():
    logging.getLogger("billing.ledger").info("credited %s to %s", "10.00", "acct_123")
"""
    )
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert REPORT not in result.stdout.str()


def test_each_leak_fails_the_run_and_is_named_without_being_shown(run: Run) -> None:
    key = "sk-" + "Ab1" * 16
    result = run(
        f"""
import logging
from tests.log_secrets import watch

def test_a_key():
    logging.getLogger("billing.accounts.keys").warning("issued %s", "{key}")

def test_a_token_in_a_traceback():
    try:
        raise ValueError("bad token adm_" + "x" * 48)
    except ValueError:
        logging.getLogger("billing.http.errors").exception("request failed")

def test_an_email_at_info():
    # INFO is below the root logger's default level: the check lowers it to see these.
    logging.getLogger("billing.accounts").info("created account for %s", "jane@example.test")

def test_a_log_file_of_a_process(tmp_path):
    (tmp_path / "worker.log").write_text("started\\nsigned with whsec_" + "Q" * 43 + "=\\n")

def test_a_watched_value():
    watch("fixed-bootstrap-token")
    logging.getLogger("billing.cli").warning("bootstrap token fixed-bootstrap-token accepted")
"""
    )
    result.assert_outcomes(passed=5)  # every test passed; the run did not
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            f"*{REPORT}*",
            "Leaked: an API key (sk-Ab1A...) in the log of test_sub.py::test_a_key"
            " (billing.accounts.keys)",
            "Leaked: an admin token (adm_xxx...) in the log of"
            " test_sub.py::test_a_token_in_a_traceback (billing.http.errors)",
            "Leaked: an email address (jane@ex...) in the log of"
            " test_sub.py::test_an_email_at_info (billing.accounts)",
            "Leaked: a configured secret (fixed-b...) in the log of"
            " test_sub.py::test_a_watched_value (billing.cli)",
            "Leaked: a webhook signing secret (whsec_Q...) in *worker.log:2",
        ]
    )
    assert key not in result.stdout.str()


def test_a_capture_detached_during_the_run_fails_it(run: Run) -> None:
    result = run(
        """
import logging

def test_detach():
    logging.getLogger().handlers.clear()
"""
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*saw nothing of a record logged at INFO*"])
