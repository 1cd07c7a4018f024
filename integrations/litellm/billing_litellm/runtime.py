"""The integration of one LiteLLM process: settings, client, key-state cache, usage reporter.

Built once per process from the environment, on first use (LiteLLM imports the hooks while it
loads its config, so a missing setting stops the proxy at startup, naming the variable).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from billing_litellm.client import GatewayClient
from billing_litellm.config import Config
from billing_litellm.key_states import KeyStateCache, KeyStatePoller, WebhookReceiver
from billing_litellm.reporter import UsageReporter


@dataclass(frozen=True)
class Runtime:
    config: Config
    client: GatewayClient
    cache: KeyStateCache
    reporter: UsageReporter
    receiver: WebhookReceiver | None
    poller: KeyStatePoller | None


def build(config: Config) -> Runtime:
    """A runtime for ``config``; starts the key-state poller when it has an interval."""
    client = GatewayClient(config)
    cache = KeyStateCache()
    reporter = UsageReporter(
        client,
        flush_interval=config.flush_interval_seconds,
        batch_max=config.batch_max,
        retry_max=config.retry_max_seconds,
    )
    receiver = WebhookReceiver(config.webhook_secret, cache) if config.webhook_secret else None
    poller = None
    if config.key_states_poll_seconds > 0:
        poller = KeyStatePoller(client.key_states, cache, interval=config.key_states_poll_seconds)
        poller.start()
    return Runtime(config, client, cache, reporter, receiver, poller)


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's runtime, built from the environment the first time; raises ConfigError."""
    global _runtime  # one integration per process, shared by LiteLLM's hooks
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = build(Config.from_env())
    return _runtime
