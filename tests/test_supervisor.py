"""
SubprocessModel and its supervisor (ProcessPool) on a Clock, with a fake launcher: no
process is started. The test plays each model process by hand through its protocol
(what it prints, how it exits) and reads what the daemon wrote on its stdin and which
signals it sent.

Every test ends by stopping the model and checking that no timer is left on the clock.
"""

from __future__ import annotations

import itertools
import json
import sys

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aibackend.config import ProcessSettings, SubprocessModelSpec, Table, parse_model
from aibackend.errors import ApiError, BadGateway, GatewayTimeout, ModelUnavailable
from aibackend.interfaces import IChunks, IModel, IRestartable, IStreaming, ModelAnswer, RequestContext
from aibackend.subprocess import SubprocessModel
from aibackend.testing import HeldModelServer, failure_of, result_of

# --- fakes ------------------------------------------------------------------------


class FakeProcess:
    """
    The transport spawnProcess would give a model process: records what the daemon
    writes on its stdin, and lets the test say what the process prints and how it ends.
    """

    def __init__(self, protocol, pid, settings, env):
        self.protocol = protocol
        self.pid = pid
        self.settings = settings
        self.env = env
        self.stdin = b""
        self.stdin_closed = False
        self.signalled = []
        self.reading = True  # not paused (pauseProducing / resumeProducing)
        self.pauses = 0

    # the transport's side
    def pauseProducing(self) -> None:
        self.reading = False
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.stdin_closed, "the daemon wrote after closing the process's stdin"
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name) -> None:
        self.signalled.append(name)

    # the test's side
    def lines(self) -> list[bytes]:
        assert self.stdin == b"" or self.stdin.endswith(b"\n"), self.stdin
        return self.stdin.split(b"\n")[:-1]

    def messages(self) -> list:
        return [json.loads(line) for line in self.lines()]

    def ids(self) -> list:
        """jsonl: the request id of each predict written (the wire id is C{<request id>#<n>})."""
        return [m["id"].rpartition("#")[0] for m in self.messages() if m.get("op") == "predict"]

    def wire(self, request_id: str) -> str:
        """jsonl: the wire id the last request with this request id was written with."""
        (found, *_) = [m["id"] for m in reversed(self.messages())
                       if m.get("op") == "predict" and m["id"].rpartition("#")[0] == request_id]
        return found

    def answers(self, request_id: str, **answer) -> None:
        """jsonl: print the answer (C{output=...} or C{error=...}) to that request."""
        self.says({"id": self.wire(request_id), **answer})

    def prints(self, data: bytes) -> None:
        self.protocol.outReceived(data)

    def says(self, *messages) -> None:
        self.prints(b"".join(json.dumps(message).encode() + b"\n" for message in messages))

    def killed(self, signal: int = 9) -> None:
        self.protocol.processExited(Failure(ProcessTerminated(signal=signal)))

    def exits(self, code: int = 0) -> None:
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
        self.protocol.processExited(Failure(reason))

    @property
    def alive(self) -> bool:
        return self.protocol.state != "exited"


class FakeLauncher:
    """Stands in for aibackend.subprocess.Launcher: records spawns, signals and reaps."""

    def __init__(self):
        self.spawned: list[FakeProcess] = []
        self.signals: list[tuple] = []
        self.reaped: list = []
        self.refuse = None
        self.running: set = set()  # pids whose main thread is running (Launcher.busy)
        self._pids = itertools.count(1001)

    def spawn(self, protocol, settings, env):
        if self.refuse is not None:
            raise self.refuse
        process = FakeProcess(protocol, next(self._pids), settings, env)
        self.spawned.append(process)
        # Like reactor.spawnProcess: the protocol is connected before it returns.
        protocol.makeConnection(process)
        return process

    def signal(self, process, name: str) -> None:
        self.signals.append((process.pid, name))

    def process_exited(self, pid):
        self.reaped.append(pid)
        return None

    def busy(self, process) -> bool:
        return process.pid in self.running

    def live(self) -> list[FakeProcess]:
        return [process for process in self.spawned if process.alive]

    def signals_to(self, process) -> list[str]:
        return [name for pid, name in self.signals if pid == process.pid]


class Outcome:
    """What a request's Deferred fired with (a failure is handled here)."""

    def __init__(self, d):
        self.results = []
        d.addBoth(self._got)

    def _got(self, result):
        self.results.append(result)

    @property
    def fired(self) -> bool:
        return bool(self.results)

    def answer(self) -> ModelAnswer:
        assert self.results, "no answer yet"
        (result,) = self.results
        if isinstance(result, Failure):
            raise AssertionError(f"failed instead:\n{result.getTraceback()}")
        return result

    def error(self, kind):
        assert self.results, "not failed yet"
        (result,) = self.results
        assert isinstance(result, Failure), f"answered {result!r} instead of failing"
        assert result.check(kind), result.getTraceback()
        return result.value


class Harness:
    def __init__(self):
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.models = []

    def model(self, start=True, environ=None, **keys) -> SubprocessModel:
        problems = []
        table = {"id": "m", "type": "subprocess", "command": ["python", "x.py"], **keys}
        spec = parse_model(Table(table, "models[0]", problems), environ={})
        assert problems == []
        model = SubprocessModel(
            spec, reactor=self.clock, environ=environ or {"PATH": "/usr/bin"}, launcher=self.launcher
        )
        self.models.append(model)
        if start:
            model.startService()
        return model

    def send(self, model, body=b'{"x": 1}', request_id="r1") -> Outcome:
        return Outcome(model.send(body, RequestContext(request_id=request_id)))

    def delays(self) -> list[float]:
        """When each pending timer fires, from now."""
        now = self.clock.seconds()
        return sorted(round(call.getTime() - now, 6) for call in self.clock.getDelayedCalls())

    def stop(self, model) -> None:
        """Stop the model; every process exits on SIGTERM. Nothing may be left on the clock."""
        stopped = Outcome(model.stopService())
        for process in self.launcher.live():
            assert "TERM" in self.launcher.signals_to(process)
            process.killed(signal=15)
        assert stopped.fired
        assert model.state in ("stopped", "failed")
        assert not any(model.slots)
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    # A safety net for a test that failed before stopping its models.
    for model in harness.models:
        if model.running:
            model.stopService()
            for process in harness.launcher.live():
                process.killed(signal=15)


def events(model, name=None) -> list[dict]:
    return [entry for entry in model.model_log.query() if name is None or entry["event"] == name]


# --- raw ------------------------------------------------------------------------------


def test_a_subprocess_model_is_an_imodel_and_restartable(h):
    model = h.model()

    assert verifyObject(IModel, model)
    assert verifyObject(IRestartable, model)
    assert (model.in_flight, model.queued, model.live_processes, model.last_failure) == (0, 0, 1, None)
    h.stop(model)


def test_watchers_and_waiters_hear_of_each_state_as_it_changes(h):
    model = h.model(start=False, protocol="jsonl")
    seen = []
    stop_watching = model.watch(lambda m: seen.append(m.state))
    assert model.state == "stopped"
    assert failure_of(model.whenReady(), ModelUnavailable).value.message == "model 'm' is stopped"

    model.startService()
    ready = model.whenReady()
    (process,) = h.launcher.spawned
    assert seen == ["starting"] and not ready.called
    process.says({"ready": True})
    assert seen == ["starting", "ready"]
    assert result_of(ready) is None
    assert result_of(model.whenReady()) is None  # at once, once ready

    process.killed(signal=9)
    assert seen[-1] == "restarting"
    stop_watching()
    h.stop(model)
    assert seen[-1] == "restarting"  # no longer watched


