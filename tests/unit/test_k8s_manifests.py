"""Offline checks of deploy/kubernetes: what the manifests promise, without a cluster.

The structural checks use PyYAML only and always run. Schema validation runs when
`kubernetes-validate` is installed, and a real `kubectl kustomize` render when kubectl is on
PATH; both need no network.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"

Manifest = dict[str, Any]


def _kustomization() -> Manifest:
    with (K8S / "kustomization.yaml").open() as f:
        data: Manifest = yaml.safe_load(f)
    return data


def _generated_configmaps(kustomization: Manifest) -> Iterator[Manifest]:
    """The ConfigMaps kustomize's configMapGenerator makes (names without the hash suffix)."""
    for gen in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, rel = entry.rpartition("=")
            data[key or posixpath.basename(rel)] = (K8S / rel).read_text()
        yield {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"]},
            "data": data,
        }


def _load_all() -> list[Manifest]:
    kustomization = _kustomization()
    docs: list[Manifest] = []
    for rel in kustomization["resources"]:
        with (K8S / rel).open() as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    docs.extend(_generated_configmaps(kustomization))
    return docs


DOCS = _load_all()


def one(kind: str, name: str) -> Manifest:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[Manifest]:
    return [d for d in DOCS if d["kind"] == kind]


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    """matchLabels semantics (the only form these manifests use)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector form: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Manifest = containers[0]
    return c


def flag(c: Manifest, name: str) -> str:
    """Value of --name=value / --name value from a container's command + args."""
    argv = [*c.get("command", []), *c.get("args", [])]
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"--{name} not set in {argv}")


