"""
aibackend.httpmodel.HttpModel against model servers that misbehave on purpose.

The model server is a small twisted.web resource reached in memory (no socket) through the
clients production uses (aibackend.testing.MemoryEndpoints: the lean client of the hot
path); deadlines run on a Clock, with a server that holds its requests.
"""

import json
import os
import sys

import pytest
from twisted.internet import error as ierror
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from aibackend.config import HttpModelSpec
from aibackend.errors import BadGateway, GatewayTimeout
from aibackend.httpmodel import HttpModel
from aibackend.interfaces import IModel, IReplicated, IRestartable, ModelAnswer, RequestContext
from aibackend.testing import (
    MODEL_SERVER, ROOT, Daemon, HeldModelServer, MemoryEndpoints, failure_of, free_port, has_fired,
    result_of, toml_models, wait_until,
)

URL = "http://model.test:9001"


class MisbehavingModelServer(Resource):
    """
    A model server with one path per way of answering; it records what it received.

      /json             200 {"label": "positive"} (with odd spacing, to see it kept as is)
      /status/CODE      CODE and a JSON body
      /html             500 text/html
      /empty            204, no body
      /redirect         302 to /json
      /big/N            200 and a JSON string body of N bytes
      /stall            headers and half a body, then nothing
      /hang             nothing at all
      /drop             closes the connection without answering
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.received = []
        self.stalled = []

    def render(self, request):
        self.received.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                "body": request.content.read(),
            }
        )
        parts = request.path.decode().strip("/").split("/")
        kind = parts[0]
        if kind == "json":
            request.setHeader(b"content-type", b"application/json")
            return b'{"label":   "positive", "score": 0.5}'
        if kind == "status":
            request.setResponseCode(int(parts[1]))
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": {"message": "the model says no"}}).encode()
        if kind == "html":
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body><h1>500 Internal Server Error</h1>" + b"x" * 500 + b"</body></html>"
        if kind == "body":
            request.setHeader(b"content-type", b"application/json")
            return BODIES[parts[1]]
        if kind == "empty":
            request.setResponseCode(204)
            return b""
        if kind == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/json")
            return b'{"moved": true}'
        if kind == "big":
            size = int(parts[1])
            return b'"' + b"a" * (size - 2) + b'"'
        if kind == "stall":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"100")
            request.write(b'{"partial": ')
            self.stalled.append(request)
            return NOT_DONE_YET
        if kind == "hang":
            self.stalled.append(request)
            return NOT_DONE_YET
        if kind == "drop":
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b'{"error": "no such path"}'


# /body/NAME answers 200 with one of these.
BODIES = {
    "nan": b'{"score": NaN}',
    "infinity": b'{"score": Infinity}',
    "minus-infinity": b'[-Infinity]',
    "latin-1": b'{"label": "caf\xe9"}',
    "utf-16": '{"label": "x"}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"label": "x"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "big-integer": b'{"n": 123456789012345678901234567890}',
    "overflowing-number": b'{"n": 1e999}',
    "nan-in-a-string": b'{"label": "NaN Infinity"}',
}


@pytest.fixture
def server():
    return MisbehavingModelServer()


@pytest.fixture
def stub(server):
    return MemoryEndpoints(server)


MADE: list = []


@pytest.fixture(autouse=True)
def _close_models(clock):
    """Each test's models close their kept-alive connections at its end (before the clock is checked)."""
    yield
    while MADE:
        idle_connections_closed(MADE.pop())


def make_model(clock, endpoints, path="/json", environ=None, **fields):
    spec = HttpModelSpec(id="m", type="http", url=URL + path, **fields)
    model = HttpModel(spec, reactor=clock, endpoints=endpoints, environ=environ if environ is not None else {})
    model.endpoints = endpoints
    MADE.append(model)
    return model


def send(model, body=b'{"text": "hi"}', request_id="rid-1"):
    """Send, and let what the model and its server write move (the answer, if it comes at once)."""
    d = model.send(body, RequestContext(request_id=request_id))
    model.endpoints.flush()
    return d


