"""One model file, run synchronously: what training, evaluation, probes and benchmarks use instead of
their own onnxruntime sessions (the services run theirs through the runtime's batcher).

    predict = Predictor(path)                    # or Predictor.of(entry) for a repository entry
    logits, embedding = predict(images)          # the first input; every output, in the graph's order
    embedding = predict(images, outputs=["embedding"], rows=128)[0]   # in chunks of 128 rows
    action, probabilities, value = predict.run({"observation": batch})  # named inputs

The session is made as the service makes it (device.create_session: the same options, the CPU
unless asked otherwise), and inputs are cast to the element type the graph declares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.contracts import device

ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


class Predictor:
    def __init__(self, path: Path | str, on: str = "cpu", threads: int = 0):
        self.path = Path(path)
        self.session, self.provider, _ = device.create_session(self.path, on, threads)
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_types = {i.name: ELEMENT_TYPES.get(i.type) for i in inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def of(cls, entry, **options) -> "Predictor":
        """A repository entry's model (repository.resolve / verify checked its sha256)."""
        return cls(entry.path, **options)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        cast = {name: np.asarray(value, self.input_types.get(name)) for name, value in feeds.items()}
        return self.session.run(outputs, cast)

    def __call__(self, batch: np.ndarray, outputs: list[str] | None = None, rows: int | None = None) -> list[np.ndarray]:
        """The graph's only (or first) input; `rows` splits the batch into chunks, joined again."""
        name = self.input_names[0]
        if rows is None or len(batch) <= rows:
            return self.run({name: batch}, outputs)
        parts = [self.run({name: batch[i:i + rows]}, outputs) for i in range(0, len(batch), rows)]
        return [np.concatenate(column) for column in zip(*parts)]
