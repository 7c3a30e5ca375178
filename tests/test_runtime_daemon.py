"""
Runtime model management in the real daemon: the real C{twistd aibackend} on a free
loopback port, real model servers and model processes, and what a user sees over HTTP
(http.client), in the log, in the state directory and in /proc.

Plain blocking tests (L{aibackend.testing.Daemon}). Model servers of our own run in threads
of this process (a recorder that keeps every request it got, a canary that counts
connections on 127.0.0.2); every wait has a deadline; every process is ended by its fixture.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import (
    LOOPBACK_ANY_PORT, PHOENIX, TWISTD, Daemon, ModelServer, config_text, reaped, wait_until, write,
)

pytestmark = pytest.mark.timeout(30)

TOKEN = "admin-token-0123456789abcdef"
KEY = "client-key-0123456789"
SECRET = "s3cr3t-value-from-env"
SLOW_SECONDS = 1.5

# A jsonl model: says it is ready after argv[2] seconds, answers with its version (argv[1]) and pid.
VERSIONED = """
import json, os, sys, time
version = sys.argv[1]
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    if message.get("op") == "predict":
        print(json.dumps({"id": message["id"], "output": {"version": version, "pid": os.getpid()}}), flush=True)
"""

# A raw model that tells what it was given in its environment.
ENVDUMP = """
import json, os, sys
for line in sys.stdin:
    print(json.dumps({"names": sorted(os.environ), "values": list(os.environ.values())}), flush=True)
"""


# --- model servers in threads -----------------------------------------------------------------


class Recorder(ModelServer):
    """
    An HTTP model server that keeps what it receives: any path answers C{{"path", "echo"}};
    C{/slow...} answers after L{SLOW_SECONDS}; C{/redirect...} answers 302 to L{redirect_to}.
    """

    def __init__(self):
        self.redirect_to = "http://127.0.0.2:9/"
        super().__init__()

    def answer(self, path, headers, body):
        status, more = 200, {}
        if path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        elif path.startswith("/redirect"):
            status, more = 302, {"Location": self.redirect_to}
        try:
            echo = json.loads(body or b"null")
        except ValueError:
            echo = None
        return status, more, json.dumps({"path": path, "echo": echo}).encode()


class Canary:
    """A plain TCP listener on 127.0.0.2 (loopback) that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.2:{self.port}/"
        self.accepted = 0
        self._open = True
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while self._open:
            try:
                connection, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self._open = False
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def canary():
    listener = Canary()
    yield listener
    listener.close()


# --- the daemon ----------------------------------------------------------------------------------


@pytest.fixture
def start(start_daemon, tmp_path):
    """Start daemons for one test (each on its own state unless told); all are stopped after it."""
    started = itertools.count()

    def start_(config: str = "", *extra, state=None, **options) -> Daemon:
        state = state or tmp_path / f"state-{next(started)}"
        return start_daemon(config_text=config, extra=extra, state=str(state), **options)

    return start_


# --- one daemon for most tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scripts")
    return {
        "dir": directory,
        "versioned": write(directory / "versioned.py", VERSIONED),
        "phoenix": PHOENIX,
        "envdump": write(directory / "envdump.py", ENVDUMP),
        "flag": str(directory / "phoenix.flag"),
    }


@pytest.fixture(scope="module")
def main(recorder, scripts, tmp_path_factory):
    """
    No admin token, loopback only, the default destinations, and this Python allowed for
    runtime programs. Config models: one with secret headers, a two-process worker, and one
    that crash-loops until its flag file exists.
    """
    directory = tmp_path_factory.mktemp("main")
    text = config_text(
        {"id": "hosted", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/hosted", "timeout": 5,
         "headers": {"Authorization": "Bearer ${AIB_TEST_SECRET}", "X-Api-Key": "literal-key-0123456789",
                     "X-Trace": "on"}},
        {"id": "worker", "type": "subprocess", "protocol": "jsonl", "workers": 2,
         "command": ["python", scripts["versioned"], "config"]},
        {"id": "phoenix", "type": "subprocess", "command": ["python", scripts["phoenix"], scripts["flag"]],
         "restart_backoff": 0.05, "max_backoff": 0.1, "max_restarts": 2, "min_uptime": 10},
        allowed_commands=[sys.executable],
    )
    daemon = Daemon(write(directory / "main.toml", text), state=str(directory / "state"),
                    env={"AIB_TEST_SECRET": SECRET}, cwd=str(directory))
    try:
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


