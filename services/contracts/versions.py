"""The software a model was exported or is served with, as cards and /info record it."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform

SERVING_PACKAGES = ("bentoml", "onnxruntime-gpu", "onnxruntime", "numpy", "pillow")


@functools.cache
def software_versions(packages: tuple[str, ...] = SERVING_PACKAGES) -> dict:
    """Python and package versions (installed ones only); cached, they cannot change while running."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine() -> str:
    """The CPU, its cores and the serving software, as benchmark reports head their tables."""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    except OSError:
        model = platform.processor()
    packages = software_versions(("bentoml", "onnxruntime-gpu", "numpy"))
    versions = ", ".join(f"{p} {v}" for p, v in packages.items() if p != "python")
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}; {versions}"
