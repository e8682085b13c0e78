"""The access log: one line per answered request, BentoML's format, without its cost.

BentoML writes a line for every request on the event loop (measured 6-10% of the policy's
requests/s). By default this log keeps the lines worth reading: every error (4xx, 5xx), every
request slower than ACCESS_LOG_SLOW_MS, and one in ACCESS_LOG_SAMPLE of the rest, each line
saying why it was kept. ACCESS_LOG=all logs every request, ACCESS_LOG=off none. Health probes
and /metrics are never logged (as in BentoML). Lines go to BentoML's "bentoml.access" logger.
"""

from __future__ import annotations

import logging
import time

UNLOGGED = {"/livez", "/healthz", "/readyz", "/metrics"}
log = logging.getLogger("bentoml.access")


class AccessLog:
    def __init__(self, mode: str = "sampled", sample: int = 100, slow_ms: float = 1000.0):
        self.mode, self.sample, self.slow_ms = mode, sample, slow_ms
        self.answered = 0  # successful, fast requests seen, for the sampling

    def wrap(self, scope, send):
        """`send`, logging the request when its answer is complete (when this one is kept)."""
        if self.mode == "off" or scope["path"] in UNLOGGED:
            return send
        started = time.perf_counter()
        response = {}

        async def logged(message):
            await send(message)
            if message["type"] == "http.response.start":
                response.update(status=message["status"], headers=message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.record(scope, response, (time.perf_counter() - started) * 1000)

        return logged

    def reason(self, status: int, ms: float) -> str | None:
        """Why this request's line is kept ("" in ACCESS_LOG=all), or None when it is not."""
        if self.mode == "all":
            return ""
        if status >= 400:
            return "error"
        if ms >= self.slow_ms:
            return "slow"
        self.answered += 1
        return f"1 in {self.sample}" if self.sample and self.answered % self.sample == 0 else None

    def record(self, scope, response: dict, ms: float) -> None:
        status = response.get("status", 0)
        why = self.reason(status, ms)
        if why is None:
            return
        client = scope.get("client") or ("-", 0)
        request = [f"scheme={scope.get('scheme', 'http')}", f"method={scope['method']}", f"path={scope['path']}",
                   f"type={_header(scope.get('headers', ()), b'content-type')}",
                   f"length={_header(scope.get('headers', ()), b'content-length')}"]
        answer = [f"status={status}", f"type={_header(response.get('headers', ()), b'content-type')}",
                  f"length={_header(response.get('headers', ()), b'content-length')}"]
        log.info("%s:%s (%s) (%s) %.3fms%s", client[0], client[1], ",".join(request), ",".join(answer), ms,
                 f" [{why}]" if why else "")


def _header(headers, name: bytes) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""
