"""
The front door, through StubFrontDoor: a real Site and Request, no socket.

Models are L{aibackend.testing.FakeModel}s: each test decides what the model answers and
looks at what it was sent.
"""

import re

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError
from zope.interface.verify import verifyObject

from aibackend import errors
from aibackend.interfaces import ISender, ModelAnswer, RequestContext
from aibackend.testing import FakeModel, StubFrontDoor, assert_error, has_fired, result_of

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def model(clock):
    return FakeModel("m", clock)


@pytest.fixture
def door(clock, model):
    return StubFrontDoor(clock, [model, FakeModel("other", clock)])


def request_entries(model):
    return [entry for entry in model.model_log.query() if entry["event"] == "request"]


# --- the fake itself -------------------------------------------------------------


def test_the_fake_model_provides_isender(model):
    assert verifyObject(ISender, model)


def test_the_fake_model_records_what_it_was_sent(model):
    answer = result_of(model.send(b'{"x": 1}', RequestContext(request_id="r")))

    assert answer == ModelAnswer(status=200, body=b'{"ok": true}')
    assert [(r.body, r.context.request_id) for r in model.received] == [(b'{"x": 1}', "r")]


def test_a_model_written_to_the_interface_can_be_registered(clock):
    from zope.interface import implementer

    from aibackend.interfaces import IModel
    from aibackend.logs import ModelLog
    from aibackend.modelstate import AlwaysReady
    from aibackend.registry import ModelDeps, ModelRegistry

    @implementer(IModel)
    class AsDocumented(AlwaysReady):
        model_id = "documented"
        type_name = "documented"
        spec = None

        def __init__(self):
            self.model_log = ModelLog(clock)

        def send(self, body, context):
            raise NotImplementedError()

        def describe(self):
            return {}

    model = AsDocumented()
    assert verifyObject(IModel, model)

    ModelRegistry(ModelDeps(reactor=clock)).add(model)


# --- predict ---------------------------------------------------------------------


def test_post_predict_forwards_the_body_unchanged_and_answers_the_models_body(door, model):
    body = b'{"text": "caf\xc3\xa9",   "n": [1, 2.50, 1e3], "nested": {"a": null}}'
    model.answers(201, b'{"label": "positive",  "score": 0.9}')

    response = door.call("POST", "/post/predict?id=m", data=body, headers={"Content-Type": "application/json"})

    assert response.status == 201
    assert response.body == b'{"label": "positive",  "score": 0.9}'
    assert response.header("Content-Type") == "application/json"
    assert [received.body for received in model.received] == [body]
    assert model.received[0].context.operation == "predict"


def test_a_models_error_status_is_passed_through(door, model):
    model.answers(422, b'{"detail": "text is required"}')

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert response.status == 422
    assert response.json() == {"detail": "text is required"}


def test_get_predict_sends_the_other_query_parameters_as_a_json_object(door, model):
    response = door.call("GET", "/get/predict?id=m&text=hello%20world&lang=en&tag=a&tag=b&empty=")

    assert response.status == 200
    assert model.received[0].json() == {"text": "hello world", "lang": "en", "tag": ["a", "b"], "empty": ""}


def test_get_predict_without_parameters_sends_an_empty_object(door, model):
    door.call("GET", "/get/predict?id=m")

    assert model.received[0].body == b"{}"


def test_the_originals_question_mark_separators_work(door, model):
    response = door.call("GET", "/get/predict?id=m?text=hi?n=1")

    assert response.status == 200
    assert model.received[0].json() == {"text": "hi", "n": "1"}


def test_plus_and_percent_escapes_are_decoded(door, model):
    door.call("GET", "/get/predict?id=m&q=a+b%26c%3Fd")

    assert model.received[0].json() == {"q": "a b&c?d"}


def test_the_path_word_is_case_insensitive(door, model):
    response = door.call("POST", "/POST/predict?id=m", data=b"{}")

    assert response.status == 200


# --- request ids --------------------------------------------------------------------


def test_the_clients_request_id_is_echoed_and_sent_to_the_model(door, model):
    response = door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": "client-id-42"})

    assert response.header("X-Request-Id") == "client-id-42"
    assert model.received[0].context.request_id == "client-id-42"


