"""Device choice: INFER_DEVICE=auto|cpu|cuda, judged by the session's real providers."""

from pathlib import Path

import onnxruntime as ort
import pytest

from services.contracts import device

MODEL = Path(__file__).resolve().parent.parent / "models" / "policy" / "cartpole" / "1" / "model.onnx"


def _cuda_works() -> bool:
    if device.CUDA not in ort.get_available_providers() or not device._nvidia_driver_present():
        return False
    try:
        _, provider, _ = device.create_session(MODEL, "cuda")
        return provider == device.CUDA
    except device.DeviceError:
        return False


HAS_CUDA = _cuda_works()


def test_cpu_is_cpu():
    session, provider, reason = device.create_session(MODEL, "cpu")
    assert provider == device.CPU and session.get_providers() == [device.CPU]


def test_auto_reports_what_really_runs():
    session, provider, reason = device.create_session(MODEL, "auto")
    assert session.get_providers()[0] == provider
    assert reason
    if not HAS_CUDA:
        assert provider == device.CPU


@pytest.mark.skipif(HAS_CUDA, reason="this host has a working CUDA provider")
def test_cuda_fails_loudly_without_a_gpu():
    with pytest.raises(device.DeviceError, match="INFER_DEVICE=cuda"):
        device.create_session(MODEL, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="no GPU with a working onnxruntime CUDA provider on this host")
def test_cuda_runs_on_the_gpu():
    session, provider, _ = device.create_session(MODEL, "cuda")
    assert provider == device.CUDA and session.get_providers()[0] == device.CUDA
