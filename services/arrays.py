"""Arrays on the wire for high-rate clients: NumPy's .npy format in and out, no JSON, no base64.

    POST /act?model=cartpole   Content-Type: application/x-npy   body: numpy.save of [N, *obs_shape]
    any endpoint that offers it, with  Accept: application/x-npy  -> its main array as .npy

.npy is self-describing (a short text header with dtype, byte order and shape, then the raw
bytes), written by `numpy.save` and read by `numpy.load`; libraries exist for C, C++, Rust,
Julia and JavaScript. Pickled (object) arrays are refused. JSON stays the default both ways;
errors are always JSON.
"""

from __future__ import annotations

import io
import math

import numpy as np
from starlette.responses import Response

from services.contracts.arrays import NPY, npy_bytes  # noqa: F401 - the write side is a contract
from services.runtime.errors import ApiError, bad_request, clip, shown

JSON = "application/json"
MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000  # numpy's own default limit on a header's length
READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy(body: bytes, field: str = "body") -> np.ndarray:
    """A request body holding one .npy array of numbers; a 400 naming what is wrong otherwise.

    The header is read first and checked against the bytes that follow it: the array is a view
    of the body, so a header declaring a billion rows over a few bytes allocates nothing. Any
    byte order, Fortran order and float16 are read as they are (the model's input dtype is made
    later); structured, object and 0-d arrays are refused."""
    if not body.startswith(MAGIC):
        raise bad_request("invalid_npy", "the body is not a .npy file (numpy.save's format, starting with "
                          "\\x93NUMPY)", field)
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in READERS:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here (1.0 and 2.0 are)")
        shape, fortran_order, dtype = READERS[version](stream, max_header_size=MAX_HEADER)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise bad_request("invalid_npy", f"cannot read the .npy header: {clip(str(exc), 200)}", field) from None
    if dtype.hasobject:
        raise bad_request("invalid_npy", "cannot read the .npy body: object (pickled) arrays are not accepted", field)
    if dtype.kind not in "iuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise bad_request("invalid_dtype", f"the array must hold numbers (float or integer), not {dtype}", field)
    if len(shape) == 0:
        raise bad_request("invalid_shape", "the array has no dimensions (0-d); send rows [N, ...]", field)
    count = math.prod(shape)  # Python ints: no overflow however large the declared shape
    expected, held = count * dtype.itemsize, len(body) - stream.tell()
    if held != expected:
        what = "bytes follow the array: send one array per body" if held > expected else "bytes are missing"
        raise bad_request("invalid_npy", f"the header declares shape {shown(shape)} of {dtype} ({expected} bytes) but "
                          f"{held} bytes follow it: {abs(held - expected)} {what}", field)
    array = np.frombuffer(body, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def npy_response(array: np.ndarray, **headers: str) -> Response:
    """The array as the whole answer; what JSON would say beside it goes in x-... headers."""
    return Response(npy_bytes(array), media_type=NPY,
                    headers={f"x-{k.replace('_', '-')}": str(v) for k, v in headers.items()})


def answer_form(accept: str | None, offered: tuple[str, ...] = (JSON, NPY)) -> str:
    """The media type to answer in, from the Accept header: the client's preference among
    `offered` (q values honoured; */* and a missing header mean the first, JSON). 406 when the
    client accepts none of them."""
    if not accept or not accept.strip():
        return offered[0]
    entries = []
    for item in accept.split(","):
        media, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        entries.append((media.lower(), q))

    def quality(candidate: str) -> float:
        for pattern in (candidate, candidate.split("/")[0] + "/*", "*/*"):  # the most specific match counts
            found = [q for media, q in entries if media == pattern]
            if found:
                return max(found)
        return 0.0

    q, _, best = max((quality(c), -i, c) for i, c in enumerate(offered))  # ties: the first offered
    if q <= 0:
        raise ApiError(406, "not_acceptable", f"this endpoint answers in {' or '.join(offered)}; the Accept header "
                       f"{shown(accept)} takes neither", "Accept")
    return best
