"""A loopback OpenAI-compatible chat server with scripted answers, for autointerp tests and the benchmark.

    with FakeChat(delay=0.01) as server:      # server.url → "http://127.0.0.1:PORT/v1"
        server.fail = [429, 500]              # the next requests get these statuses, then 200s
        ...
        server.log                            # one entry per request: (kind, status)

It answers the explainer with a JSON explanation and a scorer with a JSON list of 1s, one per
"Example N:" line, like a model that follows the prompt; `garbage` answers that many requests first
with text no parser accepts.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChat:
    def __init__(self, delay: float = 0.0, explanation: str = "the token ' the' after a verb"):
        self.delay = delay
        self.explanation = explanation
        self.fail: list[int] = []
        self.garbage = 0
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = owner.answer(body["messages"])
                if owner.delay:
                    time.sleep(owner.delay)
                if status == 200:
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                    }
                else:
                    payload = {"error": {"message": f"scripted {status}", "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, messages: list[dict]) -> tuple[int, str]:
        kind = "explain" if "Find what the marked tokens" in messages[0]["content"] else "score"
        with self.lock:
            status = self.fail.pop(0) if self.fail else 200
            garbage = status == 200 and self.garbage > 0
            self.garbage -= garbage
            self.log.append((kind, status))
        if garbage:
            return 200, ""
        if kind == "explain":
            return status, json.dumps({"explanation": self.explanation})
        n = len(re.findall(r"^Example \d+:", messages[min(1, len(messages) - 1)]["content"], re.M))
        return status, json.dumps([1] * n)

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(k == kind and s == 200 for k, s in self.log)

    def __enter__(self) -> FakeChat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
