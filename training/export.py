"""What every trainer does at its end: export to ONNX, check parity, write the version folder's card.

    out = export.new_version_dir(models_dir, name)                       # models/<service>/<name>/<next>/
    export.export_onnx(module, example, out / "model.onnx", ["image"], ["logits", "embedding"])
    parity = export.parity({"max_abs_diff": diff, "tolerance": 1e-4}, diff <= 1e-4)   # SystemExit if not
    export.write_card(out, card, extra_packages=["torch"])               # checked as the service checks it

The serving runtime reads the same card (services/contracts/repository.py, cards.py): it refuses
a model whose sha256 does not match it or whose card lacks a field its kind needs, so write_card
refuses to write such a card in the first place.
"""

from __future__ import annotations

from pathlib import Path

from services.contracts import cards
from services.contracts.repository import CARD_FILE, MODEL_FILE, sha256_file, version_dirs, write_json_atomic
from services.contracts.versions import software_versions


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
    try:
        cards.parse(card)
    except cards.CardError as exc:
        raise SystemExit(f"{out / CARD_FILE}: the card would be refused when served: {exc}") from None
    write_json_atomic(out / CARD_FILE, card)
    return card


def export_onnx(module, example, path: Path, input_names: list[str], output_names: list[str],
                opset: int = 17, batch_axis: str = "batch") -> None:
    """torch -> ONNX (the TorchScript exporter), every input and output with a dynamic batch axis
    (the service merges requests into batches of any size), then onnx.checker's full check."""
    import onnx
    import torch

    inputs = example if isinstance(example, tuple) else (example,)
    torch.onnx.export(module.eval(), inputs, str(path), input_names=input_names, output_names=output_names,
                      dynamic_axes={name: {0: batch_axis} for name in [*input_names, *output_names]},
                      opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)


def parity(report: dict, passed: bool) -> dict:
    """A parity report (the ONNX file against the framework it came from) marked passed, or the
    export stopped: a card never records a model that answers differently from what was measured."""
    report["passed"] = bool(passed)
    if not passed:
        raise SystemExit(f"ONNX parity failed: {report}")
    return report


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
