"""Requests per second from wrk, the HTTP load generator written in C (Debian package `wrk`).

The Python client of the benchmark spends more CPU per request than a small service does, so
on a 2-core machine it, not the server, would set the pace at one connection. wrk, pinned to
the client's cores with one thread, costs a few microseconds per request. Its latency
percentiles are not used (unreliable on these machines); the benchmark's own client gives
those.

Requests are prepared in Python (any body: JSON, multipart, .npy), written to files, and sent
in turn by a small Lua script, so every connection cycles through real, different requests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LUA = r"""
local requests, i = {}, 0
function init(args)
  local folder, count = args[1], tonumber(args[2])
  for k = 0, count - 1 do
    local head = io.open(folder .. "/" .. k .. ".head", "r")
    local path, content_type, accept = head:read("*l"), head:read("*l"), head:read("*l")
    local headers = {["Content-Type"] = content_type}
    for line in head:lines() do  -- any further headers, one "Name: value" per line
      local name, value = line:match("^([^:]+): (.*)$")
      if name then headers[name] = value end
    end
    head:close()
    local file = io.open(folder .. "/" .. k .. ".body", "rb")
    local body = file:read("*a")
    file:close()
    if accept ~= nil and accept ~= "" then headers["Accept"] = accept end
    requests[k + 1] = wrk.format("POST", path, headers, body)
  end
end
function request()
  i = i % #requests + 1
  return requests[i]
end
"""


@dataclass
class Request:
    path: str
    content_type: str
    body: bytes
    accept: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # any others (Triton's Inference-Header-Content-Length)


@dataclass
class Tally:
    """Requests answered over the slices driven so far."""
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def available() -> bool:
    return shutil.which("wrk") is not None


class Wrk:
    """One set of prepared requests, driven at any number of connections against any server."""

    def __init__(self, requests: list[Request], cores: set[int]):
        if not available():
            raise SystemExit("wrk is not installed: apt-get install wrk (or `make benchmark`, which does)")
        self.folder = Path(tempfile.mkdtemp(prefix="wrk-"))
        (self.folder / "requests.lua").write_text(LUA)
        for k, request in enumerate(requests):
            (self.folder / f"{k}.head").write_text(f"{request.path}\n{request.content_type}\n{request.accept}\n" +
                                                   "".join(f"{n}: {v}\n" for n, v in request.headers.items()))
            (self.folder / f"{k}.body").write_bytes(request.body)
        self.count, self.cores = len(requests), cores

    def run(self, url: str, connections: int, seconds: float, tally: Tally) -> None:
        """One slice: wrk with one thread on the client's cores; adds what was answered to tally."""
        command = ["taskset", "-c", ",".join(map(str, sorted(self.cores))), "wrk", "-t1", f"-c{connections}",
                   f"-d{seconds:g}s", "--timeout", "30s", "-s", str(self.folder / "requests.lua"), url, "--",
                   str(self.folder), str(self.count)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
        found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
        if not found:
            raise SystemExit(f"cannot read wrk's output:\n{out}")
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[found.group(3)]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        failures = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
        tally.requests += int(found.group(1)) - failures
        tally.failures += failures
        tally.seconds += float(found.group(2)) * scale

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def multipart(files: list[tuple[str, bytes, str]], field: str | list[str] = "images") -> tuple[bytes, str]:
    """A multipart/form-data body of files: (body, its Content-Type with the boundary). field: the
    form field of every file, or one per file."""
    boundary = "benchmark-7d1c52f0a3b94e6c"
    fields = [field] * len(files) if isinstance(field, str) else field
    parts = []
    for (name, data, content_type), field in zip(files, fields):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