def test_a_request_id_is_made_when_the_client_gives_none(door, model):
    first = door.call("POST", "/post/predict?id=m", data=b"{}")
    second = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert HEX32.match(first.header("X-Request-Id"))
    assert first.header("X-Request-Id") != second.header("X-Request-Id")
    assert [r.context.request_id for r in model.received] == [
        first.header("X-Request-Id"),
        second.header("X-Request-Id"),
    ]


@pytest.mark.parametrize("given", ["has space", "x" * 201, "caf\u00e9"])
def test_an_unusable_client_request_id_is_replaced(door, model, given):
    response = door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": given.encode("utf-8")})

    assert HEX32.match(response.header("X-Request-Id"))
    assert model.received[0].context.request_id == response.header("X-Request-Id")


def test_errors_carry_the_request_id_too(door):
    response = door.call("POST", "/post/predict?id=nobody", data=b"{}", headers={"X-Request-Id": "abc"})

    assert response.header("X-Request-Id") == "abc"
    assert response.json()["error"]["request_id"] == "abc"


# --- routes and methods ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, allowed",
    [("POST", "/get/predict?id=m", "GET"), ("GET", "/post/predict?id=m", "POST"), ("PUT", "/post/getlogs?id=m", "POST")],
)
def test_the_path_word_must_match_the_method(door, model, method, path, allowed):
    response = door.call(method, path, data=b"{}" if method != "GET" else None)

    assert_error(response, 405, "method_not_allowed")
    assert response.header("Allow") == allowed
    assert model.received == []


def test_an_unknown_operation_is_404(door):
    response = door.call("POST", "/post/train?id=m", data=b"{}")

    error = assert_error(response, 404, "unknown_operation")
    assert "predict" in error["message"]


@pytest.mark.parametrize("path", ["/", "/foo", "/a/b/c", "/put/predict?id=m", "/post/predict/extra?id=m"])
def test_an_unknown_route_is_a_json_404(door, model, path):
    response = door.call("GET", path)

    assert_error(response, 404, "not_found")
    assert b"<html" not in response.body.lower()
    assert model.received == []


# --- the model id ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, wanted",
    [
        ("", "missing the model id"),
        ("?text=hi", "missing the model id"),
        ("?id=", "the model id is empty"),
        ("?id=m&id=other", "give id only once"),
        ("?id=" + "x" * 129, "129 characters"),
        ("?id=%FF", "not valid UTF-8"),
    ],
)
def test_a_bad_model_id_is_400(door, model, query, wanted):
    response = door.call("POST", "/post/predict" + query, data=b"{}")

    assert_error(response, 400, "bad_request", message=wanted)
    assert model.received == []


def test_an_id_of_128_characters_is_looked_up(door):
    response = door.call("POST", "/post/predict?id=" + "x" * 128, data=b"{}")

    assert_error(response, 404, "unknown_model", model="x" * 128)


def test_an_unknown_unicode_id_is_404_and_named(door):
    response = door.call("POST", "/post/predict?id=%C3%A9t%C3%A9", data=b"{}")

    assert_error(response, 404, "unknown_model", model="\u00e9t\u00e9")


# --- the body ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, wanted",
    [
        (b'{"text": ', "not valid JSON"),
        (b"{'single': 'quotes'}", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b'{"x": NaN}', "NaN is not valid JSON"),
        (b'{"x": Infinity}', "Infinity is not valid JSON"),
        (b'{"x": -Infinity}', "not valid JSON"),
        (b'{"text": "\xff\xfe"}', "not UTF-8"),
    ],
)
def test_a_body_that_is_not_strict_json_is_400(door, model, body, wanted):
    response = door.call("POST", "/post/predict?id=m", data=body, headers={"Content-Type": "application/json"})

    assert_error(response, 400, "bad_request", message=wanted)
    assert model.received == []


def test_a_utf16_body_is_refused_as_not_json(door, model):
    response = door.call("POST", "/post/predict?id=m", data='{"a": 1}'.encode("utf-16-le"))

    assert_error(response, 400, "bad_request", message="not valid JSON")
    assert model.received == []


