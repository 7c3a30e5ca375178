"""
Tensors of the Open Inference Protocol (KServe v2), as JSON: checking them and turning
them into a model's plain JSON and back.

Pure on purpose (no Twisted, no numpy): the configuration validates declared tensors
with it, and L{aibackend.v2} uses it on every adapted request.

The mapping between a v2 request and a model that takes plain JSON:

  - request: each input tensor becomes one key of a JSON object, its name, holding the
    data as nested lists in the tensor's shape (a scalar for shape C{[]});
  - answer: each key of the model's JSON object is an output tensor of that name; its
    shape is read off the nesting of the lists, its datatype is the declared one, or
    else BOOL, INT64, FP64 or BYTES from the values. A value that is not a tensor (an
    object, a ragged list) answers as BYTES holding its JSON text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

# datatype -> (kind, lowest, highest); kind is "bool", "int", "float" or "bytes".
DATATYPES = {
    "BOOL": ("bool", None, None),
    "UINT8": ("int", 0, 2**8 - 1),
    "UINT16": ("int", 0, 2**16 - 1),
    "UINT32": ("int", 0, 2**32 - 1),
    "UINT64": ("int", 0, 2**64 - 1),
    "INT8": ("int", -(2**7), 2**7 - 1),
    "INT16": ("int", -(2**15), 2**15 - 1),
    "INT32": ("int", -(2**31), 2**31 - 1),
    "INT64": ("int", -(2**63), 2**63 - 1),
    "FP16": ("float", -65504.0, 65504.0),
    "FP32": ("float", -3.4028234663852886e38, 3.4028234663852886e38),
    "BF16": ("float", -3.3895313892515355e38, 3.3895313892515355e38),
    # A whole number past a double's range (JSON allows it) does not fit either.
    "FP64": ("float", -sys.float_info.max, sys.float_info.max),
    "BYTES": ("bytes", None, None),
}
# At most this many dimensions; deeper nesting is refused rather than recursed into.
MAX_DIMENSIONS = 32


class TensorError(ValueError):
    """A tensor is not what it says it is (the message says where and why)."""


@dataclass(frozen=True)
class TensorSpec:
    """
    A declared input or output: a name, a datatype, and a shape whose C{-1} dimensions
    take any size.
    """

    name: str
    datatype: str
    shape: tuple

    def public(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check_shape(self, shape, what: str) -> None:
        if len(shape) != len(self.shape) or any(
            want != -1 and want != got for want, got in zip(self.shape, shape)
        ):
            raise TensorError(
                f"{what} {self.name!r} has shape {list(shape)}; the model takes {list(self.shape)} "
                "(-1 is any size)"
            )


def check_shape_value(shape, *, declared: bool) -> str | None:
    """What is wrong with a shape (a list of sizes; C{-1} allowed if C{declared}), or None."""
    if not isinstance(shape, list):
        return f"must be a list of sizes, got {type(shape).__name__}"
    if len(shape) > MAX_DIMENSIONS:
        return f"has {len(shape)} dimensions; at most {MAX_DIMENSIONS}"
    lowest = -1 if declared else 0
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < lowest:
            return f"sizes are whole numbers{' (or -1 for any size)' if declared else ''} at least 0, got {size!r}"
    return None


def count_of(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def flatten(data, where: str) -> list:
    """The values of nested lists, in row-major order."""
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [(iter(data), 1)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth >= MAX_DIMENSIONS:
                    raise TensorError(f"{where} is nested more than {MAX_DIMENSIONS} deep")
                stack.append((iter(item), depth + 1))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def check_values(flat: list, datatype: str, where: str) -> None:
    """Every value fits C{datatype}: C{TensorError} names the first that does not."""
    kind, lowest, highest = DATATYPES[datatype]
    for index, value in enumerate(flat):
        if kind == "float":
            good = isinstance(value, (int, float)) and not isinstance(value, bool) and lowest <= value <= highest
        elif kind == "int":
            good = isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= highest
        elif kind == "bool":
            good = isinstance(value, bool)
        else:
            good = isinstance(value, str)
        if not good:
            wanted = {
                "float": f"a number within {datatype}'s range",
                "int": f"a whole number from {lowest} to {highest}",
                "bool": "true or false",
                "bytes": "a UTF-8 string",
            }[kind]
            raise TensorError(f"{where}: value {index} is {json.dumps(value)[:40]}; {datatype} takes {wanted}")


def reshape(flat: list, shape):
    """Flat values as nested lists of C{shape} (a scalar for C{[]})."""
    if not shape:
        return flat[0]

    def build(offset, dims):
        if len(dims) == 1:
            return flat[offset:offset + dims[0]]
        step = count_of(dims[1:])
        return [build(offset + i * step, dims[1:]) for i in range(dims[0])]

    return build(0, list(shape))


def read_input(tensor, where: str) -> tuple[str, str, list, list]:
    """
    Check one request input (name, shape, datatype, data) and give
    C{(name, datatype, shape, flat data)}.
    """
    if not isinstance(tensor, dict):
        raise TensorError(f"{where} must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError(f"{where}.name must be a non-empty string")
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise TensorError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    problem = check_shape_value(shape, declared=False)
    if problem:
        raise TensorError(f"{where}: shape {problem}")
    if "data" not in tensor:
        raise TensorError(f"{where} has no data")
    flat = flatten(tensor["data"], where)
    if len(flat) != count_of(shape):
        raise TensorError(f"{where} has {len(flat)} values; its shape {shape} holds {count_of(shape)}")
    check_values(flat, datatype, where)
    return name, datatype, shape, flat


def _shape_of(value) -> tuple[list, list] | None:
    """
    C{(shape, flat)} of nested lists that are regular (every list at a depth has the same
    length, every leaf at the same depth), or None for a ragged value.
    """
    shape = []
    probe = value
    while isinstance(probe, list):
        if len(shape) >= MAX_DIMENSIONS:
            return None
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat: list = []

    def walk(item, depth):
        if depth == len(shape):
            if isinstance(item, list):
                return False
            flat.append(item)
            return True
        return isinstance(item, list) and len(item) == shape[depth] and all(walk(x, depth + 1) for x in item)

    return (shape, flat) if walk(value, 0) else None


def _guess_datatype(flat: list) -> str:
    if flat and all(isinstance(x, bool) for x in flat):
        return "BOOL"
    if flat and all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        return "INT64" if all(-(2**63) <= x < 2**63 for x in flat) else "FP64"
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        return "FP64"
    return "BYTES"


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def output_tensor(name: str, value, spec: TensorSpec | None) -> dict:
    """
    One model answer value as a v2 output tensor, checked against its declaration.

    @raise TensorError: the value does not fit the declared output.
    """
    found = _shape_of(value)
    if spec is None:
        if found is None:
            return {"name": name, "datatype": "BYTES", "shape": [1], "data": [_as_text(value)]}
        shape, flat = found
        datatype = _guess_datatype(flat)
        if datatype == "BYTES":
            flat = [_as_text(x) for x in flat]
        return {"name": name, "datatype": datatype, "shape": shape, "data": flat}
    if found is None:
        if spec.datatype == "BYTES" and len(spec.shape) <= 1:
            return {"name": name, "datatype": "BYTES", "shape": [1] if spec.shape else [], "data": [_as_text(value)]}
        raise TensorError(f"output {name!r} is a ragged list, not a tensor")
    shape, flat = found
    if spec.datatype == "BYTES":
        flat = [_as_text(x) for x in flat]
    check_values(flat, spec.datatype, f"output {name!r}")
    if spec.datatype in ("FP16", "FP32", "BF16", "FP64"):
        flat = [float(x) for x in flat]
    spec.check_shape(shape, "output")
    return {"name": name, "datatype": spec.datatype, "shape": shape, "data": flat}


# --- batching along the batch dimension (aibackend.batching.RowBatches) ---------------------------


def batch_rows(inputs, declared) -> int | None:
    """
    How many rows a request brings along the batch dimension (its inputs' first), if the
    model declares one: every declared input's shape starts with C{-1} and every input
    given has that many rows. None otherwise (the request is not concatenated with others).

    @param inputs: the request's inputs, as L{read_input} reads them (name, datatype, shape, flat).
    @param declared: the model's declared inputs (L{TensorSpec}s).
    """
    if not declared or not all(tensor.shape and tensor.shape[0] == -1 for tensor in declared):
        return None
    rows = {shape[0] if shape else None for _, _, shape, _ in inputs}
    if len(rows) != 1:
        return None
    (count,) = rows
    return count if isinstance(count, int) and count > 0 else None


def concat_rows(bodies: list) -> bytes:
    """The model bodies (C{{name: rows}} JSON texts, the same names in each) as one, each input's rows in turn."""
    documents = [json.loads(body) for body in bodies]
    names = list(documents[0])
    return json.dumps({name: [row for document in documents for row in document[name]] for name in names}).encode()


def split_rows(value, rows: list) -> list:
    """
    The answer of a concatenated call split back: C{value} (an object of outputs, or one
    output) whose every output has C{sum(rows)} rows, as C{len(rows)} answers of their
    rows each, in order.

    @raise TensorError: an output is not a list of that many rows.
    """
    total = sum(rows)
    outputs = value if isinstance(value, dict) else {None: value}
    for name, output in outputs.items():
        if not isinstance(output, list) or len(output) != total:
            what = f"a list of {len(output)} rows" if isinstance(output, list) else "not a list of rows"
            raise TensorError(f"{'output' if name is None else f'output {name!r}'} is {what} for a batch of "
                              f"{total} rows (each output has one row per row of the inputs, in order)")
    parts = []
    start = 0
    for count in rows:
        end = start + count
        if isinstance(value, dict):
            parts.append({name: output[start:end] for name, output in value.items()})
        else:
            parts.append(value[start:end])
        start = end
    return parts