def idle_connections_closed(model):
    """The model's kept-alive connections close (their idle timers with them), as at stop."""
    model.stopService()
    model.endpoints.flush()


# --- answers -------------------------------------------------------------------------


def test_an_http_model_provides_imodel_and_is_replicated(clock, stub):
    model = make_model(clock, stub)
    assert verifyObject(IModel, model)
    assert IReplicated.providedBy(model)
    assert not IRestartable.providedBy(model)  # no server of its own to restart
    assert model.state == "ready" and result_of(model.whenReady()) is None


def test_a_json_answer_is_passed_through_as_it_is(clock, stub, server):
    model = make_model(clock, stub, "/json")

    answer = result_of(send(model, b'{"text":  "what a great day"}'))

    assert answer == ModelAnswer(status=200, body=b'{"label":   "positive", "score": 0.5}')
    [received] = server.received
    assert received["method"] == b"POST"
    assert received["path"] == b"/json"
    assert received["body"] == b'{"text":  "what a great day"}'
    assert model.in_flight == 0


@pytest.mark.parametrize("status", [400, 404, 422, 429, 500, 503])
def test_a_models_own_json_error_is_passed_through_with_its_status(clock, stub, status):
    model = make_model(clock, stub, f"/status/{status}")

    answer = result_of(send(model))

    assert answer.status == status
    assert json.loads(answer.body) == {"error": {"message": "the model says no"}}
    assert model.failures == 1


def test_an_answer_that_is_not_json_is_a_bad_gateway_naming_the_model(clock, stub):
    model = make_model(clock, stub, "/html")

    error = failure_of(send(model), BadGateway).value

    assert error.status == 502
    assert error.model == "m"
    assert "model 'm' answered something that is not JSON" in error.message
    assert "status 500" in error.message
    assert "text/html" in error.message
    assert "<html><body><h1>500 Internal Server Error</h1>" in error.message  # a snippet...
    assert "x" * 300 not in error.message  # ... not the whole body
    assert "bytes)" in error.message


@pytest.mark.parametrize(
    "name, why",
    [("nan", "answered JSON with NaN or Infinity, which clients cannot parse"),
     ("infinity", "answered JSON with NaN or Infinity, which clients cannot parse"),
     ("minus-infinity", "answered JSON with NaN or Infinity, which clients cannot parse"),
     ("latin-1", "answered something that is not UTF-8 text"),
     ("utf-16", "answered something that is not UTF-8 text"),
     ("bom", "answered something that is not JSON"),
     ("deep", "answered JSON nested too deeply to be read")],
)
def test_an_answer_that_is_not_strict_json_is_a_bad_gateway(clock, stub, name, why):
    model = make_model(clock, stub, f"/body/{name}")

    error = failure_of(send(model), BadGateway).value

    assert error.status == 502
    assert error.message.startswith(f"model 'm' {why} (status 200, content-type application/json): ")


@pytest.mark.parametrize("name", ["big-integer", "overflowing-number", "nan-in-a-string"])
def test_json_that_orjson_refuses_or_that_only_looks_odd_is_passed_through(clock, stub, name):
    model = make_model(clock, stub, f"/body/{name}")

    assert result_of(send(model)) == ModelAnswer(status=200, body=BODIES[name])


def test_an_empty_answer_is_a_bad_gateway(clock, stub):
    model = make_model(clock, stub, "/empty")

    error = failure_of(send(model), BadGateway).value

    assert "not JSON" in error.message
    assert "status 204" in error.message


def test_a_redirect_is_a_bad_gateway_and_is_not_followed(clock, stub, server):
    model = make_model(clock, stub, "/redirect")

    error = failure_of(send(model), BadGateway).value

    assert "redirect (302)" in error.message
    assert "'/json'" in error.message
    assert error.model == "m"
    assert [r["path"] for r in server.received] == [b"/redirect"]