@pytest.mark.parametrize("body", [b"", b"   \r\n"])
def test_an_empty_body_sends_an_empty_object(door, model, body):
    response = door.call("POST", "/post/predict?id=m", data=body)

    assert response.status == 200
    assert model.received[0].body == b"{}"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",  # what `curl -d` sends
        "application/vnd.api+json",
    ],
)
def test_json_like_content_types_are_accepted(door, model, content_type):
    response = door.call("POST", "/post/predict?id=m", data=b'{"a": 1}', headers={"Content-Type": content_type})

    assert response.status == 200
    assert model.received[0].body == b'{"a": 1}'


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/octet-stream", "image/png"])
def test_other_content_types_are_415(door, model, content_type):
    response = door.call("POST", "/post/predict?id=m", data=b'{"a": 1}', headers={"Content-Type": content_type})

    error = assert_error(response, 415, "unsupported_media_type")
    assert content_type.split(";")[0] in error["message"]
    assert model.received == []


# --- when the model fails ----------------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, error_type",
    [
        (errors.BadGateway("model 'm' answered something that is not JSON", model="m"), 502, "bad_gateway"),
        (errors.GatewayTimeout("model 'm' did not answer within 30 s", model="m"), 504, "gateway_timeout"),
        (errors.ModelUnavailable("model 'm' is restarting", model="m", retry_after=7), 503, "model_unavailable"),
    ],
)
def test_a_model_failure_has_its_status_and_the_error_shape(door, model, error, status, error_type):
    model.fails(error)

    response = door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": "rid"})

    assert_error(response, status, error_type, model="m", message=error.message)
    assert response.json()["error"]["request_id"] == "rid"
    if status == 503:
        assert response.header("Retry-After") == "7"
    else:
        assert response.header("Retry-After") is None
    [entry] = request_entries(model)
    assert (entry["request_id"], entry["status"], entry["error"]) == ("rid", status, error.message)


def test_a_model_refusing_at_once_is_answered_and_logged(door, model):
    # A model type that raises from send() instead of returning a failed Deferred.
    model.raises(errors.ModelUnavailable("model 'm' is starting", model="m", retry_after=3))

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert_error(response, 503, "model_unavailable", model="m")
    assert response.header("Retry-After") == "3"
    assert [entry["status"] for entry in request_entries(model)] == [503]


def test_an_unexpected_exception_in_a_model_is_a_json_500_and_logged(door, model, logged_errors):
    model.fails(ZeroDivisionError("the model's code is broken"))

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    error = assert_error(response, 500, "internal_error")
    assert "ZeroDivisionError" not in response.body.decode()  # no internals shown to the client
    assert "Traceback" not in error["message"]
    [logged] = logged_errors.flush(ZeroDivisionError)
    assert logged["path"] == "/post/predict"  # the path only: a query string may carry a key
    [entry] = request_entries(model)
    assert entry["status"] == 500
    assert entry["error"] == "the model's code is broken"


def test_an_exception_raised_at_once_by_a_model_is_a_json_500(door, model, logged_errors):
    model.raises(KeyError("oops"))

    response = door.call("POST", "/post/predict?id=m", data=b"{}")

    assert_error(response, 500, "internal_error")
    assert len(logged_errors.flush(KeyError)) == 1


# --- answers that come later ----------------------------------------------------------------


def test_a_slow_answer_is_written_when_it_comes(door, model, clock):
    model.holds()
    d = door.request("POST", "/post/predict?id=m", data=b'{"x": 1}', headers={"X-Request-Id": "slow"})
    assert not has_fired(d)
    assert len(model.pending) == 1

    clock.advance(2.5)
    model.pending[0].callback(ModelAnswer(200, b'{"late": true}'))
    door.flush()

    response = result_of(d)
    assert response.status == 200
    assert response.json() == {"late": True}
    [entry] = request_entries(model)
    assert entry["request_id"] == "slow"
    assert entry["latency_ms"] == 2500.0


def test_two_requests_do_not_wait_for_each_other(door, model):
    model.holds()
    first = door.request("POST", "/post/predict?id=m", data=b'{"n": 1}')
    second = door.request("POST", "/post/predict?id=m", data=b'{"n": 2}')
    [first_pending, second_pending] = model.pending

    second_pending.callback(ModelAnswer(200, b'{"n": 2}'))
    door.flush()
    assert result_of(second).json() == {"n": 2}
    assert not has_fired(first)

    first_pending.callback(ModelAnswer(200, b'{"n": 1}'))
    door.flush()
    assert result_of(first).json() == {"n": 1}


