"""Policy service (port 3001): actions from the RL policies in models/ (kind "policy").

    POST /act   {"observations": [[...], ...], "model": "cartpole", "deterministic": true}
    POST /act?model=cartpole   Content-Type: application/x-npy, the observations as one .npy array
    GET  /info  policies with their observation and action spaces and action meanings

With `Accept: application/x-npy` the answer is the actions as .npy (services/arrays.py).
Pixel policies (uint8 camera frames, services/contracts/pixels.py) also take their observations as
PNG frames or raw bytes (services/pixel_observations.py).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import bentoml
import numpy as np
from pydantic import Field, ValidationError

from services import arrays, pixel_observations
from services.runtime import (VERSION_FIELD, LoadedModel, Runtime, add_http_layer, api_errors, bad_request,
                              version_of)
from services.runtime.config import service_options

SERVICE = "policy"


def validate_observations(observations: Any, obs_shape: list[int], max_batch: int, images: bool = False) -> np.ndarray:
    """Check a request's observations against the model's observation space.

    Returns float32 [N, *obs_shape] (uint8 for image observations); raises a 400 ApiError
    naming the first bad observation.
    """
    if not isinstance(observations, list) or not observations:
        raise bad_request("invalid_observations", "observations must be a non-empty list of observations",
                          "observations")
    if len(observations) > max_batch:
        raise bad_request("batch_too_large",
                          f"{len(observations)} observations is over the limit of {max_batch} per request "
                          f"(MAX_REQUEST_ITEMS)", "observations")
    try:
        batch = np.asarray(observations)
    except ValueError:  # ragged: some observation has the wrong shape
        batch = None
    if batch is None or batch.dtype.kind not in "iuf" or batch.shape[1:] != tuple(obs_shape):
        for i, observation in enumerate(observations):
            _check_one(observation, obs_shape, f"observations[{i}]")
        raise bad_request("invalid_observations", f"observations must have shape [N, {', '.join(map(str, obs_shape))}]",
                          "observations")  # not reached in practice: _check_one names the culprit
    return checked_numbers(batch, images)


def checked_numbers(batch: np.ndarray, images: bool) -> np.ndarray:
    """A batch of the right shape as the model takes it: uint8 0..255 for images, else finite float32."""
    if images:
        return pixel_observations.check_uint8(batch)
    batch = batch.astype(np.float32)  # checked after the cast: 1e308 is finite, but not as a float32
    finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise bad_request("non_finite_observation", f"observation {i} holds NaN or Infinity, or a number beyond "
                          "float32's range (about +/-3.4e38)", f"observations[{i}]")
    return batch


def _check_one(observation: Any, obs_shape: list[int], field: str) -> None:
    try:
        row = np.asarray(observation)
    except ValueError:
        raise bad_request("invalid_observation", f"expected shape {obs_shape}, got a ragged list", field) from None
    if row.dtype.kind not in "iuf":
        raise bad_request("invalid_observation", f"values must be numbers, got {_json_kind(row)}", field)
    if list(row.shape) != list(obs_shape):
        raise bad_request("invalid_observation", f"expected shape {obs_shape}, got {list(row.shape)}", field)


def _json_kind(row: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "O": "null or mixed values"}.get(row.dtype.kind, str(row.dtype))


def validate_array(batch: np.ndarray, obs_shape: list[int], max_batch: int, images: bool) -> np.ndarray:
    """An .npy body's array, checked as validate_observations checks lists."""
    if batch.ndim != len(obs_shape) + 1 or list(batch.shape[1:]) != list(obs_shape) or len(batch) < 1:
        raise bad_request("invalid_shape", f"this model takes an array of shape [N, {', '.join(map(str, obs_shape))}] "
                          f"with N >= 1, got {list(batch.shape)}", "body")
    if len(batch) > max_batch:
        raise bad_request("batch_too_large", f"{len(batch)} observations is over the limit of {max_batch} per "
                          "request (MAX_REQUEST_ITEMS)", "body")
    return checked_numbers(batch, images)


