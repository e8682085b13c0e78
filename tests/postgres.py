"""A real PostgreSQL 16 with pgvector for the tests.

The binaries come from the PyPI package `pgserver` (PostgreSQL 16.2 + pgvector 0.6.2), but this
helper runs them itself, on a unix socket in a private folder, so that a test can kill -9 the
whole server and start it again on the same data, as after a power cut. As root, PostgreSQL
runs as the unprivileged user `pgserver` (created if missing, as pgserver itself does).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


class Postgres:
    def __init__(self):
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
        except ImportError as exc:
            raise PostgresUnavailable(f"the PyPI package pgserver is not installed ({exc})") from None
        self.bin = POSTGRES_BIN_PATH
        self.user = None
        # A short path: a unix socket path has a limit of about 100 characters.
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            self.user = "pgserver"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, 0o055)
            ensure_folder_permissions(self.bin.parent / "lib", 0o044)
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self.user)
        self.log = self.root / "postgres.log"
        self._run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", "-D", str(self.data))
        self.process: subprocess.Popen | None = None
        self.start()

    def _run(self, tool: str, *args: str) -> str:
        result = subprocess.run([str(self.bin / tool), *args], user=self.user, capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{tool} failed: {result.stderr[-2000:]}")
        return result.stdout

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.root}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.root), "-c", "listen_addresses=",
                 "-c", "fsync=on", "-c", "max_connections=200"],
                user=self.user, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin / "pg_isready"), "-h", str(self.root), "-q"]).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise PostgresUnavailable(f"postgres did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def create_database(self, name: str) -> str:
        self._run("psql", "-h", str(self.root), "-U", "postgres", "-q", "-c", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        return self._run("psql", "-h", str(self.root), "-U", "postgres", "-d", database, "-At", "-c", sql)

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend at once: no shutdown code runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        time.sleep(0.5)  # let the kernel release the shared memory

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