def test_when_idle_fires_once_the_last_request_in_flight_or_queued_is_done(h):
    model = h.model()
    (process,) = h.launcher.spawned
    assert result_of(model.whenIdle()) is None  # nothing in flight: at once

    first = h.send(model, b'{"n": 1}', "r1")
    second = h.send(model, b'{"n": 2}', "r2")  # queued: raw takes one at a time
    idle = model.whenIdle()
    assert (model.in_flight, model.queued) == (1, 1)
    process.prints(b'{"n": 1}\n')
    h.clock.advance(0)
    assert first.answer().status == 200 and not idle.called
    h.clock.advance(0)
    h.clock.advance(0)
    process.prints(b'{"n": 2}\n')
    assert second.answer().status == 200
    assert result_of(idle) is None
    assert (model.in_flight, model.queued) == (0, 0)
    h.stop(model)


def test_a_process_is_spawned_with_the_resolved_python_and_a_small_environment(h):
    model = h.model(env={"MODEL_SETTING": "7"}, environ={"PATH": "/usr/bin", "ADMIN_TOKEN": "secret"})

    (process,) = h.launcher.spawned
    assert process.settings.executable == sys.executable
    assert process.settings.command == ("python", "x.py")
    assert process.env == {"PATH": "/usr/bin", "PYTHONUNBUFFERED": "1", "MODEL_SETTING": "7"}
    h.stop(model)


def test_raw_is_ready_on_spawn_and_a_pretty_printed_request_is_written_as_one_line(h):
    model = h.model()
    (process,) = h.launcher.spawned
    assert model.state == "ready"
    body = b'{\r\n  "numbers": [\n    1,\n    2\n  ],\n  "text": "a\\nb"\n}'

    outcome = h.send(model, body)

    (line,) = process.lines()
    assert json.loads(line) == {"numbers": [1, 2], "text": "a\nb"}
    assert not outcome.fired
    process.prints(b'{"sum": 3}\n')
    assert outcome.answer() == ModelAnswer(status=200, body=b'{"sum": 3}')
    h.stop(model)


def test_raw_takes_one_request_at_a_time_per_process(h):
    model = h.model()
    (process,) = h.launcher.spawned

    first = h.send(model, b'{"n": 1}', "r1")
    second = h.send(model, b'{"n": 2}', "r2")

    assert process.messages() == [{"n": 1}]
    assert model.describe()["queued"] == 1
    process.says({"answer": 1})
    assert process.messages() == [{"n": 1}]  # not before stdout is polled again
    h.clock.advance(0)
    assert process.messages() == [{"n": 1}, {"n": 2}]
    process.prints(b'{"answer": 2}\r\n')
    assert json.loads(first.answer().body) == {"answer": 1}
    assert json.loads(second.answer().body) == {"answer": 2}
    h.stop(model)


def test_raw_non_json_stdout_and_stderr_go_to_the_log_and_the_answer_still_arrives(h):
    model = h.model()
    (process,) = h.launcher.spawned
    outcome = h.send(model)

    process.prints(b"Loading weights... done\n")
    process.protocol.errReceived(b"UserWarning: something\n")
    assert not outcome.fired
    process.says({"ok": True})

    assert json.loads(outcome.answer().body) == {"ok": True}
    stdout = events(model, "stdout")
    assert [(e["level"], e["line"], e["pid"]) for e in stdout] == [("warning", "Loading weights... done", process.pid)]
    assert [e["line"] for e in events(model, "stderr")] == ["UserWarning: something"]
    h.stop(model)


def test_raw_least_in_flight_dispatch_over_two_workers(h):
    model = h.model(workers=2)
    first, second = h.launcher.spawned

    r1 = h.send(model, b'{"n": 1}', "r1")
    r2 = h.send(model, b'{"n": 2}', "r2")
    r3 = h.send(model, b'{"n": 3}', "r3")

    assert first.messages() == [{"n": 1}]
    assert second.messages() == [{"n": 2}]
    second.says({"from": "second"})
    h.clock.advance(0)
    assert second.messages() == [{"n": 2}, {"n": 3}]
    first.says({"from": "first"})
    second.says({"from": "second again"})
    assert [json.loads(r.answer().body) for r in (r1, r2, r3)] == [
        {"from": "first"},
        {"from": "second"},
        {"from": "second again"},
    ]
    h.stop(model)


def test_a_full_queue_answers_503_with_retry_after(h):
    model = h.model(max_queue=1)
    h.send(model, request_id="r1")
    h.send(model, request_id="r2")

    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="r3"))

    assert caught.value.status == 503
    assert caught.value.headers == {"Retry-After": "1"}
    assert "max_queue" in caught.value.message
    assert model.describe()["queued"] == 1
    h.stop(model)


# --- raw: an answer is one JSON line per request ----------------------------------------


def test_raw_a_second_json_line_in_the_same_read_fails_the_request_and_replaces_the_process(h):
    model = h.model(restart_backoff=1)
    (process,) = h.launcher.spawned
    first = h.send(model, b'{"n": 1}', "r1")
    queued = h.send(model, b'{"n": 2}', "r2")

    process.prints(b'{"answer": 1}\n{"answer": "for whom?"}\n')

    error = first.error(BadGateway)
    assert error.status == 502
    assert "more than one JSON line" in error.message
    assert h.launcher.signals_to(process) == ["TERM"]
    assert process.messages() == [{"n": 1}]  # r2 never goes to it
    (logged,) = events(model, "protocol error")
    assert (logged["level"], logged["line"]) == ("error", '{"answer": "for whom?"}')
    process.killed(signal=15)
    h.clock.advance(1)  # a broken model: restarted after the backoff
    second = h.launcher.spawned[1]
    assert second.messages() == [{"n": 2}]
    second.says({"answer": 2})
    assert queued.answer().body == b'{"answer": 2}'
    h.stop(model)


def test_raw_a_request_sent_by_an_answers_own_callback_waits_for_the_next_poll_too(h):
    model = h.model()
    (process,) = h.launcher.spawned
    d = model.send(b'{"n": 1}', RequestContext(request_id="r1"))
    then = []
    d.addCallback(lambda _: then.append(h.send(model, b'{"n": 2}', "r2")))

    process.says({"answer": 1})

    assert len(then) == 1
    assert process.messages() == [{"n": 1}]
    h.clock.advance(0)
    assert process.messages() == [{"n": 1}, {"n": 2}]
    process.says({"answer": 2})
    assert then[0].answer().body == b'{"answer": 2}'
    h.stop(model)


def test_raw_an_answer_waits_for_the_end_of_a_line_printed_after_it(h):
    model = h.model()
    (process,) = h.launcher.spawned
    chatty = h.send(model, b'{"n": 1}', "r1")

    process.prints(b'{"answer": 1}\nchatter, conti')
    assert not chatty.fired
    process.prints(b"nued\n")
    assert chatty.answer().body == b'{"answer": 1}'

    h.clock.advance(0)
    stray = h.send(model, b'{"n": 2}', "r2")
    process.prints(b'{"answer": 2}\n{"ans')
    assert not stray.fired
    process.prints(b'wer": 3}\n')
    assert stray.error(BadGateway).status == 502
    h.stop(model)


def test_raw_a_json_line_after_the_answer_before_the_next_request_replaces_the_process(h):
    model = h.model()
    (process,) = h.launcher.spawned
    first = h.send(model, b'{"n": 1}', "r1")
    queued = h.send(model, b'{"n": 2}', "r2")

    process.prints(b'{"answer": 1}\n')
    assert first.answer().body == b'{"answer": 1}'
    assert process.messages() == [{"n": 1}]  # r2 waits for stdout to be polled again
    process.prints(b'{"answer": "late"}\n')

    assert h.launcher.signals_to(process) == ["TERM"]
    assert not queued.fired  # still queued, for the next process
    assert "while no request was waiting" in events(model, "protocol error")[0]["error"]
    h.clock.advance(0)
    assert process.messages() == [{"n": 1}]
    h.stop(model)
    assert queued.error(ModelUnavailable)


