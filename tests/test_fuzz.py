"""
Property-based tests of the real daemon (hypothesis): generated paths, query strings,
headers and bodies, written over a raw socket to every front door (C{/post|get/...},
C{/v2/...}, C{/health/...}, C{/metrics}), with an HTTP model (the example model server),
a C{raw} model (examples/raw_model.py) and a C{jsonl} model (examples/worker_model.py).

What must hold for every request, whatever it is:

  - an answer comes, within L{REQUEST_TIMEOUT} (a hung request fails), with a status line;
  - never a 500; a 502/503/504 only as the daemon's error for a model that failed (a raw
    model given something it cannot add crashes: that is the model's failure, a 502);
  - one C{X-Request-Id};
  - every error in its route's shape, as JSON: C{{"error": {"type", "message",
    "request_id"}}} on the plain routes (the id being the header's), C{{"error": "..."}}
    on C{/v2}; every other answer JSON (C{/metrics} excepted: Prometheus text);
  - nothing in the daemon's log that says it met a bug: no traceback, no unhandled
    error, no critical event (read up to the request's access event, so what a request
    made the daemon log is checked with that request).

No request can make the daemon reach anything but loopback: an admin token is set and
never sent (admin operations answer 401 before they read anything), and runtime models
could only reach 127.0.0.1.

Runs are reproducible (C{derandomize=True}, no example database) and bounded
(C{max_examples}); the whole module takes well under a minute.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

import httptools
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from aibackend.jsonread import MAX_JSON_DEPTH

from aibackend.testing import MODEL_SERVER, ROOT, Daemon, free_port, toml_models, wait_until

pytestmark = pytest.mark.timeout(180)

TOKEN = "fuzz-admin-token-0123456789abcdef"  # set, never sent
REQUEST_TIMEOUT = 15.0  # models time out after 5 s: the daemon answers well before this
LOG_SYNC_TIMEOUT = 5.0
BUG_SIGNS = ("Traceback", "Unhandled error", "Unhandled Error", "#critical]")

MODELS = ["echo", "adder", "wordstats"]
OPERATIONS = ["predict", "getlogs", "cleanlogs", "models", "status", "addmodel", "removemodel", "restart"]
ROUTE_WORDS = ["post", "get", "v2", "health", "live", "ready", "metrics", "models", "versions", "infer",
               "repository", "index", "load", "unload", *OPERATIONS, *MODELS]

FUZZ_SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    # whole_run is function-scoped on purpose: it checks the log once, after every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
    print_blob=False,
    # no "explain" phase: it reruns a failing example hundreds of times to say which lines it ran
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


# --- the daemon ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    echo_port = free_port()
    config = directory / "aibackend.toml"
    config.write_text(
        "[server]\n"
        'allowed_destinations = ["127.0.0.1/32"]\n'
        "max_body_bytes = 1048576\n\n"
        + toml_models(
            {"id": "echo", "type": "http", "url": f"http://127.0.0.1:{echo_port}/echo", "health_path": "/health",
             "command": [sys.executable, MODEL_SERVER, "--listen", f"tcp:{echo_port}:interface=127.0.0.1"],
             "timeout": 5},
            {"id": "adder", "type": "subprocess", "command": [sys.executable, os.path.join(ROOT, "examples",
                                                                                          "raw_model.py")],
             "timeout": 5, "restart_backoff": 0.01, "max_backoff": 0.05, "max_restarts": 1000,
             "min_uptime": 0.01},
        )
        + '[models.v2]\ninputs = [{ name = "numbers", datatype = "FP64", shape = [-1] }]\n'
          'outputs = [{ name = "sum", datatype = "FP64", shape = [] }, '
          '{ name = "count", datatype = "INT64", shape = [] }]\n\n'
        + toml_models(
            {"id": "wordstats", "type": "subprocess", "protocol": "jsonl", "max_inflight": 4, "timeout": 5,
             "command": [sys.executable, os.path.join(ROOT, "examples", "worker_model.py")]},
        )
    )
    running = Daemon(str(config), state=str(directory / "state"), cwd=ROOT, admin_token=TOKEN)
    try:
        def ready():
            answer = exchange(running.port, request_bytes(Request("GET", "/get/models"), running.port))
            return answer.status == 200 and all(m["state"] == "ready" for m in json.loads(answer.body)["models"])

        wait_until(ready, 20, "every model to be ready")
        yield running
    finally:
        stopping = len(running.process.lines)
        running.stop()
    assert_no_bug_in(running.process.lines[stopping:], "while the daemon stopped")


def assert_no_bug_in(lines: list[str], when: str) -> None:
    # (an access event holds the generated path, which may hold anything)
    signs = [line for line in lines if any(sign in line for sign in BUG_SIGNS) and "[aibackend.access#" not in line]
    assert not signs, f"the daemon logged a bug {when}:\n" + "\n".join(lines[-80:])


@pytest.fixture
def whole_run(daemon):
    """After the test (every example of it): nothing in the log since it began says the daemon met a bug."""
    start = len(daemon.process.lines)
    yield
    assert_no_bug_in(daemon.process.lines[start:], "during the test")


# --- a raw HTTP/1.1 client ---------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str  # as sent: already percent-encoded (or not, on purpose)
    headers: list = field(default_factory=list)  # (name, value) pairs of str or bytes, or whole lines
    body: bytes | None = None
    host: bool = True  # add the one Host header
    chunked: bool = False
    # False once the request line is broken on purpose: no route can be read from it, so a
    # refusal is in the daemon's own error shape whatever the target looks like.
    routed: bool = True

    def __repr__(self):
        body = self.body if self.body is None or len(self.body) <= 300 else self.body[:300] + b"..."
        target = self.target if len(self.target) <= 300 else self.target[:300] + f"... ({len(self.target)})"
        return f"Request({self.method} {target!r} headers={self.headers!r} body={body!r} chunked={self.chunked})"


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def request_bytes(request: Request, port: int) -> bytes:
    lines = [_bytes(request.method) + b" " + _bytes(request.target) + b" HTTP/1.1"]
    if request.host:
        lines.append(b"Host: 127.0.0.1:%d" % port)
    # a header is a (name, value) pair, or the bytes of a whole line (to break the rules)
    lines += [entry if isinstance(entry, bytes) else _bytes(entry[0]) + b": " + _bytes(entry[1])
              for entry in request.headers]
    body = b""
    if request.body is not None:
        if request.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            pieces = [request.body[i:i + 7] for i in range(0, len(request.body), 7)]
            body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(request.body))
            body = request.body
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Answer:
    """What came back, read by llhttp (httptools)."""

    def __init__(self):
        self.status = None
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False
        self.headers_complete = False
        self.closed_early = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_headers_complete(self) -> None:
        self.headers_complete = True

    def on_message_complete(self) -> None:
        self.complete = True

    def until_close(self) -> bool:
        """Does the body run until the connection closes (neither a length nor chunks)?"""
        return self.headers_complete and not self.values("content-length") and not self.values("transfer-encoding")

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def __repr__(self):
        return f"<Answer {self.status} {self.headers!r} {self.body[:500]!r}>"


class Hung(AssertionError):
    pass


def exchange(port: int, data: bytes, timeout: float = REQUEST_TIMEOUT) -> Answer:
    """Send C{data} on a new connection; the answer, or L{Hung} past C{timeout}."""
    answer = Answer()
    parser = httptools.HttpResponseParser(answer)
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            connection.sendall(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the daemon may answer (413, 400), and close or stop reading, before it read everything
        while not answer.complete:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hung(f"no whole answer within {timeout} s; so far {answer!r}")
            connection.settimeout(left)
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                raise Hung(f"no whole answer within {timeout} s; so far {answer!r}") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                answer.closed_early = not answer.complete and not answer.until_close()
                break
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as e:
                raise AssertionError(f"the daemon's answer is not HTTP ({e}): {answer!r}") from None
            if answer.status is None:
                try:
                    answer.status = parser.get_status_code()
                except httptools.HttpParserError:
                    pass
    if answer.headers and answer.status is None:
        answer.status = parser.get_status_code()
    return answer


# --- what an answer must be --------------------------------------------------------------------


def _strict(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes):
    return json.loads(body.decode("utf-8"), parse_constant=_strict)


def decoded_path(target: str) -> bytes:
    return unquote_to_bytes(target.split("?", 1)[0])


def is_v2(target: str) -> bool:
    path = decoded_path(target)
    return path == b"/v2" or path.startswith(b"/v2/")


def check_answer(request: Request, answer: Answer) -> None:
    assert answer.status is not None, f"the connection closed with no status line: {answer!r}"
    assert not answer.closed_early, f"the connection closed in the middle of the answer: {answer!r}"
    assert answer.status != 500, f"a 500: {answer!r}"
    ids = answer.values("x-request-id")
    assert len(ids) == 1, f"not one X-Request-Id: {answer!r}"
    content_type = ";".join(answer.values("content-type"))
    if answer.status == 200 and decoded_path(request.target) == b"/metrics":
        assert content_type.startswith("text/plain"), answer
        return
    if answer.status in (204, 304) or request.method == "HEAD":
        return
    assert content_type.startswith("application/json"), f"not JSON: {answer!r}"
    try:
        document = strict_json(answer.body)
    except ValueError as e:
        raise AssertionError(f"the answer is not strict JSON ({e}): {answer!r}") from None
    if answer.status < 400:
        return
    assert isinstance(document, dict) and set(document) == {"error"}, f"not the error shape: {answer!r}"
    if is_v2(request.target) and request.routed:
        assert isinstance(document["error"], str) and document["error"], f"not /v2's error shape: {answer!r}"
        return
    error = document["error"]
    assert isinstance(error, dict), f"not the error shape: {answer!r}"
    assert {"type", "message", "request_id"} <= set(error), f"not the error shape: {answer!r}"
    assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"], answer
    assert error["request_id"] == ids[0], f"the error's request_id is not X-Request-Id: {answer!r}"
    if answer.status > 500:
        # The daemon's word for a model that failed: never one of its own faults.
        assert error["type"] in ("bad_gateway", "model_unavailable", "gateway_timeout"), answer


def new_log(daemon, start: int, request_id: str | None) -> list[str]:
    """
    The daemon's log lines since C{start}, up to the access event of C{request_id} (once it
    is there, everything the request made the daemon log is too).
    """
    lines = daemon.process.lines
    if request_id is not None:
        marker = f"request={request_id}"
        deadline = time.monotonic() + LOG_SYNC_TIMEOUT
        while not any(marker in line for line in lines[start:]) and time.monotonic() < deadline:
            time.sleep(0.005)
    return lines[start:]


def run(daemon, request: Request) -> Answer:
    note(f"request: {request!r}")
    start = len(daemon.process.lines)
    answer = exchange(daemon.port, request_bytes(request, daemon.port))
    event(f"status {answer.status}")  # seen with --hypothesis-show-statistics
    note(f"answer: {answer!r}")
    try:
        check_answer(request, answer)
    finally:
        ids = answer.values("x-request-id")
        logged = new_log(daemon, start, ids[0] if ids else None)
        assert_no_bug_in(logged, "answering it")
    return answer


# --- strategies --------------------------------------------------------------------------------

UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
SUB_DELIMS = "!$&'()*+,;=:@"

plain_segment = st.one_of(
    st.sampled_from(ROUTE_WORDS),
    st.text(UNRESERVED + SUB_DELIMS, min_size=1, max_size=24).filter(lambda s: s not in (".", "..")),
    # percent-escaped text, UTF-8 (but for "/" and a line feed: those are in the odd family)
    st.text(min_size=1, max_size=16).map(lambda s: quote(s, safe="")).filter(
        lambda s: "%2F" not in s and "%0A" not in s),
    # escapes that are not escapes
    st.sampled_from(["%", "%G1", "%4", "%%", "%zz", "a%", "%2", "%u00e9"]),
    # long
    st.integers(256, 6000).map(lambda n: "a" * n),
)

odd_segment = st.one_of(
    st.just(""),
    st.sampled_from(["%2F", "%2f", ".", "..", "%2E", "%2e%2e", "%00", "%0A", "a%0Ab"]),
    # percent-escapes that are not UTF-8 once decoded
    st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)).map(lambda b: quote(b, safe="")),
)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def route_paths(segment):
    """Paths shaped like every route, with generated segments where names and words go."""
    name = st.one_of(st.sampled_from(MODELS), st.sampled_from(MODELS), segment)
    word = st.one_of(st.sampled_from(["post", "get"]), st.sampled_from(["post", "get", "POST", "Get"]), segment)
    operation = st.one_of(st.sampled_from(OPERATIONS), st.sampled_from(OPERATIONS), segment)
    version = st.one_of(st.just("1"), segment)
    return st.one_of(
        st.tuples(word, operation).map(lambda p: f"/{p[0]}/{p[1]}"),
        st.tuples(word, operation).map(lambda p: f"/{p[0]}/{p[1]}"),
        st.sampled_from(["/v2", "/v2/", "/v2/models", "/v2/health/live", "/v2/health/ready", "/v2/repository/index",
                         "/health/live", "/health/ready", "/metrics", "/", "/post", "/get/", "/v3/models"]),
        st.tuples(name, st.sampled_from(["", "/ready", "/infer"])).map(lambda p: f"/v2/models/{p[0]}{p[1]}"),
        st.tuples(name, version, st.sampled_from(["", "/ready", "/infer"])).map(
            lambda p: f"/v2/models/{p[0]}/versions/{p[1]}{p[2]}"),
        st.tuples(name, st.sampled_from(["load", "unload"])).map(lambda p: f"/v2/repository/models/{p[0]}/{p[1]}"),
        st.lists(segment, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
        st.tuples(st.sampled_from(["/health", "/metrics", "/v2/models/echo", "/post/predict"]), segment).map(
            lambda p: f"{p[0]}/{p[1]}"),
    )


query_key = st.one_of(
    st.sampled_from(["id", "limit", "since", "level", "text", "numbers", "replace", "type", "x", "ID", ""]),
    st.text(UNRESERVED, min_size=1, max_size=8),
)
query_value = st.one_of(
    st.sampled_from(MODELS + ["nosuch", "", "-1", "0", "1e999", "nan", "inf", "99999999999999999999999",
                              "2026-13-45T99:99:99", "1700000000.5", "debug", "error", "true", "%ZZ", "%", "%4",
                              "%FF", "%C3%28", "%00", "=", "%3F", "a+b", "a%20b"]),
    st.integers(-(10 ** 30), 10 ** 30).map(str),
    st.text(max_size=40).map(lambda s: quote(s, safe="")),
    st.text(UNRESERVED + SUB_DELIMS + "?/%", max_size=20),
    st.integers(300, 4000).map(lambda n: "v" * n),
)
query_part = st.one_of(
    st.tuples(query_key, query_value).map(lambda kv: f"{kv[0]}={kv[1]}"),
    query_key,
    query_value.map(lambda v: f"={v}"),
)


@st.composite
def queries(draw):
    if draw(st.integers(0, 4)) == 0:
        return ""
    parts = draw(st.lists(query_part, max_size=6))
    if draw(st.booleans()):
        parts.insert(0, "id=" + draw(st.sampled_from(MODELS)))
    separators = draw(st.lists(st.sampled_from(["&", "?", "&&", ";", "&?"]), min_size=len(parts), max_size=len(parts)))
    return "?" + "".join(sep + part for sep, part in zip(["", *separators[1:]], parts))


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
# Latin-1 bytes a header value may hold (obs-text), never a control character.
HEADER_BYTES = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x80 or 0x20 <= c < 0x7F))

header = st.one_of(
    st.tuples(st.just("Content-Type"), st.one_of(st.sampled_from([
        "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
        "APPLICATION/JSON", "text/plain", "application/x-www-form-urlencoded", "application/xml",
        "multipart/form-data; boundary=x", "", "*/*", "application/json;;", "text/event-stream",
        "application/x-ndjson", "application/octet-stream", "application/json; charset=\"utf-8\"", ";"]),
        HEADER_TEXT)),
    st.tuples(st.just("Accept"), st.one_of(st.sampled_from([
        "application/json", "text/event-stream", "*/*", "text/html", "application/x-ndjson", "",
        "application/json;q=0", "text/html;q=0.9, application/json;q=0.1"]), HEADER_TEXT)),
    st.tuples(st.just("X-Request-Id"), st.one_of(
        HEADER_TEXT, HEADER_BYTES, st.sampled_from(["", " ", "a" * 129, "a" * 5000, "é", "../../etc", "${X}",
                                                    "{\"a\": 1}", "id with spaces", "\\", "\"", "<script>"]))),
    st.tuples(st.just("Authorization"), st.one_of(st.sampled_from([
        "Bearer wrong-token-0123456789", "Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "bearer x", "Token x"]),
        HEADER_TEXT)),
    st.tuples(st.sampled_from(["Origin", "X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "User-Agent",
                               "Cookie", "Accept-Encoding", "Accept-Language", "X-Custom", "Range", "If-None-Match", "Expect"]),
              st.one_of(HEADER_TEXT, HEADER_BYTES)),
)


def _json_text(value, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10 ** 40), 10 ** 40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
v2_tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["numbers", "x", "text", ""]),
     "datatype": st.sampled_from(["FP64", "FP32", "FP16", "INT64", "INT8", "UINT64", "BOOL", "BYTES", "fp64", "X"]),
     "shape": st.lists(st.integers(-2, 6), max_size=3),
     "data": st.one_of(st.lists(json_scalars, max_size=6), json_values)},
    optional={"parameters": st.dictionaries(st.text(max_size=8), json_scalars, max_size=2)},
)
shaped = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=80), json_scalars)}),
    st.fixed_dictionaries({"numbers": st.lists(st.one_of(st.integers(-(10 ** 30), 10 ** 30), st.floats(
        allow_nan=False, allow_infinity=False), json_scalars), max_size=6)}),
    st.fixed_dictionaries({"inputs": st.lists(v2_tensor, max_size=3)}, optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2),
        "id": json_scalars,
        "parameters": st.dictionaries(st.text(max_size=8), json_scalars, max_size=3)}),
)

LITERAL_BODIES = [
    b"", b" ", b"null", b"{}", b"[]", b"NaN", b"Infinity", b"-Infinity", b'{"x": NaN}', b'{"numbers": [Infinity]}',
    b'{"text": "a", "text": "b"}', b'{"numbers": [1e999]}', b'{"numbers": [-1e999, 1e999]}', b"1e999", b"-0",
    b'{"numbers": [' + b"9" * 5000 + b"]}", b"1" * 10000, b'{"numbers": [1e-99999]}', b'"\\ud800"',
    b'{"text": "\\udfff\\ud800"}', b"\xef\xbb\xbf{}", '{"text": "é"}'.encode("utf-16"), b'{"text": "caf\xe9"}',
    b"\xff\xfe\xfd", b'{"a":1,}', b"[1,2", b"{", b'{"a" 1}', b"\x00", b'{"text": "\x00"}', b"tru", b"01",
    b'{"inputs": [{"name": "numbers", "datatype": "FP64", "shape": [2], "data": [1e308, 1e308]}]}',
    b'{"inputs": [{"name": "numbers", "datatype": "FP64", "shape": [1], "data": [NaN]}]}',
    b'{"inputs": [{"name": "numbers", "datatype": "FP64", "shape": [99999999999], "data": []}]}',
    b'{"inputs": [{"name": "numbers", "datatype": "FP64", "shape": [-1], "data": [[[[1]]]]}]}',
]


# Numbers as JSON text, around what a double holds: 1e999 is JSON, a model that reads it
# may well write it back as Infinity, which is not.
number_text = st.one_of(
    st.tuples(st.integers(-99, 99), st.integers(-400, 400)).map(lambda p: f"{p[0]}e{p[1]}"),
    st.integers(-(10 ** 400), 10 ** 400).map(str),
    st.sampled_from(["-0", "0.0", "1E+308", "1.7976931348623157e308", "2e308", "-2e308", "5e-324", "1e-400"]),
)
# Integers past a double's range in /v2 tensors are the "beyond a double" family's.
tensor_number_text = st.one_of(
    st.tuples(st.integers(-99, 99), st.integers(-400, 400)).map(lambda p: f"{p[0]}e{p[1]}"),
    st.integers(-(10 ** 300), 10 ** 300).map(str),
)


def v2_numbers(texts: list[str], datatype: str = "FP64") -> bytes:
    return ('{"inputs": [{"name": "numbers", "datatype": "%s", "shape": [%d], "data": [%s]}]}'
            % (datatype, len(texts), ", ".join(texts))).encode()


numbers_bodies = st.one_of(
    st.lists(number_text, max_size=4).map(lambda ns: ('{"numbers": [' + ", ".join(ns) + "]}").encode()),
    st.tuples(st.sampled_from(["x", "text", "numbers"]), number_text).map(
        lambda p: f'{{"{p[0]}": {p[1]}}}'.encode()),
    number_text.map(str.encode),
    st.tuples(st.lists(tensor_number_text, min_size=1, max_size=3),
              st.sampled_from(["FP64", "FP32", "INT64", "INT8", "UINT8", "FP16"])).map(lambda p: v2_numbers(*p)),
)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


bodies = st.one_of(
    st.none(),
    st.sampled_from(LITERAL_BODIES),
    st.tuples(st.one_of(json_values, shaped), st.booleans()).map(lambda p: _json_text(*p)),
    numbers_bodies,
    # JSON cut short, or with a byte changed
    st.tuples(shaped.map(lambda v: _json_text(v, True)), st.integers(0, 200)).map(lambda p: p[0][:p[1]]),
    st.tuples(shaped.map(lambda v: _json_text(v, True)), st.integers(0, 200), st.integers(0, 255)).map(
        lambda p: p[0][:p[1]] + bytes([p[2]]) + p[0][p[1] + 1:]),
    st.binary(max_size=200),
    # nested, but not as deep as the deep family goes
    st.tuples(st.integers(1, 500), st.sampled_from(["list", "object"])).map(lambda p: nested(*p)),
)

methods = st.sampled_from(["GET", "POST", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])


def right_method(path: str) -> str:
    """The method the route of C{path} takes (most requests should get past that check)."""
    lowered = path.lower()
    if lowered.startswith("/post/") or lowered.endswith(("/infer", "/load", "/unload", "/index")):
        return "POST"
    return "GET"


@st.composite
def requests(draw, segment=plain_segment, body=bodies):
    path = draw(route_paths(segment))
    if draw(st.integers(0, 9)) == 0 and not path.endswith("/"):
        path += "/"
    method = draw(methods) if draw(st.integers(0, 3)) == 0 else right_method(path)
    return Request(
        method=method,
        target=path + draw(queries()),
        headers=draw(st.lists(header, max_size=5)),
        body=draw(body),
        chunked=draw(st.integers(0, 5)) == 0,
    )


# --- the properties ------------------------------------------------------------------------------


@settings(max_examples=800, **FUZZ_SETTINGS)
@given(request=requests())
def test_no_generated_request_earns_a_500_a_hang_or_a_traceback(daemon, whole_run, request):
    run(daemon, request)


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(request=st.builds(
    Request,
    method=st.just("POST"),
    target=st.sampled_from(["/post/predict?id=echo", "/post/predict?id=adder", "/post/predict?id=wordstats",
                            "/v2/models/adder/infer", "/v2/models/echo/infer", "/v2/models/wordstats/infer"]),
    headers=st.lists(header, max_size=3),
    body=st.one_of(st.sampled_from(LITERAL_BODIES), shaped.map(lambda v: _json_text(v, False)), numbers_bodies,
                   bodies),
))
def test_every_model_route_answers_generated_bodies_with_a_model_answer_or_an_error(daemon, whole_run, request):
    run(daemon, request)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=20, **FUZZ_SETTINGS)
@given(request=st.builds(
    Request,
    method=st.sampled_from(["POST", "GET", "PUT"]),
    target=route_paths(plain_segment),
    headers=st.lists(header, max_size=2),
    # over max_body_bytes (1 MiB here)
    body=st.integers(1_048_577, 1_060_000).map(lambda n: b'{"text": "' + b"a" * (n - 12) + b'"}'),
    chunked=st.booleans(),
))
def test_a_body_over_the_limit_is_a_413_in_the_routes_shape(daemon, request):
    assert run(daemon, request).status == 413


@settings(max_examples=20, **FUZZ_SETTINGS)
@given(request=st.builds(
    Request,
    method=st.just("POST"),
    target=st.sampled_from(["/v2/models/adder/infer", "/v2/models/echo/infer"]),
    body=st.lists(st.integers(2 ** 1024, 10 ** 400).map(str), min_size=1, max_size=2).map(v2_numbers),
))
def test_integers_beyond_a_double_in_an_fp64_tensor_are_a_400(daemon, request):
    assert run(daemon, request).status == 400


# The README's rule: JSON the daemon reads (v2, admin) may nest MAX_JSON_DEPTH (512) levels;
# a predict body, passed on unread, may nest as deep as orjson reads (1,024).
@settings(max_examples=30, **FUZZ_SETTINGS)
@given(request=st.one_of(
    st.builds(
        Request,
        method=st.just("POST"),
        target=st.sampled_from(["/post/predict?id=echo", "/post/predict?id=wordstats"]),
        body=st.tuples(st.integers(1025, 100_000), st.sampled_from(["list", "object"])).map(lambda p: nested(*p)),
    ),
    st.builds(
        Request,
        method=st.just("POST"),
        target=st.sampled_from(["/v2/models/adder/infer", "/v2/models/echo/infer", "/v2/repository/index"]),
        body=st.tuples(st.integers(MAX_JSON_DEPTH + 1, 100_000), st.sampled_from(["list", "object"])).map(
            lambda p: nested(*p)),
    ),
))
def test_deeply_nested_json_is_a_400(daemon, request):
    assert run(daemon, request).status == 400


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(request=requests(segment=odd_segment))
def test_odd_path_segments_are_answered_in_the_error_shape(daemon, request):
    run(daemon, request)


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(data=st.data())
def test_malformed_http_is_answered_in_the_error_shape(daemon, data):
    request = data.draw(requests(body=st.none() | st.sampled_from([b"{}", b'{"text": "a"}'])))
    damage = data.draw(st.sampled_from([
        "two hosts", "no host", "control character", "no colon", "folded", "bad name", "long target",
        "bad version", "bad content-length", "two content-lengths", "space before colon",
    ]))
    note(f"damage: {damage}")
    if damage == "two hosts":
        request.headers.append(("Host", data.draw(st.sampled_from(["evil.example", "127.0.0.1", "localhost:80"]))))
    elif damage == "no host":
        request.host = False
    elif damage == "control character":
        request.headers.append(("X-Custom", "a" + chr(data.draw(st.sampled_from([0, 1, 8, 11, 12, 27, 127]))) + "b"))
    elif damage == "no colon":
        request.headers.append(b"X-Custom-without-a-colon")
    elif damage == "folded":
        request.headers.append(("X-Custom", "a\r\n  folded"))
    elif damage == "bad name":
        request.headers.append((data.draw(st.sampled_from(["X Custom", "X(Custom)", "\xe9t\xe9", "X/1"])), "v"))
    elif damage == "long target":
        request.target = "/get/models?id=" + "a" * data.draw(st.integers(16_384, 70_000))
    elif damage == "bad version":
        request.target += data.draw(st.sampled_from([" HTTP/1.1 x", " ", "\t"]))
        request.routed = False
    elif damage == "bad content-length":
        request.headers.append(("Content-Length", data.draw(st.sampled_from(["abc", "-1", "1.5", " ", "0x10"]))))
        request.body = None
    elif damage == "two content-lengths":
        request.headers += [("Content-Length", "2"), ("Content-Length", "3")]
        request.body = None
    elif damage == "space before colon":
        request.headers.append(b"X-Custom : v")
    answer = run(daemon, request)
    if damage in ("two hosts", "two content-lengths", "no colon", "space before colon", "bad version"):
        # RFC 9112: a request with more than one Host, or that is not HTTP, is a 400
        assert answer.status == 400, f"{damage}: {answer!r}"


# --- the test can fail -------------------------------------------------------------------------


def test_the_checks_fail_on_what_they_must():
    """The checks themselves: a daemon answer that breaks the rules is caught."""
    request = Request("GET", "/get/models")

    def answer(status, headers, body):
        made = Answer()
        made.status, made.headers, made.body, made.complete = status, headers, body, True
        return made

    good = [("x-request-id", "r1"), ("content-type", "application/json")]
    check_answer(request, answer(200, good, b"{}"))
    check_answer(request, answer(404, good, b'{"error": {"type": "not_found", "message": "m", "request_id": "r1"}}'))
    check_answer(Request("GET", "/v2/x"), answer(404, good, b'{"error": "no"}'))
    for status, headers, body in [
        (500, good, b'{"error": {"type": "internal_error", "message": "m", "request_id": "r1"}}'),
        (400, [("content-type", "text/plain")], b"Bad Request"),
        (400, [("x-request-id", "r1"), ("content-type", "text/html")], b"<html>"),
        (404, good, b'{"error": {"type": "not_found", "message": "m", "request_id": "other"}}'),
        (404, good, b'{"error": "a /v2 shape on a plain route"}'),
        (200, good, b'{"x": NaN}'),
        (502, good, b'{"error": {"type": "internal_error", "message": "m", "request_id": "r1"}}'),
        (None, [], b""),
    ]:
        with pytest.raises(AssertionError):
            check_answer(request, answer(status, headers, body))
