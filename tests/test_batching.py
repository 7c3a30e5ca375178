"""
Dynamic batching on a Clock: the Batcher in front of a fake IBatching model (when a batch
leaves and why, cancellation, answers per request), then a batching jsonl subprocess model
over fake processes (the batch message, answers by id, a whole batch's error, shedding,
queued batches merged, cancellation and timeouts of requests in a batch, crashes), and the
batching keys of the configuration. Every test ends with no delayed call on the clock.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from aibackend.batching import Batcher
from aibackend.config import ConfigError, Table, parse_config, parse_model
from aibackend.configbase import BatchingSpec
from aibackend.errors import BadGateway, GatewayTimeout, ModelBusy, ModelUnavailable
from aibackend.interfaces import IBatching, IModel, ModelAnswer, RequestContext
from aibackend.metrics import Metrics
from aibackend.registry import ModelDeps
from aibackend.subprocess import BatchingSubprocessModel, SubprocessModel
from aibackend.testing import FakeBatchingModel, LineLauncher, failure_of, has_fired, result_of


class Got:
    """What a request's Deferred fired with (a failure handled here)."""

    def __init__(self, d):
        self.results = []
        d.addBoth(self.results.append)

    @property
    def fired(self) -> bool:
        return bool(self.results)

    def answer(self) -> ModelAnswer:
        (result,) = self.results
        assert not isinstance(result, Failure), result.getTraceback()
        return result

    def error(self, kind):
        (result,) = self.results
        assert isinstance(result, Failure) and result.check(kind), result
        return result.value


def batcher(clock, *, size=4, delay_ms=10, preferred=(), timeout=60.0):
    spec = BatchingSpec(max_batch_size=size, max_delay_ms=delay_ms, preferred_sizes=tuple(preferred))
    model = FakeBatchingModel(spec)
    return model, Batcher(model, spec, clock, timeout)


def send(batcher_, request_id: str, body: bytes = b'{"x": 1}') -> Got:
    return Got(batcher_.send(body, RequestContext(request_id=request_id)))


# --- when a batch leaves ------------------------------------------------------------------


def test_a_full_batch_leaves_at_once_and_its_timer_is_cancelled(clock):
    model, b = batcher(clock, size=3, delay_ms=50)
    assert verifyObject(IBatching, model)

    send(b, "a"), send(b, "b")
    assert model.batches == [] and len(clock.getDelayedCalls()) == 1
    send(b, "c")

    (batch,) = model.batches
    assert batch.ids == ["a", "b", "c"]
    assert clock.getDelayedCalls() == []
    assert b.stats.reasons["full"] == 1
    batch.answer_all()


def test_a_batch_leaves_when_its_first_requests_delay_ends_with_one_timer_while_it_forms(clock):
    model, b = batcher(clock, size=8, delay_ms=10)

    got = [send(b, "a")]
    clock.advance(0.004)
    got += [send(b, "b"), send(b, "c")]
    assert len(clock.getDelayedCalls()) == 1  # one DelayedCall per forming batch
    clock.advance(0.0059)
    assert model.batches == []
    clock.advance(0.0002)

    (batch,) = model.batches
    assert batch.ids == ["a", "b", "c"]
    assert b.stats.reasons["delay"] == 1
    # Each item's deadline counts from its own arrival.
    assert [round(item.deadline, 6) for item in batch.items] == [60.0, 60.004, 60.004]
    batch.answer_all()
    assert [json.loads(g.answer().body) for g in got] == [{"answer": "a"}, {"answer": "b"}, {"answer": "c"}]
    assert clock.getDelayedCalls() == []


def test_with_no_delay_a_lone_request_leaves_without_waiting_and_a_turns_requests_go_together(clock):
    model, b = batcher(clock, size=8, delay_ms=0)

    send(b, "lone")
    clock.advance(0)  # the end of the reactor's turn: no time passes
    assert [batch.ids for batch in model.batches] == [["lone"]]

    send(b, "x"), send(b, "y")
    clock.advance(0)
    assert [batch.ids for batch in model.batches] == [["lone"], ["x", "y"]]
    assert b.stats.waits[0] == 3  # each waited no time at all
    for batch in model.batches:
        batch.answer_all()


