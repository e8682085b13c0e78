"""Fixtures that start real `bentoml serve` processes (through the launcher's own code)."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.contracts import processes

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
POLICIES = MODELS / "policy"
SPECS = {spec.name: spec for spec in processes.SERVICES}


free_port = processes.free_port  # below the ephemeral range: see processes.free_port


def error_of(response, status: int) -> dict:
    """The JSON error of a response, checked for its status and the one error shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"status", "code", "field", "message"} and error["status"] == status and error["message"]
    return error


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_service(name: str, tmp_path: Path, env: dict | None = None, wait: bool = True, timeout: float = 120):
    """A real `bentoml serve` of one service on a free port; stopped on exit."""
    port = free_port()
    log_path = tmp_path / f"{name}-{port}.log"
    with open(log_path, "w") as log_file:
        process = processes.start(SPECS[name], port, env={"MODELS_DIR": str(MODELS), **(env or {})}, log_file=log_file)
        server = Server(f"http://127.0.0.1:{port}", process, log_path)
        try:
            if wait and not processes.wait_ready(server.url, process, timeout):
                raise AssertionError(f"{name} did not become ready:\n{server.log()[-3000:]}")
            yield server
        finally:
            processes.stop(process)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def policy_server(session_tmp):
    """The policy service with the shipped models, default settings."""
    with running_service("policy", session_tmp) as server:
        yield server


@pytest.fixture()
def models_copy(tmp_path) -> Path:
    """A private copy of the shipped policy models (a MODELS_DIR root), safe to break."""
    target = tmp_path / "models"
    shutil.copytree(POLICIES, target / "policy")
    return target


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 with pgvector (tests/postgres.py), one server for the session;
    tests make their own databases on it."""
    from postgres import Postgres, PostgresUnavailable

    try:
        server = Postgres()
    except PostgresUnavailable as why:
        pytest.skip(f"PostgreSQL tests skipped: {why}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (tests/browser.py); skips without one."""
    from browser import start_browser

    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()
