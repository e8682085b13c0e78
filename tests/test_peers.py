"""The peer benchmark (python -m loadtests.peers) on a tiny load against one peer, Mosec: its
answers checked equal to onnxruntime's, both servers timed, the report written. No timed assertion."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from loadtests.peers import wire
from loadtests.peers.__main__ import main

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")


def test_mosec_against_ours_on_both_endpoints(tmp_path):
    out = tmp_path / "peers.md"
    assert main(["--peers", "mosec", "--peer-python", sys.executable, "--slices", "1", "--slice-seconds", "1",
                 "--latency-seconds", "0.5", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["peer"], r["endpoint"], r["check"]) for r in results] == [("mosec", "act", "equal"),
                                                                         ("mosec", "classify", "equal")]
    for r in results:
        for run in r["runs"]:
            assert run["ours"]["requests_per_s"] > 0 and run["peer"]["latency_samples"] > 0
            assert run["ours"]["failures"] == 0 and run["peer"]["failures"] == 0
    text = out.read_text()
    assert "| mosec | 64 |" in text and "mosec 0.9.8" in text and out.with_suffix(".png").stat().st_size > 0


def test_the_check_catches_a_wrong_answer():
    want = [{"action": 1, "value": 49.98, "probabilities": [0.1, 0.9]}]
    assert wire.differs(want, [dict(want[0])]) is None
    assert wire.differs(want, [{**want[0], "value": 49.98 + 1e-6}]) is None  # a JSON round trip
    assert "action" in wire.differs(want, [{**want[0], "action": 0}])
    assert "probabilities" in wire.differs(want, [{**want[0], "probabilities": [0.2, 0.8]}])
    assert "answers for" in wire.differs(want, [])
    labels = [{"labels": ["Bag"], "scores": [0.9], "in_domain": True, "domain_score": 0.51}]
    assert "in_domain" in wire.differs(labels, [{**labels[0], "in_domain": 1}])  # a number is not a flag
    assert "labels" in wire.differs(labels, [{**labels[0], "labels": ["Shirt"]}])
