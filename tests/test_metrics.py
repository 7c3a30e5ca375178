"""
Observability in memory: C{/metrics} (parsed with C{prometheus_client}'s own parser),
C{/health/live} and C{/health/ready}, and the access log, through L{StubFrontDoor} with
L{FakeModel}s on a L{Clock}.

Latencies are exact: the front door measures them on the test's clock, which only moves
when a test advances it while a model holds its answer.
"""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from aibackend import errors
from aibackend.interfaces import ModelAnswer
from aibackend.metrics import REFUSAL_REASONS
from aibackend.testing import FakeModel, HeldModelServer, StubFrontDoor, result_of

ALLOWED_LABELS = {"model", "operation", "status_class", "reason", "le"}
STATUS_CLASS = re.compile(r"^[1-5]xx$")
TOKEN = "unit-admin-token-0123456789abcdef"


# --- helpers ------------------------------------------------------------------------------


def scrape(door):
    """@return: (the response, the metric families by name)."""
    response = door.call("GET", "/metrics")
    assert response.status == 200, response.body
    families = {family.name: family for family in text_string_to_metric_families(response.body.decode("utf-8"))}
    return response, families


def samples(door, sample_name):
    """@return: {frozenset of (label, value): value} of one sample name, e.g. aibackend_requests_total."""
    _, families = scrape(door)
    found = {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == sample_name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def value(door, sample_name, **labels):
    """@return: the value of the one sample with exactly these labels, or None."""
    return samples(door, sample_name).get(frozenset(labels.items()))


def request_counts(door) -> dict:
    """aibackend_requests_total as {(model, operation, status class): count}."""
    return {
        (labels["model"], labels["operation"], labels["status_class"]): count
        for labels, count in ((dict(key), count) for key, count in samples(door, "aibackend_requests_total").items())
    }


def refusal_counts(door) -> dict:
    return {dict(key)["reason"]: count for key, count in samples(door, "aibackend_refusals_total").items()}


def predict(door, model_id="m", body=b"{}", **kwargs):
    return door.call("POST", f"/post/predict?id={model_id}", data=body, **kwargs)


def http_model(model_id, clock, endpoints, timeout=5):
    from aibackend.config import Table, parse_model
    from aibackend.httpmodel import HttpModel

    problems = []
    spec = parse_model(
        Table({"id": model_id, "type": "http", "url": "http://127.0.0.1:9/predict", "timeout": timeout},
              "models[0]", problems)
    )
    assert problems == []
    return HttpModel(spec, reactor=clock, endpoints=endpoints)


@pytest.fixture
def model(clock):
    return FakeModel("m", clock)


@pytest.fixture
def door(clock, model):
    door = StubFrontDoor(clock, [model, FakeModel("other", clock)], max_body_bytes=1024)
    # The daemon's site counts its 413s and connections in the front door's metrics
    # (build_service passes them); StubFrontDoor's site is built without.
    door.site.metrics = door.front_door.metrics
    return door


@pytest.fixture
def access_events():
    """The events of the C{aibackend.access} namespace logged while the test runs."""
    from aibackend.testing import access_events_logged

    with access_events_logged() as events:
        yield events


# --- /metrics -----------------------------------------------------------------------------


def test_metrics_is_prometheus_text_with_every_family(door):
    response, families = scrape(door)

    assert response.header("Content-Type") == CONTENT_TYPE_PLAIN_0_0_4
    types = {name: family.type for name, family in families.items()}
    assert types == {
        "aibackend_requests": "counter",
        "aibackend_request_duration_seconds": "histogram",
        "aibackend_model_in_flight": "gauge",
        "aibackend_model_queued": "gauge",
        "aibackend_model_ready": "gauge",
        "aibackend_model_restarts": "counter",
        "aibackend_model_processes": "gauge",
        "aibackend_model_ejections": "counter",
        "aibackend_open_connections": "gauge",
        "aibackend_refusals": "counter",
        "aibackend_models": "gauge",
        "aibackend_stream_first_chunk_seconds": "histogram",
        "aibackend_stream_chunks": "counter",
        "aibackend_streams": "counter",
    }
    assert value(door, "aibackend_models") == 2
    assert value(door, "aibackend_model_ready", model="m") == 1
    assert value(door, "aibackend_model_in_flight", model="other") == 0
    assert value(door, "aibackend_model_queued", model="other") == 0


def test_the_request_counter_moves_by_status_class_with_each_outcome(door, model):
    assert request_counts(door) == {}
    steps = [
        # (what the model does, the status the client sees, the counter after it)
        (lambda: model.answers(200), 200, {"2xx": 1}),
        (lambda: model.answers(422, {"error": "no text"}), 422, {"2xx": 1, "4xx": 1}),
        (lambda: model.fails(errors.BadGateway("crashed", model="m")), 502, {"2xx": 1, "4xx": 1, "5xx": 1}),
        (lambda: model.fails(errors.GatewayTimeout("too slow", model="m")), 504, {"2xx": 1, "4xx": 1, "5xx": 2}),
        (lambda: model.fails(errors.ModelUnavailable("restarting", model="m")), 503, {"2xx": 1, "4xx": 1, "5xx": 3}),
        (lambda: model.answers(201), 201, {"2xx": 2, "4xx": 1, "5xx": 3}),
    ]
    for arrange, status, counts in steps:
        arrange()

        response = predict(door)

        assert response.status == status, response.body
        assert request_counts(door) == {("m", "predict", klass): n for klass, n in counts.items()}, status


def test_a_models_4xx_is_passed_through_and_counted_as_4xx(door, model):
    model.answers(422, {"error": "send text"})

    response = predict(door)

    assert (response.status, response.json()) == (422, {"error": "send text"})
    assert value(door, "aibackend_requests_total", model="m", operation="predict", status_class="4xx") == 1


def test_a_daemon_side_400_counts_for_the_model_and_an_unknown_model_for_nobody(door):
    assert predict(door, body=b"{not json").status == 400
    assert predict(door, model_id="ghost").status == 404

    assert request_counts(door) == {("m", "predict", "4xx"): 1}
    assert "ghost" not in door.call("GET", "/metrics").body.decode()


@pytest.mark.parametrize(
    "seconds, inside, outside",
    [
        (0.3, "0.5", "0.25"),
        (0.25, "0.25", "0.1"),  # a bucket's bound is inclusive (le)
        (0.0005, "0.001", None),
        (42.0, "60.0", "30.0"),
        (700.0, "+Inf", "600.0"),
    ],
)
def test_a_latency_lands_in_its_bucket(door, model, clock, seconds, inside, outside):
    model.holds()
    d = door.request("POST", "/post/predict?id=m", data=b"{}")
    clock.advance(seconds)
    model.pending[0].callback(ModelAnswer(status=200, body=b"{}"))
    door.flush()
    assert result_of(d).status == 200

    labels = {"model": "m", "operation": "predict"}
    assert value(door, "aibackend_request_duration_seconds_count", **labels) == 1
    assert value(door, "aibackend_request_duration_seconds_sum", **labels) == pytest.approx(seconds)
    assert value(door, "aibackend_request_duration_seconds_bucket", le=inside, **labels) == 1
    if outside is not None:
        assert value(door, "aibackend_request_duration_seconds_bucket", le=outside, **labels) == 0
    assert value(door, "aibackend_request_duration_seconds_bucket", le="+Inf", **labels) == 1


def test_the_histogram_adds_up_and_its_buckets_run_from_milliseconds_to_minutes(door, model, clock):
    model.holds()
    for seconds, status in [(0.3, 200), (2.0, 200), (0.004, 500)]:
        d = door.request("POST", "/post/predict?id=m", data=b"{}")
        clock.advance(seconds)
        model.pending[0].callback(ModelAnswer(status=status, body=b"{}"))
        door.flush()
        assert result_of(d).status == status

    buckets = {
        dict(key)["le"]: count
        for key, count in samples(door, "aibackend_request_duration_seconds_bucket").items()
        if dict(key)["model"] == "m"
    }
    bounds = sorted(float(le) for le in buckets)
    assert bounds[0] <= 0.005 and 300.0 <= bounds[-2] and bounds[-1] == float("inf")
    assert [buckets[le] for le in ("0.001", "0.005", "0.25", "0.5", "1.0", "2.5", "+Inf")] == [0, 1, 1, 2, 2, 3, 3]
    labels = {"model": "m", "operation": "predict"}
    assert value(door, "aibackend_request_duration_seconds_count", **labels) == 3
    assert value(door, "aibackend_request_duration_seconds_sum", **labels) == pytest.approx(2.304)
    # Failures are timed too, and counted by their class.
    assert request_counts(door) == {("m", "predict", "2xx"): 2, ("m", "predict", "5xx"): 1}


def test_the_in_flight_gauge_counts_requests_a_model_holds(door, model):
    model.holds()
    first = door.request("POST", "/post/predict?id=m", data=b"{}")
    second = door.request("POST", "/post/predict?id=m", data=b"{}")
    try:
        assert len(model.pending) == 2
        assert value(door, "aibackend_model_in_flight", model="m") == 2
    finally:
        for d in list(model.pending):
            d.callback(ModelAnswer(status=200, body=b"{}"))
        door.flush()
        result_of(first), result_of(second)
    assert value(door, "aibackend_model_in_flight", model="m") == 0


def test_the_in_flight_gauge_of_an_http_model_until_its_timeout(clock):
    server = HeldModelServer()
    slow = http_model("slow", clock, server, timeout=5)
    door = StubFrontDoor(clock, [slow])

    d = door.request("POST", "/post/predict?id=slow", data=b"{}")
    server.flush()

    assert len(server.requests) == 1
    assert value(door, "aibackend_model_in_flight", model="slow") == 1
    clock.advance(5)
    door.flush()
    assert result_of(d).status == 504
    assert server.abandoned(0)
    assert value(door, "aibackend_model_in_flight", model="slow") == 0
    assert request_counts(door) == {("slow", "predict", "5xx"): 1}
    assert value(door, "aibackend_request_duration_seconds_sum", model="slow", operation="predict") == 5.0


def test_every_refusal_reason_is_exported_from_zero(door):
    assert refusal_counts(door) == dict.fromkeys(REFUSAL_REASONS, 0)
    assert set(REFUSAL_REASONS) == {"body_too_large", "unauthorized", "forbidden", "model_unavailable",
                                    "malformed_request", "slow_client", "connection_limit", "rate_limited"}


def test_a_413_is_a_body_too_large_refusal(door, model):
    response = predict(door, body=b'"' + b"a" * 2000 + b'"')

    assert response.status == 413
    assert model.received == []
    assert refusal_counts(door) == {**dict.fromkeys(REFUSAL_REASONS, 0), "body_too_large": 1}
    assert request_counts(door) == {}


def test_a_503_from_a_model_is_a_model_unavailable_refusal(door, model):
    model.fails(errors.ModelUnavailable("restarting", model="m", retry_after=3))

    response = predict(door)

    assert (response.status, response.header("Retry-After")) == (503, "3")
    assert refusal_counts(door) == {**dict.fromkeys(REFUSAL_REASONS, 0), "model_unavailable": 1}


def test_a_401_without_the_admin_token_is_an_unauthorized_refusal(clock, model):
    from aibackend.auth import Guard

    door = StubFrontDoor(clock, [model], guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"]))

    refused = door.call("POST", "/post/cleanlogs?id=m")
    wrong = door.call("POST", "/post/cleanlogs?id=m", headers={"Authorization": "Bearer " + "x" * 33})
    allowed = door.call("POST", "/post/cleanlogs?id=m", headers={"Authorization": f"Bearer {TOKEN}"})

    assert (refused.status, wrong.status, allowed.status) == (401, 401, 200)
    assert refusal_counts(door) == {**dict.fromkeys(REFUSAL_REASONS, 0), "unauthorized": 2}


def test_a_403_for_admin_operations_beyond_loopback_is_a_forbidden_refusal(clock, model):
    from aibackend.auth import Guard

    door = StubFrontDoor(clock, [model], guard=Guard(None, ["tcp:8080"]))

    response = door.call("POST", "/post/cleanlogs?id=m")

    assert response.status == 403
    assert refusal_counts(door) == {**dict.fromkeys(REFUSAL_REASONS, 0), "forbidden": 1}


def test_client_errors_that_are_not_refusals_are_not_counted_as_refusals(door):
    assert predict(door, model_id="ghost").status == 404
    assert predict(door, body=b"[").status == 400
    assert door.call("GET", "/post/predict?id=m").status == 405
    assert door.call("GET", "/nowhere").status == 404

    assert refusal_counts(door) == dict.fromkeys(REFUSAL_REASONS, 0)


def test_a_removed_models_series_are_dropped(door, clock):
    for model_id in ("m", "other"):
        assert predict(door, model_id=model_id).status == 200
    assert {key[0] for key in request_counts(door)} == {"m", "other"}

    result_of(door.registry.remove("other"))

    _, families = scrape(door)
    models = {sample.labels.get("model") for family in families.values() for sample in family.samples}
    assert models == {"m", None}
    assert value(door, "aibackend_models") == 1


def test_labels_hold_no_request_ids_nor_free_text(door, model):
    free_text = "what is the meaning of life"
    predict(door, headers={"X-Request-Id": "req-7f3a9c-unique"})
    predict(door, model_id=free_text.replace(" ", "+"), headers={"X-Request-Id": "req-8e2b-unique"})
    predict(door, body=b"{bad", headers={"X-Request-Id": "req-9d1c-unique"})
    door.call("GET", f"/get/predict?id=m&prompt={free_text.replace(' ', '+')}")
    model.fails(errors.BadGateway(f"the model said: {free_text}", model="m"))
    predict(door)
    predict(door, body=b'"' + b"z" * 2000 + b'"', headers={"X-Request-Id": "req-too-big-unique"})

    response, families = scrape(door)

    text = response.body.decode()
    for secret in ("req-7f3a9c-unique", "req-8e2b-unique", "req-9d1c-unique", "req-too-big-unique", "meaning"):
        assert secret not in text
    seen = {}
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            for name, label_value in sample.labels.items():
                seen.setdefault(name, set()).add(label_value)
    assert seen["model"] <= {"m", "other"}
    assert seen["operation"] == {"predict"}
    assert all(STATUS_CLASS.match(klass) for klass in seen["status_class"])
    assert seen["reason"] == set(REFUSAL_REASONS)


# --- health -------------------------------------------------------------------------------


def test_live_is_200_json(door):
    response = door.call("GET", "/health/live")

    assert response.status == 200
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id")
    assert response.json() == {"status": "live"}


def test_ready_is_503_until_the_daemon_accepts_work_then_200(door):
    assert door.front_door.accepting is False

    starting = door.call("GET", "/health/ready")

    assert starting.status == 503
    assert starting.header("Content-Type") == "application/json"
    assert starting.header("Retry-After") == "1"
    assert starting.json()["status"] == "not ready"
    assert starting.json()["reason"]

    door.front_door.accepting = True
    ready = door.call("GET", "/health/ready")

    assert ready.status == 200
    assert ready.json() == {"status": "ready", "models": {"ready": 2}}


def test_the_readiness_service_flips_ready_at_start_and_at_stop(door):
    from aibackend.daemon import ReadinessService

    from twisted.internet.testing import MemoryReactor

    readiness = ReadinessService(door.front_door, MemoryReactor())
    assert door.call("GET", "/health/ready").status == 503

    readiness.startService()
    assert door.call("GET", "/health/ready").status == 200

    readiness.stopService()
    assert door.call("GET", "/health/ready").status == 503


def test_probes_need_no_client_key(clock, model):
    from aibackend.auth import Guard

    door = StubFrontDoor(clock, [model], guard=Guard(None, ["tcp:0:interface=127.0.0.1"], ["client-key-0123456789"]))
    door.front_door.accepting = True

    assert door.call("GET", "/health/live").status == 200
    assert door.call("GET", "/health/ready").status == 200
    assert predict(door).status == 401


# --- the access log -----------------------------------------------------------------------


def test_one_access_event_per_request_with_its_fields(door, model, clock, access_events):
    model.holds()
    d = door.request("POST", "/post/predict?id=m", data=b'{"x": 1}', headers={"X-Request-Id": "acc-1"})
    assert access_events == []  # not before the answer
    clock.advance(0.3)
    door.site.reactor.advance(0.3)  # the site times the access line on its own reactor
    model.pending[0].callback(ModelAnswer(status=200, body=b'{"label": "positive"}'))
    door.flush()
    assert result_of(d).status == 200

    [event] = access_events
    fields = {key: event.get(key) for key in ("request_id", "model", "operation", "status", "latency_ms", "bytes")}
    assert fields == {
        "request_id": "acc-1",
        "model": "m",
        "operation": "predict",
        "status": 200,
        "latency_ms": 300.0,
        "bytes": len(b'{"label": "positive"}'),
    }
    assert event["log_level"].name == "info"


@pytest.mark.parametrize(
    "arrange, method, path, status",
    [
        (lambda m: m.answers(422, {"error": "x"}), "POST", "/post/predict?id=m", 422),
        (lambda m: m.fails(errors.BadGateway("crashed", model="m")), "POST", "/post/predict?id=m", 502),
        (lambda m: m.fails(errors.GatewayTimeout("slow", model="m")), "POST", "/post/predict?id=m", 504),
        (lambda m: m.fails(errors.ModelUnavailable("down", model="m")), "POST", "/post/predict?id=m", 503),
        (lambda m: None, "POST", "/post/predict?id=ghost", 404),
        (lambda m: None, "GET", "/health/live", 200),
        (lambda m: None, "GET", "/metrics", 200),
    ],
)
def test_every_outcome_has_one_access_event(door, model, access_events, arrange, method, path, status):
    arrange(model)

    response = door.call(method, path, data=b"{}" if method == "POST" else None, headers={"X-Request-Id": "one"})

    assert response.status == status
    [event] = access_events
    assert (event["status"], event["request_id"], event["bytes"]) == (status, "one", len(response.body))
    assert event["path"] == path.partition("?")[0]


def test_a_413_has_its_access_event_too(door, access_events):
    response = predict(door, body=b'"' + b"a" * 2000 + b'"', headers={"X-Request-Id": "too-big"})

    assert response.status == 413
    [event] = access_events
    assert (event["status"], event["request_id"]) == (413, "too-big")


def test_the_access_event_holds_no_query_string_nor_token(clock, model, access_events):
    from twisted.logger import formatEvent

    from aibackend.auth import Guard

    door = StubFrontDoor(clock, [model], guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"]))
    door.call("POST", "/post/cleanlogs?id=m", headers={"Authorization": f"Bearer {TOKEN}"})
    door.call("POST", "/post/cleanlogs?id=m&token=" + TOKEN)
    door.call("GET", "/get/predict?id=m&api_key=query-secret-4242", headers={"Authorization": f"Bearer {TOKEN}"})

    assert len(access_events) == 3
    for event in access_events:
        shown = formatEvent(event) + json.dumps({k: v for k, v in event.items() if isinstance(v, (str, int, float))})
        assert TOKEN not in shown
        assert "query-secret-4242" not in shown


def test_an_unexpected_error_logs_no_query_string(door, model, logged_errors):
    from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        model.raises(RuntimeError("the model type has a bug"))
        response = door.call("GET", "/get/predict?id=m&api_key=query-secret-4242")
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert response.status == 500
    assert len(logged_errors.flush(RuntimeError)) == 1
    for event in events:
        assert "query-secret-4242" not in formatEvent(event) + eventAsJSON(event)