# --- addmodel ---------------------------------------------------------------------------------


def test_the_readmes_addmodel_line_exactly(main, recorder):
    path = f'/post/addmodel?id=myverygoodmodel?type=httpmodel?dest="127.0.0.1:{recorder.port}"'

    reply = main.request("POST", path)

    assert reply.status == 201, reply
    assert reply.json()["added"] == "myverygoodmodel" and reply.json()["replaced"] is False
    answer = main.predict("myverygoodmodel", {"hello": "world"}, {"X-Request-Id": "readme-1"})
    assert answer.status == 200, answer
    assert answer.json() == {"path": "/", "echo": {"hello": "world"}}
    listed = main.models()["myverygoodmodel"]
    assert (listed["type"], listed["state"], listed["origin"]) == ("http", "ready", "runtime")
    assert main.status("myverygoodmodel").json()["spec"]["url"] == f"http://127.0.0.1:{recorder.port}"
    assert len([r for r in recorder.requests_to("/") if r[1].get("X-Request-Id") == "readme-1"]) == 1


def test_the_readme_walkthrough_with_the_example_model_server(main, model_server):
    added = main.request("POST", f'/post/addmodel?id=walkthrough?type=httpmodel?dest="127.0.0.1:{model_server}/echo"')
    assert added.status == 201, added
    echoed = main.request("POST", "/post/predict?id=walkthrough", b'{"hello": "world"}',
                          {"Content-Type": "application/x-www-form-urlencoded"})
    assert echoed.status == 200, echoed
    assert echoed.json()["echo"] == {"hello": "world"}

    replaced = main.add({"id": "walkthrough", "type": "http", "url": f"http://127.0.0.1:{model_server}/sentiment",
                         "timeout": 5}, "?replace=true")

    assert replaced.status == 200, replaced
    assert replaced.json()["replaced"] is True
    assert main.predict("walkthrough", {"text": "what a great day"}).json()["label"] == "positive"
    removed = main.remove("walkthrough")
    assert (removed.status, removed.json()) == (200, {"removed": "walkthrough"})
    main.predict("walkthrough").error(404, "unknown_model")


def test_proper_query_parameters_and_a_scheme_less_dest(main, recorder):
    reply = main.request("POST", f"/post/addmodel?id=queried&type=http&dest=127.0.0.1:{recorder.port}/q&timeout=3")

    assert reply.status == 201, reply
    spec = main.status("queried").json()["spec"]
    assert (spec["url"], spec["timeout"]) == (f"http://127.0.0.1:{recorder.port}/q", 3.0)
    assert main.predict("queried", {"n": 1}).json() == {"path": "/q", "echo": {"n": 1}}


def test_an_invalid_model_is_400_listing_every_key_path(main):
    reply = main.add({"id": "broken", "type": "http", "url": "ftp://127.0.0.1/", "timeout": -1, "colour": "red"})

    error = reply.error(400, "bad_request")
    for text in ("url: must be an http:// or https:// URL", "timeout: must be more than 0",
                 "colour: is not a known key"):
        assert text in error["message"], error["message"]
    assert main.status("broken").status == 404


def test_an_existing_id_is_409(main):
    error = main.add({"id": "hosted", "type": "http", "dest": "127.0.0.1:1"}).error(409, "conflict")

    assert error["model"] == "hosted" and "replace=true" in error["message"]
    assert main.status("hosted").json()["origin"] == "config"


