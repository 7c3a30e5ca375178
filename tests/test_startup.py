"""
Start-up in one place: C{tap.Options} only checks, L{aibackend.daemon.build} makes the
daemon as named child services for each of its three modes, the listening sockets have a
module of their own, and no start-up module is on an import cycle.
"""

from __future__ import annotations

import socket

import pytest
from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver

from aibackend import config
from aibackend.daemon import Root, build
from aibackend.listeners import StartupError, check_endpoint, describe_address
from aibackend.store import MemoryStore
from aibackend.testing import end_worker, workers_on

LOOPBACK = "tcp:0:interface=127.0.0.1"


def _subprocess_model(model_id="m", **fields):
    return {"id": model_id, "type": "subprocess", "command": ["/bin/cat"], **fields}


def names(root) -> list[str]:
    return [child.name for child in root]


# --- Options: checks only -----------------------------------------------------------------


def parsed(*arguments, parent=None):
    from aibackend.tap import Options

    options = Options()
    options.parent = parent
    options.parseOptions(list(arguments))
    return options


def test_options_make_nothing_and_set_nothing(tmp_path):
    state = tmp_path / "state" / "deeper"
    parent = {"logfile": str(tmp_path / "twistd.log"), "logger": None}

    options = parsed("--state", str(state), "--log-format", "json", "--listen", LOOPBACK, parent=parent)

    assert options.state_dir == str(state)
    assert not state.exists() and not state.parent.exists()
    assert parent == {"logfile": str(tmp_path / "twistd.log"), "logger": None}
    assert options.logfile == str(tmp_path / "twistd.log")


def test_the_state_directory_is_made_when_the_service_is(tmp_path):
    from aibackend import tap

    state = tmp_path / "made" / "here"
    options = parsed("--state", str(state), "--listen", LOOPBACK)

    root = tap.makeService(options)
    try:
        assert state.is_dir()
        assert (state.stat().st_mode & 0o777) == 0o700
    finally:
        root.getServiceNamed("store").store.close()


def test_a_state_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"

    with pytest.raises(StartupError) as caught:
        build(config.Config(), MemoryReactorClock(), listen=[], max_body_bytes=10, state_dir=str(state),
              environ={})

    assert str(caught.value) == f"aibackend: cannot use the state directory {state}: Not a directory"


def test_a_startup_error_is_one_line_a_problem():
    assert str(StartupError("bad")) == "aibackend: bad"
    assert str(StartupError(["one", "two"])) == "aibackend: one\naibackend: two"
    assert StartupError("bad").code != 0


# --- the root service and its named children ------------------------------------------------


def test_alone_the_daemon_is_named_children_in_start_order():
    cfg = config.parse_config({"models": [_subprocess_model()]}, environ={})
    daemon = build(cfg, MemoryReactorClock(), listen=[LOOPBACK, "unix:/tmp/aibackend-test.sock"],
                   max_body_bytes=10, store=MemoryStore(), environ={}, subreaper=True)
    root = daemon.service

    assert names(root) == ["subreaper", "pool", "runtime-pool", "store", "models", "listener-0", "listener-1",
                           "readiness"]
    assert root.getServiceNamed("models") is daemon.parts.registry
    assert daemon.parts.registry.get("m").model_id == "m"
    assert root.getServiceNamed("listener-0").factory is daemon.parts.site
    assert root.getServiceNamed("readiness").front_door is daemon.parts.front_door
    assert daemon.parts.front_door.registry is daemon.parts.registry


def test_the_primary_starts_its_workers_after_the_models_and_before_its_sockets():
    cfg = config.parse_config({"models": [_subprocess_model()]}, environ={})
    daemon = build(cfg, MemoryReactorClock(), listen=[LOOPBACK], max_body_bytes=10, store=MemoryStore(),
                   environ={}, processes=3, worker_argv=["-c", "pass"])
    root = daemon.service

    assert names(root) == ["pool", "runtime-pool", "store", "models", "worker-port", "workers", "listener-0",
                           "readiness"]
    workers = root.getServiceNamed("workers")
    assert workers.count == 3
    assert workers.private is root.getServiceNamed("worker-port")
    assert workers.listeners == [root.getServiceNamed("listener-0")]
    # The internal token workers present is made for this start, and the guard knows it.
    assert workers.token and daemon.parts.guard.internal_token == workers.token
    assert daemon.parts.manager.changed == [workers.sync]


def test_a_worker_forwards_to_its_primary_and_adopts_the_sockets_it_inherited():
    cfg = config.parse_config({"models": [_subprocess_model("shared"), _subprocess_model("own", per_process=True)]},
                              environ={})
    settings = {"number": 1, "fds": [[3, int(socket.AF_INET)], [4, int(socket.AF_INET6)]], "ack": 5,
                "primary": 4321, "token": "t" * 20}
    daemon = build(cfg, MemoryReactorClock(), listen=[LOOPBACK], max_body_bytes=10, store=MemoryStore(),
                   environ={}, worker=settings)
    root = daemon.service

    assert "primary-link" in names(root)
    assert names(root)[-3:] == ["listener-0", "listener-1", "readiness"]
    assert root.getServiceNamed("listener-1").inherited == (4, int(socket.AF_INET6))
    assert daemon.parts.front_door.primary is not None
    assert daemon.parts.guard.internal_token is None
    assert daemon.parts.registry.get("shared").describe()["served_by"] == "the primary process"
    assert "served_by" not in daemon.parts.registry.get("own").describe()


