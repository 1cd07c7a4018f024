"""The exception LiteLLM renders for a refusal, keeping the billing ``error.code``.

LiteLLM answers a ``ProxyException`` with ``{"error": exc.to_dict()}`` at HTTP ``exc.code``, and
its ``to_dict`` puts that status in ``code`` too: a client would read ``"code": "402"`` instead of
``insufficient_balance``. This subclass renders the billing code (LiteLLM keeps it as
``openai_code``), so OpenAI SDKs see the same ``error.code`` the billing service sent.
"""

from __future__ import annotations

from typing import Any

from litellm.proxy._types import ProxyException

from billing_litellm.refusals import Refusal


class BillingRefusal(ProxyException):
    """A refusal, answered at its HTTP status with its billing ``code`` and headers."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(
            message=refusal.message,
            type=refusal.type,
            param=refusal.param,
            code=refusal.status,
            headers=dict(refusal.headers),
            openai_code=refusal.code,
        )

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = super().to_dict()
        error["code"] = self.openai_code
        return error