def test_raw_a_json_line_while_idle_replaces_the_process_but_a_banner_before_the_first_request_does_not(h):
    model = h.model()
    (process,) = h.launcher.spawned

    process.says({"loaded": True})  # before any request: no one it could be meant for

    assert h.launcher.signals == []
    assert events(model, "unexpected output")[0]["line"] == '{"loaded": true}'
    outcome = h.send(model)
    process.says({"answer": 1})
    h.clock.advance(0)
    assert outcome.answer().body == b'{"answer": 1}'
    process.says({"answer": "again"})
    assert h.launcher.signals_to(process) == ["TERM"]
    h.stop(model)


@pytest.mark.parametrize("output", [
    b"\x00\x8f\xfe binary\n7\n",  # binary, then a fragment that is JSON
    b"7\n\xfe\xff\x00\x01\n",  # the fragment first, then binary in the same read
    b"1\x00\n",  # JSON if read as UTF-16
    b"\x1b[1m\xc3\x28\n",  # not UTF-8
])
def test_raw_binary_output_is_a_protocol_error_never_an_answer(h, output):
    model = h.model()
    (process,) = h.launcher.spawned
    outcome = h.send(model)

    process.prints(output)

    error = outcome.error(BadGateway)
    assert error.status == 502
    assert h.launcher.signals_to(process) == ["TERM"]
    h.stop(model)


def test_raw_text_chatter_anywhere_is_logged_and_never_an_answer(h):
    model = h.model()
    (process,) = h.launcher.spawned
    process.prints(b"Loading...\t\x1b[32mdone\x1b[0m\n")
    outcome = h.send(model)

    process.prints(b"thinking\r\n{\"answer\": 1}\ndone with that one\n")
    h.clock.advance(0)
    process.prints(b"idle chatter\n")

    assert outcome.answer().body == b'{"answer": 1}'
    assert [e["line"] for e in events(model, "stdout")] == [
        "Loading...\t\x1b[32mdone\x1b[0m", "thinking", "done with that one", "idle chatter",
    ]
    assert h.launcher.signals == []
    h.stop(model)


def test_raw_the_next_request_waits_while_the_process_still_runs_after_its_answer(h):
    model = h.model()
    (process,) = h.launcher.spawned
    h.send(model, b'{"n": 1}', "r1")
    h.send(model, b'{"n": 2}', "r2")
    h.launcher.running.add(process.pid)  # its main thread is between two writes, say

    process.says({"answer": 1})
    h.clock.advance(0)
    h.clock.advance(0.001)
    assert process.messages() == [{"n": 1}]
    h.launcher.running.discard(process.pid)  # asleep now (in its read of stdin)
    h.clock.advance(0.002)

    assert process.messages() == [{"n": 1}, {"n": 2}]
    h.stop(model)


def test_raw_a_process_that_never_stops_running_gets_its_next_request_after_a_bounded_wait(h):
    model = h.model()
    (process,) = h.launcher.spawned
    h.send(model, b'{"n": 1}', "r1")
    h.send(model, b'{"n": 2}', "r2")
    h.launcher.running.add(process.pid)

    process.says({"answer": 1})
    for _ in range(200):
        if len(process.messages()) == 2:
            break
        h.clock.advance(0.001)

    assert process.messages() == [{"n": 1}, {"n": 2}]
    assert 0.12 <= h.clock.seconds() <= 0.14  # 127 ms of looking again, in growing steps
    h.stop(model)


def test_raw_nan_is_a_502_and_the_process_stays(h):
    model = h.model()
    (process,) = h.launcher.spawned
    outcome = h.send(model)

    process.prints(b'{"score": NaN}\n')

    assert outcome.error(BadGateway).status == 502
    assert h.launcher.signals == []
    h.clock.advance(0)
    again = h.send(model)
    process.says({"score": 1})
    assert again.answer().body == b'{"score": 1}'
    h.stop(model)


# --- a process whose stdout closes ------------------------------------------------------


def test_a_process_whose_stdout_closes_while_it_lives_fails_its_requests_at_once_and_is_replaced(h):
    model = h.model(timeout=60, restart_backoff=1)
    (process,) = h.launcher.spawned
    in_flight = h.send(model, request_id="r1")

    process.protocol.childConnectionLost(1)
    queued = h.send(model, request_id="r2")  # not given to a process that cannot answer

    assert not in_flight.fired
    h.clock.advance(0.5)
    error = in_flight.error(BadGateway)
    assert "closed its stdout and kept running" in error.message
    assert h.launcher.signals_to(process) == ["TERM"]
    assert events(model, "stdout closed")[0]["level"] == "error"
    process.killed(signal=15)
    h.clock.advance(1)
    assert h.launcher.spawned[1].messages() == [{"x": 1}]
    h.launcher.spawned[1].says({"ok": True})
    assert queued.answer().body == b'{"ok": true}'
    h.stop(model)


def test_a_process_whose_stdout_closes_as_it_exits_reports_its_exit(h):
    model = h.model()
    (process,) = h.launcher.spawned
    in_flight = h.send(model)

    process.protocol.childConnectionLost(1)
    process.killed(signal=9)

    assert "SIGKILL" in in_flight.error(BadGateway).message
    assert events(model, "stdout closed") == []
    h.clock.advance(1)
    assert len(h.launcher.spawned) == 2
    h.stop(model)


# --- jsonl ---------------------------------------------------------------------------