def test_a_preferred_size_leaves_at_the_end_of_the_turn_and_the_rest_waits_on(clock):
    model, b = batcher(clock, size=8, delay_ms=50, preferred=(2, 4))

    send(b, "a"), send(b, "b")
    assert model.batches == []
    clock.advance(0)
    assert [batch.ids for batch in model.batches] == [["a", "b"]]

    # Three in one turn: the largest preferred size leaves, the third waits for its delay.
    send(b, "c"), send(b, "d"), send(b, "e")
    clock.advance(0)
    assert [batch.ids for batch in model.batches][1:] == [["c", "d"]]
    clock.advance(0.049)
    assert len(model.batches) == 2
    clock.advance(0.0011)
    assert [batch.ids for batch in model.batches][2:] == [["e"]]
    assert (b.stats.reasons["preferred"], b.stats.reasons["delay"]) == (2, 1)
    for batch in model.batches:
        batch.answer_all()
    assert clock.getDelayedCalls() == []


def test_a_request_never_waits_for_company_more_than_half_its_timeout(clock):
    model, b = batcher(clock, size=8, delay_ms=1500, timeout=2.0)

    send(b, "a")
    clock.advance(0.999)
    assert model.batches == []
    clock.advance(0.0011)

    (batch,) = model.batches
    assert b.stats.reasons == {"full": 0, "preferred": 0, "delay": 0, "deadline": 1}
    batch.answer_all()


# --- each request's rights ------------------------------------------------------------------


def test_a_client_that_leaves_is_taken_out_of_the_forming_batch(clock):
    model, b = batcher(clock, size=8, delay_ms=10)

    first = b.send(b'{}', RequestContext(request_id="a"))
    clock.advance(0.005)
    second = send(b, "b")
    first.cancel()
    failure_of(first, CancelledError)
    assert b.waiting == 1
    # The batch's delay now counts from the first request still in it.
    clock.advance(0.0099)
    assert model.batches == []
    clock.advance(0.0002)

    (batch,) = model.batches
    assert batch.ids == ["b"] and model.cancelled == []
    batch.answer_all()
    assert second.answer().status == 200


def test_the_last_request_leaving_a_forming_batch_cancels_its_timer(clock):
    model, b = batcher(clock, size=8, delay_ms=10)

    d = b.send(b'{}', RequestContext(request_id="a"))
    d.cancel()

    failure_of(d, CancelledError)
    assert clock.getDelayedCalls() == [] and b.waiting == 0
    clock.advance(1)
    assert model.batches == []


def test_a_client_that_leaves_after_its_batch_left_abandons_its_request_at_the_model(clock):
    model, b = batcher(clock, size=2, delay_ms=10)

    leaving = b.send(b'{}', RequestContext(request_id="a"))
    staying = send(b, "b")
    (batch,) = model.batches
    leaving.cancel()

    failure_of(leaving, CancelledError)
    assert model.cancelled == ["a"]
    batch.answer(1)
    assert staying.answer().status == 200


def test_a_refused_request_never_joins_a_batch(clock):
    model, b = batcher(clock, size=8, delay_ms=10)
    send(b, "a")
    model.refuse = ModelBusy("model 'm' is busy", model="m")

    with pytest.raises(ModelBusy):
        b.send(b'{}', RequestContext(request_id="b"))

    assert model.admitted == [0, 1]  # the model is told how many wait in the batcher
    assert b.waiting == 1
    clock.advance(0.01)
    model.batches[0].answer_all()


def test_each_request_gets_its_own_answer_or_its_own_error(clock):
    model, b = batcher(clock, size=3)
    got = [send(b, name) for name in ("a", "b", "c")]
    (batch,) = model.batches

    batch.answer(2, b'{"third": 3}')
    batch.deferreds[1].errback(BadGateway("model 'm' answered nonsense", model="m"))
    batch.answer(0, b'{"error": {"type": "model_error"}}', status=400)

    assert (got[0].answer().status, got[2].answer().body) == (400, b'{"third": 3}')
    assert got[1].error(BadGateway).status == 502


