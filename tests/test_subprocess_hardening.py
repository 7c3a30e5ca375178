"""
Subprocess models that misbehave on purpose, through the real daemon (issue 12): no answer
reaches a client other than the one whose request produced it, whatever a model prints; a
model whose stdout closes fails fast; a crash loop is tried again; what a model starts is
stopped with the daemon however it escapes.

Harness: L{aibackend.testing.Daemon} (C{twistd -n aibackend} on a free loopback port),
started by the C{start_daemon} fixture, and the models of C{tests/models/misbehave.py}.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import alive, assert_no_bug_logged, misbehaving, proc_state, reaped, wait_until

pytestmark = pytest.mark.timeout(60)

# A model that breaks the protocol is replaced at once, again and again: no crash loop here.
REPLACED_AT_ONCE = {"restart_backoff": 0.05, "max_backoff": 0.1, "min_uptime": 0, "timeout": 30, "max_queue": 100}


def each_own_answer_or_502(replies, client_of_reply) -> dict:
    """Every reply is the client's own answer (made from its input) or a 502; how many of each."""
    counts = {200: 0, 502: 0}
    for client, reply in enumerate(replies):
        assert reply.status in (200, 502), (client, reply)
        counts[reply.status] += 1
        if reply.status == 200:
            assert client_of_reply(reply.json()) == client, f"client {client} got another's answer: {reply}"
        else:
            error = reply.json()["error"]
            assert (error["type"], error["model"]) == ("bad_gateway", "m"), reply
            assert reply.headers["X-Request-Id"] == error["request_id"]
    return counts


def concurrently(daemon, payloads) -> list:
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda payload: daemon.predict("m", payload, timeout=40), payloads))


# --- 1. answers never cross ---------------------------------------------------------------


def test_a_raw_model_printing_two_lines_per_request_never_gives_one_client_anothers_answer(start_daemon):
    daemon = start_daemon(misbehaving("m", workers=2, **REPLACED_AT_ONCE))

    replies = []
    for _ in range(3):
        replies += concurrently(daemon, [{"op": "twice", "client": len(replies) + n} for n in range(8)])

    each_own_answer_or_502(replies, lambda answer: answer["echo"]["client"])
    assert all(reply.json()["line"] == 1 for reply in replies if reply.status == 200)
    errors = daemon.events("m", "protocol error")
    assert errors, "the processes were never replaced"
    assert {e["error"] for e in errors} <= {
        "printed more than one JSON line for a request",
        "printed a JSON line while no request was waiting for one",
    }
    assert len(daemon.model_pids("m")) > 2
    assert_no_bug_logged(daemon.output)


def test_a_raw_model_printing_10000_lines_per_request_never_gives_one_client_anothers_answer(start_daemon):
    daemon = start_daemon(misbehaving("m", workers=2, **REPLACED_AT_ONCE))

    replies = concurrently(daemon, [{"op": "flood", "lines": 10_000, "client": n} for n in range(20)])

    each_own_answer_or_502(replies, lambda answer: answer["echo"]["client"])
    assert daemon.events("m", "protocol error")
    assert len(daemon.model_pids("m")) > 2
    assert_no_bug_logged(daemon.output)


def test_a_raw_model_printing_binary_garbage_gets_502s_never_a_fragment(start_daemon):
    daemon = start_daemon(misbehaving("m", workers=2, **REPLACED_AT_ONCE))

    # For each of these seeds the garbage's first line is binary (JSON fragments come later).
    replies = concurrently(daemon, [{"op": "binary", "seed": n, "bytes": 4096} for n in range(8)])

    assert [reply.status for reply in replies] == [502] * 8, replies
    assert "binary data" in daemon.events("m", "protocol error")[0]["error"]
    again = daemon.predict("m", {"op": "echo", "client": 99})
    assert again.status == 200, again
    assert again.json()["echo"]["client"] == 99
    assert_no_bug_logged(daemon.output)


def test_a_jsonl_model_answers_each_client_its_own_even_when_clients_reuse_request_ids(start_daemon):
    daemon = start_daemon(misbehaving("m", "--jsonl", protocol="jsonl", max_inflight=8, timeout=30))

    def ask(client):
        return daemon.request("POST", "/post/predict?id=m", json.dumps({"op": "echo", "client": client}).encode(),
                              {"Content-Type": "application/json", "X-Request-Id": "same-id"}, 30)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))

    assert [reply.status for reply in replies] == [200] * 16
    assert [reply.json()["echo"]["client"] for reply in replies] == list(range(16))
    assert {reply.headers["X-Request-Id"] for reply in replies} == {"same-id"}


# --- 2. stdout closed -------------------------------------------------------------------------


