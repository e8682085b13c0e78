"""A private Docker engine and the compose stack, for the end-to-end test.

These machines run no Docker engine and reach no image registry (see shared/NOTES.md), so:
- start dockerd as root with its own socket and data folders, stopped afterwards;
- build a local base image with debootstrap from the machine's Debian mirror
  (python3 3.11 + venv), as air-gapped sites do, and pass it as BASE_IMAGE;
- download the serving wheels on the host into deploy/wheelhouse and build with --no-index.
Where Docker or debootstrap cannot be had (not root, no apt), DockerUnavailable says why.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "deploy" / "wheelhouse"
BASE_TAG = "local/python:3.11"
TOOLS = ("dockerd", "docker", "docker-compose", "debootstrap")


class DockerUnavailable(RuntimeError):
    pass


class Engine:
    """A private dockerd with its own socket and folders under `workdir`; inside a network
    namespace (a swarm node: tests/swarm.py) when `netns` is given."""

    def __init__(self, workdir: Path, netns: str | None = None, name: str = "engine", start: bool = True):
        self.dir, self.netns, self.name = Path(workdir), netns, name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.dir}/docker.sock"}
        self.process: subprocess.Popen | None = None
        self.log = None
        if start:
            if os.geteuid() != 0:
                raise DockerUnavailable("starting a private Docker engine needs root")
            missing = [tool for tool in TOOLS if not shutil.which(tool)]
            if missing:
                raise DockerUnavailable(f"not installed: {', '.join(missing)} (`make test` installs them as root: "
                                        "apt-get install docker.io docker-compose debootstrap)")
            self.start()

    def start(self, timeout: float = 60) -> None:
        command = ["dockerd", "--host", self.env["DOCKER_HOST"], "--data-root", str(self.dir / "data"),
                   "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "docker.pid")]
        if self.netns:
            # `ip netns exec` remounts /sys and dockerd then fails ("Devices cgroup isn't mounted"):
            # nsenter enters only the network namespace (and execs dockerd, so the pid is dockerd's).
            # No bridge or iptables rules of its own: the namespace's network is the harness's.
            command = ["nsenter", f"--net=/run/netns/{self.netns}", *command,
                       "--bridge=none", "--iptables=false", "--ip6tables=false"]
        self.log = open(self.dir / "dockerd.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.run("docker", "info", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(f"dockerd ({self.name}) did not start: "
                                        f"{(self.dir / 'dockerd.log').read_text()[-1500:]}")
            time.sleep(0.3)

    def run(self, *command: str, check: bool = True, timeout: float = 600, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env={**self.env, **(env or {})}, cwd=ROOT, capture_output=True,
                                text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"[{self.name}] {' '.join(command)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("docker", *args, **kwargs)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to dockerd (it stops its containers and containerd), SIGKILL if it hangs."""
        if self.running:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.log is not None:
            self.log.close()
            self.log = None


def debian_mirror() -> str:
    for path in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines() if Path("/etc/apt/sources.list").exists() else []:
        if line.startswith("deb "):
            return line.split()[1]
    raise DockerUnavailable("no Debian mirror found in /etc/apt for debootstrap")


# Session-level cache of the debootstrap rootfs (45 to 90 s to build here): the compose and the swarm
# end-to-end tests each run their own engines, and both import the same tarball.
_ROOTFS_TARS: dict[str, Path] = {}


def base_rootfs_tar(workdir: Path) -> Path:
    """python3 (3.11) + venv on Debian bookworm, from the machine's own mirror, as a tarball built once a session."""
    cached = _ROOTFS_TARS.get(BASE_TAG)
    if cached is not None and cached.exists():
        return cached
    rootfs = workdir / "rootfs"
    result = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                             "bookworm", str(rootfs), debian_mirror()], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"debootstrap failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    cache = Path(tempfile.mkdtemp(prefix="onnx-serving-base-"))
    atexit.register(shutil.rmtree, cache, True)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(cache / "rootfs.tar"), "."], check=True, timeout=300)
    shutil.rmtree(rootfs, ignore_errors=True)
    _ROOTFS_TARS[BASE_TAG] = cache / "rootfs.tar"
    return cache / "rootfs.tar"


def build_base_image(engine: Engine, workdir: Path) -> str:
    """Import the base image into an engine (anything with Engine.run: the swarm nodes too)."""
    with open(base_rootfs_tar(workdir), "rb") as tar:
        engine.run("docker", "import", "-", BASE_TAG, stdin=tar)
    return BASE_TAG


def build_wheelhouse(onnxruntime: str = "onnxruntime==1.31.1") -> None:
    """The image's wheels, downloaded on the host (the registries' TLS is not trusted in containers)."""
    sys.path.insert(0, str(ROOT / "deploy"))
    from requirements import requirements

    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    requirements_file = WHEELHOUSE / "requirements.txt"
    requirements_file.write_text("\n".join(requirements(onnxruntime)) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                             "-d", str(WHEELHOUSE), "-r", str(requirements_file)],
                            capture_output=True, text=True, timeout=900)
    requirements_file.unlink()
    if result.returncode == 0:  # the PostgreSQL image (deploy/postgres) takes pgserver's binaries only
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "-d", str(WHEELHOUSE), pgserver_requirement()],
                                capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"pip download failed:\n{result.stderr[-3000:]}")


def pgserver_requirement() -> str:
    """The pgserver pin of pyproject.toml's dev extra (the tests' PostgreSQL), for the image too."""
    import tomllib

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return next(d for d in dev if d.startswith("pgserver"))
