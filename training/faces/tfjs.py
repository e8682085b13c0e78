"""Read TensorFlow.js weights (a weights manifest JSON and its .bin shards) into numpy arrays.

    weights = read_weights(FACE_API / "model" / "face_recognition_model-weights_manifest.json")
    weights["conv32_down/conv/filters"]   # float32 ndarray, in TF's layout (HWIO for convolutions)

face-api ships its weights quantised to uint8 with a per-tensor scale and minimum:
value = byte * scale + min, exactly as tfjs-core's `io.decodeWeights` does it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def read_weights(manifest_path: Path) -> dict[str, np.ndarray]:
    manifest_path = Path(manifest_path)
    weights: dict[str, np.ndarray] = {}
    for group in json.loads(manifest_path.read_text()):
        data = b"".join((manifest_path.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quantization = spec.get("quantization")
            stored = DTYPES[quantization["dtype"] if quantization else spec["dtype"]]
            size = count * np.dtype(stored).itemsize
            raw = np.frombuffer(data, stored, count, offset)
            offset += size
            if quantization:
                if quantization["dtype"] == "float16":
                    values = raw.astype(np.float32)
                else:  # uint8 / uint16 affine quantisation, in float64 then stored as float32, as JS does
                    values = raw.astype(np.float64) * quantization["scale"] + quantization["min"]
                values = values.astype(DTYPES[spec["dtype"]])
            else:
                values = raw.astype(DTYPES[spec["dtype"]])
            weights[spec["name"]] = values.reshape(shape)
        if offset != len(data):
            raise ValueError(f"{manifest_path}: {len(data) - offset} bytes of the weights are not described")
    return weights
