"""The soak command, briefly: the three services under the mixed scenario, zero failures, and
every worker's memory within the stated bound."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a long soak of several servers: `pytest -m "not slow"` leaves it out


def test_a_short_soak_has_no_failures_and_bounded_memory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loadtests.soak", "--minutes", "0.25", "--users", "6",
                             "--warmup", "5s", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^(policy|generator|classifier)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+([\d.]+)$",
                      result.stdout, re.M)
    assert {row[0] for row in rows} == {"policy", "generator", "classifier"}, result.stdout[-2000:]
    assert all(float(start) > 20 for _, start, _, _, _ in rows)  # real processes with models loaded
