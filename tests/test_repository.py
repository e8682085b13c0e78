"""The model repository: version choice, pins, and refusal of broken models."""

import json
from pathlib import Path

import pytest

from services.contracts import repository
from services.runtime.config import Settings
from services.runtime.core import Runtime
from services.contracts.repository import ModelLoadError

MODELS = Path(__file__).resolve().parent.parent / "models"
POLICIES = MODELS / "policy"


def test_shipped_cards_match_their_files():
    for name in repository.list_models(POLICIES):
        entry = repository.resolve(POLICIES, name, kind="policy")
        assert entry.card["sha256"] == repository.sha256_file(entry.path)
        assert entry.card["name"] == name and entry.card["version"] == entry.version
        assert entry.path.stat().st_size < 20 * 1024 * 1024
        for key in ("training", "metrics", "contract", "export", "software"):
            assert key in entry.card, f"{name} card lacks {key}"
        assert entry.card["export"]["parity"]["passed"] is True
        assert entry.card["export"]["parity"]["observations"] >= 1000


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c["contract"].pop("observation_space"), "contract.observation_space: missing"),
    (lambda c: c["contract"]["action_space"].update(type="Continuous"), "contract.action_space.type"),
    (lambda c: c.update(kind="robot"), "kind: 'robot' is not one of"),
    (lambda c: c["contract"].update(inputs=[]), "contract.inputs"),
    (lambda c: c["contract"].update(max_batch_rows="64"), "contract.max_batch_rows: Input should be a valid integer"),
])
def test_a_card_missing_a_field_or_of_the_wrong_type_is_refused_naming_it(models_copy, edit, problem):
    folder = models_copy / "policy" / "cartpole" / "1"
    card = json.loads((folder / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="model cartpole: card .*model.json: ") as refused:
        repository.resolve(models_copy / "policy", "cartpole")
    assert problem in str(refused.value)


def test_newest_version_wins_and_pins_hold(models_copy):
    models_copy = models_copy / "policy"
    (models_copy / "cartpole" / "2").mkdir()
    for f in ("model.onnx", "model.json"):
        (models_copy / "cartpole" / "2" / f).write_bytes((models_copy / "cartpole" / "1" / f).read_bytes())
    assert repository.resolve(models_copy, "cartpole").version == "2"
    assert repository.resolve(models_copy, "cartpole", pinned="1").version == "1"
    with pytest.raises(ModelLoadError, match="pinned version 7"):
        repository.resolve(models_copy, "cartpole", pinned="7")


def test_folder_without_card_is_ignored(models_copy):
    models_copy = models_copy / "policy"
    (models_copy / "cartpole" / "9").mkdir()
    (models_copy / "cartpole" / "9" / "model.onnx").write_bytes(b"half-written export")
    assert repository.resolve(models_copy, "cartpole").version == "1"


def test_corrupt_missing_and_mismatched_models_are_refused(models_copy):
    models_copy = models_copy / "policy"
    with pytest.raises(ModelLoadError, match="of kind 'policy'"):
        repository.resolve(models_copy, "cartpole", kind="generator")
    onnx = models_copy / "cartpole" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="does not match its card"):
        repository.resolve(models_copy, "cartpole")
    onnx.unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        repository.resolve(models_copy, "cartpole")
    card = models_copy / "lunarlander" / "1" / "model.json"
    card.write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        repository.resolve(models_copy, "lunarlander")


def test_runtime_stays_not_ready_on_a_bad_model(models_copy):
    card_path = models_copy / "policy" / "cartpole" / "1" / "model.json"
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    runtime = Runtime("policy", "policy", Settings(models_dir=models_copy))
    assert runtime.wait(60) is False
    assert "cartpole" in runtime.failure and "does not match" in runtime.failure


def test_runtime_loads_and_warms_up_every_policy():
    runtime = Runtime("policy", "policy", Settings(models_dir=MODELS, device="cpu"))
    assert runtime.wait(60) is True
    assert set(runtime.models) == set(repository.list_models(POLICIES)) >= {"cartpole", "lunarlander"}
    assert all(m.provider == "CPUExecutionProvider" for m in runtime.models.values())


def test_settings_reject_bad_values(monkeypatch):
    monkeypatch.setenv("INFER_DEVICE", "tpu")
    with pytest.raises(ValueError, match="INFER_DEVICE"):
        Settings.from_env()
    monkeypatch.setenv("INFER_DEVICE", "cpu")
    monkeypatch.setenv("MODEL_VERSIONS", "cartpole=latest")
    with pytest.raises(ValueError, match="MODEL_VERSIONS"):
        Settings.from_env()
    monkeypatch.setenv("MODEL_VERSIONS", "cartpole=2, lunarlander=1")
    assert Settings.from_env().model_versions == {"cartpole": "2", "lunarlander": "1"}
