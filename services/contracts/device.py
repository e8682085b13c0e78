"""Choose where onnxruntime runs: INFER_DEVICE=auto|cpu|cuda.

auto uses CUDA only when onnxruntime really creates a CUDA session (get_providers()
says so), else the CPU, and says why. cuda fails loudly when CUDA cannot be had.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("services.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(RuntimeError):
    pass


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # No busy-waiting between runs: spinning threads would steal the CPU that the HTTP
    # server needs to parse the next requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def create_session(model_path: Path, device: str, threads: int = 0) -> tuple[ort.InferenceSession, str, str]:
    """Return (session, provider in use, why that provider)."""
    options = _session_options(threads)
    if device == "cpu":
        return ort.InferenceSession(str(model_path), options, providers=[CPU]), CPU, "INFER_DEVICE=cpu"

    if CUDA not in ort.get_available_providers():
        reason = f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
        if device == "cuda":
            raise DeviceError(f"INFER_DEVICE=cuda but {reason}; install onnxruntime-gpu")
        return ort.InferenceSession(str(model_path), options, providers=[CPU]), CPU, reason
    if device == "auto" and not _nvidia_driver_present():
        reason = "no NVIDIA driver on this host"
        return ort.InferenceSession(str(model_path), options, providers=[CPU]), CPU, reason

    if hasattr(ort, "preload_dlls"):
        try:  # finds the CUDA/cuDNN libraries that pip's nvidia-* packages installed
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - a missing library shows up below as a CPU session
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    session = ort.InferenceSession(str(model_path), options, providers=[CUDA, CPU])
    if session.get_providers()[0] == CUDA:
        return session, CUDA, f"CUDA session created (device {session.get_provider_options().get(CUDA, {}).get('device_id', '0')})"
    reason = "onnxruntime could not create a CUDA session (see its error above: CUDA 13 / cuDNN 9 libraries)"
    if device == "cuda":
        raise DeviceError(f"INFER_DEVICE=cuda but {reason}")
    return session, CPU, reason