def test_given_to_twistds_application_the_root_names_its_log_observer():
    made = []
    root = Root(log_observer=lambda: made.append(object()) or (lambda event: None))
    application = service.Application("aibackend")

    root.setServiceParent(application)

    assert application.getComponent(ILogObserver) is not None
    assert len(made) == 1
    assert list(service.IServiceCollection(application)) == [root]


def test_an_observer_the_application_has_is_kept_and_none_is_set_without_one():
    mine = lambda event: None  # noqa: E731
    application = service.Application("aibackend")
    application.setComponent(ILogObserver, mine)
    Root(log_observer=lambda: pytest.fail("made anyway")).setServiceParent(application)
    assert application.getComponent(ILogObserver) is mine

    plain = service.Application("aibackend")
    Root().setServiceParent(plain)
    assert plain.getComponent(ILogObserver) is None


def test_json_logs_go_to_twistds_log_file(tmp_path):
    from aibackend.logs import json_log_observer

    path = tmp_path / "aibackend.log"
    observer = json_log_observer(str(path))
    observer({"log_format": "hello {who}", "who": "you", "log_namespace": "t", "log_time": 0.0})
    observer._outFile.close()

    assert '"who": "you"' in path.read_text()


# --- listening sockets ------------------------------------------------------------------------


def test_addresses_are_shown_as_urls_or_unix_paths():
    assert describe_address(IPv4Address("TCP", "127.0.0.1", 8080)) == "http://127.0.0.1:8080"
    assert describe_address(IPv6Address("TCP", "::1", 8080)) == "http://[::1]:8080"
    assert describe_address(UNIXAddress("/run/aibackend.sock")) == "unix:/run/aibackend.sock"


def test_an_endpoint_is_checked_without_a_reactor():
    assert check_endpoint(LOOPBACK) is None
    assert check_endpoint("unix:/run/aibackend.sock") is None
    assert check_endpoint("tcp:notaport")
    assert check_endpoint("nonsense:1")


# (No import cycles, and imports inside functions only with a comment: tests/test_layout.py, for
# every module.)


# --- --processes: the primary tells its workers the states of its models ---------------------


def _specs(*tables):
    return {spec.id: spec for spec in config.parse_config({"models": list(tables)}, environ={}).models}


def primary_registry(clock, *models_and_specs):
    from aibackend.registry import ModelDeps, ModelRegistry

    registry = ModelRegistry(ModelDeps(reactor=clock, environ={}))
    for model, spec in models_and_specs:
        registry.add(model, spec=spec)
    return registry


def test_the_primary_tells_the_states_of_the_models_workers_forward_and_each_change(clock):
    from aibackend.processes import ModelStates
    from aibackend.testing import FakeModel

    specs = _specs(_subprocess_model("shared"), _subprocess_model("own", per_process=True),
                   {"id": "web", "type": "http", "url": "http://127.0.0.1:9/"})
    shared = FakeModel("shared", state="starting")
    registry = primary_registry(clock, (shared, specs["shared"]), (FakeModel("own"), specs["own"]),
                                (FakeModel("web"), specs["web"]))
    told = []
    states = ModelStates(registry, told.append)

    states.follow()
    assert told == ["state shared starting"]  # the others each process runs itself
    shared.state = "ready"
    shared.state = "failed"
    assert told[1:] == ["state shared ready", "state shared failed"]
    assert states.notices() == ["state shared failed"]

    replacement = FakeModel("shared", state="starting")
    registry.replace(replacement, spec=specs["shared"])
    states.follow()
    shared.state = "stopped"  # the old one, on its way out: not told
    assert told[3:] == ["state shared starting"]

    registry.remove("shared")
    states.follow()
    replacement.state = "ready"
    assert told[4:] == ["forget shared"]
    states.stop()


def test_a_new_worker_is_told_every_state_and_a_sync_tells_new_models_first(clock, logged_errors):
    from aibackend.testing import FakeModel

    specs = _specs(_subprocess_model("a"), _subprocess_model("b"))
    registry = primary_registry(clock, (FakeModel("a", state="starting"), specs["a"]))
    reactor, workers = workers_on(clock, registry=registry)
    [(first, *_)] = reactor.spawned

    assert first.transport.written == [b"state a starting\n"]
    registry.get("a").state = "ready"
    assert first.transport.written[-1] == b"state a ready\n"

    registry.add(FakeModel("b"), spec=specs["b"])
    followed = workers.sync("b")
    assert first.transport.written[-2:] == [b"state b ready\n", b"sync 1\n"]
    first.childDataReceived(4, b"synced 1\n")
    assert followed.called

    end_worker(first)
    clock.advance(1)
    (second, *_) = reactor.spawned[-1]
    assert second.transport.written == [b"state a ready\nstate b ready\n"]
    logged_errors.flush()
    workers.stopService()
    registry.get("a").state = "failed"  # stopped: the workers are not told any more
    assert second.transport.written == [b"state a ready\nstate b ready\n"]
    end_worker(second)


