"""The model repositories: models/<service>/<name>/<version>/{model.onnx, model.json}.

One repository per service (models/policy, models/generator, models/classifier), each laid
out like Triton's: one folder per model, integer versions, the card (model.json) beside the
weights. Separate repositories let the generator and the classifier both ship a `fashion`. A
version folder counts only once its card exists (the training tools write the card last), so a
half-written export is never picked up.

What a version may be (an admin can load any folder, so each is checked before onnxruntime sees it):
a name of 1 to 20 ASCII digits; the folder, its card and its model file inside MODELS_DIR once
symlinks are followed (a symlink to another version's file is fine); the card's `file` a plain file
name; the card holding every field its kind needs, of the right type (cards.py); the model file's sha256 the card's; and no tensor kept in external data, whose bytes the
sha256 would not cover. A contract section naming a file beside the model with its sha256 (the
classifier's out-of-domain statistics, `contract.domain`) is checked the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.contracts import cards, onnx_scan

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
PROBES_FILE = "probes.npz"  # per model, shared by its versions: the gate's probe inputs
VERSION_NAME = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() also takes "١", "²" and "２"


class ModelLoadError(RuntimeError):
    """A model that must not be served: missing, corrupt or not matching its card."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path  # the model.onnx file
    card: dict  # the card as written (what /info shows)
    spec: cards.Card  # the same card, typed and checked for its kind (services/contracts/cards.py)

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


def is_version_name(name) -> bool:
    return isinstance(name, str) and VERSION_NAME.fullmatch(name) is not None


def version_dirs(model_dir: Path) -> list[Path]:
    """Integer-named version folders that hold a card, oldest first."""
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if is_version_name(p.name) and p.is_dir() and (p / CARD_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name))


def probes_file(repository: Path, name: str) -> Path:
    return Path(repository) / name / PROBES_FILE


def load_probes(repository: Path, name: str) -> dict | None:
    """The gate's stored probe inputs of a model ({name: array}), None when none were recorded."""
    import numpy as np

    path = probes_file(repository, name)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


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
        if not is_version_name(pinned):
            raise ModelLoadError(f"model {name}: pinned version {pinned[:30]!r} is not a version name (1 to 20 digits)")
        version_dir = model_dir / pinned
        if not (version_dir / CARD_FILE).exists():
            raise ModelLoadError(f"model {name}: pinned version {pinned} has no {CARD_FILE} in {version_dir}")
    else:
        versions = version_dirs(model_dir)
        if not versions:
            raise ModelLoadError(f"model {name}: no version folder with a {CARD_FILE} under {model_dir}")
        version_dir = versions[-1]
    return verify(name, version_dir, kind, root=Path(repository).parent)


def verify(name: str, version_dir: Path, kind: str | tuple[str, ...] | None = None,
           root: Path | None = None) -> ModelEntry:
    """The version folder's entry once it is all that the module docstring asks; ModelLoadError
    naming what is not. `root` is MODELS_DIR (default: the folder three levels up)."""
    version_dir = Path(version_dir)
    root = Path(root) if root is not None else version_dir.parents[2]
    _inside(name, root, version_dir)
    _inside(name, root, version_dir / CARD_FILE)
    card = _read_card(version_dir / CARD_FILE)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and card.get("kind") not in kinds:
        raise ModelLoadError(f"model {name}: card {version_dir / CARD_FILE} is of kind {card.get('kind')!r}, "
                             f"this repository serves {' or '.join(map(repr, kinds))}")
    model_path, data = _checked_file(name, root, version_dir, card.get("file", MODEL_FILE), card.get("sha256"), "")
    for section, spec in (card.get("contract") or {}).items():
        if isinstance(spec, dict) and "file" in spec:
            _checked_file(name, root, version_dir, spec["file"], spec.get("sha256"), f"contract.{section}.")
    try:
        spec = cards.parse(card)
    except cards.CardError as exc:
        raise ModelLoadError(f"model {name}: card {version_dir / CARD_FILE}: {exc}") from None
    try:
        external = onnx_scan.external_tensors(data)
    except onnx_scan.NotOnnx as exc:
        raise ModelLoadError(f"model {name}: {model_path} is not a valid ONNX file: {exc}") from None
    if external:
        raise ModelLoadError(f"model {name}: {model_path} keeps tensors in external data ({', '.join(external[:3])}"
                             f"{', ...' if len(external) > 3 else ''}), which its sha256 does not cover; "
                             "export the weights inside model.onnx")
    return ModelEntry(name=name, version=version_dir.name, path=model_path, card=card, spec=spec)


def _checked_file(name: str, root: Path, version_dir: Path, file, expected, where: str) -> tuple[Path, bytes]:
    """A file the card names (`where` + file): a plain name in the version folder, inside MODELS_DIR,
    present, with the card's sha256. Returns its path and bytes (read once: hashed and then used)."""
    card = version_dir / CARD_FILE
    if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\\" in file or "\0" in file:
        raise ModelLoadError(f"model {name}: card {card}: its {where}file {str(file)[:100]!r} must be "
                             f"a file name in the version folder, not a path")
    path = version_dir / file
    _inside(name, root, path)
    if not expected:
        raise ModelLoadError(f"model {name}: card {card} has no {where}sha256")
    if not path.is_file():
        raise ModelLoadError(f"model {name}: {path} is missing")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelLoadError(f"model {name}: {path} sha256 {actual[:12]}... does not match its card ({where}sha256 "
                             f"{str(expected)[:12]}...)")
    return path, data


def _inside(name: str, root: Path, path: Path) -> None:
    """`path`, symlinks followed, must stay under MODELS_DIR (also resolved)."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != top and top not in real.parents:
        raise ModelLoadError(f"model {name}: {path} leads outside MODELS_DIR ({root}) to {real}; a version's "
                             "files must be inside it (a symlink to another version's file is fine)")


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model card {path} cannot be read: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelLoadError(f"model card {path} is not a JSON object")
    return card
