"""
An HTTP model that batches, end to end (issue 17, item 3): the real C{twistd aibackend} on a
free loopback port, a real HTTP model server (L{aibackend.testing.BatchModelServer}, in a
thread of the test, that records the size of each batch it is sent), and clients on real
sockets, at once.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import BatchModelServer, Daemon, toml_models

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count()


@pytest.fixture(scope="module")
def server():
    server = BatchModelServer(delay=0.05)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, server):
    where = tmp_path_factory.mktemp("http-batching-daemon")
    config = where / "aibackend.toml"
    config.write_text(toml_models({
        "id": "batched", "type": "http", "url": server.url, "timeout": 30,
        "batching": {"url": "/batch", "max_batch_size": 16, "max_delay_ms": 20},
    }))
    daemon = Daemon(str(config), state=str(where / "state"), cwd=str(where))
    try:
        daemon.wait_state("batched", "ready", timeout=20)
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def test_concurrent_requests_reach_the_http_model_in_batches_each_answered_as_itself(daemon, server):
    prefix = f"many-{next(_ids)}"

    def ask(i):
        return daemon.predict("batched", {"x": i}, headers={"X-Request-Id": f"{prefix}-{i}"}, timeout=20)

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32)))

    assert [reply.status for reply in replies] == [200] * 32
    assert [reply.json()["y"] for reply in replies] == [2 * i for i in range(32)]
    assert [reply.headers["x-request-id"] for reply in replies] == [f"{prefix}-{i}" for i in range(32)]
    sizes = [reply.json()["batch"] for reply in replies]
    assert min(sizes) >= 1 and max(sizes) > 1, sizes  # every one came in a batch, some with company
    assert sum(server.sizes) == 32 and max(server.sizes) <= 16, server.sizes
    assert {path for path, _, _ in server.received} == {"/batch"}
    batching = daemon.status("batched").json()["batching"]
    assert batching["batches"] == len(server.sizes)
    assert batching["url"] == "/batch" and batching["waiting"] == 0
    assert daemon.metric("aibackend_batch_size_count", model="batched") == len(server.sizes)
    assert daemon.metric("aibackend_batch_size_sum", model="batched") == 32