def test_admin_operations_over_get_are_405_with_allow_post(main):
    for operation in ("addmodel", "removemodel", "restart", "cleanlogs"):
        reply = main.request("GET", f"/get/{operation}?id=hosted&type=http&dest=127.0.0.1:1")
        reply.error(405, "method_not_allowed")
        assert reply.headers["allow"] == "POST"
    assert main.status("hosted").status == 200


def test_a_subprocess_replacement_takes_over_once_ready_and_no_request_sees_a_gap(main, scripts):
    table = {"id": "swap", "type": "subprocess", "protocol": "jsonl", "max_inflight": 4,
             "command": [sys.executable, scripts["versioned"], "v1"]}
    assert main.add(table).status == 201
    main.wait_state("swap", "ready")
    old_pids = main.pids("swap")
    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def keep_asking():
        deadline = time.monotonic() + 12
        while not stop.is_set() and time.monotonic() < deadline and len(seen) < 3000:
            reply = main.predict("swap", {"n": len(seen)}, timeout=5)
            version = reply.json().get("version") if reply.status == 200 else None
            seen.append((time.monotonic(), reply.status, version))

    with ThreadPoolExecutor(1) as pool:
        asking = pool.submit(keep_asking)
        wait_until(lambda: len(seen) >= 5, 5, "requests to the first version")
        began = time.monotonic()
        replaced = main.add({**table, "command": [sys.executable, scripts["versioned"], "v2", "1.5"]}, "?replace=true")
        ended = time.monotonic()
        count = len(seen)
        wait_until(lambda: len(seen) >= count + 5, 5, "requests to the replacement")
        stop.set()
        asking.result(10)

    assert replaced.status == 200, replaced
    assert replaced.json()["replaced"] is True
    assert ended - began >= 1.4  # answered once the replacement was ready
    assert [status for _, status, _ in seen if status != 200] == []
    versions = [version for _, _, version in seen]
    switch = versions.index("v2")
    assert set(versions[:switch]) == {"v1"} and set(versions[switch:]) == {"v2"}
    during = [version for at, _, version in seen if began + 0.2 < at < ended - 0.2]
    assert during and set(during) == {"v1"}, "the old model serves while the replacement starts"
    new_pids = main.pids("swap")
    assert new_pids and not new_pids & old_pids
    wait_until(lambda: all(reaped(pid) for pid in old_pids), 5, "the replaced processes to be gone")


# --- removemodel ---------------------------------------------------------------------------------


def test_a_slow_request_in_flight_during_removal_gets_its_answer(main, recorder):
    assert main.add({"id": "slowpoke", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/slow/1",
                     "timeout": 10}).status == 201

    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(main.predict, "slowpoke", {"slow": True})
        recorder.wait_for("/slow/1")
        began = time.monotonic()
        removing = pool.submit(main.remove, "slowpoke")
        wait_until(lambda: "slowpoke" not in main.models(), 2, "the model to be unregistered")
        main.predict("slowpoke").error(404, "unknown_model")
        answered = in_flight.result(10)
        removed = removing.result(10)

    assert answered.status == 200, answered
    assert answered.json() == {"path": "/slow/1", "echo": {"slow": True}}
    assert (removed.status, removed.json()) == (200, {"removed": "slowpoke"})
    assert time.monotonic() - began < SLOW_SECONDS + 2
    main.remove("slowpoke").error(404, "unknown_model")


def test_a_removed_models_processes_are_gone(main, scripts):
    config_pids = main.pids("worker")
    assert main.add({"id": "runtime-worker", "type": "subprocess", "protocol": "jsonl", "workers": 2,
                     "command": [sys.executable, scripts["versioned"], "rt"]}).status == 201
    main.wait_state("runtime-worker", "ready")
    wait_until(lambda: len(main.pids("runtime-worker")) == 2, 5, "two processes")
    runtime_pids = main.pids("runtime-worker")
    assert len(config_pids) == 2 and len(runtime_pids) == 2
    assert main.predict("worker").json()["version"] == "config"

    for model_id in ("worker", "runtime-worker"):
        reply = main.remove(model_id)
        assert reply.status == 200, reply

    wait_until(lambda: all(reaped(pid) for pid in config_pids | runtime_pids), 5, "the model processes to be gone")
    assert main.status("worker").status == 404
    main.remove("worker").error(404, "unknown_model")