# --- the model's log -------------------------------------------------------------------------


def test_each_predict_writes_a_request_entry(door, model, clock):
    door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": "ok-1"})
    door.call("POST", "/post/predict?id=m", data=b"{bad", headers={"X-Request-Id": "bad-1"})
    model.fails(errors.BadGateway("model 'm' refused", model="m"))
    door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": "down-1"})

    entries = request_entries(model)
    assert [(e["request_id"], e["operation"], e["status"], e["level"]) for e in entries] == [
        ("ok-1", "predict", 200, "info"),
        ("bad-1", "predict", 400, "warning"),
        ("down-1", "predict", 502, "error"),
    ]
    assert "error" not in entries[0]
    assert "not valid JSON" in entries[1]["error"]
    assert entries[2]["error"] == "model 'm' refused"
    assert all(e["latency_ms"] == 0.0 for e in entries)


def test_other_models_logs_are_untouched(door, model):
    door.call("POST", "/post/predict?id=m", data=b"{}")

    assert request_entries(door.registry.get("other")) == []


def getlogs(door, query=""):
    return door.call("GET", "/get/getlogs?id=m" + query)


def test_getlogs_shows_the_models_log(door, model):
    door.call("POST", "/post/predict?id=m", data=b"{}", headers={"X-Request-Id": "seen"})

    response = getlogs(door)

    assert response.status == 200
    assert response.header("Content-Type") == "application/json"
    body = response.json()
    assert body["model"] == "m"
    assert body["count"] == len(body["entries"]) == 2
    assert body["max_entries"] == 1000
    assert body["dropped"] == 0
    added, request = body["entries"]
    assert added["event"] == "added"
    assert (request["event"], request["request_id"], request["status"]) == ("request", "seen", 200)


def test_getlogs_works_with_post_too(door):
    response = door.call("POST", "/post/getlogs?id=m", data=b"")

    assert response.status == 200
    assert response.json()["model"] == "m"


def test_getlogs_filters(door, model, clock):
    clock.advance(1000)
    model.model_log.append("debug", "d")
    clock.advance(10)
    model.model_log.append("warning", "w")
    model.model_log.append("error", "e")

    assert [e["event"] for e in getlogs(door, "&limit=1").json()["entries"]] == ["e"]
    assert [e["event"] for e in getlogs(door, "&level=warn").json()["entries"]] == ["w", "e"]
    assert [e["event"] for e in getlogs(door, "&since=1000").json()["entries"]] == ["w", "e"]
    assert [e["event"] for e in getlogs(door, "&since=1970-01-01T00:16:40Z").json()["entries"]] == ["w", "e"]
    assert [e["event"] for e in getlogs(door, "&since=1000&level=error&limit=5").json()["entries"]] == ["e"]
    assert getlogs(door, "&limit=0").json()["entries"] == []


@pytest.mark.parametrize(
    "query, wanted",
    [
        ("&limit=ten", "limit must be a whole number"),
        ("&limit=-1", "limit must be at least 0"),
        ("&limit=1&limit=2", "give limit only once"),
        ("&level=loud", "unknown level"),
        ("&since=last-tuesday", "since must be"),
    ],
)
def test_getlogs_refuses_bad_filters(door, query, wanted):
    assert_error(getlogs(door, query), 400, "bad_request", message=wanted)


def test_getlogs_of_an_unknown_model_is_404(door):
    assert_error(door.call("GET", "/get/getlogs?id=ghost"), 404, "unknown_model", model="ghost")


def test_getlogs_shows_dropped_entries(clock):
    small = FakeModel("small", clock, log_entries=2)
    door = StubFrontDoor(clock, [small])
    for _ in range(3):
        door.call("POST", "/post/predict?id=small", data=b"{}")

    body = door.call("GET", "/get/getlogs?id=small").json()

    assert (body["count"], body["max_entries"], body["dropped"]) == (2, 2, 2)


