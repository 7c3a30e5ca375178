"""
Dynamic batching end to end (issue 17): the real C{twistd aibackend} on a free loopback
port, a real jsonl model process (C{tests/models/batch_cases.py}, an aibackend.worker
C{predict_batch} that says in each answer the size of the batch it came in), and clients
on real sockets, at once. One daemon serves the module.
"""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import BATCH_CASES, Daemon, Streamed, toml_models, wait_until

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count()

MODELS = (
    {"id": "batched", "type": "subprocess", "protocol": "jsonl", "command": ["python", BATCH_CASES],
     "timeout": 30, "max_inflight": 4, "batching": {"max_batch_size": 16, "max_delay_ms": 20}},
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    where = tmp_path_factory.mktemp("batching-daemon")
    config = where / "aibackend.toml"
    config.write_text(toml_models(*MODELS))
    daemon = Daemon(str(config), state=str(where / "state"), cwd=str(where))
    try:
        daemon.wait_state("batched", "ready", timeout=20)
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def test_concurrent_requests_are_answered_in_batches_each_with_its_own_answer_and_id(daemon):
    prefix = f"many-{next(_ids)}"

    def ask(i):
        return daemon.predict("batched", {"x": i}, headers={"X-Request-Id": f"{prefix}-{i}"}, timeout=20)

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32)))

    assert [reply.status for reply in replies] == [200] * 32
    assert [reply.json()["y"] for reply in replies] == [2 * i for i in range(32)]
    assert [reply.headers["x-request-id"] for reply in replies] == [f"{prefix}-{i}" for i in range(32)]
    sizes = [reply.json()["batch"] for reply in replies]
    assert max(sizes) > 1, sizes
    # Each request is logged as itself, with its own id and status.
    logged = {e["request_id"]: e["status"] for e in daemon.events("batched", "request")
              if e["request_id"].startswith(prefix)}
    assert logged == {f"{prefix}-{i}": 200 for i in range(32)}
    batching = daemon.status("batched").json()["batching"]
    assert batching["max_batch_size"] == 16 and batching["recent_mean_batch_size"] > 1
    assert daemon.metric("aibackend_batch_size_count", model="batched") >= 2


def test_a_client_that_leaves_mid_batch_gets_499_and_the_others_are_answered(daemon):
    prefix = f"leave-{next(_ids)}"
    clients = [Streamed(daemon.port, "POST", "/post/predict?id=batched", {"x": i, "sleep": 1.0}, framing=None,
                        headers={"X-Request-Id": f"{prefix}-{i}"}) for i in range(3)]
    # In one batch, or two if the machine is slow: each holds one of the process's places.
    wait_until(lambda: daemon.status("batched").json()["in_flight"] == 3, 10, "the batch to reach the model")

    clients[1].leave()

    assert clients[0].status == 200 and clients[2].status == 200
    answers = [json.loads(clients[i].read_all()) for i in (0, 2)]
    assert [answer["y"] for answer in answers] == [0, 4]
    assert " POST /post/predict 499 0 bytes " in daemon.access_line(f"{prefix}-1")
    assert " POST /post/predict 200 " in daemon.access_line(f"{prefix}-0")
    for client in clients:
        client.close()
    wait_until(lambda: daemon.status("batched").json()["in_flight"] == 0, 10, "the batch to be done")
