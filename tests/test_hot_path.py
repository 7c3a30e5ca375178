"""
The lean hot path (issue 8): the route past Klein (the same checks and relay as Klein's
route, without its routing) answers as Klein's would, the HTTP
model's Agent-level client, endpoints made once, JSON checked with orjson and a fallback,
a jsonl answer passed on as the model wrote it, and access events that can be turned off.
"""

from __future__ import annotations

import json

import pytest
from hyperlink import DecodedURL
from twisted.internet.defer import CancelledError
from twisted.logger import globalLogPublisher
from twisted.web.error import SchemeNotSupported
from twisted.web.client import URI

from aibackend import errors
from aibackend.web import orjson_takes, parse_json
from aibackend.auth import Guard
from aibackend.httpmodel import EndpointCache, not_strict_json
from aibackend.lines import output_text
from aibackend.replicas import uri_bytes
from aibackend.testing import FakeModel, StubFrontDoor


# --- POST /post/predict without Klein answers as through Klein ----------------------------------

CASES = [
    ("?id=m", b'{"a": 1}', {}),
    ("?id=m", b"", {}),
    ("?id=ghost", b"{}", {}),
    ("", b"{}", {}),
    ("?id=", b"{}", {}),
    ("?id=m&id=n", b"{}", {}),
    ("?id=" + "x" * 200, b"{}", {}),
    ("?id=m", b'{"a": NaN}', {}),
    ("?id=m", b"\xff\xfe", {}),
    ("?id=m", b"{", {}),
    ("?id=m", b"<xml/>", {"Content-Type": "application/xml"}),
    ("?id=m?text=hi", b"{}", {}),
    ("?id=%ff", b"{}", {}),
]


def answer_without_request_id(response):
    body = response.json()
    if isinstance(body.get("error"), dict):
        body["error"].pop("request_id", None)
    return response.status, body, response.header("Content-Type"), response.header("Allow")


@pytest.mark.parametrize("query, body, headers", CASES)
def test_the_fast_route_answers_as_the_klein_route_does(clock, query, body, headers):
    # /POST/predict (the word in capitals) is the same operation, routed by Klein.
    model = FakeModel("m", clock).answers(201, b'{"from": "the model"}')
    door = StubFrontDoor(clock, [model])

    fast = door.call("POST", "/post/predict" + query, data=body, headers=headers)
    routed = door.call("POST", "/POST/predict" + query, data=body, headers=headers)

    assert answer_without_request_id(fast) == answer_without_request_id(routed)
    assert fast.header("X-Request-Id")


OUTCOMES = [
    ("answers", lambda model: model.answers(201, b'{"from": "the model"}', {b"x-model": b"1"})),
    ("times out", lambda model: model.fails(errors.GatewayTimeout("too slow", model="m"))),
    ("is unavailable", lambda model: model.fails(errors.ModelUnavailable("busy", model="m", retry_after=3))),
    ("cancels", lambda model: model.fails(CancelledError())),
    ("has a bug", lambda model: model.fails(ZeroDivisionError("a bug"))),
    ("raises at once", lambda model: model.raises(ZeroDivisionError("a bug"))),
]


@pytest.mark.parametrize("outcome", [setup for _, setup in OUTCOMES], ids=[name for name, _ in OUTCOMES])
def test_the_fast_route_and_the_klein_route_answer_and_log_each_outcome_alike(clock, outcome, logged_errors):
    """One relay below both: the same answer, headers and log entry, whatever the model does."""
    model = outcome(FakeModel("m", clock))
    door = StubFrontDoor(clock, [model])

    fast = door.call("POST", "/post/predict?id=m", data=b"{}")
    routed = door.call("POST", "/POST/predict?id=m", data=b"{}")
    logged_errors.flush(ZeroDivisionError)

    assert answer_without_request_id(fast) == answer_without_request_id(routed)
    assert fast.header("Retry-After") == routed.header("Retry-After")
    assert fast.header("X-Model") == routed.header("X-Model")
    fast_entry, routed_entry = [entry for entry in model.model_log.query() if entry["event"] == "request"]
    assert (fast_entry["status"], fast_entry.get("error")) == (routed_entry["status"], routed_entry.get("error"))
    assert fast_entry["status"] == fast.status


def test_the_fast_route_checks_client_keys(clock):
    guard = Guard(None, ["tcp:0:interface=127.0.0.1"], ["client-key-0123456789"])
    model = FakeModel("m", clock).answers()
    door = StubFrontDoor(clock, [model], guard=guard)

    refused = door.call("POST", "/post/predict?id=m", data=b"{}")
    allowed = door.call("POST", "/post/predict?id=m", data=b"{}",
                        headers={"Authorization": "Bearer client-key-0123456789"})

    assert refused.status == 401
    assert refused.header("WWW-Authenticate") == 'Bearer realm="aibackend"'
    assert allowed.status == 200
    assert len(model.received) == 1


def test_the_fast_route_answers_a_model_failure_as_the_error_shape(clock):
    model = FakeModel("m", clock).fails(errors.GatewayTimeout("too slow", model="m"))
    door = StubFrontDoor(clock, [model])

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert response.status == 504
    assert response.json()["error"]["type"] == "gateway_timeout"
    assert response.json()["error"]["request_id"] == response.header("X-Request-Id")


def test_an_unexpected_failure_on_the_fast_route_is_a_logged_500(clock, logged_errors):
    model = FakeModel("m", clock).fails(ZeroDivisionError("a bug"))
    door = StubFrontDoor(clock, [model])

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert response.status == 500
    assert response.json()["error"]["type"] == "internal_error"
    assert logged_errors.flush(ZeroDivisionError)