class ActRequest(bentoml.IODescriptor):
    """/act's fields. A JSON body holds them all; an application/x-npy body is the observations
    alone, with the other fields in the query string (/act?model=cartpole&deterministic=false)."""
    observations: Annotated[list[Any] | None, Field(description="observation batch [N, *observation_shape]; "
                                                    "pixel policies: integers 0..255")] = None
    frames_png: Annotated[list[list[str]] | None, Field(description="pixel policies: per observation, its frames "
                                                         "as base64 greyscale PNGs, oldest first")] = None
    observations_b64: Annotated[str | None, Field(description="pixel policies: the batch's raw uint8 bytes, "
                                                   "row-major, base64 (with shape)")] = None
    shape: Annotated[list[int] | None, Field(description="the shape of observations_b64, [N, *observation_shape]")] \
        = None
    model: Annotated[str | None, Field(description="policy name; optional when one policy is loaded")] = None
    deterministic: Annotated[bool, Field(description="greedy action (true) or sampled (false)")] = True
    seed: Annotated[int | None, Field(description="seed for sampled actions", ge=0, le=2**63 - 1)] = None
    version: Annotated[str | int | None, VERSION_FIELD] = None

    npy_request: ClassVar[str] = ("the observations as one .npy array [N, *observation_shape] (float32, or uint8 "
                                  "for pixel policies); model, deterministic, seed and version in the query string")
    npy_answer: ClassVar[str] = ("with Accept: application/x-npy, the actions as .npy: int64 [N] for discrete "
                                 "action spaces, float32 [N, *action_shape] otherwise; model, version in x-model, "
                                 "x-model-version; for a policy whose card records its observation range, "
                                 "x-outside-training-range lists the rows outside it (comma-separated, maybe empty)")
    QUERY_FIELDS: ClassVar[tuple[str, ...]] = ("model", "deterministic", "seed", "version")

    @classmethod
    async def from_http_request(cls, request, serde):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != arrays.NPY:
            return await super().from_http_request(request, serde)
        # The query's text values, converted as a form would be ("false", "7"); unknown names are
        # refused by the model's extra="forbid" like unknown JSON fields. The body is read by act().
        query = dict(request.query_params)
        misplaced = [name for name in query if name in cls.model_fields and name not in cls.QUERY_FIELDS]
        if misplaced:
            raise ValidationError.from_exception_data(cls.__name__, [{
                "type": "value_error", "loc": (misplaced[0],), "input": query[misplaced[0]],
                "ctx": {"error": ValueError(f"with an .npy body the observations are the body; the query takes "
                                            f"{', '.join(cls.QUERY_FIELDS)}")}}])
        return cls.model_validate(query, strict=False)


def sample_actions(model: LoadedModel, outputs: list[np.ndarray], seed: int | None) -> np.ndarray:
    """Stochastic actions: draw from the action distribution the graph returned."""
    rng = np.random.default_rng(seed)
    action, second = outputs[0], outputs[1]
    space = model.spec.contract.action_space
    if space.type == "Discrete":
        cumulative = np.cumsum(second, axis=1)
        draws = rng.random((len(second), 1)) * cumulative[:, -1:]
        return (draws < cumulative).argmax(axis=1)
    noise = rng.standard_normal(action.shape).astype(np.float32)
    low, high = space.bounds()
    if model.spec.contract.action_squashing == "tanh":  # outputs[3]: the mean before squashing
        squashed = np.tanh(outputs[3] + second * noise)
        return np.clip(low + (squashed + 1) * 0.5 * (high - low), low, high)  # clip: float rounding at +/-1
    return np.clip(action + second * noise, low, high)


def outside_training_range(model: LoadedModel, batch: np.ndarray) -> np.ndarray | None:
    """Per observation, whether any dimension lies outside the range the card measured the policy on
    (None when the card records no range): the action is then an extrapolation, and the client is told."""
    known = model.spec.contract.observation_range
    return None if known is None else known.outside(batch)


