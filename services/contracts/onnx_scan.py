"""Which tensors of an ONNX file keep their bytes in other files (external data), read from the
protobuf wire format itself: the serving image has onnxruntime but not the onnx package.

A tensor with data_location EXTERNAL names a file onnxruntime would open beside the model; the
card's sha256 covers model.onnx only, so such a model is refused whatever the location says.
Tensors live in graph initializers, sparse initializers, node attributes (Constant's value,
If/Loop/Scan subgraphs) and functions; every one of them is visited.
"""

from __future__ import annotations

MAX_DEPTH = 64  # graphs nest in attributes; a deeper file is refused rather than recursed into

# field numbers in onnx.proto (the ones that hold tensors, or messages that do)
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODES, GRAPH_INITIALIZERS, GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
NODE_ATTRIBUTES, FUNCTION_NODES = 5, 7
ATTRIBUTE_T, ATTRIBUTE_G, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS = 5, 6, 10, 11
ATTRIBUTE_SPARSE_TENSOR, ATTRIBUTE_SPARSE_TENSORS = 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1


class NotOnnx(ValueError):
    """The bytes are not a well-formed protobuf (a truncated or corrupt file)."""


def external_tensors(data: bytes) -> list[str]:
    """Names of the tensors stored outside the file; [] for a self-contained model."""
    found: list[str] = []
    view = memoryview(data)
    for number, value in _fields(view):
        if number == MODEL_GRAPH:
            _graph(value, found, 0)
        elif number == MODEL_FUNCTIONS:
            _nodes(value, FUNCTION_NODES, found, 0)
    return found


def _graph(graph: memoryview, found: list, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotOnnx(f"graphs nested over {MAX_DEPTH} deep")
    for number, value in _fields(graph):
        if number == GRAPH_INITIALIZERS:
            _tensor(value, found)
        elif number == GRAPH_SPARSE_INITIALIZERS:
            _sparse(value, found)
        elif number == GRAPH_NODES:
            _node(value, found, depth)


def _nodes(message: memoryview, field: int, found: list, depth: int) -> None:
    for number, value in _fields(message):
        if number == field:
            _node(value, found, depth)


def _node(node: memoryview, found: list, depth: int) -> None:
    for number, attribute in _fields(node):
        if number != NODE_ATTRIBUTES:
            continue
        for field, value in _fields(attribute):
            if field in (ATTRIBUTE_T, ATTRIBUTE_TENSORS):
                _tensor(value, found)
            elif field in (ATTRIBUTE_SPARSE_TENSOR, ATTRIBUTE_SPARSE_TENSORS):
                _sparse(value, found)
            elif field in (ATTRIBUTE_G, ATTRIBUTE_GRAPHS):
                _graph(value, found, depth + 1)


def _sparse(sparse: memoryview, found: list) -> None:
    for number, value in _fields(sparse):
        if number in (SPARSE_VALUES, SPARSE_INDICES):
            _tensor(value, found)


def _tensor(tensor: memoryview, found: list) -> None:
    name, external = "", False
    for number, value in _fields(tensor, varints=True):
        if number == TENSOR_NAME:
            name = bytes(value[:200]).decode("utf-8", "replace")
        elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and value == EXTERNAL):
            external = True
    if external:
        found.append(name or "(unnamed)")


def _fields(message: memoryview, varints: bool = False):
    """(field number, value) of each field: the payload of length-delimited ones (a view, not a
    copy); varint values too when asked; other wire types skipped."""
    i, end = 0, len(message)
    while i < end:
        key, i = read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(message, i)
            if varints:
                yield number, value
        elif wire == 2:
            length, i = read_varint(message, i)
            if i + length > end:
                raise NotOnnx(f"a field runs {i + length - end} bytes past the end (truncated?)")
            yield number, message[i:i + length]
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > end:
                raise NotOnnx("a fixed-size field runs past the end (truncated?)")
        else:
            raise NotOnnx(f"wire type {wire} at byte {i}: not a protobuf message")


def read_varint(data: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise NotOnnx("a varint runs past the end (truncated?)")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
