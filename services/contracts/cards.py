"""Model cards, typed: what a card (model.json) must hold for its kind to be served.

    card = cards.parse(json.loads(path.read_text()))   # CardError naming the field, else a Card
    card.contract.action_space.n                         # a policy's, typed

Parsed once when a version loads (repository.verify): a card missing a field the serving code
reads, or holding one of the wrong type, is refused there with the field's path, like a bad
sha256, never a KeyError at request time. Cards also carry descriptive records (training,
export, metrics, licence, ...) that people read; those are kept as written (extra fields are
allowed everywhere) and only the fields below are checked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

KINDS = ("policy", "generator", "classifier", "face_detector", "face_landmarks", "face_descriptor",
         "face_animal_check")


class CardError(ValueError):
    """The card does not hold what its kind needs; the message names the field."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)  # "100" is not a latent size


class Tensor(_Part):
    name: str
    dtype: str | None = None
    shape: list[int | str]


class FileRef(_Part):
    """A file beside the model that the contract names, checked against its sha256 at load."""
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Contract(_Part):
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[Tensor] = Field(min_length=1)
    max_batch_rows: int | None = Field(None, ge=1)  # rows one merged batch may hold for this model


class Space(_Part):
    type: Literal["Box", "Discrete"]
    shape: list[int] | None = None
    dtype: str | None = None
    low: Any = None   # a number or one per dimension; null: unbounded
    high: Any = None
    n: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "Discrete" and self.n is None:
            raise ValueError("a Discrete space needs n")
        if self.type == "Box" and not self.shape:
            raise ValueError("a Box space needs its shape")
        return self

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """A Box's low and high as float32 arrays of its shape; null (unbounded) as -inf / +inf."""
        def side(value, unbounded: float) -> np.ndarray:
            items = [unbounded if v is None else v for v in np.array(value, dtype=object).ravel().tolist()]
            flat = np.array(items, np.float32)
            return np.broadcast_to(flat.reshape(self.shape) if flat.size > 1 else flat, self.shape)

        return side(self.low, -np.inf), side(self.high, np.inf)


class ObservationRange(_Part):
    """Per dimension, the observations a policy was measured on (widened by a margin): outside it the
    policy is extrapolating, and the service says so (services/policy.py)."""
    low: list[float] = Field(min_length=1)
    high: list[float] = Field(min_length=1)
    source: str | None = None

    _arrays: tuple = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _ordered(self):
        if len(self.low) != len(self.high) or any(lo > hi for lo, hi in zip(self.low, self.high)):
            raise ValueError("low and high must be as long as each other, low <= high")
        self._arrays = (np.asarray(self.low, np.float32), np.asarray(self.high, np.float32))  # once, not per request
        return self

    def outside(self, batch: np.ndarray) -> np.ndarray:
        """Per row of batch [N, ...], whether any dimension lies outside the range."""
        low, high = self._arrays
        flat = batch.reshape(len(batch), -1)
        return ((flat < low) | (flat > high)).any(axis=1)


class PolicyContract(Contract):
    env_id: str | None = None
    observation_space: Space
    action_space: Space
    action_meanings: list[str] | None = None  # per discrete action, or per action dimension (a robot's joints)
    # How a Box policy's sampled action is bounded: "clip" (mean + std * z, clipped to the bounds) or
    # "tanh" (low + (tanh(action_mean + action_std * z) + 1) / 2 * (high - low): soft actor-critic's squashing).
    action_squashing: Literal["clip", "tanh"] = "clip"
    observation_range: ObservationRange | None = None
    camera: dict | None = None  # pixel policies: how frames become observations (services/contracts/pixels.py)


class GeneratorContract(Contract):
    latent_dim: int = Field(ge=1)
    image_size: int = Field(ge=1)
    channels: Literal[1, 3]
    output_range: list[float] = Field(min_length=2, max_length=2)
    classes: list[str] | None = None
    seed_to_latent: str
    to_uint8: str


class Preprocessing(_Part):
    input_size: int = Field(ge=1)
    colour: Literal["grey", "rgb"] = "rgb"
    background: list[int] = Field(default=[0, 0, 0], min_length=3, max_length=3)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)


class DomainRef(FileRef):
    threshold: float = Field(ge=0, le=1)  # a domain score (a percentile of training images' scores)


class ClassifierContract(Contract):
    labels: list[str] = Field(min_length=1)
    preprocessing: Preprocessing
    match_threshold: float | None = None
    domain: DomainRef | None = None  # out-of-domain statistics (services/contracts/domain.py)


class DescriptorContract(Contract):
    match_distance: float = Field(gt=0)
    match_rule: str | None = None


class AnimalCheckContract(Contract):
    labels: list[str] = Field(min_length=1)
    animal_classes: list[int] = Field(min_length=1)
    threshold: float = Field(gt=0, le=1)


class Card(_Part):
    kind: str
    name: str | None = None
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    description: str | None = None
    metrics: dict = Field(default_factory=dict)
    training: dict | None = None
    export: dict | None = None
    contract: Contract


class PolicyCard(Card):
    kind: Literal["policy"]
    contract: PolicyContract


class GeneratorCard(Card):
    kind: Literal["generator"]
    contract: GeneratorContract


class ClassifierCard(Card):
    kind: Literal["classifier"]
    contract: ClassifierContract


class DetectorCard(Card):
    kind: Literal["face_detector"]


class LandmarksCard(Card):
    kind: Literal["face_landmarks"]


class DescriptorCard(Card):
    kind: Literal["face_descriptor"]
    contract: DescriptorContract


class AnimalCheckCard(Card):
    kind: Literal["face_animal_check"]
    contract: AnimalCheckContract


AnyCard = Annotated[Union[PolicyCard, GeneratorCard, ClassifierCard, DetectorCard, LandmarksCard, DescriptorCard,
                          AnimalCheckCard], Field(discriminator="kind")]


class _Envelope(BaseModel):
    card: AnyCard


def parse(record: dict) -> Card:
    """The card of its kind, checked; CardError naming the first fields that are wrong."""
    if not isinstance(record, dict):
        raise CardError("the card is not a JSON object")
    kind = record.get("kind")
    if kind not in KINDS:
        raise CardError(f"kind: {str(kind)[:40]!r} is not one of {', '.join(KINDS)}")
    try:
        return _Envelope.model_validate({"card": record}).card
    except ValidationError as exc:
        raise CardError("; ".join(_problem(error) for error in exc.errors()[:3])) from None


def _problem(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"][2:])  # past ("card", kind)
    if error["type"] == "missing":
        return f"{where}: missing"
    return f"{where}: {error['msg']}" + (f" (got {str(error.get('input'))[:40]!r})" if error["type"] != "value_error"
                                         else "")