def test_an_answer_over_max_response_bytes_is_a_bad_gateway(clock, stub):
    model = make_model(clock, stub, "/big/2000", max_response_bytes=1000)

    error = failure_of(send(model), BadGateway).value

    assert "max_response_bytes (1000 bytes)" in error.message
    assert model.in_flight == 0


def test_an_answer_at_max_response_bytes_is_fine(clock, stub):
    model = make_model(clock, stub, "/big/1000", max_response_bytes=1000)

    answer = result_of(send(model))

    assert len(answer.body) == 1000


def test_a_model_that_closes_the_connection_is_a_bad_gateway(clock, stub, logged_errors):
    model = make_model(clock, stub, "/drop")

    d = send(model)
    stub.flush()

    error = failure_of(d, BadGateway).value
    assert error.model == "m"
    assert "closed the connection" in error.message
    assert logged_errors.events == []  # an ordinary failure of a model, not a bug of ours


# --- what the model server is sent ---------------------------------------------------------


def test_the_request_carries_json_content_type_and_the_request_id(clock, stub, server):
    model = make_model(clock, stub)

    result_of(send(model, request_id="client-id-7"))

    headers = server.received[0]["headers"]
    assert headers[b"content-type"] == [b"application/json"]
    assert headers[b"x-request-id"] == [b"client-id-7"]
    assert headers[b"accept"] == [b"application/json"]
    assert headers[b"user-agent"][0].startswith(b"aibackend/")


def test_configured_headers_are_sent_with_environment_variables_expanded(clock, stub, server):
    model = make_model(
        clock,
        stub,
        headers={"Authorization": "Bearer ${MODEL_KEY}", "X-Served-By": "aibackend", "X-Both": "${A}-${B}"},
        environ={"MODEL_KEY": "s3cret", "A": "1", "B": "2"},
    )

    result_of(send(model))

    headers = server.received[0]["headers"]
    assert headers[b"authorization"] == [b"Bearer s3cret"]
    assert headers[b"x-served-by"] == [b"aibackend"]
    assert headers[b"x-both"] == [b"1-2"]
    assert "s3cret" not in json.dumps(model.describe())


def test_the_request_id_is_the_one_of_each_request(clock, stub, server):
    model = make_model(clock, stub, headers={"X-Request-Id": "configured"})

    result_of(send(model, request_id="first"))
    result_of(send(model, request_id="second"))

    assert [r["headers"][b"x-request-id"] for r in server.received] == [[b"first"], [b"second"]]


# --- deadlines -------------------------------------------------------------------------------


def test_a_model_that_never_answers_times_out_and_its_request_is_cancelled(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=30)

    d = send(model)
    [request] = held.requests
    assert not has_fired(d)

    clock.advance(29.9)
    assert not has_fired(d)
    assert not held.abandoned(0)

    clock.advance(0.1)

    error = failure_of(d, GatewayTimeout).value
    assert error.status == 504
    assert error.model == "m"
    assert "did not answer within 30 s" in error.message
    assert held.abandoned(0)  # the connection, midway through the exchange, is closed
    assert clock.getDelayedCalls() == []
    assert model.in_flight == 0


def test_the_deadline_covers_the_body_too(clock, stub, server):
    model = make_model(clock, stub, "/stall", timeout=5)

    d = send(model)
    stub.flush()
    assert not has_fired(d)
    [stalled] = server.stalled

    clock.advance(5)
    stub.flush()

    failure_of(d, GatewayTimeout)
    assert clock.getDelayedCalls() == []
    # The half-read answer's connection is closed, not left open.
    assert stalled._disconnected


def test_a_model_that_answers_in_time_leaves_no_timer(clock, stub):
    model = make_model(clock, stub, "/json", timeout=5)

    result_of(send(model))

    # The kept-alive connection's idle timer is the only one; it goes with the connection.
    assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds() + 120.0]
    idle_connections_closed(model)
    assert clock.getDelayedCalls() == []


