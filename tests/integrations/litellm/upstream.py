"""A fake OpenAI-compatible upstream: a small real HTTP server for LiteLLM to call.

It answers Chat Completions (plain, and streamed with a final usage chunk when
``stream_options.include_usage`` is set), the Responses API and the model list, at once and
deterministically, with usage that has cached and reasoning details. A message holding
``FAIL_MARKER`` is answered 500. It records the body of every request it received, so a test can
see what LiteLLM sent upstream (the ``max_tokens`` the integration granted).

``python -m tests.integrations.litellm.upstream --port N`` serves it on its own (the benchmark).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAIL_MARKER = "[upstream-fail]"
# Output a request gets when it sets no maximum, and the answer's text, one token per word.
NATURAL_OUTPUT_TOKENS = 300
WORD = "lorem "


def text_of(value: Any) -> str:
    """Every string inside a request's messages or input, joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(text_of(item) for item in value)
    if isinstance(value, dict):
        return "".join(text_of(item) for item in value.values())
    return ""


def usage_counts(prompt: str, limit: int | None) -> tuple[int, int, int, int]:
    """(input, cached, output, reasoning) tokens of a request: input from the prompt's length,
    a third of it cached; the visible output up to ``limit``, and reasoning on top of it (as
    thinking models bill it, seed 000), so that a request can cost more than its hold."""
    input_tokens = len(prompt.encode()) // 4 + 11
    visible = min(limit or NATURAL_OUTPUT_TOKENS, NATURAL_OUTPUT_TOKENS)
    reasoning = visible // 4 + 10
    return input_tokens, input_tokens // 3, visible + reasoning, reasoning


def chat_usage(counts: tuple[int, int, int, int]) -> dict[str, Any]:
    input_tokens, cached, output, reasoning = counts
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output,
        "total_tokens": input_tokens + output,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def responses_usage(counts: tuple[int, int, int, int]) -> dict[str, Any]:
    input_tokens, cached, output, reasoning = counts
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }


class Upstream(ThreadingHTTPServer):
    """The server, with the bodies of the requests it received (newest last)."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.received: deque[tuple[str, dict[str, Any]]] = deque(maxlen=1000)
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for received, body in self.received if received == path]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="fake-upstream", daemon=True)
        thread.start()
        return thread


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real upstream
    # Headers and body leave in separate writes: with Nagle on, the body waits for the client's
    # delayed ACK of the headers (40 ms on Linux), a stall no real upstream has.
    disable_nagle_algorithm = True
    server: Upstream

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the benchmark sends thousands of requests."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            names = ("doubao-seed-2-0-mini", "doubao-seed-2-0-lite", "doubao-seed-2-0-code")
            self._json(
                200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
            )
        else:
            self._json(404, error("No such route.", "not_found"))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.rstrip("/")
        with self.server.lock:
            self.server.received.append((path, body))
        if FAIL_MARKER in text_of(body.get("messages") or body.get("input")):
            self._json(500, error("The upstream failed (as asked).", "server_error"))
        elif path == "/v1/chat/completions":
            self._chat(body)
        elif path == "/v1/responses":
            self._responses(body)
        else:
            self._json(404, error("No such route.", "not_found"))

    def _chat(self, body: dict[str, Any]) -> None:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        counts = usage_counts(text_of(body.get("messages")), limit)
        answer = WORD * (counts[2] - counts[3])
        common = {"id": f"chatcmpl-{time.monotonic_ns()}", "created": int(time.time())}
        common["model"] = body.get("model", "")
        if not body.get("stream"):
            self._json(
                200,
                common
                | {
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "length" if limit else "stop",
                        }
                    ],
                    "usage": chat_usage(counts),
                },
            )
            return
        chunk = common | {"object": "chat.completion.chunk"}
        events = [
            chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}}]}
            for piece in (answer[: len(answer) // 2], answer[len(answer) // 2 :])
        ]
        events.append(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(chunk | {"choices": [], "usage": chat_usage(counts)})
        self._stream([f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"])

    def _responses(self, body: dict[str, Any]) -> None:
        counts = usage_counts(text_of(body.get("input")), body.get("max_output_tokens"))
        self._json(
            200,
            {
                "id": f"resp_{time.monotonic_ns()}",
                "object": "response",
                "created_at": int(time.time()),
                "model": body.get("model", ""),
                "status": "completed",
                "output": [
                    {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "status": "completed",
                        "content": [
                            {
                                "type": "output_text",
                                "text": WORD * (counts[2] - counts[3]),
                                "annotations": [],
                            }
                        ],
                    }
                ],
                "usage": responses_usage(counts),
                "max_output_tokens": body.get("max_output_tokens"),
            },
        )

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[str]) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    server = Upstream(parser.parse_args().port)
    print(f"fake upstream on {server.base_url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
