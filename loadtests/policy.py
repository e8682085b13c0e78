"""Locust load test of the policy service: real rollout observations, every answer checked.

    python -m loadtests.run policy            # headless, with reports and the SLO gate
    locust -f loadtests/policy.py             # Locust's web UI; the service at $POLICY_URL

Observations come from episodes of the shipped policies (loadtests/record_policy_rollouts.py).
When the served version is the recorded one, every action must equal the recorded action;
otherwise the answer is checked for shape and range only. A wrong answer is a failure.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from locust import tag, task

from loadtests.checks import check_policy
from loadtests.run import service_url
from loadtests.users import ServiceUser

ROLLOUTS = json.loads((Path(__file__).resolve().parent / "data" / "policy_rollouts.json").read_text())


class PolicyUser(ServiceUser):
    host = service_url("policy")

    def _act(self, model: str, size: int):
        rollout = ROLLOUTS[model]
        start = random.randrange(len(rollout["observations"]) - size + 1)
        observations = rollout["observations"][start:start + size]
        with self.client.post("/act", json={"observations": observations, "model": model},
                              name=f"/act {model} x{size}", catch_response=True) as response:
            problem = check_policy(response, rollout, start, size)
            if problem:
                response.failure(problem)
            else:
                response.success()

    @tag("policy", "act", "single")
    @task(6)
    def act_cartpole_one(self):
        self._act("cartpole", 1)

    @tag("policy", "act", "single")
    @task(2)
    def act_lunarlander_one(self):
        self._act("lunarlander", 1)

    @tag("policy", "act", "batch")
    @task(1)
    def act_cartpole_batch(self):
        self._act("cartpole", random.choice([8, 16, 32]))