# --- models, status, restart -------------------------------------------------------------------------


def test_models_and_status_show_specs_with_secrets_masked(main, recorder):
    status = main.status("hosted")
    listed = main.request("GET", "/get/models")

    assert status.status == 200, status
    assert status.json()["spec"]["headers"] == {"Authorization": "***", "X-Api-Key": "***", "X-Trace": "on"}
    for reply in (status, listed):
        assert SECRET.encode() not in reply.body and b"literal-key-0123456789" not in reply.body
    hosted = main.models()["hosted"]
    assert {"type", "state", "in_flight", "requests", "failures", "origin"} <= set(hosted)
    # the model itself still gets its own headers, expanded
    assert main.predict("hosted", {"x": 1}, {"X-Request-Id": "masked-1"}).status == 200
    [(_, headers, _)] = [r for r in recorder.requests_to("/hosted") if r[1].get("X-Request-Id") == "masked-1"]
    assert headers["Authorization"] == f"Bearer {SECRET}"


def test_no_daemon_credential_reaches_a_runtime_model(main, recorder):
    """A runtime model gets only its own headers: not another model's, not the client's."""
    assert main.add({"id": "stranger", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/stranger",
                     "headers": {"X-Own": "mine"}}).status == 201

    reply = main.predict("stranger", {"q": 1}, {"Authorization": f"Bearer {TOKEN}", "Cookie": "session=abc"})

    assert reply.status == 200, reply
    [(_, headers, _)] = recorder.requests_to("/stranger")
    assert headers["X-Own"] == "mine"
    names = {name.lower() for name in headers}
    assert not names & {"authorization", "x-api-key", "cookie", "x-trace"}
    for value in headers.values():
        assert SECRET not in value and TOKEN not in value and "literal-key" not in value


def test_restart_brings_a_failed_subprocess_model_back(main, scripts):
    failed = main.wait_state("phoenix", "failed")
    assert "died 2 times" in failed["last_error"]
    unavailable = main.predict("phoenix")
    unavailable.error(503, "model_unavailable")
    assert unavailable.headers["retry-after"]

    with open(scripts["flag"], "w"):
        pass
    reply = main.request("POST", "/post/restart?id=phoenix", b"")

    assert reply.status == 200, reply
    assert reply.json()["restarted"] == "phoenix"
    main.wait_state("phoenix", "ready")
    answer = main.predict("phoenix")
    assert answer.status == 200, answer
    assert answer.json()["risen"] is True
    assert main.pids("phoenix") == {answer.json()["pid"]}


def test_restart_of_a_model_without_processes_is_400_and_of_none_404(main):
    main.request("POST", "/post/restart?id=hosted", b"").error(400, "bad_request")
    main.request("POST", "/post/restart?id=ghost", b"").error(404, "unknown_model")


# --- the runtime rules ------------------------------------------------------------------------------


def test_runtime_environment_references_are_403(main):
    error = main.add({"id": "leaky", "type": "http", "url": "http://127.0.0.1:1/",
                      "headers": {"Authorization": "Bearer ${AIB_TEST_SECRET}"}}).error(403, "forbidden")

    assert "headers.Authorization" in error["message"]
    assert main.status("leaky").status == 404


def test_a_runtime_model_for_the_metadata_service_is_403(main):
    for dest in ("http://169.254.169.254/latest/meta-data/", "169.254.169.254:80", "http://[fd00:ec2::254]/"):
        error = main.add({"id": "metadata", "type": "http", "dest": dest}).error(403, "forbidden")
        assert "allowed_destinations" in error["message"]
    assert main.status("metadata").status == 404