def test_cleanlogs_says_how_many_entries_it_removed(door, model):
    door.call("POST", "/post/predict?id=m", data=b"{}")
    door.call("POST", "/post/predict?id=m", data=b"{}")

    response = door.call("POST", "/post/cleanlogs?id=m", data=b"")

    assert response.status == 200
    assert response.json() == {"model": "m", "removed": 3}  # "added" and two requests
    assert getlogs(door).json()["entries"] == []
    # An admin operation: GET (which a page could make with an <img>) is refused.
    refused = door.call("GET", "/get/cleanlogs?id=m")
    assert_error(refused, 405, "method_not_allowed")
    assert refused.header("Allow") == "POST"


def test_cleanlogs_of_an_unknown_model_is_404(door):
    assert_error(door.call("POST", "/post/cleanlogs?id=ghost", data=b""), 404, "unknown_model", model="ghost")


# --- the client going away ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/post/predict?id=m", "/POST/predict?id=m"])  # past Klein, through it
def test_a_client_that_goes_away_cancels_the_models_request(door, model, path):
    model.holds()
    d = door.request("POST", path, data=b"{}", headers={"X-Request-Id": "gone"})
    assert len(model.pending) == 1

    # Drop every connection between the stub client and the site.
    door.drop_connections()

    assert [received.context.request_id for received in model.cancelled] == ["gone"]
    assert model.pending == []
    [entry] = request_entries(model)
    assert (entry["request_id"], entry["status"]) == ("gone", 499)
    d.addErrback(lambda failure: None)  # the client's own request failed, as it should


@pytest.mark.parametrize("path", ["/post/predict?id=m", "/POST/predict?id=m"])
def test_a_model_cancelling_its_own_request_is_an_error_for_a_waiting_client(door, model, logged_errors, path):
    model.fails(CancelledError())

    response = door.call("POST", path, data=b"{}")

    logged_errors.flush()
    assert response.status >= 500
    assert response.json()["error"]["request_id"] == response.header("X-Request-Id")
    assert [entry["status"] for entry in request_entries(model)] == [response.status]


# --- hardening (issue 12): JSON too deep, paths werkzeug would redirect, bytes that are not UTF-8 ---


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


@pytest.mark.parametrize(
    "text, deeper_than_2",
    [
        (b"[[1]]", False),
        (b"[[[1]]]", True),
        (b'{"a": {"b": {"c": 1}}}', True),
        (b'{"a": [1], "c": [[2]]}', True),
        (b"[[1], [2], [3]]", False),
        (b'["[[[[", "]]]]", [1]]', False),  # brackets inside strings do not count
        (b'["\\"[[[[", [1]]', False),  # nor after an escaped quote
        (b'["\\\\", [[1]]]', True),  # an escaped backslash ends before the quote
        (b'["\\\\\\"[[[", [1]]', False),
        (b"[[],[],[],[],[]]", False),  # many brackets, shallow
    ],
)
def test_the_depth_of_json_is_measured_outside_strings(text, deeper_than_2):
    from aibackend.jsonread import too_deep

    assert too_deep(text, 2) is deeper_than_2


def test_json_as_deep_as_the_limit_is_read_and_one_level_more_is_a_400():
    from aibackend.web import parse_json
    from aibackend.jsonread import MAX_JSON_DEPTH

    assert parse_json(nested(MAX_JSON_DEPTH))[0][0]
    with pytest.raises(errors.BadRequest) as caught:
        parse_json(nested(MAX_JSON_DEPTH + 1))
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in caught.value.message


@pytest.mark.parametrize("depth", [1_025, 100_000])
def test_a_predict_body_deeper_than_orjson_reads_is_400(door, depth):
    """orjson refuses it, and Python's json then raised RecursionError, uncaught (500)."""
    assert_error(door.call("POST", "/post/predict?id=m", data=nested(depth)), 400, "bad_request",
                 message="nested deeper than 512 levels")


def test_a_predict_body_orjson_takes_is_passed_on_unread(door, model):
    """The daemon never walks a predict body: its depth is orjson's (1,024)."""
    body = nested(1_000)

    assert door.call("POST", "/post/predict?id=m", data=body).status == 200
    assert model.received[0].body == body


