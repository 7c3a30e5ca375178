"""
The Open Inference Protocol (KServe v2 REST) under C{/v2}, in memory: L{StubFrontDoor}
with L{FakeModel}s, whose recorded bodies show exactly what a model was sent.

A model declares its tensors with a C{[models.v2]} table; here the fake's spec is
replaced by one that has it (L{with_v2}).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import aibackend
from aibackend import errors
from aibackend.errors import BadGateway
from aibackend.auth import Guard
from aibackend.config import V2Spec
from aibackend.tensors import TensorSpec
from aibackend.testing import ADMIN_TOKEN as TOKEN
from aibackend.testing import FakeModel, StubFrontDoor, assert_v2_error, failure_of, has_fired, result_of
from aibackend.testing import ManagedFrontDoor as Door

KEY = "client-key-0123456789"


def with_v2(fake: FakeModel, *, inputs=(), outputs=(), **keys) -> FakeModel:
    """Give a fake model a C{[models.v2]} table: tensors as C{(name, datatype, shape)}."""
    v2 = V2Spec(
        inputs=tuple(TensorSpec(name, datatype, tuple(shape)) for name, datatype, shape in inputs),
        outputs=tuple(TensorSpec(name, datatype, tuple(shape)) for name, datatype, shape in outputs),
        **keys,
    )
    fake.spec = dataclasses.replace(fake.spec, v2=v2)
    return fake


@pytest.fixture
def declared(clock):
    """A model declaring x FP32 [-1, 2] and n INT8 [] in, y FP32 [-1] and label BYTES [] out."""
    return with_v2(
        FakeModel("m", clock),
        inputs=[("x", "FP32", [-1, 2]), ("n", "INT8", [])],
        outputs=[("y", "FP32", [-1]), ("label", "BYTES", [])],
        platform="pytorch",
    )


@pytest.fixture
def plain(clock):
    """A model that declares nothing."""
    return FakeModel("plain", clock)


@pytest.fixture
def door(clock, declared, plain):
    door = StubFrontDoor(clock, [declared, plain])
    door.front_door.accepting = True
    return door


def post(door, url, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    kwargs.setdefault("headers", {"Content-Type": "application/json"})
    return door.call("POST", url, data=data, **kwargs)


def infer(door, model, body, **kwargs):
    return post(door, f"/v2/models/{model}/infer", body, **kwargs)


def x_input(data=((1, 2), (3, 4)), shape=(2, 2), datatype="FP32", name="x", **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": json.loads(json.dumps(data)), **extra}


def n_input(value=3, datatype="INT8", shape=()):
    return {"name": "n", "datatype": datatype, "shape": list(shape), "data": [value]}


# --- the server ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_server_metadata(door, path):
    response = door.call("GET", path)

    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.json() == {"name": "aibackend", "version": aibackend.__version__, "extensions": ["model_repository", "generate"]}


def test_health_live(door):
    response = door.call("GET", "/v2/health/live")

    assert (response.status, response.json()) == (200, {"live": True})
    assert response.header("Content-Type") == "application/json"


def test_health_ready_while_accepting(door):
    response = door.call("GET", "/v2/health/ready")

    assert (response.status, response.json()) == (200, {"ready": True})


def test_health_ready_is_503_while_starting_or_stopping_and_live_stays_200(door):
    door.front_door.accepting = False

    ready = door.call("GET", "/v2/health/ready")

    assert ready.status == 503
    assert ready.header("Content-Type") == "application/json"
    assert ready.header("Retry-After") == "1"
    body = ready.json()
    assert body["ready"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert door.call("GET", "/v2/health/live").json() == {"live": True}


def test_the_model_list(door):
    response = door.call("GET", "/v2/models")

    assert (response.status, response.json()) == (200, {"models": ["m", "plain"]})


def test_an_unknown_route_is_a_v2_404(door):
    assert_v2_error(door.call("GET", "/v2/nothing/here"), 404, message="/v2/nothing/here")


def test_the_request_id_is_echoed_in_the_header(door):
    response = door.call("GET", "/v2/models/m", headers={"X-Request-Id": "abc-1"})
    error = door.call("GET", "/v2/models/nobody", headers={"X-Request-Id": "abc-2"})

    assert response.header("X-Request-Id") == "abc-1"
    assert error.header("X-Request-Id") == "abc-2"


# --- one model: metadata and readiness ---------------------------------------------------------


def test_metadata_of_a_declared_model(door):
    response = door.call("GET", "/v2/models/m")

    assert response.status == 200, response.body
    assert response.json() == {
        "name": "m",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}, {"name": "n", "datatype": "INT8", "shape": []}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}, {"name": "label", "datatype": "BYTES", "shape": []}],
    }


def test_metadata_of_an_undeclared_model(door):
    response = door.call("GET", "/v2/models/plain")

    assert response.json() == {"name": "plain", "versions": ["1"], "platform": "aibackend_fake", "inputs": [],
                               "outputs": []}


def test_the_one_version_answers_and_others_are_404(door):
    assert door.call("GET", "/v2/models/m/versions/1").json()["name"] == "m"
    assert door.call("GET", "/v2/models/m/versions/1/ready").json() == {"name": "m", "ready": True}

    for path in ("/v2/models/m/versions/2", "/v2/models/m/versions/2/ready"):
        message = assert_v2_error(door.call("GET", path), 404)
        assert "'2'" in message and "'1'" in message
    assert_v2_error(infer(door, "m/versions/2", {"inputs": [x_input(), n_input()]}), 404)
    assert door.front_door.registry.get("m").received == []


def test_a_declared_version_is_the_one_version(clock):
    model = with_v2(FakeModel("v", clock), version="7")
    door = StubFrontDoor(clock, [model])
    model.answers(200, {"a": 1})

    assert door.call("GET", "/v2/models/v").json()["versions"] == ["7"]
    assert door.call("GET", "/v2/models/v/versions/7").status == 200
    assert door.call("GET", "/v2/models/v/versions/1").status == 404
    answer = infer(door, "v/versions/7", {"inputs": [x_input()]})
    assert answer.status == 200, answer.body
    assert answer.json()["model_version"] == "7"


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v2/models/nobody"),
        ("GET", "/v2/models/nobody/ready"),
        ("GET", "/v2/models/nobody/versions/1"),
        ("POST", "/v2/models/nobody/infer"),
    ],
)
def test_an_unknown_model_is_a_404_with_an_error_string(door, method, path):
    response = door.call(method, path, data=b'{"inputs": []}' if method == "POST" else None)

    assert "nobody" in assert_v2_error(response, 404)


def test_a_url_quoted_name_is_the_model(clock):
    model = FakeModel("my-model", clock)
    door = StubFrontDoor(clock, [model])

    assert door.call("GET", "/v2/models/my%2Dmodel").json()["name"] == "my-model"
    assert door.call("GET", "/v2/models/my%2Dmodel/ready").status == 200
    assert infer(door, "my%2Dmodel", {"inputs": [x_input()]}).status == 200
    assert len(model.received) == 1


def test_ready_of_a_ready_model(door):
    response = door.call("GET", "/v2/models/m/ready")

    assert (response.status, response.json()) == (200, {"name": "m", "ready": True})


class StatefulModel(FakeModel):
    def __init__(self, model_id, clock, state):
        super().__init__(model_id, clock)
        self.state = state

    def describe(self):
        return {**super().describe(), "state": self.state}


@pytest.mark.parametrize("state", ["starting", "restarting", "failed", "stopping"])
def test_ready_of_a_model_that_is_not_ready_is_503(clock, state):
    door = StubFrontDoor(clock, [StatefulModel("s", clock, state)])

    response = door.call("GET", "/v2/models/s/ready")

    assert response.status == 503
    assert response.header("Content-Type") == "application/json"
    body = response.json()
    assert state in body["error"]
    assert body["ready"] is False


@pytest.mark.parametrize("path", ["/v2/models/m/infer", "/v2/models/m/versions/1/infer"])
def test_get_of_infer_is_405_with_allow(door, path):
    response = door.call("GET", path)

    assert_v2_error(response, 405)
    assert response.header("Allow") == "POST"


def test_post_of_metadata_is_405_with_allow(door):
    response = door.call("POST", "/v2/models/m", data=b"{}")

    assert_v2_error(response, 405)
    assert "GET" in response.header("Allow")


def test_client_keys_guard_the_model_routes_but_not_health(clock, declared):
    door = StubFrontDoor(clock, [declared], guard=Guard(None, ["tcp:0:interface=127.0.0.1"], [KEY]))
    door.front_door.accepting = True
    declared.answers(200, {"y": [1], "label": "a"})

    for method, path in (("GET", "/v2/models"), ("GET", "/v2/models/m"), ("GET", "/v2/models/m/ready"),
                         ("POST", "/v2/models/m/infer"), ("POST", "/v2/repository/index")):
        refused = door.call(method, path, data=b"{}" if method == "POST" else None)
        assert_v2_error(refused, 401)
        assert refused.header("WWW-Authenticate").startswith("Bearer")
    assert door.call("GET", "/v2/health/live").status == 200
    assert door.call("GET", "/v2/health/ready").status == 200
    allowed = infer(door, "m", {"inputs": [x_input(), n_input()]},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert allowed.status == 200, allowed.body
    assert door.call("GET", "/v2", headers={"Authorization": f"Bearer {KEY}"}).status == 200


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_a_refused_server_metadata_request_has_the_protocols_error_shape(clock, path):
    door = StubFrontDoor(clock, [], guard=Guard(None, ["tcp:0:interface=127.0.0.1"], [KEY]))

    refused = door.call("GET", path)

    assert_v2_error(refused, 401)


# --- inference, adapted --------------------------------------------------------------------------


def test_infer_sends_each_input_as_a_key_in_its_shape_and_answers_output_tensors(door, declared):
    declared.answers(200, {"y": [0.5, 1, 2], "label": "cat"})

    response = infer(door, "m", {"id": "req-7", "inputs": [x_input([1, 2, 3, 4]), n_input(-5)]},
                     headers={"X-Request-Id": "http-id"})

    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id") == "http-id"
    assert response.json() == {
        "model_name": "m",
        "model_version": "1",
        "id": "req-7",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [3], "data": [0.5, 1.0, 2.0]},
            {"name": "label", "datatype": "BYTES", "shape": [], "data": ["cat"]},
        ],
    }
    (received,) = declared.received
    assert received.json() == {"x": [[1, 2], [3, 4]], "n": -5}
    assert received.context.request_id == "http-id"
    assert received.context.operation == "infer"
    assert received.context.path is None


def test_without_an_id_the_answer_has_none(door, declared):
    declared.answers(200, {"y": [1], "label": "a"})

    body = infer(door, "m", {"inputs": [x_input(), n_input()]}).json()

    assert "id" not in body


@pytest.mark.parametrize(
    "shape, data, sent",
    [
        ([2, 2], [[1, 2], [3, 4]], [[1, 2], [3, 4]]),
        ([2, 2], [1, 2, 3, 4], [[1, 2], [3, 4]]),
        ([3], [1, 2, 3], [1, 2, 3]),
        ([], [5], 5),
        ([], 5, 5),
        ([0], [], []),
        ([2, 0], [], [[], []]),
        ([1, 2, 2], [1, 2, 3, 4], [[[1, 2], [3, 4]]]),
    ],
)
def test_an_undeclared_model_gets_each_input_in_its_shape(door, plain, shape, data, sent):
    plain.answers(200, {"ok": True})

    response = infer(door, "plain", {"inputs": [{"name": "v", "datatype": "INT32", "shape": shape, "data": data}]})

    assert response.status == 200, response.body
    assert plain.received[0].json() == {"v": sent}


def test_several_inputs_of_each_datatype_reach_the_model(door, plain):
    inputs = [
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "s", "datatype": "BYTES", "shape": [1, 2], "data": ["héllo", ""]},
        {"name": "u", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
        {"name": "f", "datatype": "FP16", "shape": [1], "data": [65504]},
    ]

    assert infer(door, "plain", {"inputs": inputs}).status == 200
    assert plain.received[0].json() == {"b": [True, False], "s": [["héllo", ""]], "u": [0, 255], "f": [65504]}


def test_undeclared_answer_types_are_guessed(door, plain):
    plain.answers(200, {
        "ints": [[1, 2], [3, 4]], "floats": [0.5, 1], "flag": True, "text": "hi", "object": {"k": [1]},
        "ragged": [[1], [2, 3]], "empty": [],
    })

    response = infer(door, "plain", {"inputs": [x_input()]})

    assert response.status == 200, response.body
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    assert list(outputs) == ["ints", "floats", "flag", "text", "object", "ragged", "empty"]
    assert outputs["ints"] == {"name": "ints", "datatype": "INT64", "shape": [2, 2], "data": [1, 2, 3, 4]}
    assert outputs["floats"] == {"name": "floats", "datatype": "FP64", "shape": [2], "data": [0.5, 1]}
    assert outputs["flag"] == {"name": "flag", "datatype": "BOOL", "shape": [], "data": [True]}
    assert outputs["text"] == {"name": "text", "datatype": "BYTES", "shape": [], "data": ["hi"]}
    assert outputs["object"]["datatype"] == "BYTES"
    assert json.loads(outputs["object"]["data"][0]) == {"k": [1]}
    assert (outputs["ragged"]["datatype"], outputs["ragged"]["shape"]) == ("BYTES", [1])
    assert json.loads(outputs["ragged"]["data"][0]) == [[1], [2, 3]]
    assert outputs["empty"]["shape"] == [0]


def test_an_answer_that_is_not_an_object_is_one_output(door, plain, clock):
    plain.answers(200, [1, 2, 3])
    single = with_v2(FakeModel("single", clock), outputs=[("only", "INT64", [-1])]).answers(200, [4, 5])
    door.front_door.registry.add(single)

    assert infer(door, "plain", {"inputs": [x_input()]}).json()["outputs"] == [
        {"name": "output", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}
    ]
    assert infer(door, "single", {"inputs": [x_input()]}).json()["outputs"] == [
        {"name": "only", "datatype": "INT64", "shape": [2], "data": [4, 5]}
    ]


def test_requested_outputs_filter_the_answer_in_their_order(door, declared):
    declared.answers(200, {"y": [1], "label": "a"})

    response = infer(door, "m", {"inputs": [x_input(), n_input()], "outputs": [{"name": "label"}]})
    both = infer(door, "m", {"inputs": [x_input(), n_input()], "outputs": [{"name": "label"}, {"name": "y"}]})

    assert [output["name"] for output in response.json()["outputs"]] == ["label"]
    assert [output["name"] for output in both.json()["outputs"]] == ["label", "y"]


def test_requested_outputs_of_an_undeclared_model_filter_too(door, plain):
    plain.answers(200, {"a": 1, "b": 2, "c": 3})

    response = infer(door, "plain", {"inputs": [x_input()], "outputs": [{"name": "c"}, {"name": "a"}]})

    assert [(o["name"], o["data"]) for o in response.json()["outputs"]] == [("c", [3]), ("a", [1])]


def test_an_output_the_model_does_not_declare_is_400_before_the_model_is_asked(door, declared):
    response = infer(door, "m", {"inputs": [x_input(), n_input()], "outputs": [{"name": "z"}]})

    message = assert_v2_error(response, 400, message="'z'")
    assert "'y'" in message and "'label'" in message
    assert declared.received == []


def test_an_output_an_undeclared_model_does_not_answer_is_502(door, plain):
    plain.answers(200, {"a": 1})

    response = infer(door, "plain", {"inputs": [x_input()], "outputs": [{"name": "b"}]})

    assert_v2_error(response, 502, message="'b'")


@pytest.mark.parametrize(
    "request_parameters, output_parameters",
    [({"binary_data_output": True}, None), (None, {"binary_data": True}), ({"binary_data_output": True}, {"binary_data": True})],
)
def test_binary_outputs_asked_for_are_answered_as_json(door, declared, request_parameters, output_parameters):
    declared.answers(200, {"y": [1.5, 2], "label": "a"})
    body = {"inputs": [x_input(), n_input()]}
    if request_parameters:
        body["parameters"] = request_parameters
    if output_parameters:
        body["outputs"] = [{"name": "y", "parameters": output_parameters}]

    response = infer(door, "m", body)

    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.header("Inference-Header-Content-Length") is None
    y = next(output for output in response.json()["outputs"] if output["name"] == "y")
    assert y["data"] == [1.5, 2.0]
    assert "binary_data_size" not in (y.get("parameters") or {})


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain", "application/x-whatever"])
def test_the_body_is_json_whatever_the_content_type(door, declared, content_type):
    declared.answers(200, {"y": [1], "label": "a"})
    headers = {"Content-Type": content_type} if content_type else {}

    response = infer(door, "m", {"inputs": [x_input(), n_input()]}, headers=headers)

    assert response.status == 200, response.body
    assert declared.received[0].json() == {"x": [[1, 2], [3, 4]], "n": 3}


# --- inference: what is refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([x_input()], "needs input 'n'"),
        ([x_input(), n_input(), {"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}], "has no input 'z'"),
        ([x_input(datatype="FP64"), n_input()], "input 'x' is FP64; the model takes FP32"),
        ([x_input(), n_input(datatype="INT16")], "input 'n' is INT16; the model takes INT8"),
        ([x_input([1, 2, 3], shape=[3]), n_input()], "input 'x' has shape [3]; the model takes [-1, 2]"),
        ([x_input([1, 2, 3, 4, 5, 6], shape=[2, 3]), n_input()], "has shape [2, 3]"),
        ([x_input(), n_input(shape=[1])], "input 'n' has shape [1]; the model takes []"),
    ],
)
def test_requests_that_do_not_fit_the_declared_inputs_are_400(door, declared, inputs, message):
    response = infer(door, "m", {"inputs": inputs})

    assert_v2_error(response, 400, message=message)
    assert declared.received == []


def test_any_number_of_rows_fits_minus_one(door, declared):
    declared.answers(200, {"y": [], "label": "a"})

    assert infer(door, "m", {"inputs": [x_input([], shape=[0, 2]), n_input()]}).status == 200
    assert infer(door, "m", {"inputs": [x_input([1, 2] * 5, shape=[5, 2]), n_input()]}).status == 200
    assert declared.received[0].json() == {"x": [], "n": 3}
    assert declared.received[1].json()["x"] == [[1, 2]] * 5


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([x_input(), n_input(128)], "value 0 is 128; INT8 takes a whole number from -128 to 127"),
        ([x_input(), n_input(-129)], "INT8 takes"),
        ([x_input(), n_input(1.5)], "INT8 takes"),
        ([x_input([1, 2, 3, "4"]), n_input()], "value 3 is \"4\"; FP32 takes"),
        ([x_input([1, 2, 3, 1e39]), n_input()], "FP32 takes"),
        ([x_input([1, 2, 3]), n_input()], "has 3 values; its shape [2, 2] holds 4"),
    ],
)
def test_values_that_do_not_fit_are_400(door, declared, inputs, message):
    assert_v2_error(infer(door, "m", {"inputs": inputs}), 400, message=message)
    assert declared.received == []


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"inputs"', "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "not valid JSON"),
        (b"{}", "no inputs"),
        (b'{"inputs": []}', "no inputs"),
        (b'{"inputs": {"name": "x"}}', "no inputs"),
        (b'{"inputs": [5]}', "inputs[0] must be an object"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', "has no data"),
        (b'{"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1]},'
         b' {"name": "v", "datatype": "FP32", "shape": [1], "data": [2]}]}', "input 'v' is given twice"),
        (b'{"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 3}]}',
         "parameters must be an object"),
        (b'{"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {"name": "a"}}',
         "outputs must be a list"),
        (b'{"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"id": "a"}]}',
         "outputs[0] must be an object with a name"),
    ],
)
def test_bodies_that_are_not_an_inference_request_are_400(door, plain, body, message):
    response = post(door, "/v2/models/plain/infer", body)

    assert_v2_error(response, 400, message=message)
    assert plain.received == []


def test_an_inference_header_content_length_is_400_naming_binary_data_false(door, plain):
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}
    text = json.dumps(body).encode()

    response = door.call("POST", "/v2/models/plain/infer", data=text + b"\x00\x00\x80?",
                         headers={"Inference-Header-Content-Length": str(len(text)),
                                  "Content-Type": "application/octet-stream"})

    assert_v2_error(response, 400, message="binary_data=False")
    assert plain.received == []


def test_the_header_alone_with_a_json_body_is_400_too(door, plain):
    text = json.dumps({"inputs": [x_input()]}).encode()

    response = door.call("POST", "/v2/models/plain/infer", data=text,
                         headers={"Inference-Header-Content-Length": str(len(text))})

    assert_v2_error(response, 400, message="binary_data=False")


def test_a_binary_data_size_parameter_is_400_naming_binary_data_false(door, plain):
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1],
                        "parameters": {"binary_data_size": 4}}]}

    assert_v2_error(infer(door, "plain", body), 400, message="binary_data=False")
    assert plain.received == []


@pytest.mark.parametrize("where", ["input", "output"])
def test_shared_memory_is_400(door, plain, where):
    shm = {"shared_memory_region": "r0", "shared_memory_byte_size": 16}
    body = {"inputs": [{"name": "v", "datatype": "FP32", "shape": [1], "data": [1]}]}
    if where == "input":
        body["inputs"][0]["parameters"] = shm
    else:
        body["outputs"] = [{"name": "a", "parameters": shm}]

    message = assert_v2_error(infer(door, "plain", body), 400, message="shared memory")
    assert "binary_data=False" in message
    assert plain.received == []


def test_classification_is_400(door, plain):
    body = {"inputs": [x_input()], "outputs": [{"name": "a", "parameters": {"classification": 2}}]}

    assert_v2_error(infer(door, "plain", body), 400, message="classification")
    assert plain.received == []


def test_refused_requests_are_logged_for_the_model(door, declared):
    infer(door, "m", {"inputs": [x_input()]})

    entries = [e for e in declared.model_log.query() if e["event"] == "request"]
    assert [(e["operation"], e["status"]) for e in entries] == [("infer", 400)]
    assert "needs input 'n'" in entries[0]["error"]


# --- inference: what the model answers ----------------------------------------------------------


def test_a_model_error_answer_becomes_a_v2_error_with_its_status(door, declared):
    declared.answers(422, {"error": {"type": "model_error", "message": "nope"}})

    response = infer(door, "m", {"inputs": [x_input(), n_input()]})

    assert response.status == 422
    assert response.header("Content-Type") == "application/json"
    assert response.json() == {"error": "nope"}


def test_a_model_error_answer_keeps_its_retry_after(door, declared, native_door, native):
    declared.answers(503, {"error": "busy"}, headers={b"retry-after": b"4"})
    native.answers(429, {"error": "slow down"}, headers={b"retry-after": b"2"})

    adapted = infer(door, "m", {"inputs": [x_input(), n_input()]})
    proxied = infer(native_door, "tri", {"inputs": [x_input()]})

    assert (adapted.status, adapted.json(), adapted.header("Retry-After")) == (503, {"error": "busy"}, "4")
    assert (proxied.status, proxied.json(), proxied.header("Retry-After")) == (429, {"error": "slow down"}, "2")


@pytest.mark.parametrize(
    "status, body, error",
    [
        (400, {"error": "plain text"}, "plain text"),
        (500, b'"just a string"', '"just a string"'),
        (503, {"detail": "busy"}, '{"detail": "busy"}'),
    ],
)
def test_other_model_error_shapes_become_one_error_string(door, declared, status, body, error):
    declared.answers(status, body)

    response = infer(door, "m", {"inputs": [x_input(), n_input()]})

    assert (response.status, response.json()) == (status, {"error": error})


@pytest.mark.parametrize(
    "answer, message",
    [
        ({"y": "text", "label": "a"}, "'y'"),
        ({"y": [1], "label": "a", "extra": 1}, None),  # extra keys are ignored: not a failure
        ({"y": [[1], [2]], "label": "a"}, "has shape [2, 1]"),
        ({"label": "a"}, "without output 'y'"),
        ({"y": [[1], [2, 3]], "label": "a"}, "ragged"),
    ],
)
def test_an_answer_that_does_not_fit_the_declared_outputs_is_502(door, declared, answer, message):
    declared.answers(200, answer)

    response = infer(door, "m", {"inputs": [x_input(), n_input()]})

    if message is None:
        assert response.status == 200, response.body
        assert [o["name"] for o in response.json()["outputs"]] == ["y", "label"]
    else:
        assert_v2_error(response, 502, message=message)
        assert "'m'" in response.json()["error"]


@pytest.mark.parametrize(
    "error",
    [errors.GatewayTimeout("model 'plain' took too long"), errors.ModelUnavailable("model 'plain' is starting"),
     errors.BadGateway("the process died")],
)
def test_a_model_failure_is_a_v2_error_with_its_status(door, plain, error):
    plain.fails(error)

    response = infer(door, "plain", {"inputs": [x_input()]})

    assert_v2_error(response, error.status, message=error.message)


def test_a_request_held_by_the_model_answers_once_the_model_does(door, plain):
    from aibackend.interfaces import ModelAnswer

    plain.holds()
    d = door.request("POST", "/v2/models/plain/infer", data=json.dumps({"inputs": [x_input()]}).encode())
    assert not has_fired(d)

    plain.pending[0].callback(ModelAnswer(200, b'{"a": [1, 2]}'))
    door.flush()

    response = result_of(d)
    assert response.json()["outputs"] == [{"name": "a", "datatype": "INT64", "shape": [2], "data": [1, 2]}]


def test_a_client_that_goes_away_from_an_inference_cancels_it_and_it_is_logged_499(door, plain):
    plain.holds()
    d = door.request("POST", "/v2/models/plain/infer", data=json.dumps({"inputs": [x_input()]}).encode(),
                     headers={"X-Request-Id": "gone"})
    assert len(plain.pending) == 1

    door.drop_connections()

    assert [received.context.request_id for received in plain.cancelled] == ["gone"]
    [entry] = [entry for entry in plain.model_log.query() if entry["event"] == "request"]
    assert (entry["request_id"], entry["operation"], entry["status"]) == ("gone", "infer", 499)
    d.addErrback(lambda failure: None)  # the client's own request failed, as it should


def test_a_model_cancelling_an_inference_is_a_503_in_the_protocols_shape(door, plain):
    from twisted.internet.defer import CancelledError

    plain.fails(CancelledError())

    response = infer(door, "plain", {"inputs": [x_input()]})

    assert_v2_error(response, 503, message="abandoned the request")
    assert response.header("Retry-After") == "1"
    [entry] = [entry for entry in plain.model_log.query() if entry["event"] == "request"]
    assert entry["status"] == 503


# --- a native v2 model: proxied ---------------------------------------------------------------------


@pytest.fixture
def native(clock):
    return with_v2(FakeModel("tri", clock), native=True, model="doubler")


@pytest.fixture
def native_door(clock, native):
    return StubFrontDoor(clock, [native])


def test_native_metadata_is_the_servers_with_the_name_rewritten(native_door, native):
    upstream = {"name": "doubler", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}], "outputs": []}
    native.answers(200, upstream)

    response = native_door.call("GET", "/v2/models/tri")

    assert response.status == 200, response.body
    assert response.json() == {**upstream, "name": "tri"}
    (received,) = native.received
    assert (received.context.method, received.context.path) == (b"GET", ("v2", "models", "doubler"))
    assert received.body == b""


def test_native_versions_are_the_servers(native_door, native):
    native.answers(200, {"name": "doubler", "versions": ["3"]})

    assert native_door.call("GET", "/v2/models/tri/versions/3").status == 200
    assert native.received[0].context.path == ("v2", "models", "doubler", "versions", "3")


def test_native_ready_asks_the_server(native_door, native):
    native.answers(200, b"")
    ready = native_door.call("GET", "/v2/models/tri/ready")
    native.answers(400, {"error": "model is not loaded"})
    not_ready = native_door.call("GET", "/v2/models/tri/ready")

    assert (ready.status, ready.json()) == (200, {"name": "tri", "ready": True})
    assert native.received[0].context.path == ("v2", "models", "doubler", "ready")
    assert native.received[0].context.method == b"GET"
    assert not_ready.status == 503
    assert not_ready.json()["ready"] is False
    assert "model is not loaded" in not_ready.json()["error"]


def test_native_infer_is_proxied_with_binary_outputs_asked_as_json(native_door, native):
    upstream = {"model_name": "doubler", "model_version": "1", "id": "r1",
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [2.0, 4.0]}]}
    native.answers(200, upstream)
    body = {"id": "r1", "inputs": [x_input([1, 2], shape=[2])], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}

    response = infer(native_door, "tri", body)

    assert response.status == 200, response.body
    assert response.json() == upstream
    (received,) = native.received
    assert received.context.path == ("v2", "models", "doubler", "infer")
    assert received.context.method == b"POST"
    assert received.context.operation == "infer"
    sent = received.json()
    assert sent["parameters"] == {"binary_data_output": False}
    assert sent["outputs"] == [{"name": "y", "parameters": {"binary_data": False}}]
    assert sent["inputs"] == body["inputs"]
    assert sent["id"] == "r1"


def test_native_infer_of_a_version_goes_to_that_version(native_door, native):
    native.answers(200, {"outputs": []})

    infer(native_door, "tri/versions/2", {"inputs": [x_input()]})

    assert native.received[0].context.path == ("v2", "models", "doubler", "versions", "2", "infer")


def test_native_errors_become_the_protocols_error(native_door, native):
    native.answers(400, {"error": "negative"})
    refused = infer(native_door, "tri", {"inputs": [x_input()]})
    native.answers(404, {"error": "Request for unknown model: 'doubler' is not found"})
    unknown = native_door.call("GET", "/v2/models/tri")

    assert (refused.status, refused.json()) == (400, {"error": "negative"})
    assert (unknown.status, unknown.json()) == (404, {"error": "Request for unknown model: 'doubler' is not found"})


def test_native_requests_are_checked_before_they_are_sent(native_door, native):
    bodies = [
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1],
                     "parameters": {"binary_data_size": 4}}]},
        {"inputs": [x_input(), x_input()]},
        {"inputs": []},
        {"inputs": [x_input()], "outputs": [{"name": "y", "parameters": {"classification": 1}}]},
    ]

    for body in bodies:
        assert infer(native_door, "tri", body).status == 400
    assert native.received == []


def test_a_native_model_without_a_name_on_its_server_goes_by_its_id(clock):
    model = with_v2(FakeModel("resnet", clock), native=True).answers(200, {"name": "resnet"})
    door = StubFrontDoor(clock, [model])

    door.call("GET", "/v2/models/resnet")

    assert model.received[0].context.path == ("v2", "models", "resnet")


# --- the model repository extension ---------------------------------------------------------------


def test_the_repository_index_lists_every_model(door):
    for body in (b"", b"{}", b'{"ready": false}'):
        response = post(door, "/v2/repository/index", body)
        assert response.status == 200, response.body
        assert response.json() == [
            {"name": "m", "version": "1", "state": "READY", "reason": ""},
            {"name": "plain", "version": "1", "state": "READY", "reason": ""},
        ]


class FailedModel(StatefulModel):
    last_failure = "it crashed 5 times"


def test_the_repository_index_tells_each_state_and_ready_true_keeps_the_ready_ones(clock):
    models = [
        with_v2(FakeModel("ok", clock), version="4"),
        StatefulModel("loading", clock, "starting"),
        StatefulModel("restarting", clock, "restarting"),
        StatefulModel("stopping", clock, "stopping"),
        FailedModel("broken", clock, "failed"),
        StatefulModel("stopped", clock, "stopped"),
    ]
    door = StubFrontDoor(clock, models)

    everything = post(door, "/v2/repository/index", {}).json()
    ready = post(door, "/v2/repository/index", {"ready": True}).json()

    assert everything == [
        {"name": "ok", "version": "4", "state": "READY", "reason": ""},
        {"name": "loading", "version": "1", "state": "LOADING", "reason": ""},
        {"name": "restarting", "version": "1", "state": "LOADING", "reason": ""},
        {"name": "stopping", "version": "1", "state": "UNLOADING", "reason": ""},
        {"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": "it crashed 5 times"},
        {"name": "stopped", "version": "1", "state": "UNAVAILABLE", "reason": ""},
    ]
    assert ready == [{"name": "ok", "version": "4", "state": "READY", "reason": ""}]


def test_the_repository_index_ready_must_be_a_boolean(door):
    assert_v2_error(post(door, "/v2/repository/index", {"ready": "yes"}), 400, message="ready")


def test_the_repository_index_takes_post_only(door):
    response = door.call("GET", "/v2/repository/index")

    assert_v2_error(response, 405)
    assert response.header("Allow") == "POST"


def test_load_and_unload_without_a_manager_are_404(door):
    for action in ("load", "unload"):
        assert_v2_error(post(door, f"/v2/repository/models/m/{action}", {}), 404, message="at runtime")


# load and unload with a model manager (a ManagedFrontDoor: a manager over a MemoryStore)


@pytest.fixture
def managed(clock):
    return Door(clock, with_v2(FakeModel("m", clock), inputs=[("x", "FP32", [-1])], version="2"),
                FakeModel("other", clock), guard=Guard(None, ["tcp:0:interface=127.0.0.1"]))


def test_unload_removes_the_model_and_the_index_says_unloaded(managed):
    response = managed.call("POST", "http://127.0.0.1/v2/repository/models/m/unload")

    assert response.status == 200, response.body
    assert response.json() == {"unloaded": "m", "model": None}
    assert managed.ids() == ["other"]
    assert_v2_error(managed.call("GET", "/v2/models/m/ready"), 404)
    assert post(managed.stub, "/v2/repository/index", {}).json() == [
        {"name": "other", "version": "1", "state": "READY", "reason": ""},
        {"name": "m", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    assert post(managed.stub, "/v2/repository/index", {"ready": True}).json() == [
        {"name": "other", "version": "1", "state": "READY", "reason": ""},
    ]
    again = managed.call("POST", "http://127.0.0.1/v2/repository/models/m/unload")
    assert (again.status, again.json()) == (200, {"unloaded": "m", "model": None})


def test_load_brings_an_unloaded_model_back(managed, monkeypatch):
    spec = managed.registry.get("m").spec
    managed.call("POST", "http://127.0.0.1/v2/repository/models/m/unload")
    # The registry builds real models from specs; a fake's spec builds a fake again.
    monkeypatch.setattr(managed.registry, "build",
                        lambda spec, runtime=False: with_v2(FakeModel(spec.id, managed.clock), inputs=[("x", "FP32", [-1])],
                                                            version=spec.v2.version))

    response = managed.call("POST", "http://127.0.0.1/v2/repository/models/m/load")

    assert response.status == 200, response.body
    assert response.json()["loaded"] == "m"
    assert sorted(managed.ids()) == ["m", "other"]
    assert managed.registry.get("m").spec.v2.version == spec.v2.version
    assert [e["state"] for e in post(managed.stub, "/v2/repository/index", {}).json()] == ["READY", "READY"]


def test_load_with_a_config_adds_a_model(managed):
    table = {"type": "http", "url": "http://127.0.0.1:8888/predict",
             "v2": {"inputs": [{"name": "q", "datatype": "BYTES", "shape": [1]}]}}

    response = post(managed.stub, "http://127.0.0.1/v2/repository/models/fresh/load",
                    {"parameters": {"config": json.dumps(table)}})

    assert response.status == 200, response.body
    assert response.json()["loaded"] == "fresh"
    assert "fresh" in managed.ids()
    metadata = managed.call("GET", "/v2/models/fresh").json()
    assert metadata["inputs"] == [{"name": "q", "datatype": "BYTES", "shape": [1]}]
    assert metadata["platform"] == "aibackend_http"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"parameters": {"config": "{not json"}}, 400, "not valid JSON"),
        ({"parameters": {"config": "[1]"}}, 400, "must be a JSON object"),
        ({"parameters": {"config": {"type": "http"}}}, 400, "must be a string"),
        ({"parameters": {"file:1/model.onnx": "AAAA"}}, 400, "cannot be uploaded"),
        ({"parameters": {"colour": "blue"}}, 400, "unknown load parameter 'colour'"),
        ({"parameters": {"config": json.dumps({"id": "other-name", "type": "http", "url": "http://127.0.0.1:1"})}},
         400, "'other-name'"),
        ({"parameters": {"config": json.dumps({"type": "http"})}}, 400, "url"),
        ({}, 404, "nobody"),
        # Deeper than Python's json recurses (a 500 before), and a lone surrogate (a 500 before).
        ({"parameters": {"config": "[" * 2_000 + "]" * 2_000}}, 400, "parameters.config is nested deeper"),
        ({"parameters": {"config": "{\"id\": \"\ud800\"}"}}, 400, "parameters.config is not UTF-8"),
        ({"parameters": {"config": json.dumps({"type": "http", "url": "http://127.0.0.1:1",
                                               "headers": json.loads("[" * 500 + "]" * 500)})}}, 400, "headers"),
    ],
)
def test_bad_loads_are_refused(managed, body, status, message):
    response = post(managed.stub, "http://127.0.0.1/v2/repository/models/nobody/load", body)

    assert_v2_error(response, status, message=message)
    assert sorted(managed.ids()) == ["m", "other"]


def test_unload_of_an_unknown_model_is_404(managed):
    assert_v2_error(managed.call("POST", "http://127.0.0.1/v2/repository/models/nobody/unload"), 404)


@pytest.mark.parametrize("action", ["load", "unload"])
@pytest.mark.parametrize("url, headers", [
    ("http://evil.example", {}),
    ("http://127.0.0.1", {"Origin": "http://evil.example"}),
])
def test_load_and_unload_are_admin_operations(managed, action, url, headers):
    response = managed.call("POST", f"{url}/v2/repository/models/m/{action}", headers=headers)

    assert_v2_error(response, 403)
    assert sorted(managed.ids()) == ["m", "other"]


def test_with_an_admin_token_load_and_unload_need_it(clock):
    door = Door(clock, FakeModel("m", clock), guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"]))

    refused = door.call("POST", "http://127.0.0.1/v2/repository/models/m/unload")
    assert_v2_error(refused, 401)
    assert refused.header("WWW-Authenticate").startswith("Bearer")
    allowed = door.call("POST", "http://127.0.0.1/v2/repository/models/m/unload",
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status == 200, allowed.body


# --- a native model through a real HttpModel (StubTreq: no socket) ---------------------------------


class DoublerServer:
    """A twisted.web resource speaking v2 for one model, doubler; it records each request's method and path."""

    def __init__(self):
        from twisted.web.resource import Resource

        received = self.received = []

        class Root(Resource):
            isLeaf = True

            def render(self, request):
                received.append((request.method, request.path))
                request.setHeader(b"content-type", b"application/json")
                if request.path == b"/v2/models/doubler" and request.method == b"GET":
                    return json.dumps({"name": "doubler", "versions": ["1"], "platform": "fake"}).encode()
                if request.path == b"/v2/models/doubler/ready":
                    return b""
                if request.path == b"/v2/models/doubler/infer" and request.method == b"POST":
                    document = json.loads(request.content.read())
                    (x,) = document["inputs"]
                    return json.dumps({"model_name": "doubler", "outputs": [
                        {"name": "y", "datatype": "FP32", "shape": x["shape"], "data": [2 * v for v in x["data"]]}
                    ]}).encode()
                request.setResponseCode(404)
                return b'{"error": "no such route"}'

        self.resource = Root()