def test_a_batch_the_model_cannot_take_fails_every_request_in_it(clock):
    model, b = batcher(clock, size=2)
    model.broken = RuntimeError("the model's send_batch broke")

    got = [send(b, "a"), send(b, "b")]

    assert [g.error(RuntimeError).args for g in got] == [("the model's send_batch broke",)] * 2


def test_stopping_fails_the_requests_still_waiting(clock):
    model, b = batcher(clock, size=8)
    got = [send(b, "a"), send(b, "b")]

    b.fail_waiting(ModelUnavailable("model 'm' is stopping", model="m"))

    assert all(g.error(ModelUnavailable).status == 503 for g in got)
    assert clock.getDelayedCalls() == [] and model.batches == []


def test_the_stats_keep_the_recent_mean_batch_size(clock):
    _, b = batcher(clock)
    for size in (1, 2, 3):
        b.stats.sent(size)

    assert b.stats.describe() == {"batches": 3, "recent_mean_batch_size": 2.0,
                                  "left": {"full": 0, "preferred": 0, "delay": 0, "deadline": 0}}


# --- configuration ----------------------------------------------------------------------------


def spec_of(**keys):
    problems = []
    table = {"id": "m", "type": "subprocess", "command": ["python", "x.py"], "protocol": "jsonl", **keys}
    spec = parse_model(Table(table, "models[0]", problems), environ={})
    return spec, [f"{path}: {message}" for path, message in problems]


def test_batching_settings_are_read_and_shown_in_the_spec():
    spec, problems = spec_of(batching={"max_batch_size": 8, "max_delay_ms": 2, "preferred_sizes": [4, 2]})

    assert problems == []
    assert spec.batching == BatchingSpec(max_batch_size=8, max_delay_ms=2, preferred_sizes=(2, 4))
    assert spec.public()["batching"] == {"max_batch_size": 8, "max_delay_ms": 2, "preferred_sizes": [2, 4]}
    assert spec_of()[0].batching is None and "batching" not in spec_of()[0].public()


@pytest.mark.parametrize("keys, problem", [
    ({"batching": {}}, "models[0].batching.max_batch_size: is required"),
    ({"batching": {"max_batch_size": 0}}, "models[0].batching.max_batch_size: must be at least 1, got 0"),
    ({"batching": {"max_batch_size": 4, "max_delay_ms": -1}},
     "models[0].batching.max_delay_ms: must be at least 0, got -1"),
    ({"batching": {"max_batch_size": 4, "preferred_sizes": [2, 8]}},
     "models[0].batching.preferred_sizes: must be at most max_batch_size (4), got 8"),
    ({"batching": {"max_batch_size": 4, "preferred_sizes": "2"}},
     "models[0].batching.preferred_sizes: must be a list of integers, got a string"),
    ({"batching": {"max_batch_size": 4, "preferred_sizes": [2, 2]}},
     "models[0].batching.preferred_sizes: names a size twice: [2, 2]"),
    ({"batching": {"max_batch_size": 4, "wait": 1}}, "models[0].batching.wait: is not a known key"),
    ({"batching": {"max_batch_size": 64}, "max_queue": 32},
     "models[0].batching.max_batch_size: is more than the model's max_queue (32)"),
    ({"batching": {"max_batch_size": 4, "max_delay_ms": 1000}, "timeout": 1},
     "models[0].batching.max_delay_ms: must be shorter than the model's timeout (1 s)"),
    ({"batching": {"max_batch_size": 4}, "protocol": "raw"},
     'models[0].batching: needs protocol = "jsonl": a raw process takes one request at a time'),
    ({"batching": 3}, "models[0].batching: must be a table, got an integer"),
])
def test_bad_batching_settings_are_clear_config_errors(keys, problem):
    _, problems = spec_of(**keys)

    assert any(p.startswith(problem) for p in problems), problems