def test_a_request_on_a_kept_alive_connection_times_out_at_its_deadline(clock):
    # Its deadline is kept by the connection's one timer (the idle one, made sooner).
    held = HeldModelServer()
    model = make_model(clock, held, timeout=30)
    first = send(model)
    held.answer(0)
    result_of(first)
    clock.advance(50)  # idle for a while: the timer's idle time is 70 s away

    d = send(model)
    assert len(held.connections) == 1 and len(held.requests) == 2
    assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds() + 30]
    clock.advance(29.9)
    assert not has_fired(d) and not held.abandoned(1)

    clock.advance(0.1)

    error = failure_of(d, GatewayTimeout).value
    assert "did not answer within 30 s" in error.message
    assert held.abandoned(1)
    assert clock.getDelayedCalls() == []
    assert model.in_flight == 0


def test_a_deadline_later_than_the_idle_time_left_is_kept_too(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=200)
    first = send(model)
    held.answer(0)
    result_of(first)
    clock.advance(100)  # 20 s of the idle 120 left, a deadline 200 s away

    d = send(model)
    clock.advance(20)
    assert not has_fired(d) and not held.abandoned(1)  # the idle time passed: the request goes on
    clock.advance(179.9)
    assert not has_fired(d)
    clock.advance(0.1)

    failure_of(d, GatewayTimeout)
    assert held.abandoned(1) and clock.getDelayedCalls() == []


def test_an_answer_in_time_on_a_kept_alive_connection_leaves_its_idle_timer_only(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=5)
    for index in range(3):
        d = send(model)
        clock.advance(1)
        held.answer(index)
        result_of(d)
        # The idle timer, counted from the answer; the deadline gone with it.
        assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds() + 120.0]
    assert len(held.connections) == 1
    clock.advance(120)  # unused for the idle time: closed
    held.flush()
    assert clock.getDelayedCalls() == []
    d = send(model)
    assert len(held.connections) == 2
    held.answer(3)
    result_of(d)
    idle_connections_closed(model)
    assert clock.getDelayedCalls() == []


def test_cancelling_a_send_on_a_kept_alive_connection_leaves_no_timer(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=30)
    first = send(model)
    held.answer(0)
    result_of(first)

    d = send(model)
    d.cancel()

    failure_of(d)
    assert held.abandoned(1)
    assert clock.getDelayedCalls() == []
    assert model.in_flight == 0


def test_an_answered_connection_is_kept_alive_and_used_again(clock, stub, server):
    model = make_model(clock, stub, "/json")

    result_of(send(model, request_id="first"))
    result_of(send(model, request_id="second"))

    assert len(stub.connections) == 1
    assert [r["headers"][b"x-request-id"] for r in server.received] == [[b"first"], [b"second"]]


def test_cancelling_a_send_abandons_the_request(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=30)

    d = send(model)
    d.cancel()

    failure_of(d)
    assert held.abandoned(0)
    assert clock.getDelayedCalls() == []
    assert model.in_flight == 0


# --- connections that fail --------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, expected, wanted",
    [
        (ierror.ConnectionRefusedError(), BadGateway, "cannot connect to model 'm' at http://model.test:9001/json: connection refused"),
        (ierror.DNSLookupError("model.test"), BadGateway, "host name not found"),
        (ierror.TimeoutError(), GatewayTimeout, "cannot connect to model 'm' at http://model.test:9001/json within 10 s"),
    ],
)
def test_connection_failures_are_gateway_errors(clock, stub, error, expected, wanted):
    model = make_model(clock, stub)
    stub.refusing = error

    raised = failure_of(send(model), expected).value

    assert wanted in raised.message
    assert raised.model == "m"
    assert model.failures == 1
    assert clock.getDelayedCalls() == []


def test_a_model_that_closes_the_connection_midway_is_a_bad_gateway(clock, logged_errors):
    held = HeldModelServer()
    model = make_model(clock, held)

    d = send(model)
    request = held.requests[0]
    request.setHeader(b"content-length", b"100")
    request.write(b'{"partial": ')
    held.drop(0)

    raised = failure_of(d, BadGateway).value
    assert "closed the connection before answering" in raised.message
    assert model.failures == 1
    assert logged_errors.events == []


