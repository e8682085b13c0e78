"""The policy Locust file keeps working: a short headless run against the real service."""

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT
from loadtests.policy import ROLLOUTS, check


def test_short_headless_run_has_no_failures(policy_server, tmp_path):
    prefix = tmp_path / "policy"
    result = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtests/policy.py", "--headless",
                             "-u", "16", "-r", "16", "-t", "6s", "--host", policy_server.url,
                             "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100 and int(total["Failure Count"]) == 0
    assert any(name.startswith("/act lunarlander") for name in rows)


def test_a_wrong_answer_is_a_failure():
    rollout = ROLLOUTS["cartpole"]
    right = rollout["actions"][:2]
    wrong = [1 - a for a in right]

    def response(actions, version=rollout["version"], status=200):
        body = {"actions": actions, "probabilities": [[0.5, 0.5]] * len(actions), "version": version}
        return SimpleNamespace(status_code=status, text=json.dumps(body), json=lambda: body)

    assert check(response(right), rollout, 0, 2) is None
    assert "differ" in check(response(wrong), rollout, 0, 2)
    assert check(response(wrong, version="999"), rollout, 0, 2) is None  # another version: shape only
    assert "expected 2 actions" in check(response(right[:1]), rollout, 0, 2)
    assert "HTTP 503" in check(response(right, status=503), rollout, 0, 2)
