"""
Fixtures every test gets.

pytest-twisted installs the reactor (``--reactor=default`` in pytest.ini) when pytest
configures itself, after this file is imported: so nothing here imports the reactor,
nor anything that does (klein, aibackend.api), at module level.
"""

from __future__ import annotations

import faulthandler
import gc
import os

import pytest


def pytest_collection_finish(session):
    """
    Every test ends with a full garbage collection (L{logged_errors}). What exists once the
    tests are collected (the modules imported: Twisted, numpy, hypothesis, tritonclient...) is
    frozen out of it (C{gc.freeze}): the collection then looks only at what the tests made,
    which is where a lost Deferred is, and takes a few milliseconds instead of a tenth of a
    second of CPU per test.
    """
    gc.collect()
    gc.freeze()


# make test runs the suite on pytest-xdist workers, each test module whole on one worker
# (--dist loadscope) in the order collected (--no-loadscope-reorder). These modules take the
# longest (real daemons, model processes, hypothesis; measured in a make test run, slowest
# first): collected first, they start first, and no worker is left with one of them at the end
# while the others idle. Every other module keeps its place after them. Only the order changes.
SLOWEST_MODULES = (
    "test_fuzz.py",
    "test_processes.py",
    "test_runtime_daemon.py",
    "test_keys_daemon.py",
    "test_fleet_daemon.py",
    "test_ratelimit_daemon.py",
    "test_redisstore.py",
    "test_faults.py",
    "test_server_hardening.py",
    "test_subprocess_integration.py",
    "test_subprocess_hardening.py",
    "test_v2.py",
    "test_tensors.py",
    "test_examples.py",
    "test_daemon.py",
    "test_worker.py",
    "test_client_limits.py",
    "test_api_hardening.py",
    "test_v2_daemon.py",
    "test_streaming_daemon.py",
    "test_http_streaming.py",
    "test_openai_daemon.py",
    "test_observability_daemon.py",
    "test_supervisor.py",
    "test_write_path.py",
    "test_batching_daemon.py",
    "test_usage_daemon.py",
    "test_fallbacks_daemon.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_MODULES)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """
    Under C{--dist loadscope}, a test that crashes its worker (pytest-timeout's thread method
    ends the worker of a test that hangs) is reported as crashed and not run again. xdist's
    own scheduler puts it back in the queue with the rest of its module: it would hang the
    next worker too, until the restarts run out and the modules after it never run.
    """
    if config.getvalue("dist") != "loadscope":
        return None
    # Imported here: pytest-xdist is there only when it calls this hook (a run without -n
    # needs none of it).
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def remove_node(self, node):
            crashed = None
            for unit in self.assigned_work.get(node, {}).values():
                crashed = next((nodeid for nodeid, done in unit.items() if not done), None)
                if crashed is not None:
                    unit[crashed] = True  # the worker ended in it: the rest of the unit goes back
                    break
            super().remove_node(node)
            return crashed

    return ModuleScheduling(config, log)


# Under pytest-xdist a worker's stdout goes nowhere (its channel to the controller took it), so
# pytest-timeout's thread method would end a hanging worker with its stack dump unseen: there,
# faulthandler's watchdog thread does the same (every thread's stack, then the worker ends) to
# the stderr the worker was started with, which is the controller's.
_worker_stderr = None


def pytest_configure(config):
    global _worker_stderr
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _worker_stderr = os.fdopen(os.dup(2), "w")  # capturing is off during configure: the real one


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item, settings):
    if _worker_stderr is None or settings.method != "thread":
        return None  # pytest-timeout's own
    faulthandler.dump_traceback_later(settings.timeout, exit=True, file=_worker_stderr)
    return True


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
    if _worker_stderr is None:
        return None
    faulthandler.cancel_dump_traceback_later()
    return True


def _is_error(event) -> bool:
    if event.get("log_failure") is not None or event.get("isError"):
        return True
    text = " ".join(str(event.get(key) or "") for key in ("log_format", "log_text", "format"))
    return "Unhandled error in Deferred" in text


def _describe(event) -> str:
    from twisted.logger import formatEvent

    text = formatEvent(event)
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


class LoggedErrors:
    """
    Collects the errors logged through Twisted's global log publisher while a test
    runs: a failure logged with C{log.failure}/C{log.err}, an "Unhandled error in
    Deferred". A test that expects one takes it out with L{flush}.
    """

    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, event) -> None:
        if _is_error(event):
            self.events.append(event)

    def flush(self, *types) -> list[dict]:
        """
        Take out (and return) the logged errors whose failure is one of C{types}
        (every logged error if no type is given).
        """
        taken, kept = [], []
        for event in self.events:
            failure = event.get("log_failure")
            if not types or (failure is not None and failure.check(*types)):
                # Twisted says "Unhandled error in Deferred:" in one event and gives
                # the failure in the next: they go together.
                if kept and kept[-1].get("log_failure") is None and _is_error(kept[-1]):
                    taken.append(kept.pop())
                taken.append(event)
            else:
                kept.append(event)
        self.events = kept
        return [event for event in taken if event.get("log_failure") is not None or not types]


@pytest.fixture(autouse=True)
def logged_errors():
    """
    Fails a test that leaves an error logged, or an unhandled error in a Deferred,
    behind (pytest-twisted reports neither, and the leak then breaks a later test).
    """
    from twisted.logger import globalLogPublisher

    collector = LoggedErrors()
    globalLogPublisher.addObserver(collector)
    try:
        yield collector
        # A Deferred that failed with nobody to handle it says so when it is collected.
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(collector)
    if collector.events:
        pytest.fail(
            "the test left errors in the log:\n\n" + "\n\n".join(_describe(event) for event in collector.events),
            pytrace=False,
        )


@pytest.fixture
def clock():
    """
    A L{twisted.internet.task.Clock}; the test fails if it leaves delayed calls
    pending on it (a timer nobody cancelled).
    """
    from twisted.internet.task import Clock

    clock = Clock()
    yield clock
    pending = clock.getDelayedCalls()
    if pending:
        pytest.fail(f"the test left {len(pending)} delayed call(s) on the clock: {pending!r}", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _session_state_dir(tmp_path_factory):
    """Daemons started by tests keep runtime models under a temporary directory, never ~."""
    import os

    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if previous is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture(autouse=True)
def _test_state_dir(tmp_path_factory, monkeypatch):
    """Each test's own daemons start with an empty store."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


# --- the real daemon ---------------------------------------------------------------------
# (aibackend.testing is imported in the fixtures, as everything in this file: see above.)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port, for a module (aibackend.testing.RedisServer)."""
    from aibackend.testing import RedisServer, need_redis_server

    server = RedisServer(need_redis_server(), tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_server():
    """examples/http_model_server.py on a free loopback port, for a module; its port."""
    from aibackend.testing import ExampleModelServer

    server = ExampleModelServer()
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture
def start_daemon(tmp_path):
    """
    Start the real daemon (L{aibackend.testing.Daemon}) with these C{[[models]]} tables
    (or C{config_text}), in C{tmp_path} unless told (C{cwd}), with the other keywords of
    L{Daemon} (C{extra} arguments, C{state}, C{env}...); every daemon started is stopped
    (SIGTERM, then SIGKILL) and reaped after the test.
    """
    from aibackend.testing import Daemon, toml_models

    daemons = []

    def start(*models: dict, config_text=None, cwd=None, extra=(), **options):
        path = tmp_path / f"aibackend-{len(daemons)}.toml"
        path.write_text(config_text if config_text is not None else toml_models(*models))
        daemon = Daemon(str(path), *extra, cwd=cwd or str(tmp_path), wait=False, **options)
        daemons.append(daemon)
        return daemon.wait_listening()

    yield start
    for daemon in daemons:
        daemon.stop()
