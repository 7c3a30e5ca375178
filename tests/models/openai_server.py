"""
A tiny server that speaks OpenAI's API itself, for tests/test_openai_native.py (a native
OpenAI model's upstream). Standard library only.

    python openai_server.py --port N

  - C{GET /health}: 200
  - C{GET /v1/models}: one model, C{upstream-name}
  - C{POST /v1/chat/completions}: the last message's content echoed (C{"echo: ..."}), the
    request's C{model} as the answer's. With C{stream}: C{text/event-stream}, chunked, one
    compact C{data: {...}} chunk per word (each with C{"seq": i}, a key of this server's,
    so a test can see the chunk arrived as written), a last one with C{finish_reason}
    C{stop}, and C{data: [DONE]}. A last message C{"fail"}: 400 in OpenAI's error shape
    (code C{upstream_says_no}); C{"slow"}: one chunk, then nothing until the client leaves
    (up to 30 s); C{"plain"}: the plain answer, even to a stream request.
  - C{POST /v1/embeddings}: a vector C{[len(text), 1.0]} per input (a string or a list)
  - C{GET /records}: what it saw: C{auth} (each request's C{Authorization} header, or
    null), C{bodies} (each POST's body as JSON) and C{streams} (each stream's end by its
    C{X-Request-Id}: C{running}, C{finished} or C{closed}: the client left before the end)
  - any other path: 404 in OpenAI's error shape
"""

import argparse
import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
RECORDS = {"auth": [], "bodies": [], "streams": {}}


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error(message, code, status):
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def answer(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.answer(200, {"ok": True})
        if self.path == "/v1/models":
            with LOCK:
                RECORDS["auth"].append(self.headers.get("Authorization"))
            return self.answer(200, {"object": "list", "data": [
                {"id": "upstream-name", "object": "model", "created": 1, "owned_by": "tests"}]})
        if self.path == "/records":
            with LOCK:
                return self.answer(200, RECORDS)
        return self.answer(*error(f"no route {self.path}", "not_found", 404))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with LOCK:
            RECORDS["auth"].append(self.headers.get("Authorization"))
            RECORDS["bodies"].append(body)
        if self.path == "/v1/chat/completions":
            return self.chat(body)
        if self.path == "/v1/embeddings":
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            return self.answer(200, {
                "object": "list", "model": body.get("model"),
                "data": [{"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0]}
                         for i, text in enumerate(inputs)],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            })
        return self.answer(*error(f"no route {self.path}", "not_found", 404))

    def chat(self, body):
        said = body["messages"][-1]["content"]
        if said == "fail":
            return self.answer(*error("the upstream says no", "upstream_says_no", 400))
        model = body.get("model")
        if not body.get("stream") or said == "plain":
            return self.answer(200, {
                "id": "up-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: " + said},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            })
        request_id = self.headers.get("X-Request-Id", "")
        with LOCK:
            RECORDS["streams"][request_id] = "running"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        words = ["echo:"] + said.split()
        events = [compact({**head, "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                                "finish_reason": None}], "seq": i})
                  for i, word in enumerate(words)]
        events.append(compact({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                               "seq": len(words)}))
        try:
            for index, event in enumerate(events):
                self.write_chunk(b"data: " + event + b"\n\n")
                if said == "slow" and index == 0:
                    if self.client_left(30):
                        with LOCK:
                            RECORDS["streams"][request_id] = "closed"
                        return None
            self.write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            with LOCK:
                RECORDS["streams"][request_id] = "closed"
            self.close_connection = True
            return None
        with LOCK:
            RECORDS["streams"][request_id] = "finished"
        return None

    def client_left(self, seconds: float) -> bool:
        """Wait up to C{seconds} for the client to close the connection: whether it did."""
        readable, _, _ = select.select([self.connection], [], [], seconds)
        if not readable:
            return False
        try:
            left = self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            left = True
        self.close_connection = left
        return left

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
