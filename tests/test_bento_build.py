"""`bentoml build` packs every service, the shared runtime and every shipped model, offline."""

import os
import subprocess
import sys

import pytest

from conftest import MODELS, ROOT
from services.contracts.processes import SERVICES

pytestmark = pytest.mark.slow  # builds a Bento: `pytest -m "not slow"` leaves it out


def test_bento_holds_every_service_and_model(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [bento] = [p for p in (tmp_path / "bentoml" / "bentos" / "onnx-model-serving").iterdir() if p.name != "latest"]
    src = bento / "src"
    for spec in SERVICES:
        if spec.module_file.exists():
            assert (src / spec.module_file.relative_to(ROOT)).is_file(), spec.name
    assert (src / "services" / "runtime" / "core.py").is_file()
    shipped = sorted(p.relative_to(ROOT) for p in MODELS.rglob("model.*") if p.suffix in (".onnx", ".json"))
    assert shipped and all((src / p).is_file() for p in shipped)
    # What serving reads besides code and models: the gate's probe inputs, the classifier's
    # out-of-domain statistics and the consoles.
    extra = [p.relative_to(ROOT) for p in [*MODELS.rglob("probes.npz"), *MODELS.rglob("domain.npz"),
                                           *(ROOT / "services" / "consoles").iterdir()]]
    assert len(extra) > 6 and all((src / p).is_file() for p in extra), [p for p in extra if not (src / p).is_file()]
    assert not any(part.startswith(".venv") for p in src.rglob("*") for part in p.relative_to(src).parts)
    requirements = "\n".join(p.read_text() for p in (bento / "env" / "python").rglob("requirements*.txt"))
    assert "onnxruntime-gpu==1.31.1" in requirements and "torch" not in requirements
