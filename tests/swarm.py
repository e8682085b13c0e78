"""A real two-node Docker Swarm on this one machine, for the swarm end-to-end test.

Each node is a `dockerd` in its own network namespace (shared/NOTES.md, "Past one machine"):

    namespace PREFIX-br   bridge br0 (the host's FORWARD policy would drop bridged traffic, so
                          the bridge lives in a namespace of its own, not in the host's)
    namespace PREFIX-n1   eth0 198.18.0.11/24  dockerd: swarm manager (init --advertise-addr)
    namespace PREFIX-n2   eth0 198.18.0.12/24  dockerd: swarm worker (join)
    namespace PREFIX-cl   eth0 198.18.0.20/24  test clients (no dockerd)

each joined to br0 by a veth pair. 198.18.0.0/24 is the benchmarking range (RFC 2544): it is in
none of Docker's address pools and exists only inside these namespaces. Traffic goes only to
those addresses. dockerd runs with --bridge=none --iptables=false and private socket, data, exec
and pid paths under one work folder, so the host's own Docker (if any) is never touched.

Cleanup (Cluster.close, also run at exit and on any failure while starting) leaves nothing:
swarm leave --force, each dockerd stopped by its pid (SIGTERM, then SIGKILL), processes still
running from the work folder (containerd, shims) killed by pid, every mount under the work folder
unmounted, the namespaces deleted (which deletes their veths and the bridge), the folder removed.

`python tests/swarm.py client ...` is the load client the rolling-update test runs inside the
client namespace (see `client_main`).
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from docker_stack import Engine

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("dockerd", "docker", "nsenter", "ip", "debootstrap")
SUBNET = "198.18.0"
CLONE_NEWNET = 0x40000000


class SwarmUnavailable(RuntimeError):
    """Why a real swarm cannot be built here (not root, a tool missing): the tests skip with it."""


def log(message: str) -> None:
    print(f"[swarm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def check_available() -> None:
    if os.name != "posix" or os.geteuid() != 0:
        raise SwarmUnavailable("a swarm of dockerds in network namespaces needs root")
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise SwarmUnavailable(f"not installed: {', '.join(missing)} (as root: apt-get install docker.io "
                               "debootstrap iproute2 util-linux)")
    if not Path("/proc/self/ns/net").exists():
        raise SwarmUnavailable("no network namespaces on this kernel")


@contextmanager
def in_netns(path: str):
    """Run the calling thread (only it) in another network namespace; sockets it opens stay there."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
        try:
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
    finally:
        os.close(target)
        os.close(original)


