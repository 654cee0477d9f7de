"""The kustomize trees render, and every object passes what an API server would check.

kubernetes-validate --strict checks each object against the Kubernetes
OpenAPI schemas with unknown fields rejected. The cert-manager kinds have no
schema there: test_cert_manager.py checks them field by field. What the API
server validates beyond the schema (names, selectors, port names,
references) is checked here by hand.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
import subprocess
from typing import Any

import kubernetes_validate
import pytest

from deploy_support import (
    CLUSTER_SCOPED_KINDS,
    CRD_GROUPS,
    KUBERNETES_VERSION,
    KUSTOMIZE_TREES,
    REPO,
    SELECTOR_LABELS,
    container,
    kustomize_build,
    only,
    pod_spec,
)

# preStop `sleep` and the pod-level appArmorProfile need Kubernetes 1.30.
OLDEST_SUPPORTED = "1.30.0"

BASE_KINDS = Counter(
    {
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "Service": 1,
        "Deployment": 1,
        "PodDisruptionBudget": 1,
        "HorizontalPodAutoscaler": 1,
        "NetworkPolicy": 1,
    }
)
# The cert-manager overlay adds its namespace, the server Certificate, and
# approver-policy's two CertificateRequestPolicies with their RBAC.
CERT_MANAGER_KINDS = BASE_KINDS + Counter(
    {"Namespace": 1, "Certificate": 1, "CertificateRequestPolicy": 2, "ClusterRole": 1, "ClusterRoleBinding": 1}
)
EXPECTED_KINDS = {
    "base": BASE_KINDS,
    "cert-manager": CERT_MANAGER_KINDS,
    # Shared state changes objects, adds none (the Secret is the operator's).
    "redis": CERT_MANAGER_KINDS,
    # Keys in Secrets Manager change objects, add none (the role is AWS's).
    "secretsmanager": CERT_MANAGER_KINDS,
}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z]$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def k8s_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if not o["apiVersion"].startswith(CRD_GROUPS)]


@pytest.mark.parametrize("tree", sorted(KUSTOMIZE_TREES))
def test_renders_the_expected_objects(rendered, tree):
    assert Counter(o["kind"] for o in rendered[tree]) == EXPECTED_KINDS[tree]
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered[tree]]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, KUBERNETES_VERSION])
def test_kubernetes_validate_strict(objects, version):
    for obj in k8s_objects(objects):
        validated = kubernetes_validate.validate(obj, version, strict=True)
        assert validated == ".".join(version.split(".")[:2]), (obj["kind"], validated)


def test_kubernetes_validate_is_the_newest_it_ships():
    assert kubernetes_validate.latest_version().startswith(KUBERNETES_VERSION.rsplit(".", 1)[0])


def test_only_cert_manager_kinds_lack_a_schema(objects):
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            assert obj["kind"] in {"Certificate", "Issuer", "ClusterIssuer", "CertificateRequestPolicy"}
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "mutate",
    [
        # An unknown (misspelt) field, as `kubectl apply --validate=strict` rejects it.
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
            runAsNonroot=True
        ),
        # A wrong type.
        lambda d: d["spec"].update(replicas="2"),
        # A missing required field.
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validator_would_catch_a_broken_deployment(base_objects, mutate):
    broken = copy.deepcopy(only(base_objects, "Deployment"))
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_names_and_labels_are_valid(objects):
    for obj in objects:
        meta = obj["metadata"]
        name = meta["name"]
        if obj["kind"] in {"Service", "Namespace"}:
            assert DNS1035_LABEL.match(name) and len(name) <= 63, name
        else:
            assert DNS1123_SUBDOMAIN.match(name) and len(name) <= 253, name
        for key, value in meta.get("labels", {}).items():
            prefix, _, label = key.rpartition("/")
            assert not prefix or DNS1123_SUBDOMAIN.match(prefix), key
            assert LABEL_NAME.match(label) and len(label) <= 63, key
            assert isinstance(value, str) and LABEL_VALUE.match(value) and len(value) <= 63, value


def test_namespaces(rendered):
    for obj in rendered["base"]:
        assert "namespace" not in obj["metadata"], "the base leaves the namespace to overlays"
    for tree in ("cert-manager", "redis"):
        for obj in rendered[tree]:
            if obj["kind"] == "Namespace":
                assert obj["metadata"]["name"] == "credgate"
            if obj["kind"] in CLUSTER_SCOPED_KINDS:
                # kustomize does not know CertificateRequestPolicy is cluster-scoped:
                # the overlay's transformer removes the namespace it would add.
                assert "namespace" not in obj["metadata"], (tree, obj["kind"], obj["metadata"]["name"])
            else:
                assert obj["metadata"]["namespace"] == "credgate", (tree, obj["kind"])


def test_deployment_selector_matches_its_pods(objects):
    deployment = only(objects, "Deployment")
    selector = deployment["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"] == SELECTOR_LABELS
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"].items() <= pod_labels.items()


def test_container_is_well_formed(objects):
    c = container(objects)
    assert DNS1123_LABEL.match(c["name"])
    names = [p["name"] for p in c["ports"]]
    numbers = [p["containerPort"] for p in c["ports"]]
    assert len(set(names)) == len(names) and len(set(numbers)) == len(numbers)
    for port in c["ports"]:
        assert IANA_SVC_NAME.match(port["name"]) and len(port["name"]) <= 15, port["name"]
        assert 1 <= port["containerPort"] <= 65535
        assert port.get("protocol", "TCP") == "TCP"
    for var in c.get("env", []):
        assert C_IDENTIFIER.match(var["name"]), var["name"]
    volumes = {v["name"] for v in pod_spec(objects)["volumes"]}
    mounts = [m["name"] for m in c["volumeMounts"]]
    assert set(mounts) <= volumes, "every mount names a volume"
    assert set(mounts) == volumes, "every volume is mounted"
    paths = [m["mountPath"] for m in c["volumeMounts"]]
    assert len(set(paths)) == len(paths)


def test_references_resolve(objects):
    """Everything the Deployment and its companions refer to exists in the rendering
    or is one of the documented, externally created Secrets."""
    spec = pod_spec(objects)
    only(objects, "ServiceAccount", spec["serviceAccountName"])
    for volume in spec["volumes"]:
        if "configMap" in volume:
            only(objects, "ConfigMap", volume["configMap"]["name"])
    hpa = only(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["apiVersion"] == "apps/v1"
    only(objects, target["kind"], target["name"])


def test_kubectl_renders_deterministically(kubectl):
    """Two renderings are byte-identical (the ConfigMap hash suffix included)."""
    for tree in KUSTOMIZE_TREES.values():
        first = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, check=True)
        second = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, check=True)
        assert first.stdout == second.stdout


def test_pinned_kubectl_renders_the_same(kubectl, rendered, tmp_path):
    """The kubectl that scripts/ensure-kubectl installs on a fresh machine
    (ENSURE_KUBECTL_PINNED=1) renders exactly what this machine's kubectl renders."""
    import os

    proc = subprocess.run(
        [str(REPO / "scripts" / "ensure-kubectl")],
        env={**os.environ, "ENSURE_KUBECTL_PINNED": "1", "KUBECTL": ""},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    pinned = proc.stdout.strip()
    assert pinned.startswith(str(REPO / ".tools")), pinned
    for name, tree in KUSTOMIZE_TREES.items():
        assert kustomize_build(pinned, tree) == rendered[name], name


def test_kubernetes_validate_cli(kubectl, tmp_path):
    """The same check as a CI step would run it: the CLI on `kubectl kustomize` output."""
    import shutil
    import sys
    from pathlib import Path

    cli = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert cli, "kubernetes-validate is in tests/deploy/requirements.txt"
    for name, tree in KUSTOMIZE_TREES.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_bytes(subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, check=True).stdout)
        proc = subprocess.run(
            [cli, "--strict", "-k", KUBERNETES_VERSION, str(manifest)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for line in proc.stdout.splitlines():
            assert line.startswith("INFO") or (
                line.startswith("WARN") and re.search(r"kind (Certificate|CertificateRequestPolicy)\b", line)
            ), line


def test_the_top_level_tree_renders_the_base(kubectl, rendered):
    assert kustomize_build(kubectl, REPO / "deploy" / "kubernetes") == rendered["base"]