def test_jsonl_is_not_ready_until_it_says_so_and_requests_wait_for_it(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    assert model.state == "starting"

    outcome = h.send(model, b'{\n "text": "hi"\n}', request_id="req-1")

    assert process.stdin == b""
    assert model.describe()["queued"] == 1
    process.says({"log": "loading"}, {"ready": True})
    assert model.state == "ready"
    assert process.messages() == [{"id": "req-1#1", "op": "predict", "input": {"text": "hi"}}]
    assert len(process.lines()) == 1
    process.says({"id": "req-1#1", "output": {"length": 2}})
    assert outcome.answer().status == 200
    assert json.loads(outcome.answer().body) == {"length": 2}
    h.stop(model)


def test_jsonl_answers_in_any_order_reach_their_own_requests(h):
    model = h.model(protocol="jsonl", max_inflight=3)
    (process,) = h.launcher.spawned
    process.says({"ready": True})

    outcomes = {rid: h.send(model, json.dumps({"n": rid}).encode(), rid) for rid in ("a", "b", "c")}

    assert process.ids() == ["a", "b", "c"]
    process.says({"id": process.wire("c"), "output": "C"}, {"id": process.wire("a"), "output": "A"})
    assert not outcomes["b"].fired
    process.answers("b", output="B")
    assert {rid: json.loads(o.answer().body) for rid, o in outcomes.items()} == {"a": "A", "b": "B", "c": "C"}
    h.stop(model)


def test_jsonl_two_requests_with_the_same_id_in_one_process_get_their_own_answers(h):
    model = h.model(protocol="jsonl", max_inflight=2)
    (process,) = h.launcher.spawned
    process.says({"ready": True})

    first = h.send(model, b'{"n": 1}', "same")
    second = h.send(model, b'{"n": 2}', "same")

    first_id, second_id = [m["id"] for m in process.messages()]
    assert first_id != second_id
    assert first_id.startswith("same#") and second_id.startswith("same#")
    process.says({"id": second_id, "output": 2}, {"id": first_id, "output": 1})
    assert (first.answer().body, second.answer().body) == (b"1", b"2")
    h.stop(model)


def test_jsonl_error_answer_keeps_its_status_in_the_daemons_error_shape(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model, request_id="r-400")

    process.answers("r-400", error={"message": 'send {"text": "..."}', "status": 400})

    answer = outcome.answer()
    assert answer.status == 400
    assert json.loads(answer.body) == {
        "error": {"type": "model_error", "message": 'send {"text": "..."}', "model": "m", "request_id": "r-400"}
    }
    h.stop(model)


@pytest.mark.parametrize("error", [{"message": "x", "status": "400"}, {"message": "x", "status": 200},
                                   {"message": "x", "status": True}, {"message": "x"}, "x"])
def test_jsonl_error_without_a_usable_status_is_a_500(h, error):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.answers("r1", error=error)

    assert outcome.answer().status == 500
    assert json.loads(outcome.answer().body)["error"]["message"] == "x"
    h.stop(model)


def test_jsonl_unknown_ids_and_non_json_lines_are_logged_and_skipped(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.prints(b"Traceback? no, just chatter\n")
    process.says({"id": "nobody", "output": 1}, [1, 2], {"something": "else"})
    assert not outcome.fired
    process.answers("r1", output="fine")

    assert outcome.answer().body == b'"fine"'
    logged = [(e["event"], e["level"], e["line"]) for e in events(model) if "line" in e]
    assert logged == [
        ("stdout", "warning", "Traceback? no, just chatter"),
        ("answer to an unknown request", "warning", '{"id": "nobody", "output": 1}'),
        ("unexpected output", "warning", "[1, 2]"),
        ("unexpected output", "warning", '{"something": "else"}'),
    ]
    h.stop(model)


def test_jsonl_log_lines_go_to_the_model_log_with_their_level(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned

    process.says({"log": "low on memory", "level": "warning"}, {"log": {"loss": 0.1}}, {"log": "x", "level": "shout"})

    said = [(e["level"], e["message"], e["pid"]) for e in events(model, "model")]
    assert said == [("warning", "low on memory", process.pid), ("info", '{"loss": 0.1}', process.pid), ("info", "x", process.pid)]
    h.stop(model)


def test_jsonl_answer_with_neither_output_nor_error_is_a_502(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.answers("r1", result=1)

    assert outcome.error(BadGateway).status == 502
    h.stop(model)


def test_jsonl_output_that_is_not_strict_json_is_a_502_not_a_broken_answer(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.prints(b'{"id": "%s", "output": {"score": NaN}}\n' % process.wire("r1").encode())

    assert outcome.error(BadGateway).status == 502
    h.stop(model)


def test_jsonl_output_too_deep_to_read_is_a_502_at_once_not_a_timeout(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.prints(b'{"id": "%s", "output": ' % process.wire("r1").encode() + b"[" * 5000 + b"]" * 5000 + b"}\n")

    error = outcome.error(BadGateway)
    assert "nested too deeply" in error.message
    h.stop(model)


def test_jsonl_least_in_flight_dispatch_over_two_workers(h):
    model = h.model(protocol="jsonl", workers=2, max_inflight=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    second.says({"ready": True})

    outcomes = [h.send(model, b"{}", f"r{n}") for n in range(1, 6)]

    assert first.ids() == ["r1", "r3"]
    assert second.ids() == ["r2", "r4"]
    assert model.describe()["queued"] == 1
    second.answers("r4", output=4)
    assert second.ids() == ["r2", "r4", "r5"]
    first.answers("r1", output=1)
    # first now has 1 in flight, second 2: the next request goes to first.
    r6 = h.send(model, b"{}", "r6")
    assert first.ids() == ["r1", "r3", "r6"]
    assert [o.answer().body for o in (outcomes[0], outcomes[3])] == [b"1", b"4"]
    h.stop(model)
    assert r6.error(BadGateway)


def test_jsonl_wire_ids_are_never_reused_whatever_the_clients_request_ids(h):
    model = h.model(protocol="jsonl", max_inflight=4)
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    # Request ids are the clients' own: they may repeat, and may look like a wire id.
    outcomes = [h.send(model, json.dumps({"n": n}).encode(), rid) for n, rid in enumerate(["x", "x#2", "x", "x#2"])]

    wire_ids = [m["id"] for m in process.messages()]
    assert len(set(wire_ids)) == 4
    for n, wire_id in reversed(list(enumerate(wire_ids))):
        process.says({"id": wire_id, "output": n})
    assert [o.answer().body for o in outcomes] == [b"0", b"1", b"2", b"3"]
    h.stop(model)


def test_jsonl_a_late_or_second_answer_never_reaches_a_later_request_with_the_same_request_id(h):
    model = h.model(protocol="jsonl", timeout=2, max_inflight=2)
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    slow = h.send(model, b'{"n": 1}', "same")
    h.clock.advance(1)
    process.says({"log": "working"})  # alive: the timed-out request is cancelled, not the process
    h.clock.advance(1)
    assert slow.error(GatewayTimeout)
    answered = h.send(model, b'{"n": 2}', "same")
    old, new = [m["id"] for m in process.messages() if m["op"] == "predict"]
    process.says({"id": new, "output": "mine"})
    assert answered.answer().body == b'"mine"'

    later = h.send(model, b'{"n": 3}', "same")
    process.says({"id": old, "output": "late"}, {"id": new, "output": "twice"})

    assert not later.fired
    unknown = [e["line"] for e in events(model, "answer to an unknown request")]
    assert unknown == [json.dumps({"id": old, "output": "late"}), json.dumps({"id": new, "output": "twice"})]
    process.answers("same", output="its own")
    assert later.answer().body == b'"its own"'
    h.stop(model)


def test_jsonl_an_answer_printed_by_another_process_of_the_model_is_unknown(h):
    model = h.model(protocol="jsonl", workers=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    second.says({"ready": True})
    on_first = h.send(model, request_id="a")

    second.says({"id": first.wire("a"), "output": "not mine to answer"})

    assert not on_first.fired
    first.answers("a", output="mine")
    assert on_first.answer().body == b'"mine"'
    h.stop(model)


# --- crashes and restarts --------------------------------------------------------------


def test_a_process_that_dies_mid_request_fails_its_requests_with_502_and_is_restarted_after_backoff(h):
    model = h.model(protocol="jsonl", workers=2, max_inflight=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    second.says({"ready": True})
    a, b, c = (h.send(model, b"{}", rid) for rid in "abc")
    assert first.ids() == ["a", "c"]
    on_first, on_second = [a, c], b
    h.clock.advance(20)

    first.killed(signal=9)

    for outcome in on_first:
        error = outcome.error(BadGateway)
        assert error.status == 502
        assert "SIGKILL" in error.message
    assert not on_second.fired
    assert h.launcher.reaped == [first.pid]
    assert h.delays() == [1.0, 40.0]  # the restart; b's timeout
    assert model.state == "ready"
    h.clock.advance(0.999)
    assert len(h.launcher.spawned) == 2
    h.clock.advance(0.001)
    third = h.launcher.spawned[2]
    assert third.pid not in (first.pid, second.pid)
    assert model.describe()["restarts"] == 1
    second.answers("b", output="untouched")
    assert on_second.answer().body == b'"untouched"'
    exited = events(model, "process exited")
    assert [(e["pid"], e["level"], e["error"]) for e in exited] == [(first.pid, "error", "killed by signal SIGKILL")]
    h.stop(model)


def test_requests_queued_while_the_only_process_restarts_go_to_the_new_one(h):
    model = h.model()
    (first,) = h.launcher.spawned
    in_flight = h.send(model, request_id="r1")
    first.exits(3)
    assert in_flight.error(BadGateway)
    assert model.state == "restarting"

    waiting = h.send(model, b'{"again": true}', request_id="r2")
    h.clock.advance(1)

    second = h.launcher.spawned[1]
    assert second.messages() == [{"again": True}]
    second.says({"ok": 2})
    assert waiting.answer().body == b'{"ok": 2}'
    h.stop(model)


def test_restart_backoff_doubles_with_quick_deaths_and_is_capped(h):
    model = h.model(restart_backoff=1, max_backoff=5, max_restarts=10, min_uptime=10)

    delays = []
    for _ in range(6):
        h.launcher.spawned[-1].killed()
        (delay,) = h.delays()
        delays.append(delay)
        h.clock.advance(delay)

    assert delays == [1, 2, 4, 5, 5, 5]
    assert model.state == "ready"
    h.stop(model)


def test_a_process_that_lived_past_min_uptime_starts_the_count_again(h):
    model = h.model(restart_backoff=1, max_restarts=3, min_uptime=10)
    h.launcher.spawned[-1].killed()
    h.clock.advance(1)
    h.launcher.spawned[-1].killed()
    assert h.delays() == [2]
    h.clock.advance(2)

    h.clock.advance(10)
    h.launcher.spawned[-1].killed()

    assert h.delays() == [1]
    assert model.state == "restarting"
    h.clock.advance(1)
    assert model.state == "ready"
    h.stop(model)


def test_after_max_restarts_quick_deaths_the_model_is_failed_and_tried_again_after_a_capped_backoff(h):
    model = h.model(max_restarts=3, restart_backoff=1, max_backoff=10, max_crash_loop_backoff=35, min_uptime=10)
    for _ in range(2):
        h.launcher.spawned[-1].exits(1)
        h.clock.advance(h.delays()[0])
    in_flight = h.send(model, request_id="waiting")
    h.launcher.spawned[-1].exits(1)  # the third quick death: "waiting" was in flight
    assert in_flight.error(BadGateway)

    assert model.state == "failed"
    assert h.delays() == [10]  # the first wait of a crash loop is max_backoff
    assert model.describe()["next_restart_in"] == 10
    assert "3 times" in model.describe()["last_error"]
    (failed,) = events(model, "failed")
    assert (failed["level"], failed["retry_in_s"]) == ("error", 10)
    h.clock.advance(4)
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="meanwhile"))
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"] == "6"
    assert "tried again in 6 s" in caught.value.message
    assert model.describe()["next_restart_in"] == 6

    h.clock.advance(6)  # the try: on trial, taking no requests, until it has run min_uptime
    assert len(h.launcher.spawned) == 4
    assert model.state == "failed"
    assert (model.describe()["next_restart_in"], model.describe()["trial_ends_in"]) == (None, 10)
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="on trial"))
    assert caught.value.headers["Retry-After"] == "10"
    assert "being tried again" in caught.value.message
    assert h.launcher.spawned[-1].stdin == b""
    waits = []
    for _ in range(3):  # each try dies at once: the wait doubles, up to max_crash_loop_backoff
        h.launcher.spawned[-1].exits(1)
        assert model.state == "failed"
        (wait,) = h.delays()
        waits.append(wait)
        h.clock.advance(wait)
    assert waits == [20, 35, 35]
    assert len(h.launcher.spawned) == 7
    assert "died 3 times in a row within 10 s of starting, and so did each of the 3 tries since" in (
        model.describe()["last_error"])

    # A try that runs for min_uptime is back, its count started again.
    h.clock.advance(9.9)
    assert model.state == "failed"
    h.clock.advance(0.1)
    assert model.state == "ready"
    assert events(model, "back after a crash loop")
    h.clock.advance(1)
    h.launcher.spawned[-1].exits(1)
    assert model.state == "restarting"
    assert h.delays() == [1]
    h.clock.advance(1)
    outcome = h.send(model, request_id="after")
    h.launcher.spawned[-1].says({"back": True})
    assert outcome.answer().body == b'{"back": true}'
    h.stop(model)


def test_restart_tries_a_failed_model_at_once_and_forgets_its_crash_loop(h):
    model = h.model(max_restarts=1, max_backoff=30)
    h.launcher.spawned[-1].exits(1)
    assert model.state == "failed"
    assert h.delays() == [30]

    model.restart()

    assert len(h.launcher.spawned) == 2
    assert model.state == "ready"
    assert h.delays() == []
    outcome = h.send(model, request_id="after")
    h.launcher.spawned[-1].says({"back": True})
    assert outcome.answer().body == b'{"back": true}'
    h.clock.advance(0)
    h.launcher.spawned[-1].exits(1)
    assert model.state == "failed"
    assert h.delays() == [30]  # counted from the start again
    h.stop(model)


def test_a_failed_jsonl_models_try_takes_requests_once_it_has_run_min_uptime(h):
    model = h.model(protocol="jsonl", max_restarts=1, max_backoff=5, min_uptime=3)
    h.launcher.spawned[-1].exits(1)
    assert model.state == "failed"

    h.clock.advance(5)
    h.launcher.spawned[-1].says({"ready": True})

    assert model.state == "failed"
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="too soon"))
    assert caught.value.headers["Retry-After"] == "3"
    h.clock.advance(3)
    assert model.state == "ready"
    outcome = h.send(model, request_id="r1")
    h.launcher.spawned[-1].answers("r1", output=1)
    assert outcome.answer().body == b"1"
    h.stop(model)


def test_a_process_stopped_on_purpose_during_a_trial_is_not_a_quick_death(h):
    model = h.model(max_restarts=1, max_backoff=5, min_uptime=30)
    h.launcher.spawned[-1].exits(1)
    h.clock.advance(5)  # the try, on trial
    trying = h.launcher.spawned[-1]
    # Stopped by the daemon (as the process of the try before would be, still on its way out).
    trying.protocol.stopping_on_purpose = True

    trying.exits(0)

    assert len(events(model, "failed")) == 1  # no second crash loop: it did not crash
    h.clock.advance(0)  # its place is taken at once, still on trial
    assert len(h.launcher.spawned) == 3
    assert model.state == "failed" and model.describe()["trial_ends_in"] == 30
    h.stop(model)


def test_restart_ends_a_trial_at_once(h):
    model = h.model(max_restarts=1, max_backoff=5, min_uptime=30)
    h.launcher.spawned[-1].exits(1)
    h.clock.advance(5)
    assert model.state == "failed"

    model.restart()

    assert model.state == "ready"
    assert len(h.launcher.spawned) == 2  # the try's process serves
    assert h.delays() == []
    h.stop(model)


def test_requests_waiting_when_the_model_fails_get_503(h):
    model = h.model(protocol="jsonl", max_restarts=1)
    waiting = h.send(model)

    h.launcher.spawned[0].exits(1)

    error = waiting.error(ModelUnavailable)
    assert (error.status, error.headers) == (503, {"Retry-After": "30"})
    h.stop(model)


def test_a_program_that_cannot_be_spawned_counts_as_a_crash(h):
    h.launcher.refuse = OSError("No such file or directory")
    model = h.model(max_restarts=3)

    assert model.state == "restarting"
    assert h.delays() == [1]
    h.clock.advance(1)
    assert h.delays() == [2]
    h.clock.advance(2)

    assert model.state == "failed"
    assert h.launcher.spawned == []
    assert [e["error"] for e in events(model, "spawn failed")] == ["No such file or directory"] * 3
    assert "cannot start the process" in model.describe()["last_error"]
    h.stop(model)


def test_a_model_that_prints_an_oversize_line_at_every_start_backs_off_and_fails(h):
    model = h.model(protocol="jsonl", max_line_bytes=64, max_restarts=3)

    delays = []
    for _ in range(3):
        process = h.launcher.spawned[-1]
        process.prints(b"#" * 1000 + b"\n")
        process.killed(signal=15)
        (delay,) = h.delays()
        delays.append(delay)
        if model.state != "failed":
            h.clock.advance(delay)

    assert delays == [1, 2, 30]
    assert model.state == "failed"
    h.stop(model)


def test_a_pool_started_again_while_stopping_supervises_exactly_its_workers(h):
    model = h.model()
    (old,) = h.launcher.spawned
    stopped = Outcome(model.stopService())
    model.startService()

    old.killed(signal=15)
    h.clock.advance(0)

    assert stopped.fired
    live = h.launcher.live()
    assert len(live) == 1
    assert [p.protocol for p in live] == [p for p in model.slots]
    h.stop(model)


# --- startup, shutdown, timeouts ----------------------------------------------------------


def test_a_jsonl_process_that_never_says_ready_is_terminated_and_waiting_requests_get_503(h):
    model = h.model(protocol="jsonl", startup_timeout=5, kill_timeout=3)
    (process,) = h.launcher.spawned
    waiting = h.send(model)

    h.clock.advance(4.9)
    assert h.launcher.signals == []
    h.clock.advance(0.1)

    assert h.launcher.signals == [(process.pid, "TERM")]
    assert process.stdin_closed
    error = waiting.error(ModelUnavailable)
    assert error.status == 503
    assert "startup_timeout" in error.message
    assert error.headers["Retry-After"] == "1"
    assert events(model, "startup timed out")
    h.clock.advance(3)
    assert h.launcher.signals == [(process.pid, "TERM"), (process.pid, "KILL")]
    process.killed(signal=9)
    assert h.delays() == [1]  # counted as a crash: restarted after the backoff
    h.clock.advance(1)
    assert len(h.launcher.spawned) == 2
    h.stop(model)


def test_stop_sends_sigterm_then_sigkill_after_kill_timeout_and_waits_for_the_exit(h):
    model = h.model(workers=2, kill_timeout=5, max_queue=5)
    first, second = h.launcher.spawned
    in_flight = h.send(model, request_id="r1")
    h.send(model, request_id="r2")
    queued = h.send(model, request_id="r3")

    stopped = Outcome(model.stopService())

    assert h.launcher.signals == [(first.pid, "TERM"), (second.pid, "TERM")]
    assert first.stdin_closed and second.stdin_closed
    assert in_flight.error(BadGateway).status == 502
    assert queued.error(ModelUnavailable).status == 503
    second.killed(signal=15)  # second leaves at once
    h.clock.advance(4.9)
    assert not stopped.fired
    assert model.state == "stopping"
    h.clock.advance(0.1)
    assert h.launcher.signals[2:] == [(first.pid, "KILL")]
    assert not stopped.fired
    first.killed(signal=9)
    assert stopped.fired
    assert model.state == "stopped"
    assert [e["level"] for e in events(model, "process exited")] == ["info", "info"]
    assert h.clock.getDelayedCalls() == []
    with pytest.raises(ModelUnavailable):
        model.send(b"{}", RequestContext(request_id="after"))


def test_a_process_that_exits_on_sigterm_is_never_killed(h):
    model = h.model(kill_timeout=5)
    (process,) = h.launcher.spawned

    stopped = Outcome(model.stopService())
    process.exits(0)

    assert stopped.fired
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10)
    assert h.launcher.signals == [(process.pid, "TERM")]


def test_a_jsonl_request_that_times_out_gets_504_and_the_model_is_told_to_cancel(h):
    model = h.model(protocol="jsonl", timeout=2, max_inflight=2)
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    slow = h.send(model, request_id="slow")
    h.clock.advance(1)
    quick = h.send(model, request_id="quick")
    process.answers("quick", output=1)  # the process is alive: it answers others

    h.clock.advance(1)

    error = slow.error(GatewayTimeout)
    assert error.status == 504
    assert "2 s" in error.message
    assert quick.answer().body == b"1"
    assert process.messages()[-1] == {"id": process.wire("slow"), "op": "cancel"}
    assert h.launcher.signals == []
    process.answers("slow", output="too late")
    assert events(model, "answer to an unknown request")
    h.stop(model)


def test_a_jsonl_process_that_printed_nothing_since_a_timed_out_request_is_replaced(h):
    model = h.model(protocol="jsonl", timeout=2)
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    h.clock.advance(1)
    stuck = h.send(model)

    h.clock.advance(2)

    assert stuck.error(GatewayTimeout)
    assert h.launcher.signals == [(process.pid, "TERM")]
    process.killed(signal=15)
    h.clock.advance(0)
    assert len(h.launcher.spawned) == 2
    h.stop(model)


def test_a_request_waiting_in_the_queue_times_out_with_504(h):
    model = h.model(protocol="jsonl", timeout=3)
    waiting = h.send(model)

    h.clock.advance(3)

    assert waiting.error(GatewayTimeout).status == 504
    assert model.describe()["queued"] == 0
    h.stop(model)


def test_a_raw_request_that_times_out_gets_504_and_its_process_is_replaced_at_once(h):
    model = h.model(timeout=2, max_restarts=2, min_uptime=100)

    for round_ in range(5):
        process = h.launcher.spawned[-1]
        outcome = h.send(model, request_id=f"r{round_}")
        h.clock.advance(2)
        assert outcome.error(GatewayTimeout).status == 504
        assert h.launcher.signals_to(process) == ["TERM"]
        assert process.stdin_closed
        process.killed(signal=15)
        assert h.delays() == [0]
        h.clock.advance(0)

    # Timeouts are not crashes: 5 replacements, and the model never failed.
    assert len(h.launcher.spawned) == 6
    assert model.state == "ready"
    outcome = h.send(model)
    h.launcher.spawned[-1].says({"fine": True})
    assert outcome.answer().status == 200
    h.stop(model)


def test_client_gone_on_jsonl_writes_cancel_and_the_next_request_takes_the_place(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    d = model.send(b'{"n": 1}', RequestContext(request_id="gone"))
    gone = Outcome(d)
    waiting = h.send(model, b'{"n": 2}', "next")

    d.cancel()

    gone.error(CancelledError)
    assert process.messages()[1:] == [
        {"id": process.wire("gone"), "op": "cancel"},
        {"id": process.wire("next"), "op": "predict", "input": {"n": 2}},
    ]
    process.says({"id": process.wire("gone"), "output": "late"}, {"id": process.wire("next"), "output": "mine"})
    assert waiting.answer().body == b'"mine"'
    assert h.delays() == []
    h.stop(model)


def test_cancelling_a_queued_request_removes_it_without_writing_it(h):
    model = h.model()
    (process,) = h.launcher.spawned
    first = h.send(model, request_id="r1")
    d = model.send(b'{"n": 2}', RequestContext(request_id="r2"))
    queued = Outcome(d)

    d.cancel()

    queued.error(CancelledError)
    assert model.describe()["queued"] == 0
    process.says({"n": 1})
    h.clock.advance(0)
    assert first.answer().body == b'{"n": 1}'
    assert len(process.lines()) == 1
    assert h.delays() == []
    h.stop(model)


def test_cancelling_a_raw_request_keeps_its_place_until_its_answer_comes(h):
    model = h.model()
    (process,) = h.launcher.spawned
    d = model.send(b'{"n": 1}', RequestContext(request_id="r1"))
    gone = Outcome(d)
    waiting = h.send(model, b'{"n": 2}', "r2")

    d.cancel()

    gone.error(CancelledError)
    assert process.messages() == [{"n": 1}]  # no way to tell a raw process to stop
    process.says({"answer": 1})  # the abandoned request's answer is dropped ...
    h.clock.advance(0)
    assert process.messages() == [{"n": 1}, {"n": 2}]
    process.says({"answer": 2})
    assert waiting.answer().body == b'{"answer": 2}'  # ... and never given to the next one
    h.stop(model)


def test_an_oversize_line_fails_the_request_with_502_and_replaces_the_process(h):
    model = h.model(max_line_bytes=64)
    (process,) = h.launcher.spawned
    outcome = h.send(model)

    process.prints(b'{"big": "' + b"x" * 40)
    process.prints(b"x" * 40)

    error = outcome.error(BadGateway)
    assert error.status == 502
    assert "max_line_bytes" in error.message
    assert h.launcher.signals == [(process.pid, "TERM")]
    assert len(process.protocol._stdout.pending()) <= 64
    process.prints(b"x" * 10_000 + b'"}\n')
    process.killed(signal=15)
    h.clock.advance(0)
    assert len(h.launcher.spawned) == 1  # a crash like any other: restarted after the backoff
    h.clock.advance(1)
    assert len(h.launcher.spawned) == 2
    assert events(model, "line too long")[0]["level"] == "error"
    h.stop(model)


def test_describe_shows_the_processes(h):
    model = h.model(protocol="jsonl", workers=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    h.clock.advance(2.5)
    h.send(model)

    described = model.describe()

    assert described["state"] == "ready"
    assert described["protocol"] == "jsonl"
    assert described["in_flight"] == 1
    assert described["processes"] == [
        {"slot": 0, "pid": first.pid, "state": "ready", "in_flight": 1, "uptime_s": 2.5},
        {"slot": 1, "pid": second.pid, "state": "starting", "in_flight": 0, "uptime_s": 2.5},
    ]
    h.stop(model)


def test_specs_built_directly_work_too(h):
    settings = ProcessSettings(command=("python", "x.py"), executable=sys.executable, kill_timeout=1)
    spec = SubprocessModelSpec(id="direct", type="subprocess", process=settings, protocol="jsonl", timeout=5)
    model = SubprocessModel(spec, reactor=h.clock, environ={}, launcher=h.launcher)
    model.startService()
    (process,) = h.launcher.spawned
    process.says({"ready": True})

    outcome = h.send(model)
    process.answers("r1", output=None)

    assert outcome.answer() == ModelAnswer(status=200, body=b"null")
    h.stop(model)


# --- the server process of an HTTP model (the same supervisor) -------------------------


def http_model_with_server(h, **keys):
    from aibackend.httpmodel import HttpModel

    problems = []
    table = {
        "id": "served", "type": "http", "url": "http://127.0.0.1:9009/predict",
        "command": ["python", "server.py"], "health_path": "/health", **keys,
    }
    spec = parse_model(Table(table, "models[0]", problems), environ={})
    assert problems == []
    client = HeldModelServer()  # its server, in memory: each request waits for the test's answer
    model = HttpModel(spec, reactor=h.clock, endpoints=client, environ={}, launcher=h.launcher)
    model.startService()
    return model, client


def stop_http_model(h, model):
    stopped = Outcome(model.stopService())
    for process in h.launcher.live():
        process.killed(signal=15)
    assert stopped.fired
    assert h.clock.getDelayedCalls() == []


def test_an_http_model_server_is_ready_once_its_health_path_answers_2xx(h):
    model, client = http_model_with_server(h)
    (server,) = h.launcher.spawned
    assert verifyObject(IModel, model) and verifyObject(IRestartable, model)  # its server is restartable
    assert (model.live_processes, model.restarts, model.startup_timeout) == (1, 0, 60.0)
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="early"))
    assert "starting" in caught.value.message

    h.clock.advance(0)
    client.flush()
    assert client.url(0) == "http://127.0.0.1:9009/health"
    client.answer(0, 503, b"")
    assert model.state == "starting"
    h.clock.advance(0.25)
    client.flush()
    client.answer(1, 200, b"")

    assert model.state == "ready"
    outcome = h.send(model, b'{"text": "hi"}', "req")
    client.flush()
    assert client.url(2) == "http://127.0.0.1:9009/predict"
    assert client.requests[2].method == b"POST" and client.requests[2].content.read() == b'{"text": "hi"}'
    client.answer(2, 200, b'{"label": "positive"}')
    assert outcome.answer() == ModelAnswer(status=200, body=b'{"label": "positive"}')
    stop_http_model(h, model)
    assert h.launcher.signals_to(server) == ["TERM"]


def test_an_http_model_server_that_crashes_answers_503_and_is_restarted_after_backoff(h):
    model, client = http_model_with_server(h)
    h.clock.advance(0)
    client.flush()
    client.answer(0, 200, b"")
    (server,) = h.launcher.spawned

    server.killed(signal=11)

    assert model.state == "restarting"
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="meanwhile"))
    assert caught.value.headers == {"Retry-After": "1"}  # the restart is 1 s away
    assert model.describe()["last_error"].startswith("a process killed by signal SIGSEGV")
    h.clock.advance(1)
    assert len(h.launcher.spawned) == 2
    h.clock.advance(0)
    client.flush()
    client.answer(1, 204, b"")
    assert model.state == "ready"
    stop_http_model(h, model)