class Node(Engine):
    """One swarm node: a dockerd in its own network namespace, at `address` on the bridge."""

    def __init__(self, name: str, netns: str, address: str, workdir: Path):
        super().__init__(workdir, netns=netns, name=name, start=False)
        self.address = address

    def run(self, *command: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return super().run(*command, timeout=timeout, **kwargs)


class Cluster:
    """Namespaces + bridge + two dockerd nodes + a client namespace; `close()` undoes all of it."""

    def __init__(self, prefix: str | None = None):
        check_available()
        self.prefix = prefix or f"sw{os.getpid() % 100000}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))  # short: unix socket paths
        self.bridge_ns = f"{self.prefix}-br"
        self.client_ns = f"{self.prefix}-cl"
        self.client_address = f"{SUBNET}.20"
        self.nodes = [Node(f"node{i}", f"{self.prefix}-n{i}", f"{SUBNET}.1{i}", self.dir / f"n{i}") for i in (1, 2)]
        self.namespaces: list[str] = []
        # `ip netns add` bind-mounts /run/netns on itself the first time: undone if we were first.
        self.netns_dir_was_there = Path("/run/netns").exists()
        self.closed = False
        atexit.register(self.close)

    # -- network ---------------------------------------------------------------------------------
    def _namespace(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _attach(self, netns: str, address: str, index: int) -> None:
        """A veth pair created inside the bridge namespace: one end on br0, the other moved to netns."""
        port = f"v{index}"
        sh("ip", "-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")

    def start(self) -> "Cluster":
        started = time.monotonic()
        try:
            self._namespace(self.bridge_ns)
            sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for index, node in enumerate(self.nodes, 1):
                self._namespace(node.netns)
                self._attach(node.netns, node.address, index)
            self._namespace(self.client_ns)
            self._attach(self.client_ns, self.client_address, 9)
            for node in self.nodes:
                node.start()
            manager, worker = self.nodes
            manager.docker("swarm", "init", "--advertise-addr", manager.address, "--listen-addr",
                           f"{manager.address}:2377")
            token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
            worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.address,
                          f"{manager.address}:2377", timeout=60)
            deadline = time.monotonic() + 60
            while len(self.ready_nodes()) < 2:
                if time.monotonic() > deadline:
                    raise AssertionError(f"node 2 did not join: {manager.docker('node', 'ls').stdout}")
                time.sleep(0.5)
            log(f"two-node swarm up in {time.monotonic() - started:.1f}s "
                f"(manager {manager.address}, worker {worker.address}, client {self.client_address})")
        except BaseException:
            self.close()
            raise
        return self

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def ready_nodes(self) -> list[str]:
        out = self.manager.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.ID}}", check=False).stdout
        return [line.split()[2] for line in out.splitlines() if line.split()[1:2] == ["Ready"]]

    def node_ids(self) -> dict[str, str]:
        """Node id -> our node name (the nodes share the host's hostname, so match by address)."""
        ids = {}
        for node_id in self.manager.docker("node", "ls", "-q").stdout.split():
            address = self.manager.docker("node", "inspect", "-f", "{{.Status.Addr}}", node_id).stdout.strip()
            ids[node_id] = next(n.name for n in self.nodes if n.address == address)
        return ids

    # -- images ----------------------------------------------------------------------------------
    def copy_images(self, source: Node, target: Node, *images: str, timeout: float = 300) -> None:
        """`docker save | docker load` from one node to another (no registry here)."""
        save = subprocess.Popen(["docker", "save", *images], env=source.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            target.run("docker", "load", stdin=save.stdout, timeout=timeout)
        finally:
            save.stdout.close()
            rc = save.wait(timeout)
        if rc != 0:
            raise AssertionError(f"docker save {' '.join(images)} failed: {save.stderr.read()[-2000:]}")

    # -- stack -----------------------------------------------------------------------------------
    def deploy(self, stack: str, compose_file: Path, env: dict) -> None:
        self.manager.docker("stack", "deploy", "--resolve-image", "never", "--detach=true", "-c", str(compose_file),
                            stack, env=env, timeout=120)

    def tasks(self, service: str) -> list[dict]:
        """The service's tasks that should be running: node name, state, image, error."""
        out = self.manager.docker("service", "ps", service, "--filter", "desired-state=running", "--no-trunc",
                                  "--format", "{{json .}}").stdout
        names = self.node_ids()
        tasks = []
        for line in out.splitlines():
            task = json.loads(line)
            node_id = self.manager.docker("inspect", "-f", "{{.NodeID}}", task["ID"], check=False).stdout.strip()
            tasks.append({"node": names.get(node_id, node_id), "state": task["CurrentState"],
                          "image": task["Image"], "error": task["Error"]})
        return tasks

    def replicas(self) -> dict[str, str]:
        out = self.manager.docker("service", "ls", "--format", "{{.Name}} {{.Replicas}}").stdout
        return dict(line.split()[:2] for line in out.splitlines())

    def wait_converged(self, expected: dict[str, int], timeout: float = 360) -> float:
        """Until every service runs its replicas, healthy (tasks with a healthcheck count once healthy)."""
        started = time.monotonic()
        last = None
        while True:
            replicas = self.replicas()
            state = {name: replicas.get(name) for name in expected}
            if state != last:
                log(f"replicas {state} after {time.monotonic() - started:.0f}s")
                last = state
            if all(state[name] == f"{count}/{count}" for name, count in expected.items()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                details = {name: self.manager.docker("service", "ps", "--no-trunc", name, check=False).stdout
                           for name in expected}
                raise AssertionError(f"not converged after {timeout}s: {state}\n{json.dumps(details, indent=1)}")
            time.sleep(2)

    def url(self, node: Node, port: int) -> str:
        return f"http://{node.address}:{port}"

    @contextmanager
    def client(self):
        """Requests from inside the client namespace (the calling thread only)."""
        with in_netns(f"/run/netns/{self.client_ns}"):
            yield

    def client_process(self, *args: str, **kwargs) -> subprocess.Popen:
        """`python tests/swarm.py client ARGS` inside the client namespace."""
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.client_ns}", sys.executable, __file__,
                                 "client", *args], cwd=ROOT, **kwargs)

    # -- cleanup ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for node in reversed(self.nodes):
            if node.running:
                node.run("docker", "swarm", "leave", "--force", check=False, timeout=30)
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception as error:  # keep cleaning up
                log(f"stopping dockerd on {node.name}: {error}")
        self._kill_leftover_processes()
        self._unmount()
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()
        self._release_netns_dir()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():  # a busy mount: one more pass
            self._unmount()
            shutil.rmtree(self.dir, ignore_errors=True)
        log(f"cleaned up {self.prefix}: namespaces, dockerds, mounts and {self.dir}")

    def _release_netns_dir(self) -> None:
        run_netns = Path("/run/netns")
        if self.netns_dir_was_there or not run_netns.is_dir() or any(run_netns.iterdir()):
            return  # it was there before us, or someone else's namespaces live in it now
        for _ in range(3):  # iproute2 may have stacked the bind mount
            if sh("umount", str(run_netns), check=False).returncode != 0:
                break
        try:
            run_netns.rmdir()
        except OSError:
            pass

    def _kill_leftover_processes(self) -> None:
        """containerd / shims / docker-proxy of our dockerds still alive (only after a SIGKILL): by pid."""
        marker = str(self.dir)
        for _ in range(2):
            pids = []
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) == os.getpid():
                    continue
                try:
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if marker in cmdline:
                    pids.append(int(proc.name))
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                return
            time.sleep(1)

    def _unmount(self) -> None:
        marker = str(self.dir)
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == marker or point.startswith(marker + "/"):
                mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", point, check=False)

    def leftovers(self) -> list[str]:
        """What of this cluster is still on the machine (for the tests' final check)."""
        found = [f"netns {n}" for n in sh("ip", "netns", "list").stdout.split() if n.startswith(self.prefix + "-")]
        if not self.netns_dir_was_there and Path("/run/netns").exists() and not any(Path("/run/netns").iterdir()):
            found.append("/run/netns (created by ip netns add)")
        found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.dir) in line.split()[4]]
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if str(self.dir).encode() in (proc / "cmdline").read_bytes():
                        found.append(f"process {proc.name}")
                except OSError:
                    pass
        if self.dir.exists():
            found.append(f"folder {self.dir}")
        return found


