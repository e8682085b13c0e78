"""What the request path leaves out (services/runtime/patches/hot_path.py) and the access log that
replaces BentoML's (services/runtime/access_log.py), on real `bentoml serve` processes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, running_service
from services.runtime.access_log import AccessLog
from services.runtime.config import Settings

STACK = """
from services.policy import Policy
Policy.inject_config()
from _bentoml_impl.server.app import ServiceAppFactory
print(",".join(m.cls.__name__ for m in ServiceAppFactory(Policy, is_main=True).middlewares))
print(",".join(f"{name}={api.output_spec.media_type}" for name, api in Policy.apis.items()))
"""


def middleware_stack(env: dict) -> list[str]:
    result = subprocess.run([sys.executable, "-c", STACK], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_bentoml_stack_without_access_log_and_unconfigured_tracing():
    stack, media = middleware_stack({})
    names = stack.split(",")
    assert "OpenTelemetryMiddleware" not in names and "AccessLogMiddleware" not in names
    # the rest stays, BentoML's request metrics wrapped to label requests by route
    assert {"BoundedPathMetrics", "TimeoutMiddleware", "ServiceHttp"} <= set(names)
    assert media == "act=application/json"  # worked out once, as BentoML would per answer


def test_configured_tracing_keeps_its_middleware():
    stack, _ = middleware_stack({"BENTOML_CONFIG_OPTIONS": "services.policy.tracing.exporter_type=in_memory"})
    assert "OpenTelemetryMiddleware" in stack.split(",") and "AccessLogMiddleware" not in stack.split(",")


def access_lines(server) -> list[str]:
    """The access log's lines of the test's own requests (not the start-up's GET /info)."""
    return [line for line in server.log_path.read_text().splitlines() if "path=/act" in line or "/readyz" in line]


def drive(server, good: int, bad: int) -> None:
    with requests.Session() as session:
        for i in range(good):
            assert session.post(f"{server.url}/act", json={"observations": [[0, 0, 0, i / 1000]], "model": "cartpole"},
                                timeout=30).status_code == 200
        for _ in range(bad):
            assert session.post(f"{server.url}/act", json={"observations": [[0, 0, 0]], "model": "cartpole"},
                                timeout=30).status_code == 400
        session.get(f"{server.url}/readyz", timeout=30)  # probes are never logged


def test_default_access_log_keeps_errors_and_one_in_a_hundred(tmp_path):
    with running_service("policy", tmp_path) as server:
        drive(server, good=250, bad=3)
        lines = access_lines(server)
    errors = [line for line in lines if line.endswith("[error]")]
    sampled = [line for line in lines if line.endswith("[1 in 100]")]
    assert len(errors) == 3 and all("status=400" in line and "path=/act" in line for line in errors)
    assert len(sampled) == 2 and all("status=200" in line for line in sampled)
    assert len(lines) == 5, lines  # nothing else: BentoML's own line per request is gone
    assert re.search(r"127\.0\.0\.1:\d+ \(scheme=http,method=POST,path=/act,type=application/json,length=\d+\) "
                     r"\(status=200,type=application/json,length=\d+\) \d+\.\d{3}ms \[1 in 100\]$", sampled[0])


@pytest.mark.parametrize("env, expected", [({"ACCESS_LOG": "all"}, 23), ({"ACCESS_LOG": "off"}, 0),
                                           ({"ACCESS_LOG_SLOW_MS": "0.001"}, 23),
                                           ({"ACCESS_LOG_SAMPLE": "0"}, 3)])
def test_access_log_settings(tmp_path, env, expected):
    with running_service("policy", tmp_path, env=env) as server:
        drive(server, good=20, bad=3)
        lines = access_lines(server)
    assert len(lines) == expected, lines
    if "ACCESS_LOG_SLOW_MS" in env:
        assert sum(line.endswith("[slow]") for line in lines) == 20


def test_sampling_counts_only_fast_successes():
    log = AccessLog("sampled", sample=3, slow_ms=100)
    kept = [log.reason(status, ms) for status, ms in [(200, 1), (200, 1), (500, 1), (200, 1), (200, 500), (404, 1),
                                                       (200, 1), (200, 1), (200, 1)]]
    assert kept == [None, None, "error", "1 in 3", "slow", "error", None, None, "1 in 3"]


@pytest.mark.parametrize("name, value", [("ACCESS_LOG", "loud"), ("ACCESS_LOG_SAMPLE", "-1"),
                                         ("ACCESS_LOG_SAMPLE", "ten"), ("ACCESS_LOG_SLOW_MS", "0")])
def test_bad_access_log_settings_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Settings.from_env("policy")
