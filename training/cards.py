"""Model cards: the JSON written beside every exported model.onnx.

The serving runtime reads the same file (services/contracts/repository.py) and refuses a
model whose sha256 does not match its card.
"""

from __future__ import annotations

from pathlib import Path

from services.contracts.versions import software_versions
from services.contracts.repository import CARD_FILE, MODEL_FILE, sha256_file, version_dirs, write_json_atomic


def new_version_dir(models_dir: Path, name: str, version: int | None = None) -> Path:
    """models/<name>/<version>/, version defaulting to one past the newest present."""
    existing = version_dirs(Path(models_dir) / name)
    number = version if version is not None else (int(existing[-1].name) + 1 if existing else 1)
    out = Path(models_dir) / name / str(number)
    if (out / CARD_FILE).exists():
        raise SystemExit(f"{out} already holds a model; pick another --version")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_card(out: Path, card: dict, extra_packages: list[str]) -> dict:
    """Finish the card (file, size, sha256, software versions) and write it last.

    The card is written after the ONNX file, atomically, so a folder with a card always
    holds a complete model: the runtime ignores folders without one.
    """
    model = out / MODEL_FILE
    card = dict(card)
    card["file"] = MODEL_FILE
    card["bytes"] = model.stat().st_size
    card["sha256"] = sha256_file(model)
    card["software"] = dict(software_versions((*extra_packages, "onnxruntime-gpu", "onnxruntime", "numpy")))
    write_json_atomic(out / CARD_FILE, card)
    return card


def return_metrics(returns, first_seed: int, reward_threshold: float | None) -> dict:
    """A policy card's measured quality: deterministic episodes on seeds first_seed, first_seed+1, ..."""
    return {
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "min_return": float(returns.min()),
        "episodes": len(returns),
        "deterministic": True,
        "seeds": f"{first_seed}..{first_seed + len(returns) - 1}",
        "reward_threshold": reward_threshold,
    }
