"""The model repositories: models/<service>/<name>/<version>/{model.onnx, model.json}.

One repository per service (models/policy, models/generator, models/classifier), each laid
out like Triton's: one folder per model, integer versions, the card (model.json) beside the
weights. Separate repositories let the generator and the classifier both ship a `fashion`. A version folder counts only once its card exists (the training tools
write the card last), so a half-written export is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"


class ModelLoadError(RuntimeError):
    """A model that must not be served: missing, corrupt or not matching its card."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path  # the model.onnx file
    card: dict

    @property
    def kind(self) -> str:
        return self.card.get("kind", "")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cards must be readable by a non-root server
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def version_dirs(model_dir: Path) -> list[Path]:
    """Integer-named version folders that hold a card, oldest first."""
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / CARD_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name))


def list_models(repository: Path) -> list[str]:
    """Names of the models in one service's repository that have at least one complete version."""
    if not Path(repository).is_dir():
        return []
    return [d.name for d in sorted(Path(repository).iterdir()) if version_dirs(d)]


def resolve(repository: Path, name: str, pinned: str | None = None,
            kind: str | tuple[str, ...] | None = None) -> ModelEntry:
    """The pinned version of a model, or its newest; verified against its card."""
    model_dir = Path(repository) / name
    if pinned:
        version_dir = model_dir / pinned
        if not (version_dir / CARD_FILE).exists():
            raise ModelLoadError(f"model {name}: pinned version {pinned} has no {CARD_FILE} in {version_dir}")
    else:
        versions = version_dirs(model_dir)
        if not versions:
            raise ModelLoadError(f"model {name}: no version folder with a {CARD_FILE} under {model_dir}")
        version_dir = versions[-1]
    return verify(name, version_dir, kind)


def verify(name: str, version_dir: Path, kind: str | tuple[str, ...] | None = None) -> ModelEntry:
    card = _read_card(version_dir / CARD_FILE)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and card.get("kind") not in kinds:
        raise ModelLoadError(f"model {name}: card {version_dir / CARD_FILE} is of kind {card.get('kind')!r}, "
                             f"this repository serves {' or '.join(map(repr, kinds))}")
    model_path = version_dir / card.get("file", MODEL_FILE)
    expected = card.get("sha256")
    if not expected:
        raise ModelLoadError(f"model {name}: card {version_dir / CARD_FILE} has no sha256")
    if not model_path.is_file():
        raise ModelLoadError(f"model {name}: {model_path} is missing")
    actual = sha256_file(model_path)
    if actual != expected:
        raise ModelLoadError(
            f"model {name}: {model_path} sha256 {actual[:12]}... does not match its card ({expected[:12]}...)"
        )
    return ModelEntry(name=name, version=version_dir.name, path=model_path, card=card)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model card {path} cannot be read: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelLoadError(f"model card {path} is not a JSON object")
    return card
