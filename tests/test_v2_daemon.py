"""
The Open Inference Protocol through the real daemon (C{twistd aibackend} on a free
loopback port), called with Triton's own client, C{tritonclient.http}.

One daemon serves the whole module (it takes a few seconds to start its models):

  - C{worker}: tests/models/v2_worker.py, a jsonl model written with aibackend.worker,
    declaring x FP32, n INT64, words BYTES in and y, total, upper out;
  - C{sleepy}: a jsonl model that never says it is ready (misbehave.py without --jsonl);
  - C{tri}: a native v2 HTTP model, tests/models/v2_server.py started by the daemon, whose
    model is C{doubler} on that server (it has the generate extension too); its streams
    get a keepalive every 0.5 s of silence;
  - C{astray}: a native v2 HTTP model on the same server, named C{missing} there, a model
    that server does not have;
  - C{generate}: the example streaming text generator (examples/generate.py), for the
    generate extension.

The tests run in file order and share the daemon: the one that unloads a model loads it
back before it ends; the last one stops the daemon and checks that no process is left.
The daemon's drain_timeout is short: a request the daemon failed to account for must not
hold its stop for the default 30 s.

About the client: tritonclient.http's synchronous client runs on gevent
(geventhttpclient). It is called from plain (non-Twisted) test functions, which
pytest-twisted runs in the main greenlet with the reactor's greenlet idle, and there
gevent's hub works as anywhere else (no monkey-patching is needed: the daemon is another
process). Plain http.client does the requests the client has no call for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from aibackend.testing import (
    MISBEHAVE,
    ROOT,
    Daemon,
    Streamed,
    call,
    free_port,
    port_is_free,
    reaped,
    sse_data,
    toml_models,
    wait_until,
)

V2_SERVER = os.path.join("tests", "models", "v2_server.py")  # relative: the daemon runs in ROOT
V2_WORKER = os.path.join(ROOT, "tests", "models", "v2_worker.py")
GENERATOR = os.path.join("examples", "generate.py")
WORKER_V2 = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1]},
        {"name": "n", "datatype": "INT64", "shape": [-1]},
        {"name": "words", "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1]},
        {"name": "total", "datatype": "INT64", "shape": []},
        {"name": "upper", "datatype": "BYTES", "shape": [-1]},
    ],
    "platform": "python_worker",
}

pytestmark = pytest.mark.timeout(60)


def worker_table(model_id: str) -> dict:
    return {"id": model_id, "type": "subprocess", "command": ["python", V2_WORKER], "protocol": "jsonl",
            "timeout": 10, "v2": WORKER_V2}


def toml_v2(v2: dict) -> str:
    """A [models.v2] table (toml_models writes flat keys only)."""
    lines = ["[models.v2]"]
    for key, value in v2.items():
        if isinstance(value, list):
            items = ", ".join("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in item.items()) + " }"
                              for item in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class V2Daemon:
    """The module's daemon, its native server's port, and a tritonclient for it."""

    def __init__(self, daemon: Daemon, upstream_port: int):
        self.daemon = daemon
        self.upstream_port = upstream_port
        self.url = f"127.0.0.1:{daemon.port}"
        self.client = triton.InferenceServerClient(self.url, connection_timeout=20, network_timeout=20)
        self.pids: set[int] = set()

    def ready(self, model: str) -> bool:
        return self.daemon.request("GET", f"/v2/models/{model}/ready").status == 200

    def state(self, model: str) -> str | None:
        """The model's state in the repository index (the daemon's own view: its server is not asked)."""
        index = self.daemon.request("POST", "/v2/repository/index", b"{}").json()
        return next((entry["state"] for entry in index if entry["name"] == model), None)

    def note_pids(self, *models: str) -> None:
        for model in models:
            self.pids |= self.daemon.model_pids(model)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2-daemon")
    upstream_port = free_port()
    server = {"state_dir": str(tmp / "state"), "allowed_commands": [os.path.realpath(sys.executable)],
              "drain_timeout": 2}
    config = (
        "[server]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in server.items()) + "\n"
        + toml_models({key: value for key, value in worker_table("worker").items() if key != "v2"})
        + toml_v2(WORKER_V2)
        + toml_models({"id": "sleepy", "type": "subprocess", "command": ["python", MISBEHAVE], "protocol": "jsonl",
                       "startup_timeout": 600, "timeout": 1})
        + "\n"
        + toml_models({"id": "tri", "type": "http", "url": f"http://127.0.0.1:{upstream_port}",
                       "command": ["python", V2_SERVER, "--port", str(upstream_port)], "health_path": "/health",
                       "timeout": 10, "keepalive_seconds": 0.5})
        + toml_v2({"native": True, "model": "doubler"})
        + "\n"
        + toml_models({"id": "astray", "type": "http", "url": f"http://127.0.0.1:{upstream_port}", "timeout": 10})
        + toml_v2({"native": True, "model": "missing"})
        + "\n"
        + toml_models({"id": "generate", "type": "subprocess", "command": ["python", GENERATOR], "protocol": "jsonl",
                       "timeout": 10})
    )
    path = tmp / "aibackend.toml"
    path.write_text(config)
    daemon = Daemon(str(path), cwd=ROOT)
    try:
        started = V2Daemon(daemon, upstream_port)
        wait_until(lambda: started.ready("worker") and started.ready("generate") and started.state("tri") == "READY",
                   20, "worker, generate and tri to be ready")
        started.note_pids("worker", "sleepy", "tri", "generate")
        yield started
        started.client.close()
    finally:
        daemon.stop()


def as_input(name, array, datatype, binary_data=False):
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary_data)
    return tensor


def worker_inputs(x=(1.0, 2.5), n=(1, 2, 3), words=("a", "b")):
    return [
        as_input("x", np.array(x, dtype=np.float32), "FP32"),
        as_input("n", np.array(n, dtype=np.int64), "INT64"),
        as_input("words", np.array(words, dtype=np.object_), "BYTES"),
    ]


def raised(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- the server ----------------------------------------------------------------------------


def test_the_server_is_live_and_ready(v2):
    assert v2.client.is_server_live() is True
    assert v2.client.is_server_ready() is True


def test_server_metadata(v2):
    metadata = v2.client.get_server_metadata()

    assert metadata["name"] == "aibackend"
    assert metadata["extensions"] == ["model_repository", "generate"]
    assert isinstance(metadata["version"], str)


def test_model_readiness(v2):
    assert v2.client.is_model_ready("worker") is True
    assert v2.client.is_model_ready("worker", "1") is True
    assert v2.client.is_model_ready("sleepy") is False
    assert v2.client.is_model_ready("worker", "2") is False
    assert v2.client.is_model_ready("nobody") is False


def test_a_native_model_is_ready_when_its_server_says_so(v2):
    assert v2.client.is_model_ready("tri") is True
    assert v2.client.is_model_ready("tri", "1") is True


def test_model_metadata_of_an_adapted_model(v2):
    metadata = v2.client.get_model_metadata("worker")

    assert metadata == {"name": "worker", "versions": ["1"], "platform": "python_worker",
                        "inputs": WORKER_V2["inputs"], "outputs": WORKER_V2["outputs"]}


def test_model_metadata_of_a_native_model_is_its_servers_under_its_own_name(v2):
    metadata = v2.client.get_model_metadata("tri")

    assert metadata == {
        "name": "tri", "versions": ["1"], "platform": "fake_triton",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }


def test_an_unknown_model_is_a_404_exception(v2):
    for call in (lambda: v2.client.get_model_metadata("nobody"),
                 lambda: v2.client.infer("nobody", worker_inputs())):
        error = raised(call)
        assert error.status() == "404"
        assert "nobody" in error.message()


# --- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outputs", ["none", "binary", "json"], ids=["outputs=None", "binary_data=True",
                                                                      "binary_data=False"])
def test_infer_fp32_int64_and_bytes(v2, outputs):
    requested = None
    if outputs != "none":
        requested = [triton.InferRequestedOutput(name, binary_data=outputs == "binary")
                     for name in ("y", "total", "upper")]

    result = v2.client.infer("worker", worker_inputs(), outputs=requested, request_id=f"req-{outputs}")

    y = result.as_numpy("y")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([2.0, 5.0], dtype=np.float32))
    total = result.as_numpy("total")
    assert total.dtype == np.int64 and total.shape == () and int(total) == 6
    upper = result.as_numpy("upper")
    assert [value.decode() if isinstance(value, bytes) else value for value in upper.tolist()] == ["A", "B"]
    response = result.get_response()
    assert response["id"] == f"req-{outputs}"
    assert (response["model_name"], response["model_version"]) == ("worker", "1")
    assert all("binary_data_size" not in (output.get("parameters") or {}) for output in response["outputs"])


def test_infer_with_some_outputs_answers_only_those(v2):
    result = v2.client.infer("worker", worker_inputs(), outputs=[triton.InferRequestedOutput("total")])

    assert [output["name"] for output in result.get_response()["outputs"]] == ["total"]
    assert result.as_numpy("y") is None


def test_infer_of_the_one_version(v2):
    result = v2.client.infer("worker", worker_inputs(x=[3.0]), model_version="1")

    np.testing.assert_array_equal(result.as_numpy("y"), [6.0])
    assert raised(lambda: v2.client.infer("worker", worker_inputs(), model_version="9")).status() == "404"


def test_a_default_binary_input_is_refused_with_the_option_to_use(v2):
    tensor = triton.InferInput("x", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2], dtype=np.float32))  # binary_data=True by default

    for model in ("worker", "tri"):
        error = raised(lambda: v2.client.infer(model, [tensor]))
        assert error.status() == "400"
        assert "binary_data=False" in error.message()


def test_inputs_that_do_not_fit_the_declaration_are_400(v2):
    missing = raised(lambda: v2.client.infer("worker", worker_inputs()[:2]))
    wrong_type = raised(lambda: v2.client.infer("worker", [as_input("x", np.array([1], dtype=np.float64), "FP64"),
                                                          *worker_inputs()[1:]]))
    wrong_shape = raised(lambda: v2.client.infer("worker", [as_input("x", np.ones((2, 2), dtype=np.float32), "FP32"),
                                                           *worker_inputs()[1:]]))

    assert (missing.status(), wrong_type.status(), wrong_shape.status()) == ("400", "400", "400")
    assert "needs input 'words'" in missing.message()
    assert "input 'x' is FP64; the model takes FP32" in wrong_type.message()
    assert "input 'x' has shape [2, 2]" in wrong_shape.message()


def test_a_models_own_refusal_comes_back_with_its_message(v2):
    error = raised(lambda: v2.client.infer("worker", worker_inputs(n=[-5, 1])))

    assert error.status() == "400"
    assert error.message() == "the total of n is negative (-4)"


def test_infer_on_a_model_that_never_gets_ready_waits_for_it_until_its_timeout(v2):
    # A request to a model still starting waits for it (as the front door's predict does),
    # here for sleepy's timeout of 1 s.
    error = raised(lambda: v2.client.infer("sleepy", [as_input("x", np.array([1.0], dtype=np.float32), "FP32")]))

    assert error.status() == "504", error
    assert "sleepy" in error.message()


# --- a native model --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_output", [False, True])
def test_infer_on_the_native_model_doubles_and_the_daemon_asks_for_json(v2, binary_output):
    outputs = [triton.InferRequestedOutput("y", binary_data=True)] if binary_output else None

    result = v2.client.infer("tri", [as_input("x", np.array([1.5, -0.0, 4], dtype=np.float32), "FP32")],
                             outputs=outputs, request_id="native-1")

    np.testing.assert_array_equal(result.as_numpy("y"), np.array([3.0, 0.0, 8.0], dtype=np.float32))
    response = result.get_response()
    assert response["id"] == "native-1"
    assert response["parameters"] == {"seen_binary_output": False}


def test_a_native_upstream_error_comes_back_with_the_upstreams_message(v2):
    error = raised(lambda: v2.client.infer("tri", [as_input("x", np.array([1, -2], dtype=np.float32), "FP32")]))

    assert error.status() == "400"
    assert error.message() == "negative"


# --- the model repository ----------------------------------------------------------------------------


def index_of(v2) -> dict:
    return {entry["name"]: entry for entry in v2.client.get_model_repository_index()}


def test_the_repository_index(v2):
    index = index_of(v2)

    assert index["worker"] == {"name": "worker", "version": "1", "state": "READY", "reason": ""}
    assert index["tri"]["state"] == "READY"
    assert index["sleepy"]["state"] == "LOADING"


def test_unload_then_load_brings_a_model_back(v2):
    v2.client.unload_model("worker")

    assert v2.client.is_model_ready("worker") is False
    assert index_of(v2)["worker"] == {"name": "worker", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert raised(lambda: v2.client.infer("worker", worker_inputs())).status() == "404"
    assert "worker" not in v2.daemon.request("GET", "/v2/models").json()["models"]

    v2.client.load_model("worker")  # answers once the model is ready

    assert v2.client.is_model_ready("worker") is True
    assert index_of(v2)["worker"]["state"] == "READY"
    result = v2.client.infer("worker", worker_inputs(x=[10.0]))
    np.testing.assert_array_equal(result.as_numpy("y"), [20.0])
    v2.note_pids("worker")


def test_load_with_a_config_adds_a_model_that_answers(v2):
    table = {key: value for key, value in worker_table("fresh").items() if key != "id"}

    v2.client.load_model("fresh", config=json.dumps(table))

    assert v2.client.is_model_ready("fresh") is True
    assert v2.client.get_model_metadata("fresh")["inputs"] == WORKER_V2["inputs"]
    result = v2.client.infer("fresh", worker_inputs(words=["xy"]))
    assert [value.decode() if isinstance(value, bytes) else value for value in result.as_numpy("upper")] == ["XY"]
    only_ready = v2.daemon.request("POST", "/v2/repository/index", b'{"ready": true}').json()
    assert {"name": "fresh", "version": "1", "state": "READY", "reason": ""} in only_ready
    assert "sleepy" not in [entry["name"] for entry in only_ready]
    v2.note_pids("fresh")


def test_load_with_a_config_of_a_native_model(v2):
    table = {"type": "http", "url": f"http://127.0.0.1:{v2.upstream_port}", "v2": {"native": True, "model": "doubler"}}

    v2.client.load_model("tri2", config=json.dumps(table))

    assert index_of(v2)["tri2"]["state"] == "READY"


def test_a_native_model_loaded_with_a_config_answers(v2):
    result = v2.client.infer("tri2", [as_input("x", np.array([7], dtype=np.float32), "FP32")])
    np.testing.assert_array_equal(result.as_numpy("y"), [14.0])
    assert v2.client.get_model_metadata("tri2")["name"] == "tri2"


def test_a_bad_load_config_is_a_400_exception(v2):
    error = raised(lambda: v2.client.load_model("bad", config=json.dumps({"type": "http"})))

    assert error.status() == "400"
    assert "url" in error.message()
    assert "bad" not in index_of(v2)


# --- the generate extension ---------------------------------------------------------------------------------

# The example generator's words for this prompt and seed (tests/test_examples.py reads them too).
SEEDED = {"text_input": "the daemon", "parameters": {"max_words": 8, "seed": 7}}
SEEDED_TEXT = "asks the model that the request names."


def test_generate_answers_the_generators_text_as_text_output(v2):
    reply = v2.daemon.request("POST", "/v2/models/generate/generate",
                              {**SEEDED, "parameters": {**SEEDED["parameters"], "delay": 0}})

    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"model_name": "generate", "model_version": "1", "text_output": SEEDED_TEXT}


def test_the_generators_text_input_is_its_prompt(v2):
    def text(document):
        reply = v2.daemon.request("POST", "/v2/models/generate/generate", document)
        assert reply.status == 200, reply
        return reply.json()["text_output"]

    prompt = {"prompt": SEEDED["text_input"], "parameters": {**SEEDED["parameters"], "delay": 0}}
    assert text(prompt) == SEEDED_TEXT
    both = v2.daemon.request("POST", "/v2/models/generate/generate", {**prompt, "text_input": "the daemon"})
    assert (both.status, both.json()) == (400, {"error": "give the prompt as prompt or as text_input, not both"})


def test_generate_stream_sends_the_words_one_by_one_then_ends(v2):
    body = json.dumps({**SEEDED, "parameters": {**SEEDED["parameters"], "delay": 0.1}}).encode()

    stream = Streamed(v2.daemon.port, "POST", "/v2/models/generate/generate_stream", body, framing=None,
                      timeout=20, http_version="1.0")
    events = stream.read_events()
    status, headers = stream.status, stream.headers

    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    answers = sse_data(stream.body)
    assert len(answers) == 8  # one per word; no end event: the answer ends with the last word
    assert all(set(answer) == {"model_name", "model_version", "text_output"} for answer in answers)
    assert {(answer["model_name"], answer["model_version"]) for answer in answers} == {("generate", "1")}
    assert "".join(answer["text_output"] for answer in answers) == SEEDED_TEXT
    first, last = events[0][0], events[-1][0]
    assert last - first >= 0.3  # 100 ms between words: the eight were not sent together


def test_the_readmes_generate_lines_answer_what_it_shows(v2):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("### The generate extension", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    (generate_body, stream_body) = re.findall(r"-d '([^']*)'", block)
    shown = [json.loads(line[2:]) for line in block.splitlines() if line.startswith("# {")]
    shown_events = [json.loads(line[len("# data: "):]) for line in block.splitlines() if line.startswith("# data: ")]

    reply = v2.daemon.request("POST", "/v2/models/generate/generate", generate_body.encode())
    stream = Streamed(v2.daemon.port, "POST", "/v2/models/generate/generate_stream", stream_body, framing=None,
                      timeout=20, http_version="1.0")
    stream.read_events()
    status = stream.status

    assert [reply.json()] == shown
    answers = sse_data(stream.body)
    assert status == 200 and answers[:len(shown_events)] == shown_events
    assert "".join(answer["text_output"] for answer in answers) == shown[0]["text_output"]


def test_a_client_that_leaves_generate_stream_stops_the_generator_and_is_logged_499(v2):
    body = json.dumps({"text_input": "the daemon", "parameters": {"max_words": 200, "delay": 0.05}}).encode()
    stream = Streamed(v2.daemon.port, "POST", "/v2/models/generate/generate_stream", body, framing=None,
                      headers={"X-Request-Id": "leaves-early"}, timeout=20)
    try:
        stream.read_until(b"data: ")  # the first word came: the client leaves
    finally:
        stream.close()

    def logged():
        return [entry for entry in v2.daemon.events("generate", "request") if entry["request_id"] == "leaves-early"]

    wait_until(logged, 5, "the stream's end to be logged")
    [entry] = logged()
    assert (entry["operation"], entry["status"]) == ("generate_stream", 499)
    # The request is over for the model (it was sent a cancel) long before 200 words (10 s) were made.
    wait_until(lambda: v2.daemon.request("GET", "/get/status?id=generate").json()["in_flight"] == 0, 3,
               "the model's request to end")


def test_generate_on_a_jsonl_model_answers_its_fields(v2):
    body = {"x": [1.0, 2.5], "parameters": {"n": 4}}

    generated = v2.daemon.request("POST", "/v2/models/worker/generate", body)
    streamed = v2.daemon.request("POST", "/v2/models/worker/versions/1/generate_stream", body)

    expected = {"model_name": "worker", "model_version": "1", "y": [2.0, 5.0], "total": 4}
    assert (generated.status, generated.json()) == (200, expected)
    assert streamed.status == 200, streamed
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert sse_data(streamed.body) == [expected]  # its one output, as one event


def test_generate_errors_are_the_protocols_with_their_status(v2):
    refusals = [
        ("/v2/models/generate/generate_stream", {"parameters": {"max_words": 0}}, 400, "max_words must be"),
        ("/v2/models/generate/generate", {"parameters": {"max_words": 0}}, 400, "max_words must be"),
        ("/v2/models/generate/generate", [1], 400, "must be a JSON object"),
        ("/v2/models/generate/generate_stream", {"text_input": 1}, 400, "text_input must be a string"),
        ("/v2/models/generate/versions/2/generate", {}, 404, "has no version '2'"),
        ("/v2/models/nobody/generate_stream", {}, 404, "no model with id 'nobody'"),
        ("/v2/models/worker/generate", {"n": [-1]}, 400, "the total of n is negative"),
        # A native model's server is asked on its own generate routes, for its own name
        # for the model (one it does not have): its 404 comes back.
        ("/v2/models/astray/generate", {"text_input": "a"}, 404, "unknown model: 'missing' is not found"),
        ("/v2/models/astray/generate_stream", {"text_input": "a"}, 404, "unknown model: 'missing' is not found"),
    ]
    for path, body, status, message in refusals:
        reply = v2.daemon.request("POST", path, body)
        assert reply.status == status, (path, reply)
        assert reply.headers["content-type"] == "application/json", (path, reply)
        assert set(reply.json()) == {"error"} and message in reply.json()["error"], (path, reply)


# --- the generate extension of a native model (its server's own routes) ---------------------------------------


def upstream_streams(v2) -> dict:
    """How each generate_stream the native server was sent ended, by request id (its GET /streams)."""
    return call(v2.upstream_port, "GET", "/streams", None, {}, 5).json()


def logged(v2, model: str, request_id: str) -> dict:
    def entries():
        return [entry for entry in v2.daemon.events(model, "request") if entry["request_id"] == request_id]
    (entry,) = wait_until(entries, 5, f"request {request_id} in the log of {model}")
    return entry


def test_generate_on_a_native_model_is_its_servers_answer(v2):
    reply = v2.daemon.request("POST", "/v2/models/tri/generate", {"text_input": "one two"})

    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/json"
    # Passed through as the server answered it (its own name for the model).
    assert reply.json() == {"model_name": "doubler", "model_version": "1", "text_output": "one one two two"}


def test_generate_stream_on_a_native_model_relays_its_servers_events_one_by_one(v2):
    body = json.dumps({"text_input": "one two three", "parameters": {"delay": 0.2, "stamp": True}}).encode()

    stream = Streamed(v2.daemon.port, "POST", "/v2/models/tri/versions/1/generate_stream", body, framing=None,
                      http_version="1.0")
    events = stream.read_events()

    assert stream.status == 200
    headers = stream.headers
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    answers = [event.data for event in events]  # (a keepalive, if slow, is passed over)
    assert [answer["text_output"] for answer in answers] == ["one", " one", " two", " two", " three", " three"]
    assert all(set(answer) == {"model_name", "model_version", "text_output", "sent_at"} for answer in answers)
    # Each event reached the client after the server wrote it (the clocks are one: the
    # machine's time.time()), and the first came before the server wrote the last (a
    # second later): the events were relayed as they came, not gathered.
    arrived = [event.at for event in events]
    assert all(when >= answer["sent_at"] for when, answer in zip(arrived, answers))
    assert arrived[0] < answers[-1]["sent_at"]
    assert len(set(arrived)) >= 3


def test_a_native_generate_stream_gets_keepalives_while_its_server_is_silent(v2):
    body = json.dumps({"text_input": "slow", "parameters": {"delay": 0.8}}).encode()

    stream = Streamed(v2.daemon.port, "POST", "/v2/models/tri/generate_stream", body, framing=None,
                      http_version="1.0")
    stream.read_all()
    stream.close()

    assert (stream.status, stream.headers["content-type"]) == (200, "text/event-stream; charset=utf-8")
    assert stream.body.startswith(b": keepalive\n\n")  # the SSE comment, before the first word (0.8 s)
    assert [answer["text_output"] for answer in sse_data(stream.body)] == ["slow", " slow"]


def test_a_native_servers_error_before_the_first_event_is_its_status_and_message(v2):
    for path in ("/v2/models/tri/generate_stream", "/v2/models/tri/generate"):
        reply = v2.daemon.request("POST", path, {"parameters": {"delay": 0}})

        assert reply.status == 400, (path, reply)
        assert reply.headers["content-type"] == "application/json", (path, reply)
        assert reply.json() == {"error": "text_input is required, a string"}, (path, reply)
    failed = v2.daemon.request("POST", "/v2/models/tri/generate", {"text_input": "a b", "parameters": {"fail_after": 1}})
    assert (failed.status, failed.json()) == (400, {"error": "the model failed after 1 words"})
    # An error event that comes before any other: the stream had not begun for the
    # client, so it is answered as an error of the server's is, with its words (a 502).
    first = v2.daemon.request("POST", "/v2/models/tri/generate_stream",
                              {"text_input": "a b", "parameters": {"fail_after": 0}})
    assert (first.status, first.headers["content-type"]) == (502, "application/json")
    assert first.json() == {"error": "the model failed after 0 words"}


def test_a_native_servers_error_after_the_first_event_ends_the_stream_with_it(v2):
    body = json.dumps({"text_input": "a b c", "parameters": {"fail_after": 2}}).encode()

    stream = Streamed(v2.daemon.port, "POST", "/v2/models/tri/generate_stream", body, framing=None,
                      http_version="1.0")
    stream.read_all()
    stream.close()

    assert stream.status == 200
    answers = sse_data(stream.body)
    assert [answer.get("text_output") for answer in answers[:-1]] == ["a", " a"]
    assert answers[-1] == {"error": "the model failed after 2 words"}  # the server's own words, its last event


def test_a_native_servers_error_event_is_logged_as_the_streams_error(v2):
    body = json.dumps({"text_input": "a b c", "parameters": {"fail_after": 1}})
    request_id = "native-fails-late"

    reply = v2.daemon.request("POST", "/v2/models/tri/generate_stream", body.encode(),
                              headers={"X-Request-Id": request_id})

    assert reply.status == 200
    assert sse_data(reply.body)[-1] == {"error": "the model failed after 1 words"}
    entry = logged(v2, "tri", request_id)
    assert (entry["operation"], entry["status"], entry["error"]) == (
        "generate_stream", 502, "the model failed after 1 words")
    line = v2.daemon.access_line(request_id)
    assert "chunks=1 " in line and line.endswith("stream_end=error"), line


def test_a_client_that_leaves_a_native_generate_stream_closes_the_upstream_connection(v2):
    request_id = "native-leaves"
    body = json.dumps({"text_input": " ".join(["word"] * 100), "parameters": {"delay": 0.05}}).encode()
    stream = Streamed(v2.daemon.port, "POST", "/v2/models/tri/generate_stream", body, framing=None,
                      headers={"X-Request-Id": request_id}, timeout=20)
    try:
        stream.read_until(b"data: ")  # the first word came: the client leaves
        assert upstream_streams(v2)[request_id] == "running"  # (200 events, 10 s)
    finally:
        stream.close()

    # The daemon closed its connection to the server, which saw it and stopped.
    wait_until(lambda: upstream_streams(v2)[request_id] == "closed", 3, "the server to see its connection closed")
    entry = logged(v2, "tri", request_id)
    assert (entry["operation"], entry["status"]) == ("generate_stream", 499)
    assert v2.daemon.access_line(request_id).endswith("stream_end=cancelled")
    wait_until(lambda: v2.daemon.request("GET", "/get/status?id=tri").json()["in_flight"] == 0, 3,
               "the model's request to end")


# --- the end -----------------------------------------------------------------------------------------------


def test_the_daemon_survived_and_stopping_it_leaves_no_model_process(v2):
    assert v2.client.is_server_live() is True
    assert v2.client.is_model_ready("worker") is True
    pids = v2.pids | v2.daemon.model_pids("tri") | v2.daemon.model_pids("sleepy")
    assert len(pids) >= 4  # worker, sleepy, tri and generate; more if the load tests ran

    assert v2.daemon.terminate() in (0, -signal.SIGTERM)

    wait_until(lambda: all(reaped(pid) for pid in pids), 5, "every model process to be reaped")
    assert port_is_free(v2.upstream_port)
    assert "Unhandled error in Deferred" not in v2.daemon.output, v2.daemon.log_text()
