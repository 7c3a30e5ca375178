"""
A tiny model server that speaks the Open Inference Protocol (KServe v2 REST) itself, for
tests/test_v2_daemon.py: one model, C{doubler}, that answers C{y = 2 * x}. Standard
library only.

    python v2_server.py --port N

  - C{GET /health}: 200
  - C{GET /v2/models/doubler}: its metadata (x FP32 [-1] in, y FP32 [-1] out)
  - C{GET /v2/models/doubler/ready}: 200 with an empty body, as Triton answers it
  - C{POST /v2/models/doubler/infer}: C{y = 2 * x}, the request's C{id} echoed, and
    C{parameters.seen_binary_output}: whether the request asked for any output as binary
    (so a test can see what the daemon sent on)
  - an x holding a negative value: 400 C{{"error": "negative"}}
  - C{POST /v2/models/doubler/generate} and C{/generate_stream}: Triton's generate
    extension. The request is a flat JSON object, C{text_input} and C{parameters}; the
    model says each word of C{text_input} twice. C{generate} answers one flat object,
    C{{"model_name": "doubler", "model_version": "1", "text_output": "a a b b"}};
    C{generate_stream} answers C{text/event-stream; charset=utf-8}, chunked, one
    C{data: {...}} event per word said (C{"a"}, C{" a"}, C{" b"}, C{" b"}), and no end
    event. Parameters: C{delay}, the seconds before each event (0 by default);
    C{fail_after}, how many words are said before the model fails (C{generate}: a 400;
    C{generate_stream}: a last event C{data: {"error": "..."}}, after a 200, as Triton
    sends an error once its stream has begun); C{stamp}, true to add C{sent_at} (this
    process's C{time.time()} as the event was written) to each event. A
    C{text_input} missing or not a string is a 400 C{{"error": "..."}} before any event.
  - C{GET /streams}: how each generate_stream so far ended, by its C{X-Request-Id}:
    C{"running"}, C{"finished"}, C{"failed"} or C{"closed"} (the client closed the
    connection before the last event: the server stops there, as it sees the close)
  - any other model: 404 C{{"error": "..."}}
"""

import argparse
import json
import select
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "doubler"
METADATA = {
    "name": MODEL,
    "versions": ["1"],
    "platform": "fake_triton",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
}
# How each generate_stream ended, by its X-Request-Id (dict assignments: one per thread, atomic).
STREAMS: dict[str, str] = {}


class Refused(Exception):
    """A generate request refused before any word: a 400 with this message."""


def flat(data):
    if isinstance(data, list):
        return [value for item in data for value in flat(item)]
    return [data]


def asks_binary(request) -> bool:
    parameters = request.get("parameters") or {}
    if parameters.get("binary_data_output"):
        return True
    return any((output.get("parameters") or {}).get("binary_data") for output in request.get("outputs") or ())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def model_path(self):
        """(model name, rest of the path) of a /v2/models/NAME[/versions/V]/... path, or None."""
        parts = [part for part in self.path.split("?")[0].split("/") if part]
        if parts[:2] != ["v2", "models"] or len(parts) < 3:
            return None
        name, rest = parts[2], parts[3:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        return name, rest

    def do_GET(self):
        if self.path == "/health":
            return self.answer(200, {"status": "ok"})
        if self.path == "/streams":
            return self.answer(200, STREAMS)
        found = self.model_path()
        if found is None:
            return self.answer(404, {"error": f"no route {self.path}"})
        name, rest = found
        if name != MODEL:
            return self.answer(404, {"error": f"Request for unknown model: '{name}' is not found"})
        if rest == []:
            return self.answer(200, METADATA)
        if rest == ["ready"]:
            self.send_response(200)  # Triton's answer: no body at all
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self.answer(404, {"error": f"no route {self.path}"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        found = self.model_path()
        if found is None or found[1] not in (["infer"], ["generate"], ["generate_stream"]):
            return self.answer(404, {"error": f"no route {self.path}"})
        name, (route,) = found
        if name != MODEL:
            return self.answer(404, {"error": f"Request for unknown model: '{name}' is not found"})
        if route != "infer":
            return self.generate(body, stream=route == "generate_stream")
        try:
            request = json.loads(body)
            (x,) = [tensor for tensor in request["inputs"] if tensor["name"] == "x"]
            values = flat(x["data"])
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": "send one FP32 input x as JSON"})
        if any(value < 0 for value in values):
            return self.answer(400, {"error": "negative"})
        response = {
            "model_name": MODEL,
            "model_version": "1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [len(values)], "data": [2.0 * v for v in values]}],
            "parameters": {"seen_binary_output": asks_binary(request)},
        }
        if "id" in request:
            response["id"] = request["id"]
        return self.answer(200, response)


    # --- the generate extension -------------------------------------------------------

    @staticmethod
    def generate_request(body):
        """(the words to say, delay, fail_after, stamp) of a generate request, or L{Refused}."""
        try:
            request = json.loads(body)
        except ValueError:
            raise Refused("the request body is not JSON") from None
        if not isinstance(request, dict):
            raise Refused("the request body must be a JSON object")
        text = request.get("text_input")
        if not isinstance(text, str):
            raise Refused("text_input is required, a string")
        parameters = request.get("parameters") or {}
        words = [piece for word in text.split() for piece in (word, word)]
        said = [word if i == 0 else " " + word for i, word in enumerate(words)]
        fail_after = parameters.get("fail_after")
        return said, float(parameters.get("delay", 0)), fail_after, bool(parameters.get("stamp"))

    def generate(self, body, *, stream):
        try:
            said, delay, fail_after, stamp = self.generate_request(body)
        except Refused as e:
            return self.answer(400, {"error": str(e)})
        failing = fail_after is not None and fail_after < len(said)
        if not stream:
            if failing:
                return self.answer(400, {"error": f"the model failed after {fail_after} words"})
            return self.answer(200, {"model_name": MODEL, "model_version": "1", "text_output": "".join(said)})
        request_id = self.headers.get("X-Request-Id", "")
        STREAMS[request_id] = "running"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"model_name": MODEL, "model_version": "1", "text_output": word} for word in said]
        if failing:
            events = events[:fail_after] + [{"error": f"the model failed after {fail_after} words"}]
        try:
            for event in events:
                if self.client_left(delay):
                    STREAMS[request_id] = "closed"
                    return None
                if stamp and "error" not in event:
                    event["sent_at"] = time.time()
                self.write_chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # (BrokenPipeError, ConnectionResetError: it left as the event was written)
            STREAMS[request_id] = "closed"
            self.close_connection = True
            return None
        STREAMS[request_id] = "failed" if failing else "finished"
        return None

    def client_left(self, delay: float) -> bool:
        """Wait C{delay} seconds, or less if the client closes the connection: whether it did."""
        readable, _, _ = select.select([self.connection], [], [], delay)
        if not readable:
            return False
        try:
            left = self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            left = True
        if left:
            self.close_connection = True
        else:
            time.sleep(delay)  # (it sent more: not the daemon's way, but no reason to stop)
        return left

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