def test_a_batching_table_where_nothing_batches_is_a_clear_error():
    with pytest.raises(ConfigError) as raised:
        parse_config({"server": {"batching": {"max_batch_size": 4}}}, environ={})

    assert raised.value.lines() == [
        'server.batching: is not a known key here: only a subprocess model with protocol = "jsonl" and an HTTP '
        "model can batch"
    ]


# --- a batching jsonl subprocess model, over fake processes -------------------------------------


class Harness:
    def __init__(self, clock):
        self.clock = clock
        self.launcher = LineLauncher()
        self.models = []

    def model(self, *, batching=None, ready=True, **keys) -> SubprocessModel:
        batching = {"max_batch_size": 4, "max_delay_ms": 10} if batching is None else batching
        spec, problems = spec_of(batching=batching, **keys)
        assert problems == []
        deps = ModelDeps(reactor=self.clock, environ={"PATH": "/usr/bin"})
        model = SubprocessModel.from_spec(spec, deps)
        model.pool.launcher = self.launcher
        self.models.append(model)
        model.startService()
        for process in self.launcher.live() if ready else ():
            process.says({"ready": True})
        return model

    def send(self, model, request_id: str, body=None) -> Got:
        body = json.dumps(body if body is not None else {"n": request_id}).encode()
        return Got(model.send(body, RequestContext(request_id=request_id)))

    def stop(self, model) -> None:
        stopped = Got(model.stopService())
        for process in self.launcher.live():
            process.killed(signal=15)
        assert stopped.fired
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def h(clock):
    harness = Harness(clock)
    yield harness
    for model in harness.models:
        if model.running:
            harness.stop(model)


def test_a_model_with_batching_is_built_as_a_batching_model(h):
    model = h.model()

    assert isinstance(model, BatchingSubprocessModel)
    assert verifyObject(IBatching, model) and verifyObject(IModel, model)
    assert not IBatching.providedBy(SubprocessModel.from_spec(spec_of()[0], ModelDeps(reactor=h.clock, environ={})))
    h.stop(model)


def test_a_batch_is_one_message_and_each_request_gets_the_answer_under_its_own_id(h):
    model = h.model()
    (process,) = h.launcher.spawned
    got = [h.send(model, name) for name in ("r1", "r2", "r3")]
    h.clock.advance(0.01)

    (batch,) = process.batches()
    assert batch["id"].startswith("batch#")
    assert [item["input"] for item in batch["batch"]] == [{"n": "r1"}, {"n": "r2"}, {"n": "r3"}]
    assert [item["id"].rpartition("#")[0] for item in batch["batch"]] == ["r1", "r2", "r3"]
    assert (model.in_flight, model.queued) == (3, 0)
    first, second, third = batch["batch"]
    process.says({"id": third["id"], "output": {"third": True}},
                 {"id": first["id"], "error": {"message": "send a number", "status": 400}},
                 {"id": second["id"], "output": {"second": True}})

    assert json.loads(got[0].answer().body)["error"] == {
        "type": "model_error", "message": "send a number", "model": "m", "request_id": "r1"}
    assert got[0].answer().status == 400
    assert [g.answer().body for g in got[1:]] == [b'{"second": true}', b'{"third": true}']
    assert model.in_flight == 0 and model.protocol.batches == {}
    described = model.describe()["batching"]
    assert described == {"max_batch_size": 4, "max_delay_ms": 10, "preferred_sizes": [], "batches": 1,
                         "recent_mean_batch_size": 3.0, "left": {"full": 0, "preferred": 0, "delay": 1,
                                                                  "deadline": 0}, "waiting": 0}
    h.stop(model)


def test_an_error_line_under_the_batch_id_fails_every_request_not_answered_yet(h):
    model = h.model()
    (process,) = h.launcher.spawned
    got = [h.send(model, name) for name in ("r1", "r2", "r3", "r4")]  # full: at once

    (batch,) = process.batches()
    process.says({"id": batch["batch"][0]["id"], "output": 1},
                 {"id": batch["id"], "error": {"message": "out of memory", "status": 503}})

    assert got[0].answer().body == b"1"
    for g, name in zip(got[1:], ("r2", "r3", "r4")):
        assert g.answer().status == 503
        assert json.loads(g.answer().body)["error"]["request_id"] == name
    assert model.in_flight == 0 and model.protocol.batches == {}
    h.stop(model)


