"""deploy/observability/ against real parts (issue 30): promtool checks the shipped configurations
and rules, a real Prometheus (Debian's package) scrapes real policy and classifier services with
the shipped rules, every query of the shipped Grafana dashboard returns data from them, and
alerts fire: a canary rolled back, then a service stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from classifier_helpers import fashion_png
from conftest import POLICIES, free_port, running_service
from test_model_lifecycle import ADMIN_KEY, admin, flip_actions, new_version

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "deploy" / "observability"
CONFIGS = ("prometheus.yml", "prometheus-swarm.yml", "prometheus-kubernetes.yml")

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="Prometheus is not installed (apt-get install prometheus; make test does it "
                                       "as root)")


@pytest.mark.parametrize("config", CONFIGS)
def test_promtool_accepts_each_configuration_with_its_rules(config):
    result = subprocess.run(["promtool", "check", "config", config], cwd=OBSERVABILITY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_accepts_the_rules_and_they_hold_the_slos():
    result = subprocess.run(["promtool", "check", "rules", "rules.yml"], cwd=OBSERVABILITY, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((OBSERVABILITY / "rules.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"ServiceDown", "ServiceNotReady", "HighErrorRate", "LatencyOverSlo", "BatchQueueGrowing",
            "TaughtStoreUnavailable", "CanaryRolledBack"} <= names
    slo = json.loads((ROOT / "loadtests" / "slo.json").read_text())["p95_ms"]
    wanted = {k: v for k, v in slo.items() if "(" not in k}
    wanted["/check"] = max(slo["/check"], slo["/check (faces)"])  # one endpoint serves both
    latency = {r["labels"]["endpoint"]: r for r in rules if r["alert"] == "LatencyOverSlo"}
    assert set(latency) == set(wanted)
    for endpoint, ms in wanted.items():
        threshold = float(re.search(r">\s*([0-9.]+)\s*$", latency[endpoint]["expr"]).group(1))
        assert threshold == ms / 1000 and f'endpoint="{endpoint}"' in latency[endpoint]["expr"], endpoint


def test_compose_has_an_observability_profile():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    plain = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "prometheus" in yaml.safe_load(plain.stdout)["services"]  # defined, but only started with its profile
    service = yaml.safe_load(plain.stdout)["services"]["prometheus"]
    assert service["profiles"] == ["observability"]
    mounts = {v["source"] if isinstance(v, dict) else v.split(":")[0] for v in service["volumes"]}
    assert str(OBSERVABILITY / "prometheus.yml") in mounts and str(OBSERVABILITY / "rules.yml") in mounts


def dashboard_queries() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
                                         f"--web.listen-address=127.0.0.1:{self.port}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, (expr, r.text)
        return r.json()["data"]["result"]

    def firing(self) -> list[dict]:
        alerts = requests.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    def wait(self, what, timeout: float = 60, pause: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = what()
            except requests.RequestException:
                found = None
            if found:
                return found
            time.sleep(pause)
        return None

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def test_a_real_prometheus_scrapes_the_services_the_dashboard_has_data_and_alerts_fire(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(POLICIES, models / "policy")
    new_version(models, "cartpole", "2", models / "policy" / "cartpole" / "1", edit=flip_actions)
    policy_env = {"MODELS_DIR": str(models), "MODEL_VERSIONS": "cartpole=1", "ADMIN_KEY": ADMIN_KEY,
                  "MODEL_CONTROL_DIR": str(tmp_path / "control"), "MODEL_CONTROL_POLL": "0.2"}
    classifier_env = {"TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}
    with running_service("policy", tmp_path, env=policy_env) as policy, \
            running_service("classifier", tmp_path, env=classifier_env) as classifier:
        # The shipped compose configuration, pointed at these two services and scraped every second;
        # the shipped rules with their `for:` waits removed (the expressions are the shipped ones).
        config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        ports = {"policy": policy.url.rsplit(":", 1)[1], "classifier": classifier.url.rsplit(":", 1)[1]}
        config["scrape_configs"] = [{**job, "static_configs": [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]}
                                    for job in config["scrape_configs"] if job["job_name"] in ports]
        rules = (OBSERVABILITY / "rules.yml").read_text()
        (tmp_path / "rules.yml").write_text(re.sub(r"\n(\s+)for: \S+", r"\n\1for: 0s", rules))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Prometheus(tmp_path / "prometheus.yml", tmp_path / "tsdb", tmp_path / "prometheus.log")
        try:
            up = prometheus.wait(lambda: len([r for r in prometheus.query("up == 1")]) == 2)
            assert up, (tmp_path / "prometheus.log").read_text()[-2000:]

            # Traffic for every panel: answers, an error, classifications, the store, a canary.
            with requests.Session() as session:
                for i in range(30):
                    session.post(f"{policy.url}/act", json={"observations": [[0.01 * i, 0.2, -0.03, -0.25]],
                                                            "model": "cartpole"}, timeout=10)
                session.post(f"{policy.url}/act", json={"observations": [[1, 2]], "model": "cartpole"}, timeout=10)
                for i in range(3):
                    r = session.post(f"{classifier.url}/classify", files=[("images", ("x.png", fashion_png(i),
                                                                                      "image/png"))], timeout=30)
                    assert r.status_code == 200, r.text
                assert session.post(f"{classifier.url}/taught", json={}, timeout=30).status_code == 200
                assert admin(policy, "/models/cartpole/versions/2/load", {"min_agreement": 0}).status_code == 200
                r = admin(policy, "/models/cartpole/canary", {"version": "2", "share": 0.5, "compare_share": 1.0,
                                                              "min_compared": 10, "min_requests": 1000})
                assert r.status_code == 200, r.text
                for i in range(60):
                    session.post(f"{policy.url}/act", json={"observations": [[0.01, 0.2, -0.03, -0.25]],
                                                            "model": "cartpole"}, timeout=10)

            empty = []
            for expr in dashboard_queries():
                concrete = expr.replace("$__rate_interval", "1m").replace('"$job"', '".+"')
                if not prometheus.wait(lambda: prometheus.query(concrete), timeout=30):
                    empty.append(concrete)
            assert not empty, f"dashboard queries without data: {empty}"

            fired = prometheus.wait(lambda: [a for a in prometheus.firing() if a["labels"]["alertname"] ==
                                             "CanaryRolledBack"], timeout=30)
            assert fired and fired[0]["labels"]["model"] == "cartpole" and fired[0]["labels"]["version"] == "2"
            assert not [a for a in prometheus.firing() if a["labels"]["alertname"] == "ServiceDown"]

            policy.process.terminate()  # the policy service goes away: ServiceDown fires for it alone
            policy.process.wait(60)
            down = prometheus.wait(lambda: [a for a in prometheus.firing() if a["labels"]["alertname"] ==
                                            "ServiceDown"], timeout=60)
            assert down and {a["labels"]["job"] for a in down} == {"policy"}
        finally:
            prometheus.stop()
