"""Store an ONNX model's quantised weights as one byte each, exactly.

face-api ships every weight tensor quantised to 256 levels (uint8 with a scale and a minimum).
Exported as float32 the detector and the descriptor are 22 MB each; here every float32
initializer with at most 256 distinct values becomes uint8 codes plus a 256-entry table,
decoded in the graph (Cast + Gather, folded once when onnxruntime loads the model). The decoded
values are the same float32 numbers, so outputs do not change by a single bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 1024  # small tensors are not worth three extra nodes


def compact(path: Path) -> tuple[int, int]:
    """Rewrite the ONNX file in place; returns (bytes before, bytes after)."""
    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path))
    graph = model.graph
    kept, nodes = [], []
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor)
        table, codes = (np.unique(values, return_inverse=True) if values.dtype == np.float32 and
                        values.size >= MIN_ELEMENTS else (None, None))
        if table is None or len(table) > 256:
            kept.append(tensor)
            continue
        name = tensor.name
        kept.append(numpy_helper.from_array(codes.reshape(values.shape).astype(np.uint8), f"{name}__codes"))
        kept.append(numpy_helper.from_array(table.astype(np.float32), f"{name}__table"))
        nodes.append(helper.make_node("Cast", [f"{name}__codes"], [f"{name}__index"], to=onnx.TensorProto.INT64))
        nodes.append(helper.make_node("Gather", [f"{name}__table", f"{name}__index"], [name], axis=0))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)  # decoders first: the graph stays topologically sorted
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return before, path.stat().st_size