@pytest.mark.parametrize(
    "path",
    ["/get//models", "/post//addmodel", "/get/predict/?id=m", "/get/models/", "/health//live"],
)
def test_a_path_with_an_empty_segment_or_a_trailing_slash_is_404_never_a_redirect(door, path):
    """werkzeug redirected an empty segment (merge_slashes): it reached the catch-all as a bug (500)."""
    method = "POST" if path.startswith("/post") else "GET"
    response = door.call(method, path, data=b"{}" if method == "POST" else None)

    assert_error(response, 404, "not_found", message="no route")
    assert response.header("Location") is None


@pytest.mark.parametrize("path, shape", [("/get/models", "front door"), ("/v2/models/m/ready", "v2")])
def test_a_redirect_werkzeug_makes_anyway_is_answered_as_not_found(door, path, shape):
    """Defence in depth: should a rule ever redirect, the path the client sent is still no route."""
    import json

    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyRequest
    from werkzeug.routing import RequestRedirect

    request = DummyRequest(path.encode().split(b"/")[1:])
    request.path = path.encode()
    request.aibackend_request_id = None  # (the daemon's BoundedRequest has it)
    # What the Klein app of the path's front door answers a failure of its routing with.
    front = door.front_door.api if shape == "front door" else door.front_door.open_inference

    body = front.shape.failure(request, Failure(RequestRedirect("http://localhost/elsewhere")))

    assert request.responseCode == 404
    assert request.responseHeaders.getRawHeaders(b"location") is None
    error = json.loads(body)["error"]
    assert isinstance(error, dict if shape == "front door" else str)


@pytest.mark.parametrize("shape", ["front door", "v2"])
@pytest.mark.parametrize("gone", [False, True])
def test_a_cancelled_request_is_answered_503_unless_its_client_went_away(door, shape, gone):
    """What Klein's handler (written once for both apps) makes of a CancelledError outside the relay."""
    import json

    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"x"])
    request.aibackend_request_id = None
    request.aibackend_gone = gone
    front = door.front_door.api if shape == "front door" else door.front_door.open_inference

    body = front.shape.failure(request, Failure(CancelledError()))

    if gone:
        assert body == b""
        return
    assert request.responseCode == 503
    error = json.loads(body)["error"]
    if shape == "front door":
        assert error["type"] == "model_unavailable"
        assert error["message"] == "the request was abandoned before it was answered"
        assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    else:
        assert error == "the request was abandoned before it was answered"
        assert request.responseHeaders.getRawHeaders(b"retry-after") is None


@pytest.mark.parametrize("path", ["/get/predict%FF?id=m", "/get/%C3%28?id=m", "/post/predict%FF?id=m"])
def test_a_path_that_is_not_utf8_is_a_json_400(door, path):
    """Klein answered it in text (400) and logged a traceback (the autouse logged_errors fixture would fail)."""
    method = "POST" if path.startswith("/post") else "GET"
    response = door.call(method, path, data=b"{}" if method == "POST" else None)

    assert_error(response, 400, "bad_request", message="path is not UTF-8")


def test_a_query_that_is_not_utf8_is_a_json_400(door):
    assert_error(door.call("GET", "/get/predict?id=m&text=%FF"), 400, "bad_request", message="not valid UTF-8")


# --- getlogs off the reactor thread ---------------------------------------------------------


def test_a_long_log_is_filtered_and_rendered_in_a_thread_and_answers_the_same(clock):
    import json

    from aibackend.api import THREAD_ABOVE_ENTRIES

    model = FakeModel("m", clock)
    ran = []

    def in_thread(function, *args):
        ran.append(function.__name__)
        return result_now(function(*args))

    from twisted.internet.defer import succeed as result_now

    door = StubFrontDoor(clock, [model], in_thread=in_thread)
    for index in range(THREAD_ABOVE_ENTRIES + 50):
        clock.advance(1)
        model.model_log.append("warning" if index % 2 else "info", "event", index=index)
    expected = model.model_log.query(level="warning", limit=20)

    response = door.call("GET", "/get/getlogs?id=m&level=warning&limit=20")

    assert ran == ["render"]
    assert response.status == 200
    assert response.body == json.dumps({"model": "m", "count": 20, "max_entries": 1000, "dropped": 0,
                                        "entries": expected}).encode()