def test_stopping_an_http_model_server_mid_probe_leaves_no_timer(h):
    model, client = http_model_with_server(h)
    h.clock.advance(0)
    client.flush()
    assert len(client.requests) == 1  # a probe is on its way

    stop_http_model(h, model)


# --- jsonl streams ------------------------------------------------------------------


@implementer(IChunks)
class RecordingChunks:
    """An IChunks that records each chunk with the clock's time and the producer."""

    def __init__(self, clock):
        self.clock = clock
        self.chunks = []
        self.producer = None
        self.unregistered = False

    def chunk(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming is True
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True


def streaming(h, **keys):
    model = h.model(protocol="jsonl", **keys)
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    return model, process


def test_jsonl_provides_istreaming_and_raw_does_not(h):
    jsonl = h.model(protocol="jsonl", start=False)
    raw = h.model(protocol="raw", start=False)
    assert IStreaming.providedBy(jsonl)
    verifyObject(IStreaming, jsonl)
    assert not IStreaming.providedBy(raw)
    verifyObject(IChunks, RecordingChunks(h.clock))


def test_a_streams_producer_is_a_push_producer(h):
    from twisted.internet.interfaces import IPushProducer

    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    verifyObject(IPushProducer, chunks.producer)
    process.answers("s", done=True)
    assert outcome.results == [None]
    h.stop(model)


def test_a_reader_that_fails_on_a_chunk_ends_its_stream_not_the_process(h, logged_errors):
    model, process = streaming(h)

    class Broken(RecordingChunks):
        def chunk(self, data):
            raise RuntimeError("a bug in the reader")

    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), Broken(h.clock)))
    wire = process.wire("s")
    process.answers("s", chunk=1)
    outcome.error(CancelledError)
    assert len(logged_errors.flush(RuntimeError)) == 1
    assert process.messages()[-1] == {"id": wire, "op": "cancel"}
    assert process.alive and model.in_flight == 0
    other = h.send(model, request_id="next")
    process.answers("next", output=2)
    assert other.answer().body == b"2"
    h.stop(model)