def test_a_model_whose_stdout_closes_while_it_lives_fails_fast_and_is_replaced(start_daemon):
    # The request's timeout is longer than the client waits: only failing fast passes.
    daemon = start_daemon(misbehaving("m", timeout=60, restart_backoff=0.05))
    first = daemon.predict("m", {"op": "echo"}).json()["pid"]

    reply = daemon.predict("m", {"op": "close_stdout", "seconds": 60}, timeout=15)

    assert reply.status == 502, reply
    assert "closed its stdout and kept running" in reply.json()["error"]["message"]
    wait_until(lambda: daemon.ready_pids("m") - {first}, 10, "the process to be replaced")
    again = daemon.predict("m", {"op": "echo"})
    assert again.status == 200, again
    assert again.json()["pid"] != first
    wait_until(lambda: reaped(first), 10, "the old process to be gone")
    assert daemon.events("m", "stdout closed")[0]["pid"] == first
    assert_no_bug_logged(daemon.output)


# --- 4. what a model starts ---------------------------------------------------------------------


def test_a_grandchild_that_left_the_process_group_is_stopped_and_reaped_with_the_daemon(start_daemon):
    daemon = start_daemon(misbehaving("m"))
    answer = daemon.predict("m", {"op": "setsid_spawn"}).json()
    escaped = answer["child"]
    assert alive(escaped)
    with open(f"/proc/{escaped}/stat") as f:
        session = int(f.read().rpartition(")")[2].split()[3])
    assert session == escaped != answer["pid"]  # out of the model's group and session

    assert daemon.terminate() in (0, -signal.SIGTERM)

    assert reaped(answer["pid"])
    assert proc_state(escaped) is None, "the escaped grandchild is still there (or a zombie)"
    assert_no_bug_logged(daemon.output)


def test_a_grandchild_of_a_crashed_model_that_left_its_group_is_stopped_with_the_daemon(start_daemon):
    daemon = start_daemon(misbehaving("m", restart_backoff=0.05))
    answer = daemon.predict("m", {"op": "setsid_spawn"}).json()
    escaped = answer["child"]

    os.kill(answer["pid"], signal.SIGKILL)
    wait_until(lambda: daemon.ready_pids("m") - {answer["pid"]}, 10, "the model to be restarted")
    # Orphaned, it is the daemon's child now (a subreaper), not init's.
    with open(f"/proc/{escaped}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) == daemon.pid

    assert daemon.terminate() in (0, -signal.SIGTERM)

    assert proc_state(escaped) is None, "the escaped grandchild is still there (or a zombie)"
    assert_no_bug_logged(daemon.output)


# --- aibackend.proctree on its own ----------------------------------------------------------------


@pytest.fixture
def sleeper_with_child():
    """A process with a child: C{(process pid, child pid)}; both killed at the end."""
    import subprocess
    import sys

    program = ("import subprocess, sys, time; "
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
               "print(child.pid, flush=True); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    child = int(parent.stdout.readline())
    yield parent.pid, child
    for pid in (child, parent.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    parent.wait(5)


def test_a_stat_line_is_read_whatever_the_command_name_holds():
    from aibackend.proctree import parse_stat

    line = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 5 0 0 0 0 0 0 0 20 0 1 0 73810 3133440 381 0\n"

    found = parse_stat(4242, line)

    assert (found.state, found.ppid, found.pgrp, found.session, found.start) == ("S", 1, 4242, 4242, 73810)


def test_descendants_are_every_process_below_one(sleeper_with_child):
    from aibackend.proctree import descendants

    parent, child = sleeper_with_child

    assert [entry.pid for entry in descendants(parent)] == [child]
    assert {parent, child} <= {entry.pid for entry in descendants(os.getpid())}
    assert descendants(child) == []


def test_a_process_asleep_is_not_running_and_one_with_another_start_time_is_not_signalled(sleeper_with_child):
    from dataclasses import replace

    from aibackend.proctree import running, signal as signal_process, stat

    parent, child = sleeper_with_child
    wait_until(lambda: not running(child), 5, "the child to sleep")
    now = stat(child)

    assert not signal_process(replace(now, start=now.start + 1), signal.SIGKILL)  # its pid, reused
    assert alive(child)
    assert signal_process(now, signal.SIGKILL)
    wait_until(lambda: not alive(child), 5, "the child to die")


def test_orphans_are_adopted_only_by_a_subreaper(sleeper_with_child):
    from twisted.internet.task import Clock

    from aibackend.proctree import Orphans

    orphans = Orphans(Clock())  # this process's children (the fixture's) are a Popen's, not orphans

    assert orphans.sweep() == []
