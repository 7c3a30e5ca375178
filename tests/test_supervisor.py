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
from zope.interface.verify import verifyObject

from aibackend.config import ProcessSettings, SubprocessModelSpec, Table, parse_model
from aibackend.errors import BadGateway, GatewayTimeout, ModelUnavailable
from aibackend.interfaces import ISender, ModelAnswer, RequestContext
from aibackend.subprocess import SubprocessModel

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

    # the transport's side
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

    def reap_group(self, pid) -> None:
        self.reaped.append(pid)

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


def test_a_subprocess_model_is_an_isender(h):
    model = h.model()

    assert verifyObject(ISender, model)
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
    assert process.messages() == [{"id": "req-1", "op": "predict", "input": {"text": "hi"}}]
    assert len(process.lines()) == 1
    process.says({"id": "req-1", "output": {"length": 2}})
    assert outcome.answer().status == 200
    assert json.loads(outcome.answer().body) == {"length": 2}
    h.stop(model)


def test_jsonl_answers_in_any_order_reach_their_own_requests(h):
    model = h.model(protocol="jsonl", max_inflight=3)
    (process,) = h.launcher.spawned
    process.says({"ready": True})

    outcomes = {rid: h.send(model, json.dumps({"n": rid}).encode(), rid) for rid in ("a", "b", "c")}

    assert [m["id"] for m in process.messages()] == ["a", "b", "c"]
    process.says({"id": "c", "output": "C"}, {"id": "a", "output": "A"})
    assert not outcomes["b"].fired
    process.says({"id": "b", "output": "B"})
    assert {rid: json.loads(o.answer().body) for rid, o in outcomes.items()} == {"a": "A", "b": "B", "c": "C"}
    h.stop(model)


def test_jsonl_two_requests_with_the_same_id_in_one_process_get_their_own_answers(h):
    model = h.model(protocol="jsonl", max_inflight=2)
    (process,) = h.launcher.spawned
    process.says({"ready": True})

    first = h.send(model, b'{"n": 1}', "same")
    second = h.send(model, b'{"n": 2}', "same")

    first_id, second_id = [m["id"] for m in process.messages()]
    assert first_id == "same" and second_id != "same"
    process.says({"id": second_id, "output": 2}, {"id": first_id, "output": 1})
    assert (first.answer().body, second.answer().body) == (b"1", b"2")
    h.stop(model)


def test_jsonl_error_answer_keeps_its_status_in_the_daemons_error_shape(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model, request_id="r-400")

    process.says({"id": "r-400", "error": {"message": 'send {"text": "..."}', "status": 400}})

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

    process.says({"id": "r1", "error": error})

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
    process.says({"id": "r1", "output": "fine"})

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

    process.says({"id": "r1", "result": 1})

    assert outcome.error(BadGateway).status == 502
    h.stop(model)


def test_jsonl_output_that_is_not_strict_json_is_a_502_not_a_broken_answer(h):
    model = h.model(protocol="jsonl")
    (process,) = h.launcher.spawned
    process.says({"ready": True})
    outcome = h.send(model)

    process.prints(b'{"id": "r1", "output": {"score": NaN}}\n')

    assert outcome.error(BadGateway).status == 502
    h.stop(model)


def test_jsonl_least_in_flight_dispatch_over_two_workers(h):
    model = h.model(protocol="jsonl", workers=2, max_inflight=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    second.says({"ready": True})

    outcomes = [h.send(model, b"{}", f"r{n}") for n in range(1, 6)]

    assert [m["id"] for m in first.messages()] == ["r1", "r3"]
    assert [m["id"] for m in second.messages()] == ["r2", "r4"]
    assert model.describe()["queued"] == 1
    second.says({"id": "r4", "output": 4})
    assert [m["id"] for m in second.messages()] == ["r2", "r4", "r5"]
    first.says({"id": "r1", "output": 1})
    # first now has 1 in flight, second 2: the next request goes to first.
    r6 = h.send(model, b"{}", "r6")
    assert [m["id"] for m in first.messages()] == ["r1", "r3", "r6"]
    assert [o.answer().body for o in (outcomes[0], outcomes[3])] == [b"1", b"4"]
    h.stop(model)
    assert r6.error(BadGateway)


# --- crashes and restarts --------------------------------------------------------------


def test_a_process_that_dies_mid_request_fails_its_requests_with_502_and_is_restarted_after_backoff(h):
    model = h.model(protocol="jsonl", workers=2, max_inflight=2)
    first, second = h.launcher.spawned
    first.says({"ready": True})
    second.says({"ready": True})
    a, b, c = (h.send(model, b"{}", rid) for rid in "abc")
    assert [m["id"] for m in first.messages()] == ["a", "c"]
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
    second.says({"id": "b", "output": "untouched"})
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


def test_after_max_restarts_quick_deaths_the_model_has_failed_until_restarted(h):
    model = h.model(max_restarts=3, restart_backoff=1)
    for _ in range(2):
        h.launcher.spawned[-1].exits(1)
        h.clock.advance(h.delays()[0])
    queued = h.send(model, request_id="waiting")
    h.launcher.spawned[-1].exits(1)  # the third quick death: r "waiting" was in flight
    assert queued.error(BadGateway)

    assert model.state == "failed"
    assert h.clock.getDelayedCalls() == []
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="late"))
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"] == "60"
    assert "failed" in caught.value.message
    assert "3 times" in model.describe()["last_error"]
    h.clock.advance(600)
    assert len(h.launcher.spawned) == 3
    assert events(model, "failed")[0]["level"] == "error"

    model.restart()

    assert len(h.launcher.spawned) == 4
    assert model.state == "ready"
    outcome = h.send(model, request_id="after")
    h.launcher.spawned[-1].says({"back": True})
    assert outcome.answer().body == b'{"back": true}'
    h.stop(model)