def _measured(card: dict) -> dict:
    """The card's evaluation figures a client compares policies by (and a robot's target)."""
    metrics = card.get("metrics") or {}
    keep = ("mean_return", "std_return", "episodes", "target", "published_by_others")
    return {key: metrics[key] for key in keep if key in metrics}


@bentoml.service(name=SERVICE, **service_options(SERVICE))
class Policy:
    def __init__(self) -> None:
        self.runtime = Runtime(service=SERVICE, kind="policy")

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def model_choices(self) -> dict:
        """For /docs.json: the policies /act takes (model required with several)."""
        return {"/act": self.runtime.choices()} if self.runtime.ready else {}

    def info(self) -> dict:
        policies = {name: {"observation_space": m.card["contract"]["observation_space"],  # as the card writes them
                           "action_space": m.card["contract"]["action_space"],
                           "action_meanings": m.spec.contract.action_meanings,
                           "env_id": m.spec.contract.env_id,
                           **({"action_squashing": m.spec.contract.action_squashing}
                              if m.spec.contract.action_space.type == "Box" else {}),
                           "measured": _measured(m.card)}
                    for name, m in self.runtime.models.items()}
        return self.runtime.info(policies=policies, endpoints=["POST /act", "GET /info"])

    @bentoml.api(route="/act", input_spec=ActRequest)
    @api_errors
    async def act(self, ctx: bentoml.Context, observations=None, frames_png=None, observations_b64=None, shape=None,
                  model=None, deterministic=True, seed=None, version=None):
        answer_form = arrays.answer_form(ctx.request.headers.get("accept"))
        policy = self.runtime.get(model, version=version_of(version), canary=True)
        if ctx.request.headers.get("content-type", "").split(";")[0].strip().lower() == arrays.NPY:
            space = policy.spec.contract.observation_space
            batch = validate_array(arrays.read_npy(await ctx.request.body()), space.shape,
                                   self.runtime.settings.max_request_items, space.dtype == "uint8")
        else:
            batch = self.observations(policy, observations, frames_png, observations_b64, shape)
        outputs = await policy(batch)
        actions = outputs[0] if deterministic else sample_actions(policy, outputs, seed)
        outside = outside_training_range(policy, batch)
        if answer_form == arrays.NPY:
            extra = {} if outside is None else {"outside_training_range": ",".join(map(str, np.flatnonzero(outside)))}
            return arrays.npy_response(actions, model=policy.name, model_version=policy.version,
                                       deterministic=str(deterministic).lower(), **extra)
        discrete = policy.spec.contract.action_space.type == "Discrete"
        answer = {"actions": actions.tolist(), "values": outputs[2].tolist()}
        answer["probabilities" if discrete else "action_std"] = outputs[1].tolist()
        if outside is not None:
            answer["outside_training_range"] = outside.tolist()
        answer.update(model=policy.name, version=policy.version, deterministic=deterministic)
        return answer

    def observations(self, policy: LoadedModel, observations, frames_png, observations_b64, shape) -> np.ndarray:
        """The request's observation batch, in whichever of its forms it came, checked."""
        space = policy.spec.contract.observation_space
        images, limit = space.dtype == "uint8", self.runtime.settings.max_request_items
        given = [name for name, value in (("observations", observations), ("frames_png", frames_png),
                                          ("observations_b64", observations_b64)) if value is not None]
        if len(given) != 1:
            raise bad_request("observations_required", "give the observations in exactly one of observations"
                              + (", frames_png or observations_b64 (with shape)" if images else "")
                              + f"; got {given or 'none'}", "observations")
        if given[0] != "observations" and not images:
            raise bad_request("invalid_field", f"{given[0]} is for pixel policies; {policy.name} takes state "
                              "vectors in observations", given[0])
        if shape is not None and given[0] != "observations_b64":
            raise bad_request("invalid_field", "shape goes with observations_b64", "shape")
        if frames_png is not None:
            return pixel_observations.from_png_frames(frames_png, space.shape, limit)
        if observations_b64 is not None:
            return pixel_observations.from_raw(observations_b64, shape, space.shape, limit)
        return validate_observations(observations, space.shape, limit, images)


add_http_layer(Policy, SERVICE)