def test_a_short_log_is_rendered_at_once(clock):
    model = FakeModel("m", clock)
    door = StubFrontDoor(clock, [model], in_thread=lambda *args: pytest.fail("a short log went to a thread"))

    assert door.call("GET", "/get/getlogs?id=m").json()["count"] == 1


def test_entries_written_while_a_long_log_renders_are_not_in_its_answer(clock):
    """The answer is the log as it was when asked (a snapshot), whatever the thread's timing."""
    from twisted.internet.defer import Deferred

    model = FakeModel("m", clock)
    held = []

    def in_thread(function, *args):
        d = Deferred()
        held.append((d, function))
        return d

    door = StubFrontDoor(clock, [model], in_thread=in_thread)
    for _ in range(200):
        model.model_log.append("info", "before")
    pending = door.request("GET", "/get/getlogs?id=m")
    model.model_log.append("info", "after")
    model.model_log.clear()
    [(d, function)] = held
    d.callback(function())
    door.flush()

    body = result_of(pending).json()
    assert body["count"] == 201
    assert {entry["event"] for entry in body["entries"]} == {"added", "before"}


@pytest.mark.parametrize("path", ["/get/models", "/v2/models"])
def test_a_host_that_is_not_utf8_is_a_400_in_the_routes_shape(door, path):
    """Klein decodes the Host for werkzeug: it answered text/plain 400 and logged a traceback."""
    response = door.call("GET", path, headers={b"Host": [b"\xff.example"]})

    assert response.status == 400
    assert response.header("X-Request-Id")
    error = response.json()["error"]
    message = error if path.startswith("/v2") else error["message"]
    assert "Host header is not UTF-8" in message


@pytest_twisted.ensureDeferred
async def test_by_default_a_long_log_is_rendered_in_the_reactors_thread_pool(clock, monkeypatch):
    import json
    import threading

    from twisted.internet import threads
    from twisted.web.test.requesthelper import DummyRequest

    from aibackend import api

    model = FakeModel("m", clock)
    for _ in range(api.THREAD_ABOVE_ENTRIES + 1):
        model.model_log.append("info", "event")
    door = StubFrontDoor(clock, [model], in_thread=threads.deferToThread)
    ran_in = []
    real_select = api.select

    def select(*args, **kwargs):
        ran_in.append(threading.current_thread())
        return real_select(*args, **kwargs)

    monkeypatch.setattr(api, "select", select)

    request = DummyRequest([b""])
    request.aibackend_caller = None  # what the daemon's requests have (aibackend.server.BoundedRequest)
    body = await door.front_door.api.getlogs(request, "r", {"id": ["m"]})

    assert ran_in and ran_in[0] is not threading.main_thread()
    assert json.loads(body)["count"] == api.THREAD_ABOVE_ENTRIES + 2  # with the "added" entry


@pytest.mark.parametrize("tail, status", [(b"1e400]", 200), (b"1,]", 400)])
def test_a_large_predict_body_orjson_refuses_is_read_again_in_a_thread(clock, tail, status):
    """json takes seconds for a few megabytes: not on the reactor."""
    from twisted.internet.defer import maybeDeferred

    from aibackend.web import THREAD_ABOVE_BYTES

    model = FakeModel("m", clock).answers()
    ran = []

    def in_thread(function, *args):
        ran.append(function.__name__)
        return maybeDeferred(function, *args)

    door = StubFrontDoor(clock, [model], in_thread=in_thread)
    body = b"[" + b"1," * (THREAD_ABOVE_BYTES // 2) + tail  # a number orjson cannot read, or a mistake

    response = door.call("POST", "/post/predict?id=m", data=body)

    assert ran == ["parse_json"]
    assert response.status == status, response.body
    assert [r.body for r in model.received] == ([body] if status == 200 else [])
    if status == 400:
        assert response.json()["error"]["type"] == "bad_request"
        assert model.model_log.query()[-1]["status"] == 400  # the refusal is in the model's log


def test_a_small_predict_body_orjson_refuses_is_read_again_at_once(clock):
    model = FakeModel("m", clock).answers()
    door = StubFrontDoor(clock, [model], in_thread=lambda *a: pytest.fail("a thread for a small body"))

    response = door.call("POST", "/post/predict?id=m", data=b'{"n": 1e400}')

    assert response.status == 200
