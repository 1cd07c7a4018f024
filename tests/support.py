"""Assertions shared by the HTTP tests."""

from __future__ import annotations

from typing import Any

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """``response`` is an OpenAI-shaped error with this status and code (naming ``param``)."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
        if status == 400:  # a validation error names the field it refuses
            assert param in body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]
