"""Benchmark the face pipeline on the CPU, by photo size: in-process and served, side by side.

For each photo (tests/fixtures/faces: one face, and a group of three) scaled to each long side:

  detect     face_detector on the 512 square, NMS (ms)
  landmarks  face_landmarks on every face found (ms)
  align      dlib's chip for every face (ms)
  describe   faces (the descriptor) on every chip (ms)
  pipeline   all of it, in-process with onnxruntime (training/faces/evaluate.Pipeline), per photo
  served     POST /check of that photo to a real `bentoml serve` of the classifier, one request at
             a time (decode, pipeline with the animal check, store search, HTTP): what a client waits for

The steps and `pipeline` use the networks a deployment serves by default (the newest versions:
int8 since issue 29); `pipeline float` and `served float` pin the float versions (1) of the
detector, the animal check and the descriptor, and the two servers are asked in turn, request by
request, so both see the same machine. Medians of --repeats runs after one warm-up.
onnxruntime's threads: --threads (the service's INFER_THREADS is set to the same).

    python -m loadtests.faces_benchmark --out benchmarks/faces.md
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from services.contracts.versions import machine
from services.contracts import processes
from services.contracts import face_geometry
from services.contracts.repository import resolve
from training.faces.evaluate import Pipeline

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = {"one face": "obama.jpg", "three faces": "group_1.jpg"}
FIXTURES = ROOT / "tests" / "fixtures" / "faces"


def scaled(name: str, side: int) -> np.ndarray:
    image = Image.open(FIXTURES / name).convert("RGB")
    factor = side / max(image.size)
    return np.asarray(image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def steps(pipeline: Pipeline, rgb: np.ndarray, repeats: int) -> dict[str, float]:
    net_input, size = face_geometry.detector_input(rgb)

    def detect():
        boxes, scores = pipeline.detector(net_input)
        return face_geometry.faces_found(boxes[0], scores[0], size)

    found = detect()
    crops = [face_geometry.landmark_input(rgb, (x0, y0, x1 - x0, y1 - y0)) for x0, y0, x1, y1, _ in found]
    faces = np.concatenate([c[0] for c in crops])
    points = [face.landmarks for face in pipeline.faces(rgb)]
    chips = np.stack([face_geometry.align(rgb, p) for p in points]).transpose(0, 3, 1, 2).astype(np.float32)
    return {"faces": len(found),
            "detect": median_ms(lambda: (face_geometry.detector_input(rgb), detect()), repeats),
            "landmarks": median_ms(lambda: pipeline.landmarks(faces), repeats),
            "align": median_ms(lambda: [face_geometry.align(rgb, p) for p in points], repeats),
            "describe": median_ms(lambda: pipeline.descriptor(chips), repeats),
            "pipeline": median_ms(lambda: [pipeline.describe(rgb, p) for p in pipeline.faces(rgb)], repeats)}


FLOAT_PINS = "face_detector=1,face_animal_check=1,faces=1"


def served_ms(urls: list[str], rgb: np.ndarray, repeats: int) -> list[float]:
    """Median ms of one /check per server, the servers asked in turn."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=92)
    files = [("images", ("photo.jpg", buffer.getvalue(), "image/jpeg"))]
    times: list[list[float]] = [[] for _ in urls]
    for attempt in range(repeats + 1):  # the first round warms up
        for url, kept in zip(urls, times):
            started = time.perf_counter()
            r = requests.post(f"{url}/check", files=files, timeout=120)
            assert r.status_code == 200, r.text
            if attempt:
                kept.append(time.perf_counter() - started)
    return [1000 * float(np.median(t)) for t in times]


def start_server(folder: Path, threads: int, pins: str):
    spec = next(s for s in processes.SERVICES if s.name == "classifier")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MODELS_DIR": str(ROOT / "models"), "INFER_THREADS": str(threads), "MODEL_VERSIONS": pins,
           "MODEL_CONTROL_DIR": str(folder / "control"), "TEACH_STORE": f"sqlite:///{folder}/taught.db",
           **processes.own_home("classifier", port, os.environ)}
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(processes.serve_command(spec, "127.0.0.1", port), cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not processes.wait_ready(url, process, 180):
        processes.stop(process)
        raise SystemExit(f"the classifier did not become ready; see {log.name}")
    requests.post(f"{url}/teach", files=[("images", ("o.jpg", (FIXTURES / "obama.jpg").read_bytes()))],
                  data={"name": "obama"}, timeout=60)
    return url, process


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.faces_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[320, 640, 1280, 2560])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, here and in the service")
    p.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    command = "python -m loadtests.faces_benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    repository = ROOT / "models" / "classifier"
    pipeline = Pipeline(repository, threads=args.threads)
    float_pipeline = Pipeline(repository, descriptor_path=resolve(repository, "faces", "1").path,
                              detector_path=resolve(repository, "face_detector", "1").path, threads=args.threads)

    folder = Path(tempfile.mkdtemp(prefix="faces-bench-"))
    rows, servers = [], []
    try:
        servers = [start_server(folder / "default", args.threads, ""),
                   start_server(folder / "float", args.threads, FLOAT_PINS)]
        for label, name in PHOTOS.items():
            for side in args.sides:
                rgb = scaled(name, side)
                row = steps(pipeline, rgb, args.repeats)
                row["pipeline_float"] = median_ms(lambda: [float_pipeline.describe(rgb, p)
                                                           for p in float_pipeline.faces(rgb)], args.repeats)
                row["served"], row["served_float"] = served_ms([u for u, _ in servers], rgb, args.repeats)
                rows.append((label, f"{rgb.shape[1]}x{rgb.shape[0]}", row))
                print(f"  {label:<12} {rgb.shape[1]:>5}x{rgb.shape[0]:<5} faces {row['faces']}  detect "
                      f"{row['detect']:6.1f}  landmarks {row['landmarks']:5.1f}  align {row['align']:5.1f}  describe "
                      f"{row['describe']:6.1f}  pipeline {row['pipeline']:6.1f} (float {row['pipeline_float']:6.1f})  "
                      f"served {row['served']:6.1f} (float {row['served_float']:6.1f}) ms", flush=True)
    finally:
        for _, process in servers:
            processes.stop(process)
    table = ["| photo | size | faces | detect ms | landmarks ms | align ms | describe ms | pipeline ms | pipeline float ms "
             "| served /check ms | served float ms | float / int8 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {label} | {size} | {r['faces']} | {r['detect']:.1f} | {r['landmarks']:.1f} | {r['align']:.1f} | "
              f"{r['describe']:.1f} | {r['pipeline']:.1f} | {r['pipeline_float']:.1f} | **{r['served']:.1f}** | "
              f"{r['served_float']:.1f} | {r['served_float'] / r['served']:.2f} |" for label, size, r in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.write_text("\n".join([
            "# Face pipeline speed on the CPU", "", f"`{command}`", "", f"Machine: {machine()}.", "",
            f"Medians of {args.repeats} runs after a warm-up; onnxruntime with {args.threads} intra-op threads "
            "(the service: INFER_THREADS the same). `pipeline` is detect + landmarks + align + describe in-process; "
            "`served` is one POST /check of the photo as JPEG to a real `bentoml serve` (decode, pipeline, animal "
            "check, search of the taught faces, HTTP), one request at a time. The steps, `pipeline` and `served` "
            "run the versions served by default (int8: face_detector, face_animal_check and faces version 2); "
            f"the float columns pin version 1 of each (MODEL_VERSIONS={FLOAT_PINS}), the two servers asked in "
            "turn.", "", text, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