# -- the rolling-update client ---------------------------------------------------------------------

def client_main(argv: list[str]) -> int:
    """Send POST PATH with BODY until STOP_FILE exists, spread over BACKENDS like a health-checked
    load balancer would, and write what happened to OUT as JSON.

    - Backends are `host:port`. A checker probes GET /readyz on each every 0.5 s: a backend is in
      rotation only while its last probe answered 200 (a replica being stopped or still starting is
      out of rotation, as in HAProxy / nginx / an ALB with a /readyz health check).
    - Requests go round-robin over the backends in rotation, each on a new connection.
    - A connection-level error (refused, reset, closed without a response, timeout) takes that
      backend out of rotation and retries the request on another one: up to 4 attempts within 10 s.
      The request (POST /act is idempotent) never produced an answer, so a retry is safe.
    - A FAILURE is a request that did not end in HTTP 200 with a well-formed body: any non-200
      answer (no retry on those), a 200 whose body is not {"actions": [one int]}, or a request whose
      every attempt failed at the connection level (or no backend was in rotation for 10 s).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="swarm.py client")
    parser.add_argument("--backends", required=True)
    parser.add_argument("--path", default="/act")
    parser.add_argument("--body", default='{"observations": [[0, 0, 0.05, 0]], "model": "cartpole"}')
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    backends = [b.rsplit(":", 1) for b in args.backends.split(",")]
    backends = [(host, int(port)) for host, port in backends]
    healthy = {b: False for b in backends}
    events: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    done = threading.Event()

    def mark(backend, up: bool, why: str) -> None:
        with lock:
            if healthy[backend] != up:
                healthy[backend] = up
                events.append(f"{time.monotonic() - started:6.1f}s {backend[0]}:{backend[1]} "
                              f"{'in' if up else 'out of'} rotation ({why})")

    def probe(backend) -> tuple[bool, str]:
        connection = http.client.HTTPConnection(*backend, timeout=1.0)
        try:
            connection.request("GET", "/readyz")
            status = connection.getresponse().status
            return status == 200, f"/readyz {status}"
        except (OSError, http.client.HTTPException) as error:
            return False, f"/readyz {type(error).__name__}"
        finally:
            connection.close()

    def checker() -> None:
        while not done.is_set():
            for backend in backends:
                mark(backend, *probe(backend))
            done.wait(0.5)

    for backend in backends:
        mark(backend, *probe(backend))
    thread = threading.Thread(target=checker, daemon=True)
    thread.start()

    body = args.body.encode()
    stats = {"requests": 0, "ok": 0, "failed": 0, "retried": 0, "attempt_errors": 0,
             "per_backend": {f"{h}:{p}": 0 for h, p in backends}}
    failures: list[str] = []
    turn = 0
    while not os.path.exists(args.stop_file):
        stats["requests"] += 1
        deadline = time.monotonic() + 10
        attempts, outcome = 0, None
        while outcome is None:
            with lock:
                rotation = [b for b in backends if healthy[b]]
            if not rotation:
                if time.monotonic() > deadline:
                    outcome = "failed: no backend in rotation for 10 s"
                    break
                time.sleep(0.05)
                continue
            backend = rotation[turn % len(rotation)]
            turn += 1
            attempts += 1
            connection = http.client.HTTPConnection(*backend, timeout=5.0)
            try:
                connection.request("POST", args.path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as error:
                stats["attempt_errors"] += 1
                mark(backend, False, f"request {type(error).__name__}")
                if attempts >= 4 or time.monotonic() > deadline:
                    outcome = f"failed: {attempts} attempts, last {type(error).__name__} from {backend}"
                continue
            finally:
                connection.close()
            if response.status != 200:
                outcome = f"failed: HTTP {response.status} from {backend}: {payload[:200]!r}"
                break
            try:
                actions = json.loads(payload)["actions"]
                well_formed = len(actions) == 1 and isinstance(actions[0], int)
            except (ValueError, KeyError, TypeError):
                well_formed = False
            if not well_formed:
                outcome = f"failed: malformed 200 from {backend}: {payload[:200]!r}"
                break
            stats["per_backend"][f"{backend[0]}:{backend[1]}"] += 1
            stats["retried"] += attempts > 1
            outcome = "ok"
        if outcome == "ok":
            stats["ok"] += 1
        else:
            stats["failed"] += 1
            failures.append(f"{time.monotonic() - started:6.1f}s {outcome}")
        time.sleep(args.interval)
    done.set()
    thread.join(5)
    stats.update(seconds=round(time.monotonic() - started, 1), failures=failures[:50], events=events)
    Path(args.out).write_text(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        sys.exit(client_main(sys.argv[2:]))
    sys.exit("usage: python tests/swarm.py client --backends HOST:PORT,... --stop-file F --out F")
