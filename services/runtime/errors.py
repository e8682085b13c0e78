"""One JSON shape for every 4xx/5xx the services answer:

    {"error": {"status": 400, "code": "invalid_observation",
               "field": "observations[3]", "message": "expected shape [4], got [3]"}}

API methods raise ApiError; the @api_errors decorator turns it into that response.
BentoML's own errors (request validation, unknown routes) are reshaped into the same
form by the HTTP layer (http.py).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

from starlette.responses import JSONResponse

from services.runtime.metrics import metrics


# (service, model, version) of the model a request took (Runtime.get sets it), so its error is
# counted against that version. Names, not the model: a context must not keep an unloaded one alive.
ANSWERING: contextvars.ContextVar = contextvars.ContextVar("answering_model", default=None)


def error_body(status: int, code: str, message: str, field: str | None = None, **extra: Any) -> dict:
    error = {"status": status, "code": code, "field": field, "message": message}
    error.update(extra)
    return {"error": error}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.code, self.message, self.field, **self.extra),
                            status_code=self.status)


def shown(value, limit: int = 80) -> str:
    """A client's value quoted for an error message, cut to `limit` characters: an error must
    not echo a 1 MB model name back."""
    return repr(clip(str(value), limit))


def count_model_error(status: int, code: str) -> None:
    answering = ANSWERING.get()
    if answering is not None:
        metrics()["model_errors"].labels(*answering, str(status), code).inc()


def clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bad_request(code: str, message: str, field: str | None = None) -> ApiError:
    return ApiError(400, code, message, field)


def api_errors(func):
    """Decorate an async API method: an ApiError becomes its JSON response. A method that takes
    BentoML's request context (`ctx`) has its answer's status set from it, so it is set there too."""

    @functools.wraps(func)
    async def wrapper(*args, **kwargs):
        try:
            return await func(*args, **kwargs)
        except ApiError as exc:
            count_model_error(exc.status, exc.code)
            if kwargs.get("ctx") is not None:
                kwargs["ctx"].response.status_code = exc.status
            return exc.response()
        except Exception:
            count_model_error(500, "internal_error")
            raise

    return wrapper
