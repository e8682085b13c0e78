"""All Locust files keep working: the mixed scenario, through the runner and its gate, against
the three real services (answers checked: policy actions, generator PNGs and repeated seeds,
classifier labels equal to offline predictions of the same files)."""

import csv
import subprocess
import sys
from contextlib import ExitStack

from conftest import ROOT, running_service


def test_mixed_scenario_against_the_three_services(tmp_path):
    with ExitStack() as stack:
        servers = {name: stack.enter_context(running_service(name, tmp_path, env=env))
                   for name, env in (("policy", {}), ("generator", {}),
                                     ("classifier", {"TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}))}
        urls = [arg for name, server in servers.items() for arg in (f"--{name}-url", server.url)]
        result = subprocess.run([sys.executable, "-m", "loadtests.run", "mixed", "--users", "12", "--spawn-rate", "12",
                                 "--duration", "8s", "--out", str(tmp_path / "reports"), *urls],
                                cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "reports" / "mixed_stats.csv"))}
    assert int(rows["Aggregated"]["Failure Count"]) == 0 and int(rows["Aggregated"]["Request Count"]) > 100
    for prefix in ("/act", "/generate", "/interpolate", "/classify", "/embed"):
        assert any(name.startswith(prefix) for name in rows), f"no {prefix} requests"
