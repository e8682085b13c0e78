"""The HTTP layer every service shares, as one ASGI middleware around BentoML's app:

- API key: when API_KEY is set, POST endpoints (inference, and any call that changes state)
  need `Authorization: Bearer <key>` (401 otherwise). GET endpoints stay open: health
  (/livez, /healthz, /readyz), /metrics, /info and the OpenAPI docs.
- Body size: a request body over MAX_BODY_BYTES (or the route's own limit) gets 413 before
  the service sees it.
- One error shape: BentoML's own 4xx answers (request validation, unknown route, wrong
  media type) are rewritten into the shape of errors.py, naming the field.
- GET /info: the service's info() (models, contracts, provider, limits, versions).
"""

from __future__ import annotations

import hmac
import json

from services.runtime.errors import error_body
from services.runtime.metrics import metrics

OPEN_METHODS = {"GET", "HEAD", "OPTIONS"}


class ServiceHttp:
    def __init__(self, app, service: str, max_body_bytes: int, api_key: str | None,
                 body_limits: dict[str, int] | None = None):
        self.app, self.service, self.max_body_bytes = app, service, max_body_bytes
        self.body_limits = body_limits or {}  # route -> its own limit (the classifier's /state/import)
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"].rstrip("/") or "/"

        if method == "GET" and path == "/info":
            return await self._info(send)
        if self.api_key is not None and method not in OPEN_METHODS and not self._authorized(scope):
            return await self._error(send, 401, "unauthorized",
                                     "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     field="Authorization", headers=[(b"www-authenticate", b"Bearer")])

        if method not in OPEN_METHODS:
            limit = self.body_limits.get(path, self.max_body_bytes)
            length = _header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await self._too_large(send, limit)
            body, complete = await self._read_body(receive, limit)
            if not complete:
                return await self._too_large(send, limit)
            receive = _replay(body, receive)

        return await self.app(scope, receive, _reshaping_send(send, self._count))

    def _authorized(self, scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    async def _read_body(self, receive, limit: int) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _too_large(self, send, limit: int):
        setting = "MAX_BODY_BYTES" if limit == self.max_body_bytes else "this route's limit"
        await self._error(send, 413, "body_too_large", f"request body is over the limit of {limit} bytes ({setting})")

    async def _info(self, send):
        import bentoml

        instance = bentoml.get_current_service()
        if instance is None:
            return await self._error(send, 503, "not_ready", "the service is starting")
        await _send_json(send, 200, instance.info())

    def _count(self, status: int, code: str) -> None:
        metrics()["errors"].labels(self.service, str(status), code).inc()

    async def _error(self, send, status, code, message, field=None, headers=()):
        self._count(status, code)
        await _send_json(send, status, error_body(status, code, message, field), headers)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, data, headers=()):
    payload = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def _reshaping_send(send, count):
    """Pass responses through; rewrite 4xx/5xx bodies that are not yet in our error shape."""
    state = {"start": None, "chunks": []}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                return await send(message)
            state["start"] = message
            return None
        if state["start"] is None:
            return await send(message)
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        start, body = state["start"], b"".join(state["chunks"])
        status = start["status"]
        shaped = _as_error_shape(status, body)
        count(status, shaped["error"]["code"])
        payload = json.dumps(shaped).encode()
        headers = [(k, v) for k, v in start.get("headers", [])
                   if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return wrapped


GENERIC_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                 500: "internal_error", 503: "not_ready"}


def _as_error_shape(status: int, body: bytes) -> dict:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "code" in data["error"]:
        return data  # already ours
    if isinstance(data, list) and len(data) == 1:  # BentoML wraps some errors in a 1-tuple
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        # pydantic validation errors: name each field, e.g. "deterministic: Input should be a valid boolean"
        problems = [{"field": _loc(d.get("loc", ())),
                     "message": "unknown field" if d.get("type") == "extra_forbidden" else d.get("msg", "invalid")}
                    for d in data["detail"]]
        first = problems[0]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        code = "unknown_field" if first["message"] == "unknown field" else "invalid_request"
        return error_body(status, code, message, first["field"], problems=problems)
    if isinstance(data, dict) and isinstance(data.get("error") or data.get("detail"), str):
        message = data.get("error") or data.get("detail")
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status >= 500:
        message = "internal error; see the service log"
    return error_body(status, GENERIC_CODES.get(status, "error"), message)


def _loc(loc) -> str:
    """("observations", 3, 1) -> "observations[3][1]"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"
