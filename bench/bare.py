"""The bare endpoint the authorize benchmark compares with: Flask parsing a JSON body and
answering a small JSON document, nothing else (served by the same gunicorn configuration)."""

from __future__ import annotations

from typing import Any

from flask import Flask, request

app = Flask(__name__)


@app.post("/gateway/v1/authorize")
def authorize() -> dict[str, Any]:
    body = request.get_json()
    return {"allow": True, "request_id": body["request_id"]}
