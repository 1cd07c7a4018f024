"""A pytest plugin: the logs of a whole test run hold no secret and no personal data (DESIGN
invariant 7; issue 10, observation 10).

What is searched: every log record of the test process from the start of the session (the root
logger is put at INFO, the level the service logs at by default, if it was above), and, at the
end, every ``*.log`` file under the run's base temporary directory: the output of the API
servers, workers, Redis and localstripe that fixtures start.

What is looked for: API keys (``sk-``), admin and gateway tokens (``adm_``, ``gw_``), webhook
signing secrets (``whsec_``), Stripe secret keys, the fixed secrets the tests configure
(``watch``), and email addresses (a Celery node name, ``name@<this host>``, is not one).

A hit fails the run (exit status 1) with a report naming where each was found, the secret
shown only by its first characters. So that the check cannot pass by being blind, the end of
the session logs a planted key through the ``billing`` logger at INFO, and the run fails unless
the check finds it (the capture was detached, or the level raised, or a pattern broke).
``tests/test_log_secrets.py`` runs it on sub-runs that leak on purpose.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an API key", re.compile(r"sk-[0-9A-Za-z]{40,}")),
    ("an admin token", re.compile(r"adm_[0-9A-Za-z]{40,}")),
    ("a gateway token", re.compile(r"gw_[0-9A-Za-z]{40,}")),
    ("a webhook signing secret", re.compile(r"whsec_[0-9A-Za-z+/=_]{8,}")),
    ("a Stripe secret key", re.compile(r"[sr]k_(?:test|live)_[0-9A-Za-z_]{4,}")),
    (
        "an email address",
        re.compile(
            r"(?<![\w.%+-])[\w.%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})(?![\w-])"
        ),
    ),
)
_watched: set[str] = set()
_CANARY = "sk-" + "LogSecretsCanary" * 3
_BASETEMP = pytest.StashKey[Path]()
_CHECK = "log-secrets-check"


def watch(*values: str) -> None:
    """Look for these exact values too (fixed tokens and secrets the tests configure)."""
    _watched.update(value for value in values if value)


@dataclass(frozen=True)
class Hit:
    kind: str
    value: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.value[:7]}...) in {self.where}"


def find(text: str, where: str) -> list[Hit]:
    """The secrets in ``text``."""
    hits = []
    for kind, pattern in PATTERNS:
        for match in pattern.finditer(text):
            if kind == "an email address" and match.group(1).lower() in _THIS_HOST:
                continue
            hits.append(Hit(kind, match.group(0), where))
    hits.extend(Hit("a configured secret", value, where) for value in _watched if value in text)
    return hits


_THIS_HOST = {name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name}


class _Capture(logging.Handler):
    """Searches each record as it is emitted, traceback included; keeps only the hits."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.hits: list[Hit] = []
        self.test = "(outside any test)"
        self._hits_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            found = find(self.format(record), f"the log of {self.test} ({record.name})")
        except Exception:
            self.handleError(record)
            return
        with self._hits_lock:
            self.hits.extend(found)


class LogSecretsCheck:
    """The session's capture, and the check at its end."""

    def __init__(self) -> None:
        self.capture = _Capture()
        self.previous_level: int | None = None

    def start(self) -> None:
        root = logging.getLogger()
        root.addHandler(self.capture)
        if root.getEffectiveLevel() > logging.INFO:
            self.previous_level = root.level
            root.setLevel(logging.INFO)

    def stop(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.capture)
        if self.previous_level is not None:
            root.setLevel(self.previous_level)
            self.previous_level = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.capture.test = nodeid

    @pytest.hookimpl(trylast=True)  # after the session's fixtures and their processes stopped
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.capture.test = "the end of the session"
        logging.getLogger("billing").info("log check canary %s", _CANARY)
        self.stop()
        hits = [hit for hit in self.capture.hits if hit.value != _CANARY]
        problems = [f"Leaked: {hit}" for hit in hits]
        if len(hits) == len(self.capture.hits):
            problems.append(
                "The log check saw nothing of a record logged at INFO through the billing"
                " logger: its handler was detached or the root level raised during the run, so"
                " the logs of the run were not all checked."
            )
        basetemp = session.config.stash.get(_BASETEMP, None)
        for path in sorted(basetemp.rglob("*.log")) if basetemp else []:
            with path.open(errors="replace") as lines:
                for number, line in enumerate(lines, 1):
                    problems.extend(f"Leaked: {hit}" for hit in find(line, f"{path}:{number}"))
        if not problems:
            return
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "secrets or personal data in the logs of this run", red=True)
            for problem in problems[:50]:
                reporter.write_line(problem)
            if len(problems) > 50:
                reporter.write_line(f"... and {len(problems) - 50} more")


@pytest.fixture(autouse=True, scope="session")
def _log_secrets_basetemp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Remember where this run's temporary files, and so its processes' logs, are."""
    request.config.stash[_BASETEMP] = tmp_path_factory.getbasetemp()


def pytest_configure(config: pytest.Config) -> None:
    check = LogSecretsCheck()
    config.pluginmanager.register(check, _CHECK)
    check.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    check = config.pluginmanager.get_plugin(_CHECK)
    if isinstance(check, LogSecretsCheck):
        check.stop()
        config.pluginmanager.unregister(check)