def native_http_door(clock):
    from treq.testing import StubTreq

    from aibackend.config import HttpModelSpec
    from aibackend.httpmodel import HttpModel

    server = DoublerServer()
    spec = HttpModelSpec(id="tri", type="http", url="http://model.test:9001",
                         v2=V2Spec(native=True, model="doubler"))
    model = HttpModel(spec, reactor=clock, client=StubTreq(server.resource), environ={})
    return StubFrontDoor(clock, [model]), model, server


def test_a_native_model_through_a_real_http_model(clock, logged_errors):
    door, model, server = native_http_door(clock)
    try:
        metadata = door.call("GET", "/v2/models/tri")
        answer = infer(door, "tri", {"inputs": [x_input([1, 2], shape=[2])]})

        assert metadata.status == 200, metadata.body
        assert metadata.json() == {"name": "tri", "versions": ["1"], "platform": "fake"}
        assert answer.status == 200, answer.body
        assert answer.json()["outputs"][0]["data"] == [2, 4]
        assert server.received == [(b"GET", b"/v2/models/doubler"), (b"POST", b"/v2/models/doubler/infer")]
        assert model.in_flight == 0
    finally:
        logged_errors.flush()


def test_a_native_model_whose_server_answers_ready_with_an_empty_body_is_ready(clock, logged_errors):
    door, model, server = native_http_door(clock)
    try:
        ready = door.call("GET", "/v2/models/tri/ready")

        assert ready.status == 200, ready.body
        assert ready.json() == {"name": "tri", "ready": True}
        assert server.received == [(b"GET", b"/v2/models/doubler/ready")]
    finally:
        logged_errors.flush()