def test_a_program_off_allowed_commands_is_403_but_the_listed_one_runs(main, scripts):
    sh = main.add({"id": "shell", "type": "subprocess", "command": ["/bin/sh", "-c", "cat"]})
    sh.error(403, "forbidden")
    assert "not in allowed_commands" in sh.json()["error"]["message"]

    listed = main.add({"id": "listed", "type": "subprocess", "command": [sys.executable, scripts["phoenix"], "/"]})
    assert listed.status == 201, listed
    main.wait_state("listed", "ready")
    assert main.predict("listed").json()["risen"] is True


# --- no admin token: loopback only ---------------------------------------------------------------------


def test_without_a_token_the_log_says_admin_is_loopback_only(main):
    assert "admin operations are allowed from loopback only (no admin token is set)" in main.output


@pytest.mark.parametrize("headers, status", [
    ({}, 200),
    ({"Host": "HOSTPORT"}, 200),
    ({"Host": "localhost"}, 200),
    ({"Host": "localhost:PORT"}, 200),
    ({"Host": "evil.example"}, 403),
    ({"Host": "evil.example:PORT"}, 403),
    ({"Origin": "http://evil.example"}, 403),
    ({"Host": "HOSTPORT", "Origin": "http://127.0.0.1:PORT"}, 200),
])
def test_without_a_token_admin_needs_a_loopback_host_and_origin(main, headers, status):
    headers = {name: value.replace("HOSTPORT", f"127.0.0.1:{main.port}").replace("PORT", str(main.port))
               for name, value in headers.items()}

    reply = main.request("POST", "/post/cleanlogs?id=hosted", b"", headers)

    assert reply.status == status, reply
    if status == 403:
        reply.error(403, "forbidden")


def test_without_a_token_a_daemon_listening_beyond_loopback_refuses_admin(start):
    daemon = start("", listen="tcp:0:interface=0.0.0.0")

    reply = daemon.request("POST", "/post/addmodel?id=x&type=http&dest=127.0.0.1:1")

    error = reply.error(403, "forbidden")
    assert "listens beyond loopback" in error["message"]
    assert daemon.request("GET", "/get/models").status == 200
    assert "admin operations are refused: no admin token is set" in daemon.output
    assert daemon.models() == {}


# --- an admin token, client keys ---------------------------------------------------------------------


