"""
The Open Inference Protocol's batch dimension, end to end (issue 17, item 4): the real
C{twistd aibackend} on a free loopback port, a real jsonl model process
(C{tests/models/v2_rows.py}, whose input C{x} is declared C{[-1, 2]}) with
C{[models.batching]}, and v2 clients on real sockets at once: their requests' rows are
concatenated into one model call, and each gets its own rows, id and shape back.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import ROOT, Daemon, toml_models

pytestmark = pytest.mark.timeout(60)

V2_ROWS = os.path.join(ROOT, "tests", "models", "v2_rows.py")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    where = tmp_path_factory.mktemp("v2-batching-daemon")
    config = where / "aibackend.toml"
    config.write_text(
        toml_models({"id": "rows", "type": "subprocess", "protocol": "jsonl", "command": ["python", V2_ROWS],
                     "timeout": 30, "max_inflight": 2,
                     "batching": {"max_batch_size": 16, "max_delay_ms": 30}})
        + '[models.v2]\ninputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]\n'
        + 'outputs = [{ name = "y", datatype = "FP32", shape = [-1, 3] }]\n'
    )
    daemon = Daemon(str(config), state=str(where / "state"), cwd=str(where))
    try:
        daemon.wait_state("rows", "ready", timeout=20)
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def infer(daemon, i: int, rows: int, parameters=None):
    document = {"id": f"req-{i}", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [float(i)] * (2 * rows)}]}
    if parameters is not None:
        document["parameters"] = parameters
    return daemon.request("POST", "/v2/models/rows/infer", json.dumps(document).encode(),
                          headers={"X-Request-Id": f"v2-{i}"})


def test_concurrent_v2_requests_are_concatenated_along_the_batch_dimension_and_split_back(daemon):
    def ask(i):
        return infer(daemon, i, 1 + i % 2)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))

    assert [reply.status for reply in replies] == [200] * 16
    called = []
    for i, reply in enumerate(replies):
        document = reply.json()
        rows = 1 + i % 2
        assert document["id"] == f"req-{i}" and reply.headers["x-request-id"] == f"v2-{i}"
        [y] = document["outputs"]
        assert y["name"] == "y" and y["shape"] == [rows, 3]
        data = y["data"]
        assert data[0::3] == [2 * i] * rows and data[1::3] == [2 * i] * rows  # its own rows, doubled
        called.append(data[2])  # the rows of the call it came in
        assert len(set(data[2::3])) == 1 and data[2] >= rows
    assert max(called) > 2, called  # some came with company: one call of several requests' rows
    batching = daemon.status("rows").json()["batching"]
    assert batching["batches"] < 16 and batching["waiting"] == 0


def test_requests_whose_parameters_differ_are_not_concatenated(daemon):
    def ask(i):
        return infer(daemon, 100 + i, 1, parameters={"group": i % 2})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))

    assert [reply.status for reply in replies] == [200] * 8
    calls = [reply.json()["outputs"][0]["data"][2] for reply in replies]
    assert max(calls) <= 4, calls  # never more rows in a call than one group has