class RefusingClient:
    """A treq-like client whose request() raises at once (as treq's did for a bytes method)."""

    def request(self, method, url, **kwargs):
        raise AttributeError("'bytes' object has no attribute 'encode'")

    post = get = request


def test_a_client_call_that_raises_leaves_no_request_in_flight(clock, logged_errors):
    from aibackend.config import HttpModelSpec
    from aibackend.httpmodel import HttpModel
    from aibackend.interfaces import RequestContext

    spec = HttpModelSpec(id="tri", type="http", url="http://model.test:9001", v2=V2Spec(native=True))
    model = HttpModel(spec, reactor=clock, client=RefusingClient(), environ={})

    d = model.send(b"", RequestContext(request_id="r", path=("v2", "models", "tri"), method=b"GET"))

    failure = failure_of(d, BadGateway)
    assert "'bytes' object has no attribute 'encode'" in failure.getErrorMessage()
    assert logged_errors.flush()  # a failure of an unexpected kind is logged with its traceback

    assert model.in_flight == 0
    assert [replica.in_flight for replica in model.replicas] == [0]


# --- large tensors off the reactor thread -----------------------------------------------------


def test_large_tensors_are_read_and_converted_in_a_thread(clock):
    from twisted.internet.defer import succeed

    from aibackend.v2 import THREAD_ABOVE_BYTES

    values = [round(i * 0.5, 1) for i in range(60_000)]
    model = FakeModel("big", clock).answers(200, json.dumps({"y": values}).encode())
    door = StubFrontDoor(clock, [model])
    ran = []

    def in_thread(function, *args):
        ran.append(function.__name__)
        return succeed(function(*args))

    door.front_door.open_inference.in_thread = in_thread
    request = {"inputs": [x_input(values, shape=[len(values)], datatype="FP64")]}
    assert len(json.dumps(request)) > THREAD_ABOVE_BYTES

    response = infer(door, "big", request)

    assert response.status == 200, response.body
    assert ran == ["prepare", "convert"]
    assert json.loads(model.received[0].body) == {"x": values}
    [output] = response.json()["outputs"]
    assert (output["name"], output["shape"], output["data"][-1]) == ("y", [60_000], values[-1])