def test_an_unexpected_client_failure_is_logged_and_a_bad_gateway(clock, stub, logged_errors):
    model = make_model(clock, stub)
    stub.refusing = ZeroDivisionError("bug in the client")

    raised = failure_of(send(model), BadGateway).value

    assert raised.message == "model 'm' failed: bug in the client"
    assert len(logged_errors.flush(ZeroDivisionError)) == 1


# --- one rule for every model, in the real daemon ------------------------------------------------


@pytest.fixture(scope="module")
def strict_daemon(tmp_path_factory):
    """
    The real daemon with the example HTTP model server (echo), the Open Inference Protocol
    test server (tri, native v2) and the example raw model (adder), each started by it.
    """
    tmp = tmp_path_factory.mktemp("strict")
    echo_port, v2_port = free_port(), free_port()
    config = (
        f"[server]\nstate_dir = {json.dumps(str(tmp / 'state'))}\n\n"
        + toml_models(
            {"id": "echo", "type": "http", "url": f"http://127.0.0.1:{echo_port}/echo", "health_path": "/health",
             "command": [sys.executable, MODEL_SERVER, "--listen", f"tcp:{echo_port}:interface=127.0.0.1"],
             "timeout": 10},
            {"id": "adder", "type": "subprocess", "command": [sys.executable, os.path.join(ROOT, "examples",
                                                                                          "raw_model.py")]},
            {"id": "tri", "type": "http", "url": f"http://127.0.0.1:{v2_port}", "health_path": "/health",
             "command": [sys.executable, os.path.join(ROOT, "tests", "models", "v2_server.py"), "--port",
                         str(v2_port)], "timeout": 10},
        )
        + '[models.v2]\nnative = true\nmodel = "doubler"\n'
    )
    (tmp / "aibackend.toml").write_text(config)
    daemon = Daemon(str(tmp / "aibackend.toml"), cwd=ROOT)
    try:
        def ready():
            reply = daemon.request("GET", "/get/models")
            return reply.status == 200 and all(m["state"] == "ready" for m in reply.json()["models"])

        wait_until(ready, 20, "every model to be ready")
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def post(daemon, path: str, body: bytes):
    return daemon.request("POST", path, body, {"Content-Type": "application/json"})


@pytest.mark.timeout(60)
def test_an_http_models_infinity_is_a_502_as_a_subprocess_models_is(strict_daemon):
    # 1e999 is JSON (a number too big for a double); the models read it as infinity and
    # write it back as Infinity, which is not JSON.
    http_model = post(strict_daemon, "/post/predict?id=echo", b'{"x": 1e999}')
    subprocess_model = post(strict_daemon, "/post/predict?id=adder", b'{"numbers": [1e308, 1e308]}')

    for reply, model in ((http_model, "echo"), (subprocess_model, "adder")):
        assert reply.status == 502, reply
        assert reply.headers["Content-Type"] == "application/json"
        error = reply.json()["error"]
        assert error["type"] == "bad_gateway"
        assert error["model"] == model
        assert error["message"].startswith(
            f"model '{model}' answered JSON with NaN or Infinity, which clients cannot parse"), error
        assert error["request_id"] == reply.headers["X-Request-Id"]
    assert "Infinity" in http_model.json()["error"]["message"]  # the snippet of what came back


@pytest.mark.timeout(60)
def test_a_native_v2_models_infinity_is_a_502(strict_daemon):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1e308]}]}).encode()

    reply = post(strict_daemon, "/v2/models/tri/infer", body)

    assert reply.status == 502, reply
    assert "answered JSON with NaN or Infinity, which clients cannot parse" in reply.json()["error"]


@pytest.mark.timeout(60)
def test_finite_answers_still_pass(strict_daemon):
    assert post(strict_daemon, "/post/predict?id=echo", b'{"x": 1e308}').json()["echo"] == {"x": 1e308}
    assert post(strict_daemon, "/post/predict?id=adder", b'{"numbers": [1, 2]}').json() == {"sum": 3, "count": 2}