def test_the_queue_bound_counts_the_requests_waiting_to_be_batched(h):
    model = h.model(max_queue=5)
    (process,) = h.launcher.spawned
    in_flight = [h.send(model, f"a{i}") for i in range(4)]  # full, written: the process's one place
    queued = [h.send(model, f"b{i}") for i in range(4)]  # full, and queued for a place
    waiting = [h.send(model, "c0")]  # waits to be batched: 5 waiting
    assert model.queued == 5

    with pytest.raises(ModelBusy) as shed:
        model.send(b"{}", RequestContext(request_id="c1"))

    assert "busy" in shed.value.message and model.limit.shed == 1
    assert len(process.batches()) == 1
    process.answers_batch(process.batches()[0])
    # The place freed: the queued batch is written; the waiting one leaves after its delay.
    assert len(process.batches()) == 2 and len(process.batches()[1]["batch"]) == 4
    h.clock.advance(0.01)
    process.answers_batch(process.batches()[1])
    process.answers_batch(process.batches()[2])
    assert all(g.answer().status == 200 for g in in_flight + queued + waiting)
    h.stop(model)


def test_batches_waiting_for_a_process_are_sent_together_when_one_frees(h):
    model = h.model(batching={"max_batch_size": 8, "max_delay_ms": 0})
    (process,) = h.launcher.spawned
    first = h.send(model, "first")
    h.clock.advance(0)
    later = []
    for name in ("a", "b", "c"):  # three turns, three batches, all waiting for the place
        later.append(h.send(model, name))
        h.clock.advance(0)
    assert model.queued == 3 and len(process.batches()) == 1

    process.answers_batch(process.batches()[0])

    assert first.answer().status == 200
    (_, merged) = process.batches()
    assert [item["input"] for item in merged["batch"]] == [{"n": "a"}, {"n": "b"}, {"n": "c"}]
    assert model.batch_stats.recent_mean() == 2.0  # batches as sent: 1, then 3
    process.answers_batch(merged)
    assert [json.loads(g.answer().body) for g in later] == [{"echo": {"n": n}} for n in "abc"]
    h.stop(model)


def test_a_client_that_leaves_mid_batch_is_cancelled_at_the_model_and_the_others_are_answered(h):
    model = h.model()
    (process,) = h.launcher.spawned
    leaving = model.send(b'{"n": 1}', RequestContext(request_id="leaving"))
    staying = [h.send(model, name) for name in ("s1", "s2", "s3")]
    (batch,) = process.batches()

    leaving.cancel()

    failure_of(leaving, CancelledError)
    assert process.messages()[-1] == {"id": batch["batch"][0]["id"], "op": "cancel"}
    process.answers_batch(batch)  # the model answers it anyway: dropped, logged at info
    assert all(g.answer().status == 200 for g in staying)
    assert model.in_flight == 0 and model.protocol.batches == {}
    h.stop(model)


def test_a_request_of_a_queued_batch_that_leaves_is_taken_out_of_it(h):
    model = h.model(batching={"max_batch_size": 2, "max_delay_ms": 0})
    (process,) = h.launcher.spawned
    busy = [h.send(model, "x"), h.send(model, "y")]
    leaving = model.send(b'{"n": "a"}', RequestContext(request_id="a"))
    staying = h.send(model, "b")
    assert model.queued == 2

    leaving.cancel()

    failure_of(leaving, CancelledError)
    assert model.queued == 1
    process.answers_batch(process.batches()[0])
    assert [item["input"] for item in process.batches()[1]["batch"]] == [{"n": "b"}]
    process.answers_batch(process.batches()[1])
    assert staying.answer().status == 200 and all(g.answer().status == 200 for g in busy)
    h.stop(model)


