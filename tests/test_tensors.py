"""
Tensors of the Open Inference Protocol, without the network: L{aibackend.tensors} (a
request input checked and reshaped, a model's answer value made an output tensor), the
C{[models.v2]} table of the configuration, and L{aibackend.worker.tensor}.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from aibackend.config import (
    DEFAULT_V2,
    ConfigError,
    HttpModelSpec,
    SubprocessModelSpec,
    V2Spec,
    load_config,
    parse_config,
)
from aibackend.tensors import (
    DATATYPES,
    MAX_DIMENSIONS,
    TensorError,
    TensorSpec,
    output_tensor,
    read_input,
    reshape,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "aibackend.toml")


def tensor(name="x", datatype="FP32", shape=(2,), data=None, **extra):
    """A request input as a client sends it."""
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": [1, 2] if data is None else data,
            **extra}


def refused(value, where="inputs[0]") -> str:
    """The TensorError message read_input gives for C{value}."""
    with pytest.raises(TensorError) as caught:
        read_input(value, where)
    return str(caught.value)


# --- read_input: the tensor itself ---------------------------------------------------------


def test_a_good_input_gives_name_datatype_shape_and_flat_data():
    assert read_input(tensor(shape=[2, 2], data=[[1, 2], [3, 4]]), "inputs[0]") == ("x", "FP32", [2, 2], [1, 2, 3, 4])


def test_nested_and_flat_data_are_the_same_tensor():
    nested = read_input(tensor(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6]]), "inputs[0]")
    flat = read_input(tensor(shape=[2, 3], data=[1, 2, 3, 4, 5, 6]), "inputs[0]")

    assert nested == flat == ("x", "FP32", [2, 3], [1, 2, 3, 4, 5, 6])


def test_a_scalar_shape_takes_one_value_bare_or_in_a_list():
    assert read_input(tensor(shape=[], data=7), "i") == ("x", "FP32", [], [7])
    assert read_input(tensor(shape=[], data=[7]), "i") == ("x", "FP32", [], [7])


@pytest.mark.parametrize("shape", [[0], [2, 0], [0, 5], [3, 0, 2]])
def test_zero_size_shapes_take_no_values(shape):
    assert read_input(tensor(shape=shape, data=[]), "i") == ("x", "FP32", shape, [])


def test_too_few_or_too_many_values_for_the_shape_are_refused():
    assert refused(tensor(shape=[2, 2], data=[1, 2, 3])) == "input 'x' has 3 values; its shape [2, 2] holds 4"
    assert "has 5 values; its shape [2, 2] holds 4" in refused(tensor(shape=[2, 2], data=[1, 2, 3, 4, 5]))
    assert "has 1 values; its shape [0] holds 0" in refused(tensor(shape=[0], data=[1]))
    assert "has 0 values; its shape [] holds 1" in refused(tensor(shape=[], data=[]))


def test_what_is_not_a_tensor_object_is_refused_with_where_it_is():
    assert refused([1, 2], "inputs[3]") == "inputs[3] must be an object with name, shape, datatype and data"
    assert refused({"datatype": "FP32", "shape": [1], "data": [1]}, "inputs[1]") == (
        "inputs[1].name must be a non-empty string"
    )
    assert "inputs[0].name" in refused(tensor(name=""))
    assert "inputs[0].name" in refused(tensor(name=5))


def test_an_unknown_datatype_is_refused_and_the_known_ones_listed():
    message = refused(tensor(datatype="FLOAT32"))

    assert message.startswith("input 'x': datatype 'FLOAT32' is not one of BOOL, UINT8")
    assert "BYTES" in message
    assert "input 'x': datatype 'fp32'" in refused(tensor(datatype="fp32"))  # the protocol's names are upper case
    assert "datatype None" in refused({"name": "x", "shape": [1], "data": [1]})


@pytest.mark.parametrize(
    "shape, problem",
    [
        ("2", "must be a list of sizes, got str"),
        (None, "must be a list of sizes, got NoneType"),
        ([-1], "got -1"),  # a request's shape is the actual one: no -1
        ([2.0], "got 2.0"),
        ([True], "got True"),
        (["2"], "got '2'"),
        ([1] * (MAX_DIMENSIONS + 1), f"has {MAX_DIMENSIONS + 1} dimensions; at most {MAX_DIMENSIONS}"),
    ],
)
def test_a_bad_request_shape_is_refused(shape, problem):
    value = {"name": "x", "datatype": "FP32", "shape": shape, "data": [1]}

    message = refused(value)

    assert message.startswith("input 'x': shape ")
    assert problem in message


def test_an_input_without_data_is_refused():
    assert refused({"name": "x", "datatype": "FP32", "shape": [1]}) == "input 'x' has no data"


def test_data_nested_deeper_than_the_limit_is_refused_not_recursed_into():
    data = 1
    for _ in range(MAX_DIMENSIONS + 1):
        data = [data]

    assert f"nested more than {MAX_DIMENSIONS} deep" in refused(tensor(shape=[1] * MAX_DIMENSIONS, data=data))


def test_very_deep_data_does_not_blow_the_stack():
    data = 1
    for _ in range(100_000):
        data = [data]

    assert "nested more than" in refused(tensor(shape=[1], data=data))


# --- read_input: values and datatypes ------------------------------------------------------


@pytest.mark.parametrize(
    "datatype, good, bad",
    [
        ("INT8", [-128, 0, 127], [128, -129]),
        ("UINT8", [0, 255], [-1, 256]),
        ("INT16", [-(2**15), 2**15 - 1], [2**15, -(2**15) - 1]),
        ("UINT16", [0, 2**16 - 1], [-1, 2**16]),
        ("INT32", [-(2**31), 2**31 - 1], [2**31, -(2**31) - 1]),
        ("UINT32", [0, 2**32 - 1], [-1, 2**32]),
        ("INT64", [-(2**63), 2**63 - 1], [2**63, -(2**63) - 1]),
        ("UINT64", [0, 2**64 - 1], [-1, 2**64]),
        ("FP16", [-65504.0, 0.5, 65504], [65505, -70000.0, 1e300]),
        ("FP32", [-3.4e38, 1, 3.4e38], [3.5e38, -1e39]),
        ("BF16", [-3.3e38, 1.5, 3.3e38], [3.4e38, -1e39]),
        # JSON's whole numbers have no bound: one past a double's range does not fit FP64
        ("FP64", [-1e308, 0, 1e308, 5, 2**1023], [2**1024, -(10**400)]),
    ],
)
def test_each_numeric_datatype_takes_its_range_and_nothing_past_it(datatype, good, bad):
    assert read_input(tensor(datatype=datatype, shape=[len(good)], data=good), "i")[3] == good
    for value in bad:
        message = refused(tensor(datatype=datatype, shape=[1], data=[value]))
        assert message.startswith(f"input 'x': value 0 is {json.dumps(value)[:40]}; {datatype} takes"), message


def test_the_message_names_the_first_bad_value_and_the_range():
    message = refused(tensor(datatype="INT8", shape=[3], data=[1, 2, 300]))

    assert message == "input 'x': value 2 is 300; INT8 takes a whole number from -128 to 127"


@pytest.mark.parametrize("datatype", ["INT8", "UINT8", "INT32", "INT64", "UINT64"])
@pytest.mark.parametrize("value", [1.0, 1.5, True, False, "1", None, {"v": 1}])
def test_integer_datatypes_take_only_whole_numbers_not_floats_or_bools(datatype, value):
    assert "takes a whole number" in refused(tensor(datatype=datatype, shape=[1], data=[value]))


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "BF16", "FP64"])
@pytest.mark.parametrize("value", [True, "1.5", None, {"v": 1}])
def test_float_datatypes_take_numbers_only(datatype, value):
    assert "takes a number within" in refused(tensor(datatype=datatype, shape=[1], data=[value]))


def test_float_datatypes_take_whole_numbers_too():
    assert read_input(tensor(datatype="FP32", shape=[3], data=[1, 2.5, -3]), "i")[3] == [1, 2.5, -3]


def test_nan_is_refused_by_every_float_datatype():
    for datatype in ("FP16", "FP32", "BF16", "FP64"):
        assert "takes a number within" in refused(tensor(datatype=datatype, shape=[1], data=[float("nan")]))


@pytest.mark.parametrize("value", [1, 0, "true", None, 1.0])
def test_bool_takes_only_true_and_false(value):
    assert read_input(tensor(datatype="BOOL", shape=[2], data=[True, False]), "i")[3] == [True, False]
    assert refused(tensor(datatype="BOOL", shape=[1], data=[value])).endswith("BOOL takes true or false")


@pytest.mark.parametrize("value", [1, 1.5, True, None, {"a": 1}])
def test_bytes_takes_only_strings(value):
    assert read_input(tensor(datatype="BYTES", shape=[2], data=["a", ""]), "i")[3] == ["a", ""]
    assert refused(tensor(datatype="BYTES", shape=[1], data=[value])).endswith("BYTES takes a UTF-8 string")


def test_every_datatype_of_the_protocol_is_known():
    assert set(DATATYPES) == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "BF16", "FP64", "BYTES",
    }


def test_read_input_does_not_change_the_request():
    value = tensor(shape=[2, 2], data=[[1, 2], [3, 4]], parameters={"p": 1})
    before = json.dumps(value)

    read_input(value, "i")

    assert json.dumps(value) == before


# --- reshape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flat, shape, nested",
    [
        ([1, 2, 3, 4], [4], [1, 2, 3, 4]),
        ([1, 2, 3, 4], [2, 2], [[1, 2], [3, 4]]),
        ([1, 2, 3, 4, 5, 6], [2, 3], [[1, 2, 3], [4, 5, 6]]),
        ([1, 2, 3, 4, 5, 6], [3, 2], [[1, 2], [3, 4], [5, 6]]),
        ([1, 2, 3, 4, 5, 6], [1, 2, 3], [[[1, 2, 3], [4, 5, 6]]]),
        ([1, 2, 3, 4, 5, 6], [3, 1, 2], [[[1, 2]], [[3, 4]], [[5, 6]]]),
        ([7], [1], [7]),
        ([7], [1, 1], [[7]]),
        (["a", "b"], [2, 1], [["a"], ["b"]]),
    ],
)
def test_reshape_nests_row_major(flat, shape, nested):
    assert reshape(flat, shape) == nested


def test_reshape_of_the_scalar_shape_is_the_bare_value():
    assert reshape([7], []) == 7
    assert reshape(["s"], ()) == "s"
    assert reshape([[1, 2]], []) == [1, 2]  # a flat value is whatever it is


@pytest.mark.parametrize(
    "shape, nested",
    [([0], []), ([0, 3], []), ([2, 0], [[], []]), ([2, 0, 4], [[], []]), ([2, 3, 0], [[[], [], []], [[], [], []]])],
)
def test_reshape_of_zero_size_shapes_keeps_the_outer_dimensions(shape, nested):
    assert reshape([], shape) == nested


def test_read_then_reshape_gives_back_nested_data():
    name, datatype, shape, flat = read_input(tensor(shape=[2, 2, 2], data=list(range(8))), "i")

    assert reshape(flat, shape) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


# --- output_tensor, undeclared ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, datatype, shape, data",
    [
        ([[1, 2], [3, 4]], "INT64", [2, 2], [1, 2, 3, 4]),
        ([1.5, 2], "FP64", [2], [1.5, 2]),
        ([True, False], "BOOL", [2], [True, False]),
        (3, "INT64", [], [3]),
        (0.25, "FP64", [], [0.25]),
        (True, "BOOL", [], [True]),
        ("hello", "BYTES", [], ["hello"]),
        (["a", "b"], "BYTES", [2], ["a", "b"]),
        ([], "FP64", [0], []),
        ([[], []], "FP64", [2, 0], []),
        ([2**63], "FP64", [1], [2**63]),  # too big for INT64
        ([-(2**63), 2**63 - 1], "INT64", [2], [-(2**63), 2**63 - 1]),
        ([1, "a"], "BYTES", [2], ["1", "a"]),
        ([1, True], "BYTES", [2], ["1", "true"]),
        (None, "BYTES", [], ["null"]),
    ],
)
def test_undeclared_outputs_take_a_datatype_guessed_from_the_values(value, datatype, shape, data):
    assert output_tensor("out", value, None) == {"name": "out", "datatype": datatype, "shape": shape, "data": data}


def test_an_undeclared_object_answers_as_bytes_of_its_json_text():
    out = output_tensor("probabilities", {"setosa": 0.5, "virginica": 0.5}, None)

    assert out["datatype"] == "BYTES"
    assert out["shape"] == []
    assert [json.loads(text) for text in out["data"]] == [{"setosa": 0.5, "virginica": 0.5}]


def test_a_list_of_objects_is_a_bytes_tensor_of_json_texts():
    out = output_tensor("items", [{"a": 1}, {"b": [2]}], None)

    assert (out["datatype"], out["shape"]) == ("BYTES", [2])
    assert [json.loads(text) for text in out["data"]] == [{"a": 1}, {"b": [2]}]


@pytest.mark.parametrize("ragged", [[[1], [2, 3]], [[1, 2], 3], [1, [2]], [[[1]], [2]], [["the", 2], ["cat", 1, 0]]])
def test_a_ragged_value_is_one_bytes_element_of_its_json_text(ragged):
    out = output_tensor("r", ragged, None)

    assert (out["name"], out["datatype"], out["shape"]) == ("r", "BYTES", [1])
    (text,) = out["data"]
    assert json.loads(text) == ragged


def test_a_regular_list_of_pairs_keeps_its_shape_as_bytes():
    out = output_tensor("top", [["the", 2], ["cat", 1]], None)

    assert out == {"name": "top", "datatype": "BYTES", "shape": [2, 2], "data": ["the", "2", "cat", "1"]}


# --- output_tensor, declared ------------------------------------------------------------------


def test_a_declared_float_output_answers_floats_in_the_declared_type():
    spec = TensorSpec("y", "FP32", (-1,))

    assert output_tensor("y", [1, 2.5, 3], spec) == {"name": "y", "datatype": "FP32", "shape": [3], "data": [1.0, 2.5, 3.0]}
    assert all(isinstance(x, float) for x in output_tensor("y", [1, 2], spec)["data"])


def test_a_declared_scalar_output():
    assert output_tensor("sum", 6.5, TensorSpec("sum", "FP64", ())) == {
        "name": "sum", "datatype": "FP64", "shape": [], "data": [6.5],
    }
    assert output_tensor("count", 3, TensorSpec("count", "INT64", ())) == {
        "name": "count", "datatype": "INT64", "shape": [], "data": [3],
    }


def test_a_declared_shape_with_any_sizes():
    spec = TensorSpec("scores", "FP32", (-1, 3))

    out = output_tensor("scores", [[0.1, 0.2, 0.7], [1, 0, 0]], spec)

    assert out["shape"] == [2, 3]
    assert out["data"] == [0.1, 0.2, 0.7, 1.0, 0.0, 0.0]


def test_a_declared_bytes_output_holds_text_of_what_is_not_a_string():
    spec = TensorSpec("label", "BYTES", (-1,))

    assert output_tensor("label", ["a", 1, {"k": True}], spec)["data"] == ["a", "1", '{"k":true}']


def test_a_ragged_value_of_a_declared_bytes_output_is_its_json_text():
    vector = output_tensor("top", [["the", 2], ["cat", 1, 0]], TensorSpec("top", "BYTES", (-1,)))
    scalar = output_tensor("top", [["the", 2], ["cat"]], TensorSpec("top", "BYTES", ()))

    assert (vector["shape"], json.loads(vector["data"][0])) == ([1], [["the", 2], ["cat", 1, 0]])
    assert (scalar["shape"], json.loads(scalar["data"][0])) == ([], [["the", 2], ["cat"]])


@pytest.mark.parametrize(
    "spec, value, problem",
    [
        (TensorSpec("y", "FP32", (-1,)), [[1], [2, 3]], "output 'y' is a ragged list, not a tensor"),
        (TensorSpec("y", "BYTES", (-1, 2)), [["a"], ["b", "c"]], "output 'y' is a ragged list, not a tensor"),
        (TensorSpec("y", "FP32", (-1,)), ["x"], "output 'y': value 0 is \"x\"; FP32 takes a number"),
        (TensorSpec("y", "FP32", (-1,)), [1e39], "FP32 takes a number within"),
        (TensorSpec("y", "FP16", ()), 70000, "FP16 takes a number within"),
        (TensorSpec("y", "INT64", (-1,)), [1.5], "INT64 takes a whole number"),
        (TensorSpec("y", "INT8", (-1,)), [127, 128], "value 1 is 128; INT8 takes a whole number from -128 to 127"),
        (TensorSpec("y", "UINT8", (-1,)), [-1], "UINT8 takes a whole number from 0 to 255"),
        (TensorSpec("y", "BOOL", (-1,)), [1, 0], "BOOL takes true or false"),
        (TensorSpec("y", "FP32", (-1, 3)), [[1, 2]], "output 'y' has shape [1, 2]; the model takes [-1, 3]"),
        (TensorSpec("y", "FP32", (-1,)), [[1, 2]], "output 'y' has shape [1, 2]; the model takes [-1]"),
        (TensorSpec("y", "FP64", ()), [1.0], "output 'y' has shape [1]; the model takes []"),
        (TensorSpec("y", "FP64", (2,)), [1.0, 2.0, 3.0], "has shape [3]; the model takes [2]"),
    ],
)
def test_a_value_that_does_not_fit_the_declared_output_raises(spec, value, problem):
    with pytest.raises(TensorError) as caught:
        output_tensor("y", value, spec)

    assert problem in str(caught.value)


def test_check_shape_takes_minus_one_as_any_size():
    spec = TensorSpec("x", "FP32", (-1, 4))

    spec.check_shape([0, 4], "input")
    spec.check_shape([1000, 4], "input")
    for shape in ([4], [1, 3], [1, 4, 1]):
        with pytest.raises(TensorError) as caught:
            spec.check_shape(shape, "input")
        assert str(caught.value) == f"input 'x' has shape {shape}; the model takes [-1, 4] (-1 is any size)"


def test_a_tensor_spec_is_public_as_the_protocols_metadata():
    assert TensorSpec("x", "FP32", (-1, 4)).public() == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}


# --- [models.v2] in the configuration -------------------------------------------------------


def http_model(**keys):
    return {"id": "m", "type": "http", "url": "http://127.0.0.1:9/predict", **keys}


def subprocess_model(**keys):
    return {"id": "s", "type": "subprocess", "command": ["python", "model.py"], **keys}


def spec_of(model: dict):
    (spec,) = parse_config({"models": [model]}, environ={}).models
    return spec


def problems_of(*models) -> list:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": list(models)}, environ={})
    return caught.value.problems


def problem_at(model: dict, path: str) -> str:
    problems = problems_of(model)
    messages = [message for where, message in problems if where == path]
    assert messages, f"no problem at {path!r}: {problems!r}"
    return messages[0]


def test_a_model_without_a_v2_table_has_the_default():
    spec = spec_of(http_model())

    assert spec.v2 is DEFAULT_V2
    assert spec.v2 == V2Spec(inputs=(), outputs=(), platform=None, version="1", native=False, model=None)
    assert "v2" not in spec.public()


def test_a_good_v2_table_is_a_v2spec_of_tensor_specs():
    spec = spec_of(subprocess_model(v2={
        "platform": "sklearn",
        "version": "3",
        "inputs": [{"name": "instances", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "bytes", "shape": [-1]},
            {"name": "total", "datatype": "int64", "shape": []},
        ],
    }))

    assert isinstance(spec, SubprocessModelSpec)
    assert spec.v2 == V2Spec(
        inputs=(TensorSpec("instances", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "BYTES", (-1,)), TensorSpec("total", "INT64", ())),
        platform="sklearn",
        version="3",
    )
    assert spec.public()["v2"] == {
        "inputs": [{"name": "instances", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "total", "datatype": "INT64", "shape": []}],
        "version": "3",
        "native": False,
        "platform": "sklearn",
    }


def test_a_native_http_model_names_its_model_on_the_server():
    spec = spec_of(http_model(url="http://127.0.0.1:8000", v2={"native": True, "model": "doubler"}))

    assert isinstance(spec, HttpModelSpec)
    assert (spec.v2.native, spec.v2.model, spec.v2.inputs, spec.v2.outputs) == (True, "doubler", (), ())
    assert spec.public()["v2"]["model"] == "doubler"


def test_a_native_model_may_leave_its_name_out():
    assert spec_of(http_model(v2={"native": True})).v2.model is None


def test_an_empty_v2_table_declares_nothing():
    assert spec_of(http_model(v2={})).v2 == V2Spec()


def test_the_example_configuration_declares_adder_and_iris():
    by_id = {spec.id: spec for spec in load_config(EXAMPLE, environ={}).models}

    assert by_id["iris"].v2 == V2Spec(
        inputs=(TensorSpec("instances", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "BYTES", (-1,)), TensorSpec("scores", "FP32", (-1, 3))),
        platform="sklearn",
    )
    assert by_id["adder"].v2 == V2Spec(
        inputs=(TensorSpec("numbers", "FP64", (-1,)),),
        outputs=(TensorSpec("sum", "FP64", ()), TensorSpec("count", "INT64", ())),
    )
    assert by_id["sentiment"].v2 is DEFAULT_V2


@pytest.mark.parametrize("datatype", ["FLOAT", "F32", "", "STRING"])
def test_a_bad_datatype_is_reported_at_its_key_path(datatype):
    model = http_model(v2={"outputs": [{"name": "y", "datatype": "FP32", "shape": [1]},
                                       {"name": "z", "datatype": datatype, "shape": [1]}]})

    problems = dict(problems_of(model))

    assert "models[0].v2.outputs[1].datatype" in problems, problems
    if datatype:
        assert problems["models[0].v2.outputs[1].datatype"].startswith("must be one of BOOL, UINT8")
        assert repr(datatype) in problems["models[0].v2.outputs[1].datatype"]


def test_a_datatype_that_is_not_a_string_is_reported():
    assert problem_at(http_model(v2={"inputs": [{"name": "x", "datatype": 32, "shape": [1]}]}),
                      "models[0].v2.inputs[0].datatype") == "must be a string, got an integer"


@pytest.mark.parametrize(
    "shape, problem",
    [
        ([-2], "got -2"),
        ([4, 1.5], "got 1.5"),
        ([True], "got True"),
        ("4", "must be a list of sizes, got str"),
        (4, "must be a list of sizes, got int"),
        ([1] * 33, "has 33 dimensions; at most 32"),
    ],
)
def test_a_bad_shape_is_reported_at_its_key_path(shape, problem):
    model = subprocess_model(v2={"inputs": [{"name": "x", "datatype": "FP32", "shape": shape}]})

    assert problem in problem_at(model, "models[0].v2.inputs[0].shape")


def test_a_declared_shape_may_use_minus_one_and_zero():
    spec = spec_of(http_model(v2={"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 0, 3]}]}))

    assert spec.v2.inputs == (TensorSpec("x", "FP32", (-1, 0, 3)),)


def test_each_tensor_key_is_required():
    model = http_model(v2={"inputs": [{}]})

    problems = [(where, message) for where, message in problems_of(model) if where.startswith("models[0].v2")]

    assert sorted(problems) == [
        ("models[0].v2.inputs[0].datatype", "is required"),
        ("models[0].v2.inputs[0].name", "is required"),
        ("models[0].v2.inputs[0].shape", "is required"),
    ]


def test_native_is_only_for_http_models():
    assert problem_at(subprocess_model(v2={"native": True}), "models[0].v2.native") == (
        "only an HTTP model's server can speak v2 itself"
    )


def test_native_must_be_a_boolean():
    assert problem_at(http_model(v2={"native": "yes"}), "models[0].v2.native") == "must be true or false, got a string"


def test_model_needs_native():
    assert "it needs native = true" in problem_at(http_model(v2={"model": "doubler"}), "models[0].v2.model")
    assert "it needs native = true" in problem_at(
        http_model(v2={"model": "doubler", "native": False}), "models[0].v2.model"
    )


def test_a_native_model_declares_no_tensors():
    model = http_model(v2={"native": True, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]})

    assert "leave them out" in problem_at(model, "models[0].v2.native")


def test_a_tensor_name_declared_twice_is_reported():
    model = http_model(v2={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1]},
        {"name": "y", "datatype": "FP32", "shape": [1]},
        {"name": "x", "datatype": "INT64", "shape": [2]},
    ]})

    assert problem_at(model, "models[0].v2.inputs[2].name") == "'x' is declared twice"


def test_an_input_and_an_output_may_share_a_name():
    spec = spec_of(http_model(v2={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                                  "outputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}))

    assert spec.v2.inputs[0].name == spec.v2.outputs[0].name == "x"


def test_unknown_keys_are_reported_in_the_v2_table_and_in_a_tensor():
    model = http_model(v2={"colour": "blue", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "dims": [1]}]})

    problems = dict(problems_of(model))

    assert problems["models[0].v2.colour"] == "is not a known key"
    assert problems["models[0].v2.inputs[0].dims"] == "is not a known key"


@pytest.mark.parametrize(
    "v2, path, problem",
    [
        (5, "models[0].v2", "must be a table, got an integer"),
        ({"inputs": {"name": "x"}}, "models[0].v2.inputs", "must be a list of {name, datatype, shape} tables"),
        ({"outputs": ["y"]}, "models[0].v2.outputs[0]", "must be a table with name, datatype and shape"),
        ({"version": "1 2"}, "models[0].v2.version", "must be letters, digits"),
        ({"version": 2}, "models[0].v2.version", "must be a string, got an integer"),
        ({"platform": 7}, "models[0].v2.platform", "must be a string"),
        ({"inputs": [{"name": "", "datatype": "FP32", "shape": [1]}]}, "models[0].v2.inputs[0].name", "must not be empty"),
    ],
)
def test_other_bad_v2_tables_are_reported(v2, path, problem):
    assert problem in problem_at(http_model(v2=v2), path)


def test_every_problem_of_every_model_is_reported_together():
    problems = problems_of(
        http_model(v2={"inputs": [{"name": "x", "datatype": "FP33", "shape": [1]}]}),
        subprocess_model(v2={"native": True, "model": "m"}),
    )

    paths = [where for where, _ in problems]
    assert "models[0].v2.inputs[0].datatype" in paths
    assert "models[1].v2.native" in paths
    lines = ConfigError(problems, "x.toml").lines()
    assert any(line.startswith("x.toml: models[1].v2.native: ") for line in lines)


# --- aibackend.worker.tensor ----------------------------------------------------------------


def test_worker_tensor_is_a_numpy_array_of_the_datatype():
    import numpy

    from aibackend.worker import tensor as worker_tensor

    x = worker_tensor({"x": [[1, 2], [3, 4]]}, "x", "FP32")
    n = worker_tensor({"n": [1, 2, 3]}, "n", "INT64")
    words = worker_tensor({"words": ["a", "b"]}, "words", "BYTES")
    flags = worker_tensor({"f": [True, False]}, "f", "BOOL")
    small = worker_tensor({"u": [0, 255]}, "u", "UINT8")

    assert isinstance(x, numpy.ndarray)
    assert (x.dtype, x.shape, x.tolist()) == (numpy.float32, (2, 2), [[1.0, 2.0], [3.0, 4.0]])
    assert (n.dtype, n.tolist()) == (numpy.int64, [1, 2, 3])
    assert (words.dtype, words.tolist()) == (object, ["a", "b"])
    assert (flags.dtype, flags.tolist()) == (numpy.bool_, [True, False])
    assert small.dtype == numpy.uint8


def test_worker_tensor_takes_numpy_dtypes_and_none():
    import numpy

    from aibackend.worker import tensor as worker_tensor

    assert worker_tensor({"x": [1.5]}, "x", "float16").dtype == numpy.float16
    assert worker_tensor({"x": [1.5]}, "x", numpy.float64).dtype == numpy.float64
    assert worker_tensor({"x": [1, 2]}, "x").dtype.kind == "i"
    assert worker_tensor({"x": 3.0}, "x", "FP64").shape == ()


@pytest.mark.parametrize("data", [{}, {"y": [1]}, None, [1, 2], "x"])
def test_worker_tensor_of_a_missing_input_is_bad_input(data):
    from aibackend.worker import BadInput, tensor as worker_tensor

    with pytest.raises(BadInput) as caught:
        worker_tensor(data, "x", "FP32")

    assert caught.value.status == 400
    assert str(caught.value) == "the request has no input 'x'"


@pytest.mark.parametrize("datatype", [None, "FP32", "INT64"])
def test_worker_tensor_of_a_ragged_input_is_bad_input(datatype):
    from aibackend.worker import BadInput, tensor as worker_tensor

    with pytest.raises(BadInput) as caught:
        worker_tensor({"x": [[1, 2], [3]]}, "x", datatype)

    assert caught.value.status == 400
    assert "'x'" in str(caught.value)


@pytest.mark.parametrize("value, datatype", [(["a"], "FP32"), ([300], "INT8"), ([-1], "UINT8"), ([{"a": 1}], "FP64")])
def test_worker_tensor_of_values_that_do_not_fit_is_bad_input(value, datatype):
    from aibackend.worker import BadInput, tensor as worker_tensor

    with pytest.raises(BadInput) as caught:
        worker_tensor({"x": value}, "x", datatype)

    assert caught.value.status == 400
    assert f"input 'x' is not a {datatype} tensor" in str(caught.value)


def test_worker_tensor_without_numpy_is_the_data_as_sent(monkeypatch):
    from aibackend.worker import tensor as worker_tensor

    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now raises ImportError

    assert worker_tensor({"x": [[1, 2], [3]]}, "x", "FP32") == [[1, 2], [3]]