def test_small_tensors_stay_on_the_reactor_thread(clock):
    model = FakeModel("small", clock).answers(200, b'{"y": [1, 2]}')
    door = StubFrontDoor(clock, [model])
    door.front_door.open_inference.in_thread = lambda *args: pytest.fail("a small request went to a thread")

    assert infer(door, "small", {"inputs": [x_input()]}).status == 200


# --- hardening (issue 12) -----------------------------------------------------------------


def deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize(
    "url, body",
    [
        ("/v2/models/plain/infer", deep(1_000)),
        ("/v2/models/plain/infer", '{"inputs": [{"name": "x", "parameters": %s}]}' % deep(2_000)),
        ("/v2/repository/index", deep(5_000)),
    ],
)
def test_json_deeper_than_the_limit_is_a_v2_400(door, url, body):
    """Python's json raised RecursionError, uncaught: a 500 and a logged traceback."""
    assert_v2_error(post(door, url, body.encode()), 400, message="nested deeper than 512 levels")


def test_a_models_answer_too_deep_to_read_is_a_502(clock):
    model = FakeModel("plain", clock).answers(200, ('{"y": %s}' % deep(1_000)).encode())
    door = StubFrontDoor(clock, [model])

    assert_v2_error(infer(door, "plain", {"inputs": [x_input()]}), 502, message="nested deeper than 512 levels")


def test_a_number_too_large_for_a_double_is_never_written_out_as_infinity(clock):
    """json reads 1e999 as infinity: written out again, it became Infinity, which is not JSON."""
    model = FakeModel("plain", clock).answers(200, b'{"y": [1e999]}')
    door = StubFrontDoor(clock, [model])

    assert_v2_error(infer(door, "plain", {"inputs": [x_input()]}), 502, message="too large for a double")
    assert_v2_error(post(door, "/v2/models/plain/infer", b'{"inputs": [], "parameters": {"x": 1e999}}'), 400,
                    message="too large for a double")


@pytest.mark.parametrize("path", ["/v2/models//ready", "/v2/models/%2F/ready", "/v2//models", "/v2/models/plain/ready/"])
def test_a_v2_path_with_an_empty_segment_is_a_v2_404(door, path):
    """werkzeug redirected (merge_slashes): the catch-all answered 500 and logged a bug."""
    response = door.call("GET", path)

    assert_v2_error(response, 404, message="no Open Inference Protocol route")
    assert response.header("Location") is None


def test_a_v2_path_that_is_not_utf8_is_a_v2_400(door):
    assert_v2_error(door.call("GET", "/v2/models/%FF/ready"), 400, message="not UTF-8")