def test_an_admin_token_file_and_client_keys(start, recorder, tmp_path):
    token_file = write(tmp_path / "token", TOKEN + "\n")
    daemon = start(config_text({"id": "echo", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/keyed"},
                               api_keys=[KEY]),
                   "--admin-token-file", token_file)
    table = {"id": "added", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/keyed-runtime"}
    assert "admin operations need the admin token" in daemon.output

    missing = daemon.add(table)
    wrong = daemon.add(table, headers={"Authorization": "Bearer wrong-token-0123456789"})
    client_key = daemon.add(table, headers={"Authorization": f"Bearer {KEY}"})
    right = daemon.add(table, headers={"Authorization": f"Bearer {TOKEN}"})

    for refused in (missing, wrong, client_key):
        refused.error(401, "unauthorized")
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert right.status == 201, right

    for model_id in ("echo", "added"):
        daemon.predict(model_id).error(401, "unauthorized")
        daemon.predict(model_id, headers={"Authorization": "Bearer wrong-key-0123456789"}).error(401, "unauthorized")
        assert daemon.predict(model_id, {"k": 1}, {"Authorization": f"Bearer {KEY}"}).status == 200
        assert daemon.predict(model_id, {"t": 1}, {"Authorization": f"Bearer {TOKEN}"}).status == 200
    assert "www-authenticate" in daemon.predict("echo").headers
    daemon.request("GET", "/get/models").error(401, "unauthorized")
    assert set(daemon.models({"Authorization": f"Bearer {KEY}"})) == {"echo", "added"}

    received = recorder.requests_to("/keyed")
    assert len(received) == 4
    for _, headers, body in received:
        for value in [*headers.values(), body.decode()]:
            assert TOKEN not in value and KEY not in value
    logs = daemon.request("GET", "/get/getlogs?id=echo", headers={"Authorization": f"Bearer {KEY}"})
    assert logs.status == 200 and logs.json()["entries"]
    for text in (logs.body.decode(), daemon.output):
        assert TOKEN not in text and KEY not in text
    daemon.assert_no_bug_logged()


def test_an_admin_token_from_the_environment_never_reaches_a_model(start, scripts):
    daemon = start(config_text({"id": "envdump", "type": "subprocess", "command": ["python", scripts["envdump"]]}),
                   env={"AIBACKEND_ADMIN_TOKEN": TOKEN})
    table = {"id": "x", "type": "http", "dest": "127.0.0.1:1"}

    daemon.add(table).error(401, "unauthorized")
    daemon.add(table, headers={"Authorization": "Bearer " + TOKEN[::-1]}).error(401, "unauthorized")
    assert daemon.add(table, headers={"Authorization": f"Bearer {TOKEN}"}).status == 201

    seen = daemon.predict("envdump").json()
    assert "AIBACKEND_ADMIN_TOKEN" not in seen["names"]
    assert not any(TOKEN in value for value in seen["values"])
    daemon.assert_no_bug_logged()


@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_weak_admin_token_ends_the_start_with_one_line(tmp_path, where):
    argv = [TWISTD, "--pidfile=", "-n", "aibackend", "--listen", LOOPBACK_ANY_PORT, "--state", str(tmp_path / "state")]
    env = dict(os.environ)
    env.pop("AIBACKEND_ADMIN_TOKEN", None)
    if where == "file":
        argv += ["--admin-token-file", write(tmp_path / "token", "short-token\n")]
    else:
        env["AIBACKEND_ADMIN_TOKEN"] = "short-token"

    result = subprocess.run(argv, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=15,
                            stdin=subprocess.DEVNULL)

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    [line] = output.splitlines()
    assert "too weak" in line and "16" in line
    assert "short-token" not in line


# --- destinations ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fenced(recorder, scripts, tmp_path_factory):
    """A daemon whose runtime models may reach 127.0.0.1 only, and whose runtime programs are none."""
    directory = tmp_path_factory.mktemp("fenced")
    text = config_text(
        {"id": "trusted", "type": "subprocess", "protocol": "jsonl",
         "command": ["python", scripts["versioned"], "trusted"]},
        allowed_destinations=["127.0.0.1"],
    )
    daemon = Daemon(write(directory / "fenced.toml", text), state=str(directory / "state"), cwd=str(directory))
    try:
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def test_a_destination_off_the_list_is_403_and_never_contacted(fenced, canary):
    error = fenced.add({"id": "canary", "type": "http", "url": canary.url}).error(403, "forbidden")

    assert "127.0.0.2" in error["message"]
    time.sleep(0.2)
    assert canary.accepted == 0
    assert fenced.status("canary").status == 404


def test_a_name_is_checked_on_the_address_it_resolves_to(fenced, recorder):
    reply = fenced.add({"id": "byname", "type": "http", "dest": f"localhost:{recorder.port}/byname"})

    assert reply.status == 201, reply
    answer = fenced.predict("byname", {"n": 1})
    assert answer.status == 200, answer
    assert answer.json() == {"path": "/byname", "echo": {"n": 1}}


def test_a_redirect_is_never_followed(fenced, recorder, canary):
    recorder.redirect_to = canary.url + "stolen"
    added = fenced.add({"id": "bouncer", "type": "http", "url": f"http://127.0.0.1:{recorder.port}/redirect"})
    assert added.status == 201, added

    reply = fenced.predict("bouncer", {"n": 1})

    error = reply.error(502, "bad_gateway")
    assert "redirect" in error["message"]
    time.sleep(0.2)
    assert canary.accepted == 0
    assert len(recorder.requests_to("/redirect")) == 1


def test_runtime_programs_are_403_by_default_but_config_ones_run(fenced, scripts):
    error = fenced.add({"id": "prog", "type": "subprocess", "command": ["python", scripts["versioned"], "x"]})

    assert "allowed_commands is empty" in error.error(403, "forbidden")["message"]
    assert fenced.predict("trusted").json()["version"] == "trusted"


# --- state that survives ---------------------------------------------------------------------------


def test_a_restart_keeps_runtime_adds_and_removals(start, recorder, tmp_path):
    state = tmp_path / "kept"
    url = f"http://127.0.0.1:{recorder.port}"
    config = config_text({"id": "keep-me", "type": "http", "url": f"{url}/keep"},
                         {"id": "drop-me", "type": "http", "url": f"{url}/drop"},
                         {"id": "change-me", "type": "http", "url": f"{url}/before"})
    first = start(config, state=state)
    readme_form = f'/post/addmodel?id=added?type=httpmodel?dest="127.0.0.1:{recorder.port}/added"'
    assert first.request("POST", readme_form).status == 201
    assert first.add({"id": "fleeting", "type": "http", "url": f"{url}/fleeting"}).status == 201
    assert first.remove("fleeting").status == 200
    assert first.remove("drop-me").status == 200
    assert first.add({"id": "change-me", "type": "http", "url": f"{url}/after"}, "?replace=true").status == 200
    assert first.terminate() in (0, -signal.SIGTERM)
    first.assert_no_bug_logged()

    second = start(config, state=state)

    models = second.models()
    assert set(models) == {"keep-me", "change-me", "added"}
    assert {i: m["origin"] for i, m in models.items()} == {"keep-me": "config", "change-me": "runtime",
                                                         "added": "runtime"}
    assert second.predict("added", {"a": 1}).json() == {"path": "/added", "echo": {"a": 1}}
    assert second.predict("change-me").json()["path"] == "/after"
    second.predict("drop-me").error(404, "unknown_model")
    second.predict("fleeting").error(404, "unknown_model")


def test_kill_9_in_a_burst_of_200_addmodels_loses_no_acknowledged_change(start, tmp_path):
    state = tmp_path / "burst"
    first = start("", state=state)
    acknowledged: set[str] = set()
    refused: list = []
    lock = threading.Lock()

    def burst(worker: int):
        for n in range(50):
            model_id = f"burst-{worker}-{n}"
            try:
                reply = first.add({"id": model_id, "type": "http", "url": f"http://127.0.0.1:9/{model_id}"})
            except (OSError, http.client.HTTPException):
                return  # the daemon is gone
            with lock:
                if 200 <= reply.status < 300:
                    acknowledged.add(model_id)
                else:
                    refused.append(reply)

    with ThreadPoolExecutor(4) as pool:
        bursts = [pool.submit(burst, worker) for worker in range(4)]
        wait_until(lambda: len(acknowledged) >= 40, 10, "40 acknowledged adds")
        os.kill(first.pid, signal.SIGKILL)
        for done in bursts:
            done.result(15)
    first.process.popen.wait(5)

    assert refused == []
    assert 40 <= len(acknowledged) < 200, "the daemon was killed in the middle of the burst"
    database = sqlite3.connect(os.path.join(state, "models.sqlite3"))
    try:
        assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        kept = {model_id for (model_id,) in database.execute("SELECT id FROM changes WHERE action = 'add'")}
    finally:
        database.close()
    assert acknowledged <= kept

    second = start("", state=state)

    models = second.models()
    assert acknowledged <= set(models)
    assert set(models) <= {f"burst-{w}-{n}" for w in range(4) for n in range(50)}
    second.assert_no_bug_logged()
