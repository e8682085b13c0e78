"""The `play` client drives CartPole-v1 over HTTP to the return the model card promises."""

import json
import re
import subprocess
import sys

from conftest import POLICIES, ROOT


def test_play_reaches_the_promised_return(policy_server):
    card = json.loads((POLICIES / "cartpole" / "1" / "model.json").read_text())
    promised = card["metrics"]["mean_return"]
    assert promised >= 475
    result = subprocess.run([sys.executable, "-m", "training", "play", "--env", "CartPole-v1",
                             "--url", policy_server.url, "--episodes", "10"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mean = float(re.search(r"mean return (\S+)", result.stdout).group(1))
    assert len(re.findall(r"^episode ", result.stdout, re.M)) == 10
    assert mean >= 475 and mean >= promised - 2 * card["metrics"]["std_return"] - 1, result.stdout