def test_a_notice_that_is_not_one_line_is_refused(clock):
    reactor, workers = workers_on(clock)
    with pytest.raises(ValueError):
        workers.notify("state a ready\nsync 9")
    with pytest.raises(ValueError):
        workers.notify("x" * 2000)
    workers.stopService()
    end_worker(reactor.spawned[0][0])


# --- in a worker: the stand-in takes its state from what the primary says --------------------


def channel_with_states():
    from twisted.internet.testing import StringTransport

    from aibackend.processes import ControlChannel, PrimaryStates

    states = PrimaryStates()
    channel = ControlChannel(lambda: pytest.fail("no sync here"), reactor=None, states=states)
    channel.makeConnection(StringTransport())
    return channel, states


def forwarded_model(clock, states, model_id="shared"):
    from aibackend.processes import ForwardedModel

    spec = _specs(_subprocess_model(model_id, timeout=7))[model_id]
    return ForwardedModel(spec, 4321, "t" * 20, states, reactor=clock)


def test_a_forwarded_model_is_starting_until_the_primary_says_otherwise(clock):
    from zope.interface.verify import verifyObject

    from aibackend.interfaces import IModel, IRestartable

    channel, states = channel_with_states()
    model = forwarded_model(clock, states)
    verifyObject(IModel, model)
    assert not IRestartable.providedBy(model)  # its processes are the primary's
    model.startService()
    seen = []
    model.watch(lambda m: seen.append(m.state))
    ready = model.whenReady()

    assert model.state == "starting" and not ready.called
    channel.dataReceived(b"state shared re")
    channel.dataReceived(b"ady\nstate other failed\n")

    assert model.state == "ready" and ready.called and seen == ["ready"]
    assert model.describe()["state"] == "ready"
    assert model.describe()["served_by"] == "the primary process"
    assert model.describe()["type"] == "subprocess"
    assert "url" not in model.describe()
    assert model.request_timeout == 12.0  # its own, and the way to the primary
    channel.dataReceived(b"state shared failed\n")
    assert model.state == "failed"
    model.stopService()
    assert model.state == "stopped"
    channel.dataReceived(b"state shared ready\n")
    assert model.state == "stopped" and seen == ["ready", "failed", "stopped"]


def test_a_forwarded_model_made_after_the_primary_spoke_has_its_state(clock):
    channel, states = channel_with_states()
    channel.dataReceived(b"state shared failed\n")

    model = forwarded_model(clock, states)
    assert model.state == "failed"
    failed = model.whenReady()
    assert failed.called
    from aibackend.errors import ModelUnavailable

    failed.addErrback(lambda f: f.trap(ModelUnavailable))
    channel.dataReceived(b"forget shared\n")
    assert forwarded_model(clock, states).state == "starting"


@pytest.mark.parametrize("line", [
    b"state shared nonsense",
    b"state shared",
    b"state -bad ready",
    b"state " + b"a" * 129 + b" ready",
    b"state sh\xffared ready",
    b"state shared ready extra",
    b"forget",
])
def test_a_state_line_that_is_not_one_is_ignored(line):
    channel, states = channel_with_states()
    channel.dataReceived(b"state shared failed\n" + line + b"\n")

    assert states.get("shared") == "failed"


def test_a_long_model_id_is_told(clock):
    channel, states = channel_with_states()
    model_id = "a" + "b.c-d_" * 21  # 127 characters
    channel.dataReceived(f"state {model_id} ready\n".encode())

    assert states.get(model_id) == "ready"


def test_the_worker_channel_stops_the_reactor_when_the_primary_is_gone_unless_it_is_closing():
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.python.failure import Failure

    from aibackend.processes import ControlChannel

    reactor = MemoryReactorClock()
    reactor.running = True
    stopped = []
    reactor.stop = lambda: stopped.append(True)
    channel = ControlChannel(lambda: None, reactor)
    channel.makeConnection(StringTransport())

    channel.connectionLost(Failure(EOFError()))
    assert stopped == [True]
    closing = ControlChannel(lambda: None, reactor)
    closing.closing = True
    closing.connectionLost(Failure(EOFError()))
    assert stopped == [True]


def test_a_notice_that_fails_is_logged_and_the_channel_reads_on(logged_errors):
    from twisted.internet.testing import StringTransport

    from aibackend.processes import ControlChannel, PrimaryStates

    def restart(model_id):
        raise RuntimeError(f"cannot restart {model_id}")

    states = PrimaryStates()
    channel = ControlChannel(lambda: pytest.fail("no sync here"), reactor=None, restart=restart, states=states)
    channel.makeConnection(StringTransport())

    channel.dataReceived(b"restart m\nstate m ready\n")

    assert [event["log_failure"].value.args for event in logged_errors.flush(RuntimeError)] == [("cannot restart m",)]
    assert states.get("m") == "ready"
    assert not channel.transport.disconnecting
