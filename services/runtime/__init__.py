"""The serving runtime shared by every service: model repository, device choice, sessions,
adaptive batching, limits, errors, auth and metrics. Services hold one Runtime each."""

from pydantic import Field

from services.runtime import patches
from services.runtime.config import Settings, settings_for
from services.runtime.core import Runtime
from services.runtime.model import LoadedModel
from services.runtime.errors import ApiError, api_errors, bad_request
from services.runtime.http import ServiceHttp

VERSION_FIELD = Field(description="a loaded version of the model (see /info); default: the serving one")


def version_of(value: str | int | None) -> str | None:
    """A request's `version` field as the runtime names versions ("2")."""
    return None if value is None else str(value)


def add_http_layer(service, name: str, settings: Settings | None = None,
                   body_limits: dict[str, int] | None = None, error_statuses: dict[str, str] | None = None) -> None:
    """Wrap a BentoML service in the shared HTTP layer (auth, body limit, error shape, /info).

    Also make every JSON endpoint reject fields it does not know (a misspelt
    "determinstic" must be a 400 naming it, not a silently ignored option) and take
    types strictly: "deterministic": "yes" or 0, "seed": "7" or 1.0 are 400s, not guesses.
    """
    json_routes, array_routes = {}, {}  # the routes' body media types; .npy forms (services/arrays.py)
    for api in service.apis.values():
        spec = api.input_spec
        npy_request, npy_answer = getattr(spec, "npy_request", None), getattr(spec, "npy_answer", None)
        if not getattr(spec, "multipart_fields", None):  # multipart forms check their own fields
            spec.model_config["extra"] = "forbid"
            spec.model_config["strict"] = True
            spec.model_rebuild(force=True)
            json_routes[api.route] = ("application/json", "application/x-npy") if npy_request else ("application/json",)
        if npy_request or npy_answer:
            array_routes[api.route] = {"request": npy_request, "answer": npy_answer}
    settings = settings or settings_for(name)
    service.add_asgi_middleware(ServiceHttp, service=name, settings=settings, body_limits=body_limits,
                                json_routes=json_routes, error_statuses=error_statuses, array_routes=array_routes,
                                routes=tuple(api.route for api in service.apis.values()))
    patches.install(service, name, settings.header_timeout)


__all__ = ["VERSION_FIELD", "ApiError", "LoadedModel", "Runtime", "Settings", "add_http_layer", "api_errors",
           "bad_request", "version_of"]