def port_number(c: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    assert numbers, f"no container port named {port!r}"
    return int(numbers[0])


def image_uid() -> int:
    """The numeric user the Dockerfile runs as."""
    match = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile must set a numeric USER"
    return int(match.group(1))


GATEWAY = one("Deployment", "rbac-gateway")
BACKEND = one("StatefulSet", "inventory-backend")
GATEWAY_LABELS = GATEWAY["spec"]["template"]["metadata"]["labels"]
BACKEND_LABELS = BACKEND["spec"]["template"]["metadata"]["labels"]
WORKLOADS = [GATEWAY, BACKEND]


def test_every_document_has_kind_apiversion_and_name() -> None:
    for doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc


def test_gateway_runs_at_least_two_replicas_and_rolls_without_losing_capacity() -> None:
    assert GATEWAY["spec"]["replicas"] >= 2
    assert GATEWAY["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one("PodDisruptionBudget", "rbac-gateway")
    assert selects(pdb["spec"]["selector"], GATEWAY_LABELS)


def test_gateway_probes_use_ready_for_readiness_and_healthz_for_liveness() -> None:
    c = container(GATEWAY)
    gateway_port = int(flag(c, "port"))
    for probe, path in (("readinessProbe", "/-/ready"), ("livenessProbe", "/-/healthz")):
        http = c[probe]["httpGet"]
        assert http["path"] == path
        assert port_number(c, http["port"]) == gateway_port


def test_backend_probes_use_its_healthz() -> None:
    c = container(BACKEND)
    for probe in ("readinessProbe", "livenessProbe"):
        http = c[probe]["httpGet"]
        assert http["path"] == "/healthz"
        assert port_number(c, http["port"]) == int(flag(c, "port"))


def test_every_container_has_requests_and_limits() -> None:
    for workload in WORKLOADS:
        resources = container(workload)["resources"]
        for section in ("requests", "limits"):
            assert set(resources[section]) >= {"cpu", "memory"}, workload["metadata"]["name"]


def test_containers_run_as_the_image_user_non_root_with_read_only_root() -> None:
    for workload in WORKLOADS:
        pod = workload["spec"]["template"]["spec"]
        sc = {**pod.get("securityContext", {}), **container(workload)["securityContext"]}
        name = workload["metadata"]["name"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["runAsUser"] == image_uid() != 0, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert pod["automountServiceAccountToken"] is False, name
        mounts = {m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_policy_comes_from_the_configmap_mounted_as_a_directory() -> None:
    c = container(GATEWAY)
    policy_dir, policy_file = posixpath.split(flag(c, "policy"))
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == policy_dir]
    assert len(mounts) == 1, f"nothing mounted at {policy_dir}"
    mount = mounts[0]
    # subPath mounts never see ConfigMap updates (the same trap as a single-file bind mount).
    assert "subPath" not in mount
    assert mount.get("readOnly") is True
    volume = next(
        v for v in GATEWAY["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    configmap = one("ConfigMap", volume["configMap"]["name"])
    assert policy_file in configmap["data"]


def test_configmap_policy_is_the_shipped_rbac_yaml_byte_for_byte() -> None:
    shipped = ROOT / "rbac.yaml"
    copy = K8S / "rbac.yaml"
    assert copy.read_bytes() == shipped.read_bytes(), (
        "deploy/kubernetes/rbac.yaml differs from rbac.yaml: run `make k8s-policy`"
    )
    generated = one("ConfigMap", "rbac-gateway-policy")
    assert generated["data"]["rbac.yaml"].encode() == shipped.read_bytes()


def test_gateway_upstream_is_the_backend_service() -> None:
    upstream = urlsplit(flag(container(GATEWAY), "upstream"))
    service = one("Service", upstream.hostname or "")
    assert selects({"matchLabels": service["spec"]["selector"]}, BACKEND_LABELS)
    assert upstream.port in {p["port"] for p in service["spec"]["ports"]}
    backend = container(BACKEND)
    for p in service["spec"]["ports"]:
        assert port_number(backend, p["targetPort"]) == int(flag(backend, "port"))


def test_services_select_their_own_pods_only() -> None:
    for name, labels, other in (
        ("rbac-gateway", GATEWAY_LABELS, BACKEND_LABELS),
        ("inventory-backend", BACKEND_LABELS, GATEWAY_LABELS),
    ):
        selector = {"matchLabels": one("Service", name)["spec"]["selector"]}
        assert selects(selector, labels) and not selects(selector, other), name


def test_backend_is_a_single_replica_with_its_database_on_a_persistent_volume() -> None:
    assert BACKEND["spec"]["replicas"] == 1
    c = container(BACKEND)
    db_dir = posixpath.dirname(flag(c, "db"))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == db_dir)
    claims = {t["metadata"]["name"]: t for t in BACKEND["spec"].get("volumeClaimTemplates", [])}
    standalone = {p["metadata"]["name"] for p in of_kind("PersistentVolumeClaim")}
    pod_volumes = {v["name"]: v for v in BACKEND["spec"]["template"]["spec"]["volumes"]}
    if mount["name"] in claims:
        assert "ReadWriteOnce" in claims[mount["name"]]["spec"]["accessModes"]
    else:
        claim = pod_volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in standalone
    # Writable by the non-root user on volumes that come up root-owned.
    assert BACKEND["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == image_uid()


def test_network_policy_lets_only_gateway_pods_reach_the_backend() -> None:
    policies = [
        p for p in of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], BACKEND_LABELS)
    ]
    assert policies, "no NetworkPolicy selects the backend pods"
    backend_port = int(flag(container(BACKEND), "port"))
    for policy in policies:
        spec = policy["spec"]
        assert not selects(spec["podSelector"], GATEWAY_LABELS)
        assert "Ingress" in spec["policyTypes"]
        assert spec.get("ingress"), "an Ingress policy without rules would cut off the gateway too"
        for rule in spec["ingress"]:
            # A rule without `from` allows every source; ipBlock/namespaceSelector widen it.
            assert rule.get("from"), "ingress rule without `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"peer {peer} is more than gateway pods"
                assert selects(peer["podSelector"], GATEWAY_LABELS)
                assert not selects(peer["podSelector"], BACKEND_LABELS)
            assert [p["port"] for p in rule["ports"]] == [backend_port]


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in DOCS:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomize_renders_the_policy_configmap_and_wires_its_hashed_name() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("kubectl without kustomize")
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"] != "ConfigMap")
    assert kinds == sorted(
        (d["kind"], d["metadata"]["name"]) for d in DOCS if d["kind"] != "ConfigMap"
    )
    (configmap,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"].startswith("rbac-gateway-policy-")
    assert configmap["data"]["rbac.yaml"].encode() == (ROOT / "rbac.yaml").read_bytes()
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    names = [
        v["configMap"]["name"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "configMap" in v
    ]
    assert names == [configmap["metadata"]["name"]]