def test_a_stream_gives_each_chunk_in_order_in_the_turn_its_line_is_read_and_ends_with_the_output(h):
    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b'{"x": 1}', RequestContext(request_id="s"), chunks))
    wire = process.wire("s")
    assert process.messages()[-1] == {"id": wire, "op": "predict", "input": {"x": 1}}

    process.prints(b'{"id": "%s", "chunk": "a"}\n{"id": "%s", "chunk": {"b":  [1, 2]}}\n' % (
        wire.encode(), wire.encode()))
    assert chunks.chunks == [b'"a"', b'{"b":  [1, 2]}']  # as the model wrote them, no turn waited
    assert not outcome.fired
    process.says({"id": wire, "chunk": 3})
    assert chunks.chunks[-1] == b"3"
    process.says({"id": wire, "output": {"n": 3}})
    assert outcome.results == [b'{"n": 3}']
    assert chunks.unregistered
    assert model.in_flight == 0
    h.stop(model)


def test_a_stream_ended_with_done_fires_none(h):
    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    process.answers("s", chunk="x")
    process.answers("s", done=True)
    assert chunks.chunks == [b'"x"']
    assert outcome.results == [None]
    h.stop(model)


def test_an_error_mid_stream_fails_the_deferred_after_its_chunks_with_the_plain_requests_error(h):
    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    process.answers("s", chunk="x")
    process.answers("s", error={"message": "out of tokens", "status": 422})
    assert chunks.chunks == [b'"x"']
    error = outcome.error(ApiError)
    assert (error.status, error.type, error.message, error.model) == (422, "model_error", "out of tokens", "m")
    assert error.as_json("s") == {
        "error": {"type": "model_error", "message": "out of tokens", "model": "m", "request_id": "s"}
    }
    h.stop(model)