def test_the_timeout_counts_the_wait_to_be_batched_and_for_a_process(h):
    model = h.model(timeout=1, batching={"max_batch_size": 2, "max_delay_ms": 100}, ready=False)
    (process,) = h.launcher.spawned  # still loading: the batch waits for it
    late = h.send(model, "late")
    h.clock.advance(0.1)
    assert model.queued == 1 and model.batch_stats.reasons["delay"] == 1

    h.clock.advance(0.9001)

    assert late.error(GatewayTimeout).message == (
        "model 'm' did not answer within 1 s (the request waited to be batched and for a process)")
    assert model.queued == 0
    process.says({"ready": True})
    assert process.batches() == []  # nothing left to write
    h.stop(model)


def test_a_process_that_dies_mid_batch_fails_each_of_its_requests_with_502(h):
    model = h.model()
    (process,) = h.launcher.spawned
    got = [h.send(model, f"r{i}") for i in range(4)]

    process.killed()

    assert all(g.error(BadGateway).status == 502 for g in got)
    assert model.in_flight == 0 and model.places == {} and model.protocol.batches == {}
    h.clock.advance(1)  # restarted
    (_, again) = h.launcher.spawned
    again.says({"ready": True})
    g = h.send(model, "after")
    h.clock.advance(0.01)
    again.answers_batch(again.batches()[0])
    assert g.answer().status == 200
    h.stop(model)


def test_several_batches_are_in_flight_across_processes_and_places(h):
    model = h.model(workers=2, max_inflight=2, batching={"max_batch_size": 2, "max_delay_ms": 0})
    got = [h.send(model, f"r{i}") for i in range(10)]  # five full batches, four places

    written = [len(process.batches()) for process in h.launcher.spawned]
    assert written == [2, 2] and model.queued == 2
    for process in h.launcher.spawned:
        for batch in process.batches():
            process.answers_batch(batch)
    for process in h.launcher.spawned:
        for batch in process.batches()[2:]:
            process.answers_batch(batch)
    assert all(g.answer().status == 200 for g in got)
    h.stop(model)


def test_a_stream_is_never_batched(h):
    from aibackend.testing import RecordingChunks

    model = h.model()
    (process,) = h.launcher.spawned
    chunks = RecordingChunks()
    d = model.stream(b'{"s": 1}', RequestContext(request_id="st"), chunks)

    (message,) = process.messages()
    assert message["op"] == "predict" and message["input"] == {"s": 1}
    process.says({"id": message["id"], "chunk": "a"}, {"id": message["id"], "done": True})
    assert result_of(d) is None and model.places == {}
    h.stop(model)


def test_the_model_is_idle_once_no_request_waits_to_be_batched_or_is_in_flight(h):
    model = h.model()
    (process,) = h.launcher.spawned
    got = h.send(model, "r1")

    idle = model.whenIdle()
    h.clock.advance(0.01)  # the batch leaves: in flight now
    assert not has_fired(idle)
    process.answers_batch(process.batches()[0])

    assert has_fired(idle) and got.answer().status == 200
    assert result_of(model.whenIdle()) is None
    cancelled = model.send(b"{}", RequestContext(request_id="r2"))
    later = model.whenIdle()
    cancelled.cancel()  # the only request waiting leaves: idle at once
    failure_of(cancelled, CancelledError)
    assert has_fired(later)
    h.stop(model)


def test_stopping_fails_the_requests_waiting_to_be_batched(h):
    model = h.model()
    got = h.send(model, "r1")

    h.stop(model)

    assert got.error(ModelUnavailable).status == 503


