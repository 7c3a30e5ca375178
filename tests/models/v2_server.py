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
  - any other model: 404 C{{"error": "..."}}
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "doubler"
METADATA = {
    "name": MODEL,
    "versions": ["1"],
    "platform": "fake_triton",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
}


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
        if found is None or found[1] != ["infer"]:
            return self.answer(404, {"error": f"no route {self.path}"})
        name, _ = found
        if name != MODEL:
            return self.answer(404, {"error": f"Request for unknown model: '{name}' is not found"})
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
