"""Arrays on the wire: NumPy's .npy format (numpy.save's bytes, never pickled). The services
read it with services/arrays.py (every malformed body a 400); clients and benchmarks write it here."""

from __future__ import annotations

import io

import numpy as np

NPY = "application/x-npy"


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()
