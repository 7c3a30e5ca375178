"""
Dynamic batching of an HTTP model (issue 17, item 3), on an injected clock: an HTTP model
with C{[models.batching]} POSTs each batch as a JSON array of its requests' bodies to the
batching C{url}, through its own client (the lean one, over L{MemoryEndpoints} here), and
splits the answer (an array in the same order) back into each request's answer.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import error as ierror
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from aibackend.config import ConfigError, HttpModelSpec, parse_config
from aibackend.errors import BadGateway, GatewayTimeout, ModelBusy, ModelUnavailable
from aibackend.httpmodel import BatchingHttpModel, HttpModel, batch_route
from aibackend.batching import TensorBatch
from aibackend.httpspec import HttpBatchingSpec
from aibackend.interfaces import IBatching, IModel, IStreaming, RequestContext, RowsContext
from aibackend.testing import MemoryEndpoints, failure_of, has_fired, result_of

URL = "http://model.test:9001"


class BatchServer(Resource):
    """
    A model server that records what it is sent and answers by path:

      /predict          200 {"alone": BODY}
      /rows/double      200 {"y": each row of input x doubled, "n": the rows' count, for each row}
      /rows/short       as /rows/double, one row fewer
      /batch/echo       200 [{"echo": ITEM, "of": N}, ...]
      /batch/short      200 one answer fewer than the batch's requests
      /batch/object     200 {"not": "an array"}
      /batch/status/N   N {"error": {"message": "the model says no"}}
      /batch/hang       nothing, ever
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.received = []
        self.held = []

    def render(self, request):
        body = request.content.read()
        self.received.append({"path": request.path.decode(), "body": body,
                              "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}})
        request.setHeader(b"content-type", b"application/json")
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "predict":
            return json.dumps({"alone": json.loads(body)}).encode()
        if parts[0] == "rows":  # the model's url of the tensor cases: one output row per input row
            rows = json.loads(body)["x"]
            if parts[1] == "short":
                rows = rows[1:]
            return json.dumps({"y": [[2 * v for v in row] for row in rows], "n": [len(rows)] * len(rows)}).encode()
        items = json.loads(body)
        kind = parts[1]
        if kind == "echo":
            return json.dumps([{"echo": item, "of": len(items)} for item in items]).encode()
        if kind == "short":
            return json.dumps([{"echo": item} for item in items[1:]]).encode()
        if kind == "object":
            return b'{"not": "an array"}'
        if kind == "status":
            request.setResponseCode(int(parts[2]))
            return b'{"error": {"message": "the model says no"}}'
        if kind == "hang":
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b'{"error": "no such path"}'


@pytest.fixture
def server():
    return BatchServer()


@pytest.fixture
def stub(server):
    return MemoryEndpoints(server)


MADE: list = []


@pytest.fixture(autouse=True)
def _close_models(clock):
    yield
    while MADE:
        model = MADE.pop()
        model.stopService()
        model.endpoints.flush()


def make_model(clock, endpoints, batch_url="/batch/echo", *, max_batch_size=4, max_delay_ms=10,
               path="/predict", **fields) -> BatchingHttpModel:
    batching = HttpBatchingSpec(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, url=batch_url)
    spec = HttpModelSpec(id="m", type="http", url=URL + path, batching=batching, **fields)
    model = BatchingHttpModel(spec, reactor=clock, endpoints=endpoints, environ={})
    model.endpoints = endpoints
    MADE.append(model)
    return model


def ask(model, x, request_id=None, path=None, operation="predict"):
    context = RequestContext(request_id=request_id or f"r{x}", path=path, operation=operation)
    return model.send(json.dumps({"x": x}).encode(), context)


def sent_batch(model, clock, count, delay=0.01):
    """C{count} requests, the batch's delay, and what the model's server wrote: their Deferreds."""
    ds = [ask(model, i) for i in range(count)]
    clock.advance(delay)
    model.endpoints.flush()
    return ds


# --- configuration ------------------------------------------------------------------------------


def http_model(**keys):
    return {"id": "h", "type": "http", "url": "http://127.0.0.1:9/predict", **keys}


def test_an_http_model_with_a_batching_table_and_url_is_a_batching_model():
    config = parse_config({"models": [http_model(batching={"url": "/predict_batch", "max_batch_size": 8,
                                                           "max_delay_ms": 2})]}, environ={})

    [spec] = config.models
    assert spec.batching == HttpBatchingSpec(max_batch_size=8, max_delay_ms=2, url="/predict_batch")
    assert spec.public()["batching"] == {"max_batch_size": 8, "max_delay_ms": 2, "preferred_sizes": [],
                                         "url": "/predict_batch"}


@pytest.mark.parametrize("keys, problem", [
    ({"batching": {"max_batch_size": 8}}, "models[0].batching.url: is required"),
    ({"batching": {"max_batch_size": 8, "url": "ftp://x/y"}},
     "models[0].batching.url: must be a path ('/predict_batch', on each of the model's servers) or an http(s) "
     "URL"),
    ({"batching": {"max_batch_size": 8, "url": "/b?x=1"}},
     "models[0].batching.url: must be a path without a query or fragment"),
    ({"url": None, "urls": ["http://127.0.0.1:9/p", "http://127.0.0.1:10/p"],
      "batching": {"max_batch_size": 8, "url": "http://127.0.0.1:11/batch"}},
     "models[0].batching.url: must be a path with urls (replicas)"),
    ({"batching": {"max_batch_size": 200, "url": "/b"}}, "models[0].batching.max_batch_size: is more than"),
    ({"batching": {"url": "/b"}}, "models[0].batching.max_batch_size: is required"),
    ({"batching": {"max_batch_size": 8, "url": "/b", "batch_url": "/c"}},
     "models[0].batching.batch_url: is not a known key"),
    ({"batching": "/b"}, "models[0].batching: must be a table"),
])
def test_bad_http_batching_settings_are_clear_config_errors(keys, problem):
    model = {k: v for k, v in http_model(**keys).items() if v is not None}
    with pytest.raises(ConfigError) as raised:
        parse_config({"models": [model]}, environ={})

    assert any(line.startswith(problem) for line in raised.value.lines()), raised.value.lines()


def test_without_a_batching_table_an_http_model_is_as_before(clock, stub):
    spec = HttpModelSpec(id="m", type="http", url=URL + "/predict")

    assert not IBatching.providedBy(HttpModel(spec, reactor=clock, endpoints=stub, environ={}))


# --- batches ---------------------------------------------------------------------------------------


def test_a_batching_http_model_provides_ibatching_and_still_streams(clock, stub):
    model = make_model(clock, stub)

    assert verifyObject(IBatching, model)
    assert IModel.providedBy(model) and IStreaming.providedBy(model)


def test_requests_that_come_within_the_delay_go_in_one_post_of_an_array_and_each_gets_its_answer(
        clock, stub, server):
    model = make_model(clock, stub, headers={"X-Api-Key": "k"})

    ds = [ask(model, i) for i in range(3)]
    clock.advance(0.009)
    stub.flush()
    assert server.received == [] and not any(has_fired(d) for d in ds)
    clock.advance(0.002)
    stub.flush()

    [received] = server.received
    assert received["path"] == "/batch/echo"
    assert received["body"] == b'[{"x": 0},{"x": 1},{"x": 2}]'  # each body as it would be sent alone
    assert received["headers"][b"x-request-id"] == [b"r0, r1, r2"]
    assert received["headers"][b"x-api-key"] == [b"k"]
    assert received["headers"][b"content-type"] == [b"application/json"]
    answers = [result_of(d) for d in ds]
    assert [a.status for a in answers] == [200] * 3
    assert [json.loads(a.body) for a in answers] == [{"echo": {"x": i}, "of": 3} for i in range(3)]
    assert model.batch_stats.batches == 1 and model.batch_stats.reasons["delay"] == 1
    assert model.requests == 3 and model.failures == 0
    described = model.describe()["batching"]
    assert described["url"] == "/batch/echo" and described["batches"] == 1 and described["waiting"] == 0


def test_a_full_batch_leaves_at_once_and_the_rest_wait_for_the_next(clock, stub, server):
    model = make_model(clock, stub, max_batch_size=4)

    ds = [ask(model, i) for i in range(6)]
    stub.flush()
    assert [json.loads(r["body"]) for r in server.received] == [[{"x": i} for i in range(4)]]
    clock.advance(0.01)
    stub.flush()

    assert [len(json.loads(r["body"])) for r in server.received] == [4, 2]
    assert [json.loads(result_of(d).body)["echo"]["x"] for d in ds] == list(range(6))


def test_a_whole_batch_url_is_posted_to_as_it_is(clock, stub, server):
    model = make_model(clock, stub, "http://model.test:9001/batch/echo")

    [d] = sent_batch(model, clock, 1)

    assert server.received[0]["path"] == "/batch/echo"
    assert json.loads(result_of(d).body) == {"echo": {"x": 0}, "of": 1}


def test_a_batch_path_is_on_each_replicas_server_and_a_whole_url_as_it_is():
    spec = HttpModelSpec(id="m", type="http", url="http://a.test:1/v1/predict?x=1",
                         urls=("http://a.test:1/v1/predict?x=1", "https://b.test:2/p"),
                         batching=HttpBatchingSpec(max_batch_size=2, url="/predict_batch"))
    routes = [batch_route(replica, "/predict_batch") for replica in HttpModel(spec, reactor=None).replicas]

    assert [route.uri for route in routes] == [b"http://a.test:1/predict_batch", b"https://b.test:2/predict_batch"]
    assert routes[0].head == b"POST /predict_batch HTTP/1.1\r\nHost: a.test:1\r\n"
    assert batch_route(routes[0], "http://c.test:3/b").uri == b"http://c.test:3/b"


def test_a_batch_refused_by_one_replica_goes_to_another(clock, stub, server):
    stub.refused_ports[9001] = ierror.ConnectionRefusedError("refused")
    model = make_model(clock, stub, urls=(URL + "/predict", "http://model.test:9002/predict"))

    ds = sent_batch(model, clock, 2)

    [received] = server.received
    assert received["path"] == "/batch/echo" and received["headers"][b"host"] == [b"model.test:9002"]
    assert model.replicas[0].failures == 1  # tried first, refused
    assert [json.loads(result_of(d).body)["echo"] for d in ds] == [{"x": 0}, {"x": 1}]
    assert model.batch_stats.batches == 1  # sent once, as far as its figures go


def test_requests_to_the_servers_other_routes_are_not_batched(clock, stub, server):
    model = make_model(clock, stub)

    d = ask(model, 7, path=("embeddings",), operation="embeddings")  # a native OpenAI server's route
    stub.flush()

    assert [r["path"] for r in server.received] == ["/predict/embeddings"]
    assert json.loads(result_of(d).body) == {"alone": {"x": 7}}
    assert model.batch_stats.batches == 0


@pytest.mark.parametrize("path, said", [
    ("/batch/short", "answered a batch of 3 requests with 2 answers"),
    ("/batch/object", "answered a batch of 3 requests with a JSON object"),
])
def test_an_answer_that_is_not_an_array_of_one_answer_per_request_is_a_502_for_each(clock, stub, path, said):
    model = make_model(clock, stub, path)

    ds = sent_batch(model, clock, 3)

    errors = [failure_of(d, BadGateway).value for d in ds]
    assert all(e.status == 502 and e.model == "m" for e in errors)
    assert errors[0].message.startswith(f"model 'm' {said} (a batch is answered by a JSON array")
    assert model.failures == 3


@pytest.mark.parametrize("status", [400, 500, 503])
def test_a_non_2xx_answer_is_every_requests_answer(clock, stub, status):
    model = make_model(clock, stub, f"/batch/status/{status}")

    ds = sent_batch(model, clock, 2)

    answers = [result_of(d) for d in ds]
    assert [a.status for a in answers] == [status] * 2
    assert [json.loads(a.body) for a in answers] == [{"error": {"message": "the model says no"}}] * 2
    assert model.failures == 2


def test_a_batch_that_cannot_be_sent_fails_each_request(clock, stub):
    stub.refusing = ierror.ConnectionRefusedError()
    model = make_model(clock, stub)

    ds = sent_batch(model, clock, 2)

    errors = [failure_of(d, BadGateway).value for d in ds]
    assert all("connection refused" in e.message for e in errors)


# --- each request keeps its rights -----------------------------------------------------------------


def test_each_request_of_a_batch_that_never_answers_times_out_at_its_own_deadline(clock, stub, server):
    model = make_model(clock, stub, "/batch/hang", timeout=2, max_delay_ms=100)

    first = ask(model, 0)
    clock.advance(0.05)
    second = ask(model, 1)
    clock.advance(0.05)  # the batch leaves (its first request waited 100 ms)
    stub.flush()
    assert len(server.held) == 1

    clock.advance(1.9)  # the first request's deadline: 2 s after it came
    failure_of(first, GatewayTimeout)
    assert not has_fired(second)
    assert not server.held[0]._disconnected  # the second still waits for the exchange

    clock.advance(0.05)
    stub.flush()
    assert "did not answer within 2 s" in failure_of(second, GatewayTimeout).value.message
    assert server.held[0]._disconnected
    assert model.in_flight == 0
    assert model.failures == 2


def test_a_request_cancelled_in_a_sent_batch_fails_alone_and_the_others_are_answered(clock, stub, server):
    model = make_model(clock, stub, "/batch/hang")

    ds = sent_batch(model, clock, 3)
    ds[1].cancel()
    failure_of(ds[1])
    assert not server.held[0]._disconnected
    ds[0].cancel()
    ds[2].cancel()  # every one gone: the exchange is abandoned
    stub.flush()

    failure_of(ds[0])
    failure_of(ds[2])
    assert server.held[0]._disconnected
    assert model.in_flight == 0


def test_a_request_cancelled_while_its_batch_forms_leaves_it(clock, stub, server):
    model = make_model(clock, stub)

    ds = [ask(model, i) for i in range(3)]
    ds[0].cancel()
    clock.advance(0.01)
    stub.flush()

    assert json.loads(server.received[0]["body"]) == [{"x": 1}, {"x": 2}]
    failure_of(ds[0])
    assert [result_of(d).status for d in ds[1:]] == [200, 200]


def test_with_max_concurrency_a_batch_waits_for_a_place_and_waiting_requests_count_in_max_queue(
        clock, stub, server):
    model = make_model(clock, stub, "/batch/hang", max_concurrency=1, max_queue=4, max_batch_size=2)

    first = [ask(model, i) for i in range(2)]  # a full batch: sent at once
    waiting = [ask(model, i) for i in range(2, 6)]  # two full batches: they wait for the place
    stub.flush()
    assert len(server.held) == 1
    assert model.in_flight == 1
    assert model.queued == 4

    with pytest.raises(ModelBusy) as shed:
        ask(model, 6)
    assert shed.value.message == ("model 'm' is busy: 4 requests are waiting to be batched or for a place "
                                  "(max_queue)")
    assert model.shed == 1

    # The first batch's answer frees the place: the next batch goes.
    held = server.held[0]
    held.write(b'[{"a": 1}, {"a": 2}]')
    held.finish()
    stub.flush()
    assert [json.loads(result_of(d).body) for d in first] == [{"a": 1}, {"a": 2}]
    assert len(server.held) == 2
    assert json.loads(server.received[1]["body"]) == [{"x": 2}, {"x": 3}]
    assert model.queued == 2
    for d in waiting:
        d.cancel()
        failure_of(d)
    stub.flush()
    assert model.queued == 0 and model.in_flight == 0


def answer_held(server, stub, index, answers):
    held = server.held[index]
    held.write(json.dumps(answers).encode())
    held.finish()
    stub.flush()


def test_batches_that_waited_for_a_place_go_together_up_to_max_batch_size(clock, stub, server):
    model = make_model(clock, stub, "/batch/hang", max_concurrency=1, max_batch_size=4)

    first = [ask(model, i) for i in range(4)]  # full: sent at once
    second = [ask(model, 4)]
    clock.advance(0.01)  # a batch of one leaves, and waits for the place
    third = [ask(model, 5), ask(model, 6)]
    clock.advance(0.01)
    fourth = [ask(model, 7), ask(model, 8)]
    clock.advance(0.01)
    stub.flush()
    assert len(server.held) == 1 and model.queued == 5 and model.describe()["queued"] == 5

    answer_held(server, stub, 0, [{"a": i} for i in range(4)])
    assert [json.loads(result_of(d).body) for d in first] == [{"a": i} for i in range(4)]
    # The two batches first in line go as one (1 + 2 requests); the next would make 5.
    assert json.loads(server.received[1]["body"]) == [{"x": 4}, {"x": 5}, {"x": 6}]
    assert server.received[1]["headers"][b"x-request-id"] == [b"r4, r5, r6"]
    assert model.queued == 2 and model.batch_stats.batches == 2 and model.batch_stats.size_sum == 7

    answer_held(server, stub, 1, [{"a": 4}, {"a": 5}, {"a": 6}])
    assert [json.loads(result_of(d).body) for d in second + third] == [{"a": 4}, {"a": 5}, {"a": 6}]
    assert json.loads(server.received[2]["body"]) == [{"x": 7}, {"x": 8}]
    answer_held(server, stub, 2, [{"a": 7}])  # one answer short: a 502 for both of its requests
    assert all(failure_of(d, BadGateway) for d in fourth)
    assert model.queued == 0 and model.in_flight == 0


def test_batches_sent_together_are_abandoned_only_once_all_their_requests_are_gone(clock, stub, server):
    model = make_model(clock, stub, "/batch/hang", max_concurrency=1, max_batch_size=4)

    first = [ask(model, i) for i in range(4)]
    second = [ask(model, 4)]
    clock.advance(0.01)
    third = [ask(model, 5)]
    clock.advance(0.01)
    stub.flush()
    answer_held(server, stub, 0, [{"a": i} for i in range(4)])
    for d in first:
        result_of(d)
    assert json.loads(server.received[1]["body"]) == [{"x": 4}, {"x": 5}]

    second[0].cancel()
    failure_of(second[0])
    stub.flush()
    assert not server.held[1]._disconnected
    answer_held(server, stub, 1, [{"a": 4}, {"a": 5}])
    assert json.loads(result_of(third[0]).body) == {"a": 5}


def test_a_batch_that_waits_too_long_for_a_place_is_a_504_for_each(clock, stub, server):
    model = make_model(clock, stub, "/batch/hang", max_concurrency=1, max_batch_size=2, timeout=1)

    first = [ask(model, 0), ask(model, 1)]
    waiting = [ask(model, 2), ask(model, 3)]
    stub.flush()
    clock.advance(1)
    stub.flush()

    assert all(failure_of(d, GatewayTimeout) for d in first + waiting)
    assert model.queued == 0 and model.in_flight == 0
    assert len(server.received) == 1


def test_stopping_the_model_fails_the_requests_waiting_to_be_batched(clock, stub):
    model = make_model(clock, stub)

    d = ask(model, 0)
    model.stopService()

    assert isinstance(failure_of(d, ModelUnavailable).value, ModelUnavailable)
    assert clock.getDelayedCalls() == []


def test_an_answered_batch_leaves_no_timer_but_its_kept_alive_connection(clock, stub):
    model = make_model(clock, stub, timeout=5)

    for d in sent_batch(model, clock, 3):
        result_of(d)

    assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds() + 120.0]


# --- requests concatenated along their batch dimension (the Open Inference Protocol's) -------------

KEY = ((("x", "FP32", (2,)),), "[null, null]")


def ask_rows(model, request_id, rows, key=KEY):
    """A request of C{rows} (each [a, b]) that batches with those of its key, as aibackend.v2 makes one."""
    context = RowsContext(request_id=request_id, operation="infer", batch=TensorBatch(key, len(rows)))
    return model.send(json.dumps({"x": rows}).encode(), context)


def test_requests_of_one_key_are_one_call_of_all_their_rows_and_each_gets_its_own_rows_back(clock, stub, server):
    model = make_model(clock, stub, path="/rows/double")

    ds = [ask_rows(model, "a", [[1, 2]]), ask_rows(model, "b", [[3, 4], [5, 6]]), ask_rows(model, "c", [[7, 8]])]
    assert model.queued == 3
    clock.advance(0.011)
    stub.flush()

    [received] = server.received
    assert received["path"] == "/rows/double"  # the model's own url: one request of all the rows
    assert json.loads(received["body"]) == {"x": [[1, 2], [3, 4], [5, 6], [7, 8]]}
    assert received["headers"][b"x-request-id"] == [b"a,b,c"]
    assert [json.loads(result_of(d).body) for d in ds] == [
        {"y": [[2, 4]], "n": [4]}, {"y": [[6, 8], [10, 12]], "n": [4, 4]}, {"y": [[14, 16]], "n": [4]}]
    assert model.batch_stats.batches == 1 and model.batch_stats.size_sum == 3
    assert model.keyed == {} and model.queued == 0
    assert clock.getDelayedCalls()[0].getTime() == clock.seconds() + 120.0  # the kept-alive connection's alone
    assert len(clock.getDelayedCalls()) == 1


def test_requests_of_other_keys_or_without_one_are_never_concatenated_together(clock, stub, server):
    model = make_model(clock, stub, path="/rows/double")
    other = ((("x", "FP32", (3,)),), "[null, null]")
    params = ((("x", "FP32", (2,)),), '[{"scale": 2}, null]')

    ds = [ask_rows(model, "a", [[1, 2]]), ask_rows(model, "b", [[1, 2, 3]], other),
          ask_rows(model, "c", [[3, 4]], params), ask_rows(model, "d", [[5, 6]]), ask(model, 9)]
    assert len(model.keyed) == 3
    clock.advance(0.011)
    stub.flush()

    bodies = sorted(r["body"] for r in server.received if r["path"] == "/rows/double")
    assert bodies == sorted([b'{"x": [[1, 2], [5, 6]]}', b'{"x": [[1, 2, 3]]}', b'{"x": [[3, 4]]}'])
    assert [json.loads(r["body"]) for r in server.received if r["path"] == "/batch/echo"] == [[{"x": 9}]]
    assert json.loads(result_of(ds[3]).body) == {"y": [[10, 12]], "n": [2]}
    assert json.loads(result_of(ds[1]).body) == {"y": [[2, 4, 6]], "n": [1]}
    assert [result_of(d).status for d in (ds[0], ds[2], ds[4])] == [200] * 3
    assert model.keyed == {}


def test_an_answer_without_one_row_per_row_is_a_502_for_each_request(clock, stub):
    model = make_model(clock, stub, path="/rows/short")

    ds = [ask_rows(model, "a", [[1, 2]]), ask_rows(model, "b", [[3, 4]])]
    clock.advance(0.011)
    stub.flush()

    errors = [failure_of(d, BadGateway).value for d in ds]
    assert errors[0].message == (
        "model 'm' answered a batch of 2 requests (2 rows) badly: output 'y' is a list of 1 rows for a batch "
        "of 2 rows (each output has one row per row of the inputs, in order)")
    assert model.failures == 2


def test_a_request_of_a_concatenated_call_cancelled_fails_alone(clock, stub, server):
    model = make_model(clock, stub, path="/rows/double")

    ds = [ask_rows(model, "a", [[1, 2]]), ask_rows(model, "b", [[3, 4]])]
    clock.advance(0.011)
    ds[0].cancel()
    failure_of(ds[0])
    stub.flush()

    assert json.loads(result_of(ds[1]).body) == {"y": [[6, 8]], "n": [2]}


def test_requests_waiting_to_be_concatenated_count_in_max_queue(clock, stub):
    model = make_model(clock, stub, path="/rows/double", max_queue=4)

    ds = [ask_rows(model, "a", [[1, 2]]), ask(model, 1), ask_rows(model, "c", [[1, 2]], (("z",), "")),
          ask_rows(model, "d", [[1, 2]])]
    with pytest.raises(ModelBusy):
        ask_rows(model, "e", [[1, 2]])
    with pytest.raises(ModelBusy):
        ask(model, 5)

    assert len(model.keyed) == 2  # the refused one left no batcher behind
    model.stopService()
    assert all(isinstance(failure_of(d, ModelUnavailable).value, ModelUnavailable) for d in ds)
    assert model.keyed == {}


def test_a_batchs_request_ids_header_is_bounded():
    from aibackend.httpmodel import MAX_BATCH_IDS, batch_request_ids

    assert batch_request_ids(["a", "b"]) == b"a, b"
    many = [f"{index:032x}" for index in range(1000)]
    header = batch_request_ids(many)
    assert len(header) <= MAX_BATCH_IDS
    shown = header.decode().split(", ")
    assert shown[:-1] == many[:len(shown) - 1]
    assert shown[-1] == f"... ({1000 - (len(shown) - 1)} more)"