def test_cancelling_a_stream_sends_the_cancel_op_and_later_chunks_go_nowhere(h):
    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    wire = process.wire("s")
    process.answers("s", chunk=1)
    chunks.producer.stopProducing()  # the client left
    outcome.error(CancelledError)
    assert process.messages()[-1] == {"id": wire, "op": "cancel"}
    assert model.in_flight == 0
    process.says({"id": wire, "chunk": 2})
    assert chunks.chunks == [b"1"]
    assert [e["event"] for e in events(model)][-1] == "answer to an unknown request"
    h.stop(model)


def test_the_lines_a_model_still_prints_for_a_request_it_was_told_to_drop_are_logged_once_at_info(h):
    model, process = streaming(h, timeout=5, max_inflight=2)
    chunks = RecordingChunks(h.clock)
    stream = Outcome(model.stream(b"{}", RequestContext(request_id="c"), chunks))
    slow = h.send(model, request_id="t")
    cancelled, timed_out = process.wire("c"), process.wire("t")
    chunks.producer.stopProducing()  # the client left
    stream.error(CancelledError)
    h.clock.advance(1)
    process.says({"log": "working"})  # alive: the timed-out request is cancelled, not the process
    h.clock.advance(4)
    slow.error(GatewayTimeout)

    process.says({"id": cancelled, "chunk": 1}, {"id": cancelled, "chunk": 2}, {"id": cancelled, "done": True},
                 {"id": timed_out, "output": "late"}, {"id": "nobody#1", "chunk": 3})

    logged = [(e["level"], e.get("request"), e["line"]) for e in events(model, "answer to an unknown request")]
    assert logged == [
        ("info", "cancelled", json.dumps({"id": cancelled, "chunk": 1})),
        ("info", "timed out", json.dumps({"id": timed_out, "output": "late"})),
        ("warning", None, json.dumps({"id": "nobody#1", "chunk": 3})),
    ]
    h.stop(model)


