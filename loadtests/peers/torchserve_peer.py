"""TorchServe serving /act or /classify with loadtests/peers/work.py: one worker, its batching on.

    python -m loadtests.peers.torchserve_peer --endpoint act --port 8000

The model is an unpacked archive (a folder with MAR-INF/MANIFEST.json and the handler,
torchserve_handler.py), which TorchServe loads like a .mar; no torch is needed. Clients POST to
/predictions/act or /predictions/classify. The management and metrics APIs listen on the next
two ports; token authorisation is off (loopback only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.peers import options, work

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    args = options.parse(__doc__)
    store = Path(tempfile.mkdtemp(prefix="torchserve-"))
    model = store / args.endpoint
    (model / "MAR-INF").mkdir(parents=True)
    shutil.copy(HERE / "torchserve_handler.py", model / "handler.py")
    (model / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(
        {"runtime": "python", "archiverVersion": "0.12.0",
         "model": {"modelName": args.endpoint, "modelVersion": "1.0", "handler": "handler.py"}}))
    config = store / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{args.port}", f"management_address=http://127.0.0.1:{args.port + 1}",
        f"metrics_address=http://127.0.0.1:{args.port + 2}", "disable_token_authorization=true",
        "default_workers_per_model=1", f"model_store={store}", f"load_models={args.endpoint}",
        "models=" + json.dumps({args.endpoint: {"1.0": {
            "defaultVersion": True, "marName": args.endpoint, "minWorkers": 1, "maxWorkers": 1,
            "batchSize": args.max_batch, "maxBatchDelay": max(1, round(args.wait_ms)), "responseTimeout": 120}}}),
        f"log_location={store / 'logs'}", f"metrics_location={store / 'logs'}"]) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work.ROOT), os.environ.get("PYTHONPATH", "")]),
           "LOG_LOCATION": str(store / "logs"), "METRICS_LOCATION": str(store / "logs")}
    try:
        sys.exit(subprocess.call(["torchserve", "--start", "--foreground", "--ncs", "--model-store", str(store),
                                  "--ts-config", str(config), "--disable-token-auth"], env=env))
    finally:
        shutil.rmtree(store, ignore_errors=True)