def test_requests_waiting_when_the_model_fails_get_503(h):
    model = h.model(protocol="jsonl", max_restarts=1)
    waiting = h.send(model)

    h.launcher.spawned[0].exits(1)

    error = waiting.error(ModelUnavailable)
    assert (error.status, error.headers) == (503, {"Retry-After": "60"})
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
        if model.state == "failed":
            break
        process = h.launcher.spawned[-1]
        process.prints(b"#" * 1000 + b"\n")
        process.killed(signal=15)
        delays.append(h.delays()[0] if h.delays() else None)
        h.clock.advance(delays[-1] or 0)

    assert delays[:2] == [1, 2]
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
    process.says({"id": "quick", "output": 1})  # the process is alive: it answers others

    h.clock.advance(1)

    error = slow.error(GatewayTimeout)
    assert error.status == 504
    assert "2 s" in error.message
    assert quick.answer().body == b"1"
    assert process.messages()[-1] == {"id": "slow", "op": "cancel"}
    assert h.launcher.signals == []
    process.says({"id": "slow", "output": "too late"})
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
        {"id": "gone", "op": "cancel"},
        {"id": "next", "op": "predict", "input": {"n": 2}},
    ]
    process.says({"id": "gone", "output": "late"}, {"id": "next", "output": "mine"})
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
    process.says({"id": "r1", "output": None})

    assert outcome.answer() == ModelAnswer(status=200, body=b"null")
    h.stop(model)


# --- the server process of an HTTP model (the same supervisor) -------------------------


class FakeResponse:
    def __init__(self, code: int, body: bytes = b""):
        from twisted.web.http_headers import Headers

        self.code = code
        self.body = body
        self.length = len(body)
        self.headers = Headers({b"content-type": [b"application/json"]})

    def deliverBody(self, protocol):
        from twisted.internet.testing import StringTransport
        from twisted.web.client import ResponseDone

        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTPClient:
    """A treq-like client whose requests the test answers."""

    def __init__(self):
        self.gets: list = []
        self.posts: list = []

    def get(self, url, **kwargs):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.gets.append((str(url), d))
        return d

    def post(self, url, data=None, **kwargs):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.posts.append((str(url), data, d))
        return d


def http_model_with_server(h, **keys):
    from aibackend.httpmodel import HttpModel

    problems = []
    table = {
        "id": "served", "type": "http", "url": "http://127.0.0.1:9009/predict",
        "command": ["python", "server.py"], "health_path": "/health", **keys,
    }
    spec = parse_model(Table(table, "models[0]", problems), environ={})
    assert problems == []
    client = FakeHTTPClient()
    model = HttpModel(spec, reactor=h.clock, client=client, environ={}, launcher=h.launcher)
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
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="early"))
    assert "starting" in caught.value.message

    h.clock.advance(0)
    url, probe = client.gets[0]
    assert url == "http://127.0.0.1:9009/health"
    probe.callback(FakeResponse(503))
    assert model.state == "starting"
    h.clock.advance(0.25)
    client.gets[1][1].callback(FakeResponse(200))

    assert model.state == "ready"
    outcome = h.send(model, b'{"text": "hi"}', "req")
    url, data, d = client.posts[0]
    assert (url, data) == ("http://127.0.0.1:9009/predict", b'{"text": "hi"}')
    d.callback(FakeResponse(200, b'{"label": "positive"}'))
    assert outcome.answer() == ModelAnswer(status=200, body=b'{"label": "positive"}')
    stop_http_model(h, model)
    assert h.launcher.signals_to(server) == ["TERM"]


def test_an_http_model_server_that_crashes_answers_503_and_is_restarted_after_backoff(h):
    model, client = http_model_with_server(h)
    h.clock.advance(0)
    client.gets[0][1].callback(FakeResponse(200))
    (server,) = h.launcher.spawned

    server.killed(signal=11)

    assert model.state == "restarting"
    with pytest.raises(ModelUnavailable) as caught:
        model.send(b"{}", RequestContext(request_id="meanwhile"))
    assert caught.value.headers == {"Retry-After": "2"}
    assert model.describe()["last_error"].startswith("a process killed by signal SIGSEGV")
    h.clock.advance(1)
    assert len(h.launcher.spawned) == 2
    h.clock.advance(0)
    client.gets[1][1].callback(FakeResponse(204))
    assert model.state == "ready"
    stop_http_model(h, model)


def test_stopping_an_http_model_server_mid_probe_leaves_no_timer(h):
    model, client = http_model_with_server(h)
    h.clock.advance(0)
    assert len(client.gets) == 1  # a probe is on its way

    stop_http_model(h, model)