# --- JSON --------------------------------------------------------------------------------------


def test_values_are_read_exactly():
    # orjson reads integers past 64 bits as floats: values that are used are read with json.
    assert parse_json(b'{"n": 123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    # What orjson refuses is read again by json (parse_json), whose word is final:
    assert not orjson_takes(b"1e400")  # json reads it (as infinity), so it is taken as before
    assert parse_json(b"1e400") == float("inf")


@pytest.mark.parametrize("body, words", [
    (b'{"a": NaN}', "NaN is not valid JSON"),
    (b'{"a": Infinity}', "Infinity is not valid JSON"),
    (b"\xff", "not UTF-8"),
    (b'{"a": 1', "line 1 column 8"),
])
def test_bad_request_bodies_keep_jsons_messages(body, words):
    assert not orjson_takes(body)
    with pytest.raises(errors.BadRequest) as raised:
        parse_json(body)
    assert words in raised.value.message


def test_an_answer_is_taken_as_json_as_json_takes_it():
    assert not_strict_json(b'{"a": [1, 2.5, "x", null, true]}') is None
    assert not_strict_json(b"123456789012345678901234567890") is None
    assert not_strict_json(b"<html>") is not None
    assert not_strict_json(b"") is not None
    assert not_strict_json(b"\xff") is not None


# --- the HTTP model's client ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("http://127.0.0.1:9001/echo", b"http://127.0.0.1:9001/echo"),
    ("http://[::1]:8888/a b?x=é", b"http://[::1]:8888/a%20b?x=%C3%A9"),
    ("http://exämple.com/p", b"http://xn--exmple-cua.com/p"),
    ("https://api.example.com/v1/chat?key=a%2Fb", b"https://api.example.com/v1/chat?key=a%2Fb"),
])
def test_a_replica_url_is_encoded_once_as_a_request_target(text, expected):
    assert uri_bytes(DecodedURL.from_text(text)) == expected


def test_endpoints_are_made_once_per_scheme_host_and_port():
    from twisted.internet import reactor

    cache = EndpointCache(reactor, connect_timeout=3)

    first = cache.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9001/a"))
    again = cache.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9001/b?x=1"))
    other_port = cache.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9002/a"))
    tls = cache.endpointForURI(URI.fromBytes(b"https://127.0.0.1:9001/a"))

    assert first is again
    assert other_port is not first
    assert tls is not first
    assert type(tls).__name__ != type(first).__name__  # TLS wraps the TCP endpoint


def test_an_endpoint_for_another_scheme_is_refused():
    with pytest.raises(SchemeNotSupported):
        EndpointCache(None, connect_timeout=3).endpointForURI(URI.fromBytes(b"ftp://127.0.0.1:21/x"))


# --- a jsonl answer passed on as written -----------------------------------------------------------


def test_a_workers_answer_is_passed_on_byte_for_byte():
    line = b'{"id": "r-1", "output": {"b": 1.50, "a": [1,2 ,3], "s": "\\u00e9"}}\n'

    assert output_text(json.loads(line), line) == b'{"b": 1.50, "a": [1,2 ,3], "s": "\\u00e9"}'


@pytest.mark.parametrize("line", [
    b'{"output": {"a": 1}, "id": "r-1"}',            # another key order
    b'{"id":"r-1","output":{"a": 1}}',                # another spelling
    b'{"id": "r-1", "output": {"a": 1}, "x": 2}',     # another key
    b'{"id": "r-\\u0031", "output": {"a": 1}}',       # the id escaped
])
def test_an_answer_in_another_spelling_is_encoded_again(line):
    assert json.loads(output_text(json.loads(line), line)) == {"a": 1}


def test_a_big_integer_in_an_answer_encoded_again_stays_exact():
    line = b'{"output": 123456789012345678901234567890, "id": "r-1"}'

    assert output_text({"output": 1.2345678901234568e29, "id": "r-1"}, line) == b"123456789012345678901234567890"


def test_an_output_that_holds_the_marker_is_not_cut_short():
    line = b'{"id": "r-1", "output": "say \\", \\"output\\": " }'
    message = json.loads(line)

    assert json.loads(output_text(message, line)) == message["output"]


# --- access events ----------------------------------------------------------------------------------


def access_events_during(function):
    seen = []

    def observer(event):
        if event.get("log_namespace") == "aibackend.access":
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        function()
    finally:
        globalLogPublisher.removeObserver(observer)
    return seen


def test_access_events_say_the_line_and_keep_their_fields(clock):
    door = StubFrontDoor(clock, [FakeModel("m", clock).answers()])

    [event] = access_events_during(lambda: door.call("POST", "/post/predict?id=m&key=secret", data=b"{}",
                                                      headers={"X-Request-Id": "r-7"}))

    assert event["line"].startswith("127.0.0.1 POST /post/predict 200 ")
    assert event["line"].endswith(" model=m request=r-7")
    assert "secret" not in event["line"]
    assert (event["method"], event["path"], event["status"], event["model"], event["operation"]) == (
        "POST", "/post/predict", 200, "m", "predict")


def test_access_events_can_be_turned_off(clock):
    door = StubFrontDoor(clock, [FakeModel("m", clock).answers()])
    door.site.access_log = False

    assert access_events_during(lambda: door.call("POST", "/post/predict?id=m", data=b"{}")) == []


# --- listening ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("description, expected", [
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=1024"),
    ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=1024"),
    ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=1024"),
    ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
    ("unix:/run/aibackend.sock", "unix:/run/aibackend.sock"),
])
def test_tcp_listeners_get_a_backlog_for_bursts_unless_they_say(description, expected):
    from aibackend.listeners import with_backlog

    assert with_backlog(description) == expected
