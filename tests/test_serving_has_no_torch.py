"""Serving must never need torch: not in its dependencies, not imported by the services."""

import subprocess
import sys
import tomllib

from conftest import ROOT


def test_serving_dependencies_have_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("torch", "torchvision"))]


def test_services_import_no_torch():
    code = ("import sys, services.launch, services.policy, services.runtime; "
            "bad = [m for m in ('torch', 'torchvision', 'stable_baselines3', 'gymnasium') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
