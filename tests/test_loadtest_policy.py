"""The policy Locust file keeps working: a short headless run against the real service."""

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT
from loadtests.checks import check_policy as check

ROLLOUTS = json.loads((ROOT / "loadtests" / "data" / "policy_rollouts.json").read_text())


def run_scenario(server, tmp_path, slo: dict, duration="6s"):
    slo_path = tmp_path / "slo.json"
    slo_path.write_text(json.dumps(slo))
    return subprocess.run([sys.executable, "-m", "loadtests.run", "policy", "--users", "16", "--spawn-rate", "16",
                           "--duration", duration, "--policy-url", server.url, "--out", str(tmp_path / "reports"),
                           "--slo", str(slo_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_short_headless_run_meets_the_gate_and_writes_reports(policy_server, tmp_path):
    result = run_scenario(policy_server, tmp_path, {"max_failure_ratio": 0.0, "p95_ms": {"/act": 2000}})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "SLO met" in result.stdout
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "reports" / "policy_stats.csv"))}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100 and int(total["Failure Count"]) == 0
    assert any(name.startswith("/act lunarlander") for name in rows)
    assert (tmp_path / "reports" / "policy.html").stat().st_size > 1000


def test_the_gate_fails_a_run_that_misses_its_slo(policy_server, tmp_path):
    result = run_scenario(policy_server, tmp_path, {"max_failure_ratio": 0.0, "p95_ms": {"/act": 0.001}}, "3s")
    assert result.returncode == 1 and "SLO MISSED" in result.stderr and "p95" in result.stderr


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
