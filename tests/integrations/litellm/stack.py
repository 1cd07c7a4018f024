"""A real LiteLLM proxy process, configured as a reseller would: the seed's models routed to an
OpenAI-compatible upstream, with or without the billing integration. Used by the tests and by
``bench/litellm.py`` (so it imports nothing of pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

BIN = Path(sys.executable).parent
MODELS = ("doubao-seed-2-0-mini", "doubao-seed-2-0-lite", "doubao-seed-2-0-code")
MASTER_KEY = "sk-litellm-master-key"  # a local proxy's admin key, not a secret


def litellm_config(upstream_base: str, *, billing: bool) -> dict[str, Any]:
    """The proxy's config.yaml: every seed model on ``upstream_base``, no retries (a failure
    is seen at once), and the integration's hooks when ``billing``."""
    config: dict[str, Any] = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream_base,
                    "api_key": "upstream-key",
                    "max_retries": 0,
                },
            }
            for model in MODELS
        ],
        "litellm_settings": {"num_retries": 0},
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": MASTER_KEY},
    }
    if billing:
        config["litellm_settings"]["callbacks"] = "billing_litellm.proxy.usage_logger"
        config["general_settings"]["custom_auth"] = "billing_litellm.proxy.custom_auth"
    return config


def proxy_env(**billing: str) -> dict[str, str]:
    """The proxy's environment: ours, with ``BILLING_*`` settings added, and without
    ``DATABASE_URL`` (LiteLLM would take it for its own database)."""
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    # The model price map ships with litellm: no fetch from the network at startup.
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["LITELLM_LOG"] = "WARNING"
    return env | {f"BILLING_{name.upper()}": value for name, value in billing.items()}


@dataclass
class Proxy:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        """Return once ``/health/liveliness`` answers; raise RuntimeError (with the log) if the
        process exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"litellm exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if httpx.get(f"{self.base}/health/liveliness", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"litellm did not answer within {timeout:.0f}s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def proxy_command(config: dict[str, Any], *, port: int, workdir: Path, name: str) -> list[str]:
    """The command line of ``litellm`` serving ``config`` (written to ``workdir``) on
    127.0.0.1:``port``, with one worker."""
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [str(BIN / "litellm"), "--config", str(config_path), "--host", "127.0.0.1"]
    return [*command, "--port", str(port)]


def start_proxy(
    config: dict[str, Any], *, port: int, env: dict[str, str], workdir: Path, name: str = "litellm"
) -> Proxy:
    """Start ``litellm`` (see ``proxy_command``), not waiting for it to answer."""
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            proxy_command(config, port=port, workdir=workdir, name=name),
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proxy(f"http://127.0.0.1:{port}", process, log)