def test_the_metrics_show_batch_sizes_waits_and_why_batches_left(h):
    model = h.model()
    (process,) = h.launcher.spawned
    got = [h.send(model, f"r{i}") for i in range(5)]
    h.clock.advance(0.01)  # the fifth leaves, and waits for the place
    process.answers_batch(process.batches()[0])
    process.answers_batch(process.batches()[1])
    assert all(g.answer().status == 200 for g in got)

    class Entry:
        model_id, stats = "m", None

    Entry.model = model

    class Registry:
        def entries(self):
            return [Entry]

        def models(self):
            return [model]

    from aibackend.metrics import ModelStats

    Entry.stats = ModelStats()
    text = Metrics(Registry()).render().decode()

    assert 'aibackend_batch_size_bucket{le="1.0",model="m"} 1.0' in text
    assert 'aibackend_batch_size_bucket{le="4.0",model="m"} 2.0' in text
    assert 'aibackend_batch_size_sum{model="m"} 5.0' in text
    assert 'aibackend_batches_total{model="m",reason="full"} 1.0' in text
    assert 'aibackend_batches_total{model="m",reason="delay"} 1.0' in text
    assert 'aibackend_batches_total{model="m",reason="deadline"} 0.0' in text
    assert 'aibackend_batch_wait_seconds_count{model="m"} 5.0' in text
    h.stop(model)


# --- the iris example ---------------------------------------------------------------------------


def test_the_iris_example_predicts_a_batch_in_one_call_as_it_would_each_request():
    pytest.importorskip("sklearn")
    import importlib.util
    import os

    from aibackend.worker import BadInput

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "iris_model.py")
    loader = importlib.util.spec_from_file_location("iris_example", path)
    iris = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(iris)
    model = iris.IrisClassifier()
    model.load()
    inputs = [{"features": [6.7, 3.0, 5.2, 2.3]}, {"features": [1, 2]},
              {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]

    first, bad, both = model.predict_batch(inputs)

    assert isinstance(bad, BadInput) and "got shape [1, 2]" in str(bad)
    for output, data in ((first, inputs[0]), (both, inputs[2])):
        alone = model.predict(data)
        assert output["label"] == alone["label"] and output["scores"].tolist() == alone["scores"].tolist()
    assert both["label"] == ["setosa", "virginica"]


def test_a_request_of_a_batch_that_times_out_leaves_the_others_of_its_batch_to_the_process(h):
    model = h.model(timeout=10, batching={"max_batch_size": 8, "max_delay_ms": 4000})
    (process,) = h.launcher.spawned
    first = h.send(model, "a")
    h.clock.advance(3.9)
    second = h.send(model, "b")
    h.clock.advance(0.1)
    (batch,) = process.batches()  # written at 4 s: the process works on both

    h.clock.advance(6.0)  # 10 s: the first one's deadline, nothing printed yet

    assert first.error(GatewayTimeout).status == 504
    assert not second.fired  # 3.9 s left: the process is not hung for it
    assert process.alive and process.protocol.state == "ready"
    process.answers_batch(batch)
    assert second.answer().status == 200
    h.stop(model)


def test_a_process_silent_past_every_deadline_of_its_batch_is_hung(h):
    model = h.model(timeout=10, batching={"max_batch_size": 8, "max_delay_ms": 4000})
    (process,) = h.launcher.spawned
    first = h.send(model, "a")
    h.clock.advance(3.9)
    second = h.send(model, "b")
    h.clock.advance(0.1)
    assert len(process.batches()) == 1

    h.clock.advance(6.0)
    assert process.protocol.state == "ready"
    h.clock.advance(3.9)  # the second one's deadline too: nothing printed since the batch was sent

    assert first.error(GatewayTimeout).status == 504 and second.error(GatewayTimeout).status == 504
    assert process.protocol.state != "ready"  # replaced as hung
    process.killed()
    h.stop(model)


def test_a_lone_request_concatenated_along_its_batch_dimension_keeps_its_deadline(h):
    from aibackend.batching import TensorBatch
    from aibackend.interfaces import RowsContext

    model = h.model(timeout=1, batching={"max_batch_size": 8, "max_delay_ms": 400})
    context = RowsContext(request_id="a", operation="infer", batch=TensorBatch(("k",), 1))
    got = Got(model.send(b'{"x": [[1, 2]]}', context))
    h.clock.advance(0.4)  # its batch of one leaves

    h.clock.advance(0.6001)  # its arrival + the timeout

    assert got.error(GatewayTimeout).status == 504
    h.stop(model)