def test_a_paused_stream_stops_reading_its_process_only_while_it_is_the_only_request_there(h):
    # Reading stdout is all or nothing: a slow reader holds its process only while no other
    # request waits for that process's lines (the relay bounds what waits for the reader).
    model, process = streaming(h, max_inflight=2)
    one, two = RecordingChunks(h.clock), RecordingChunks(h.clock)
    first = Outcome(model.stream(b"{}", RequestContext(request_id="a"), one))

    one.producer.pauseProducing()
    assert not process.reading  # alone: its process waits for its reader
    one.producer.pauseProducing()  # twice: still one pause
    assert process.pauses == 1
    second = Outcome(model.stream(b"{}", RequestContext(request_id="b"), two))
    assert process.reading  # another request there: the process is read again
    two.producer.pauseProducing()
    assert process.reading  # and neither slow reader holds it up now
    one.producer.resumeProducing()
    two.producer.resumeProducing()
    assert process.reading
    assert process.pauses == 1

    process.answers("b", done=True)
    one.producer.pauseProducing()  # alone again: held again
    assert not process.reading
    one.producer.resumeProducing()
    process.answers("a", output=1)
    assert process.reading
    assert (first.results, second.results) == ([b"1"], [None])
    h.stop(model)


def test_a_stream_paused_while_queued_pauses_its_process_once_it_is_sent(h):
    model, process = streaming(h)
    busy = h.send(model, request_id="busy")
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    chunks.producer.pauseProducing()
    assert process.reading and model.queued == 1
    process.answers("busy", output=0)
    assert busy.answer().body == b"0"
    assert not process.reading
    chunks.producer.resumeProducing()
    assert process.reading
    process.answers("s", done=True)
    assert outcome.results == [None]
    h.stop(model)


def test_a_streams_deadline_is_the_models_timeout_over_the_whole_stream(h):
    model, process = streaming(h, timeout=10)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    wire = process.wire("s")
    for _ in range(9):
        h.clock.advance(1)
        process.answers("s", chunk="t")
    assert not outcome.fired
    h.clock.advance(1)
    outcome.error(GatewayTimeout)
    assert len(chunks.chunks) == 9
    assert process.messages()[-1] == {"id": wire, "op": "cancel"}
    h.stop(model)


def test_a_stream_is_shed_like_a_request_when_the_queue_is_full(h):
    model, process = streaming(h, max_queue=0)
    h.send(model, request_id="busy")
    chunks = RecordingChunks(h.clock)
    with pytest.raises(ModelUnavailable):
        model.stream(b"{}", RequestContext(request_id="s"), chunks)
    assert chunks.unregistered
    process.answers("busy", output=0)
    h.stop(model)


# --- a plain request to a model that answers in chunks ------------------------------


@pytest.mark.parametrize("chunks, end, body", [
    (["Hel", "lo", ""], {"done": True}, b'"Hello"'),
    (["a", 1, {"b": None}], {"done": True}, b'["a",1,{"b": null}]'),
    (["a", "b"], {"output": {"text": "ab"}}, b'{"text": "ab"}'),
    ([], {"done": True}, b"[]"),
])
def test_a_plain_request_gets_the_chunks_gathered(h, chunks, end, body):
    model, process = streaming(h)
    outcome = h.send(model, request_id="p")
    for chunk in chunks:
        process.answers("p", chunk=chunk)
    assert not outcome.fired
    process.answers("p", **end)
    answer = outcome.answer()
    assert answer.status == 200
    assert answer.body == body
    assert json.loads(answer.body) == (end["output"] if "output" in end else json.loads(body))
    h.stop(model)


def test_gathered_chunks_past_max_line_bytes_are_a_502_and_the_process_is_told_to_stop(h):
    model, process = streaming(h, max_line_bytes=100)
    outcome = h.send(model, request_id="p")
    wire = process.wire("p")
    for _ in range(9):
        process.answers("p", chunk="x" * 8)  # 10 bytes of JSON each
    assert not outcome.fired
    process.answers("p", chunk="x" * 8)
    error = outcome.error(BadGateway)
    assert "answered more than max_line_bytes (100 bytes)" in error.message
    assert process.messages()[-1] == {"id": wire, "op": "cancel"}
    process.answers("p", done=True)  # too late: dropped
    assert model.in_flight == 0
    h.stop(model)


def test_gathered_chunks_within_max_line_bytes_are_answered(h):
    model, process = streaming(h, max_line_bytes=100)
    outcome = h.send(model, request_id="p")
    for _ in range(9):
        process.answers("p", chunk=[1, 2, 3])  # 9 bytes + a comma
    process.answers("p", done=True)
    assert len(outcome.answer().body) <= 100
    h.stop(model)


def test_a_chunk_that_is_not_strict_json_fails_the_stream_with_502_and_cancels_it(h):
    model, process = streaming(h)
    chunks = RecordingChunks(h.clock)
    outcome = Outcome(model.stream(b"{}", RequestContext(request_id="s"), chunks))
    wire = process.wire("s")
    process.answers("s", chunk="ok")
    process.prints(b'{"id": "%s", "chunk": NaN}\n' % wire.encode())
    outcome.error(BadGateway)
    assert chunks.chunks == [b'"ok"']
    assert process.messages()[-1] == {"id": wire, "op": "cancel"}
    h.stop(model)
