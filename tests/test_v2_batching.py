"""
The Open Inference Protocol's batch dimension (issue 17, item 4), in parts: which requests
are concatenated (L{aibackend.v2.OpenInference._tensor_batch}, L{aibackend.tensors.batch_rows}),
and how rows are joined and split back (L{aibackend.tensors.concat_rows}, L{split_rows}).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from zope.interface import implementer

from aibackend.configbase import V2Spec
from aibackend.interfaces import IBatching
from aibackend.tensors import TensorError, TensorSpec, batch_rows, concat_rows, split_rows
from aibackend.v2 import OpenInference

ROWS = (TensorSpec("x", "FP32", (-1, 2)), TensorSpec("k", "INT64", (-1,)))


@implementer(IBatching)
class Batching:
    batching = batch_stats = None

    def __init__(self, inputs=ROWS):
        self.spec = SimpleNamespace(v2=V2Spec(inputs=inputs))

    def admit(self, waiting):
        pass

    def send_batch(self, items):
        return []


def tensors(rows: int = 2, **more):
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": [1.0] * 2 * rows},
                       {"name": "k", "datatype": "INT64", "shape": [rows], "data": [1] * rows}], **more}


def batch_of(document, model=None):
    model = model or Batching()
    return OpenInference._tensor_batch(model, document, OpenInference._inputs(document))


def test_a_request_to_a_model_with_a_batch_dimension_batches_by_its_rows():
    batch = batch_of(tensors(3))

    assert batch.rows == 3
    assert batch == batch_of(tensors(3)) and batch.key == batch_of(tensors(5)).key  # rows are not in the key


@pytest.mark.parametrize("other", [
    {"parameters": {"temperature": 2}},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0] * 4, "parameters": {"a": 1}},
                {"name": "k", "datatype": "INT64", "shape": [2], "data": [1, 1]}]},
    {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 2], "data": [1.0] * 4},
                {"name": "k", "datatype": "INT64", "shape": [2], "data": [1, 1]}]},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4},
                {"name": "k", "datatype": "INT64", "shape": [1], "data": [1]}]},
])
def test_requests_whose_parameters_datatypes_or_other_dimensions_differ_have_other_keys(other):
    assert batch_of({**tensors(2), **other}).key != batch_of(tensors(2)).key


def test_no_batch_without_a_batching_model_a_declared_batch_dimension_or_one_row_count():
    assert OpenInference._tensor_batch(object(), tensors(2), OpenInference._inputs(tensors(2))) is None
    assert batch_of(tensors(2), Batching(inputs=(TensorSpec("x", "FP32", (2, 2)),))) is None
    assert batch_of(tensors(2), Batching(inputs=())) is None
    mixed = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0] * 4},
                        {"name": "k", "datatype": "INT64", "shape": [3], "data": [1, 1, 1]}]}
    assert batch_of(mixed) is None
    assert batch_rows([("x", "FP32", [0, 2], [])], ROWS[:1]) is None


def test_rows_are_joined_in_order_and_split_back_by_each_requests_count():
    body = concat_rows([json.dumps({"x": [[1, 2]], "k": [1]}).encode(),
                        json.dumps({"x": [[3, 4], [5, 6]], "k": [2, 3]}).encode()])

    assert json.loads(body) == {"x": [[1, 2], [3, 4], [5, 6]], "k": [1, 2, 3]}
    assert split_rows({"y": [10, 20, 30], "z": [[1], [2], [3]]}, [1, 2]) == [
        {"y": [10], "z": [[1]]}, {"y": [20, 30], "z": [[2], [3]]}]
    assert split_rows([7, 8, 9], [2, 1]) == [[7, 8], [9]]  # one output, not named


@pytest.mark.parametrize("value, said", [
    ({"y": [1, 2]}, "output 'y' is a list of 2 rows for a batch of 3 rows"),
    ({"y": [1, 2, 3], "label": "cat"}, "output 'label' is not a list of rows for a batch of 3 rows"),
    (5, "output is not a list of rows"),
])
def test_an_answer_without_one_row_per_row_cannot_be_split(value, said):
    with pytest.raises(TensorError) as raised:
        split_rows(value, [1, 2])

    assert str(raised.value).startswith(said)
