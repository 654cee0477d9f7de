"""Hardening of the rendered objects that checkov does not check.

test_checkov.py runs the standard policy scan (checkov's Kubernetes checks,
zero failures). What stays here is what no checkov check covers, or covers
only partly: each group says which checkov check falls short, and the
assertions checkov makes exactly were removed (e.g. privileged, host
namespaces, allowPrivilegeEscalation, readOnlyRootFilesystem, dropped/added
capabilities, hostPort, the pod's token automount, pinned image and pull
policy: CKV_K8S_16/17/18/19/20/22/25/26/37/38/14/15/43).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pytest

from deploy_support import (
    COMMON_LABELS,
    NONROOT_ID,
    REPO,
    SELECTOR_LABELS,
    config,
    container,
    only,
    pod_spec,
    port_of,
    seconds,
    uses_redis,
    uses_secrets_manager,
)

QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
# The only downward-API fields the container may read from its environment.
DOWNWARD_FIELDS = {"metadata.name", "metadata.namespace"}


def quantity(q: str | int) -> float:
    match = QUANTITY.match(str(q))
    assert match, f"unsupported quantity {q!r}"
    number, unit = float(match.group(1)), match.group(2) or ""
    scale = {"": 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    return number * scale[unit]


def all_containers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = pod_spec(objs)
    return spec["containers"] + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])


# ----------------------------------------------------------------- the pod


# No checkov check looks at replica counts or the rollout strategy.
def test_replicas(objects):
    assert only(objects, "Deployment")["spec"]["replicas"] >= 2


def test_rollout_never_drops_below_the_replica_count(objects):
    strategy = only(objects, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pod_security_context(objects):
    """runAsNonRoot, RuntimeDefault seccomp and the host namespaces are checkov's
    (CKV_K8S_23, CKV_K8S_31, CKV_K8S_17/18/19). Not covered there: CKV_K8S_40
    only wants a UID >= 10000, not the image's USER 65532 that owns nothing
    else and that fsGroup matches; no check looks at runAsGroup, sysctls,
    supplementalGroups or the pod-level appArmorProfile (Kubernetes 1.30)."""
    sc = pod_spec(objects)["securityContext"]
    assert sc["runAsUser"] == NONROOT_ID
    assert sc["runAsGroup"] == NONROOT_ID
    assert not sc.get("sysctls"), "no sysctls"
    assert 0 not in sc.get("supplementalGroups", [])
    assert sc.get("appArmorProfile", {"type": "RuntimeDefault"})["type"] != "Unconfined"


def test_container_security_context(objects):
    """Privilege escalation, read-only root, capabilities, privileged, non-root
    and hostPort are checkov's (CKV_K8S_20/22/37/25/16/23/26). Not covered
    there: the exact UID/GID (CKV_K8S_40 takes any UID >= 10000); a
    container-level seccompProfile (CKV_K8S_31 decides on the pod-level profile
    and never sees a container overriding it with Unconfined); procMount."""
    for c in all_containers(objects):
        sc = c["securityContext"]
        assert sc.get("runAsUser", NONROOT_ID) == NONROOT_ID
        assert sc.get("runAsGroup", NONROOT_ID) == NONROOT_ID
        assert sc.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
        assert sc.get("procMount", "Default") == "Default"


# checkov only rejects the Docker socket among hostPath volumes (CKV_K8S_27)
# and has no check on mount modes, subPath or Secret file modes.
def test_no_host_paths_or_writable_mounts(objects):
    spec = pod_spec(objects)
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir", "projected"}, volume
    for mount in container(objects)["volumeMounts"]:
        assert mount["readOnly"] is True, mount
        # A subPath mount is never updated by the kubelet: rotations would be missed.
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
        assert PurePosixPath(mount["mountPath"]).is_relative_to("/etc/credgate"), mount


def test_secret_and_config_volumes(objects):
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    secrets = ["tls"] + ([] if uses_secrets_manager(objects) else ["aws"])
    secrets += ["redis"] if uses_redis(objects) else []
    assert set(volumes) == {"config", *secrets}
    assert "configMap" in volumes["config"]
    for name in secrets:
        secret = volumes[name]["secret"]
        # Readable by the owner and by the pod's fsGroup only.
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{name} Secret files are world-readable"
        assert not secret.get("optional", False), f"{name} Secret must exist"
    assert pod_spec(objects)["securityContext"]["fsGroup"] == NONROOT_ID


def test_env_carries_only_file_paths(objects):
    """Secrets travel as mounted files; env only says where they are.

    checkov's CKV_K8S_35 only rejects secretKeyRef and envFrom secretRef; this
    also rejects values from ConfigMaps or fields, literal AWS keys and OTLP
    headers (which may carry tokens)."""
    c = container(objects)
    assert "envFrom" not in c, "no bulk env from a Secret or ConfigMap"
    mount_paths = [PurePosixPath(m["mountPath"]) for m in c["volumeMounts"]]
    names = set()
    for var in c.get("env", []):
        names.add(var["name"])
        assert var["name"] not in SECRET_ENV_NAMES
        if "valueFrom" in var:
            # Only the pod's own name and namespace (downward API), for telemetry.
            source = var["valueFrom"]
            assert set(source) == {"fieldRef"}, f"{var['name']} takes a value from a Secret/ConfigMap"
            assert source["fieldRef"]["fieldPath"] in DOWNWARD_FIELDS, var
            continue
        if var["name"].startswith("OTEL_"):
            # DESIGN.md: telemetry export is configured by OTEL_* variables
            # (endpoints, service name: not secrets). Headers may carry tokens.
            assert "HEADERS" not in var["name"], f"{var['name']} may carry credentials"
            continue
        path = PurePosixPath(var["value"])
        assert path.is_absolute(), f"{var['name']}={var['value']} is not a file path"
        assert any(path.is_relative_to(m) for m in mount_paths), f"{path} is on no mounted volume"
    if uses_secrets_manager(objects):
        assert not any(n.startswith("AWS_") for n in names), "no AWS credentials of any kind in the env"
    else:
        assert {"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"} <= names


def test_each_replica_exports_telemetry_under_its_pod_name(objects):
    """service.instance.id is the pod name (downward API), so replicas' series never merge."""
    env = {v["name"]: v for v in container(objects)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    attributes = dict(kv.split("=", 1) for kv in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
    assert attributes["service.instance.id"] == "$(POD_NAME)"
    names = list(env)
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(VAR) needs VAR defined first"


def test_aws_files_come_from_the_aws_secret(objects):
    if uses_secrets_manager(objects):
        pytest.skip("no AWS credentials file: see test_with_secrets_manager_no_aws_key_is_mounted")
    c = container(objects)
    env = {v["name"]: v.get("value") for v in c["env"]}
    aws_mount = next(m for m in c["volumeMounts"] if m["name"] == "aws")["mountPath"]
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"{aws_mount}/credentials"
    assert env["AWS_CONFIG_FILE"] == f"{aws_mount}/config"


def test_with_secrets_manager_no_aws_key_is_mounted(rendered):
    """overlays/secretsmanager: no AWS key in any file, variable or Secret of
    the pod; credgate's own identity is its ServiceAccount's role (IRSA),
    whose web identity token the EKS webhook projects on its own."""
    objs = rendered["secretsmanager"]
    assert uses_secrets_manager(objs)
    spec = pod_spec(objs)
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"credgate-server-tls", "credgate-redis"}, secrets
    assert not any(m["mountPath"].startswith("/etc/credgate/aws") for m in container(objs)["volumeMounts"])
    sa = only(objs, "ServiceAccount", spec["serviceAccountName"])
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role
    assert sa["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    for tree in ("base", "cert-manager", "redis"):
        annotations = only(rendered[tree], "ServiceAccount")["metadata"].get("annotations", {})
        assert "eks.amazonaws.com/role-arn" not in annotations, f"{tree}: no role where profiles hold the keys"


def test_no_service_account_token_and_no_service_links(objects):
    """The pod's automountServiceAccountToken is checkov's CKV_K8S_38. Not
    covered: CKV_K8S_41 checks only a ServiceAccount named `default`, not ours
    nor whether the pod uses `default`; nothing checks enableServiceLinks."""
    spec = pod_spec(objects)
    assert spec["enableServiceLinks"] is False
    sa = only(objects, "ServiceAccount", spec["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] != "default"


def test_resources(objects):
    """CKV_K8S_10/11/12/13 only want requests and limits present; not that the
    request fits under the limit or that the numbers are sane for credgate."""
    resources = container(objects)["resources"]
    for kind in ("cpu", "memory"):
        request = quantity(resources["requests"][kind])
        limit = quantity(resources["limits"][kind])
        assert 0 < request <= limit, (kind, request, limit)
    # Sane bounds for this service (see the comment in deployment.yaml).
    assert quantity(resources["limits"]["memory"]) <= 1024**3
    assert quantity(resources["requests"]["cpu"]) >= 0.01


# A pinned image (tag not latest/blank, or a digest) and the pull policy are
# checkov's CKV_K8S_14, CKV_K8S_43 (skipped in the base only, with its reason)
# and CKV_K8S_15; see test_checkov.py.


# No checkov check knows the image is distroless (no shell) or what credgate's
# probes, shutdown timing and spread need.
def test_no_shell_is_assumed(objects):
    """The distroless image has no shell: no exec probes or hooks, and preStop is a native sleep."""
    c = container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "exec" not in c[probe]
    pre_stop = c["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, pre_stop
    assert pre_stop["sleep"]["seconds"] > 0
    assert "postStart" not in c["lifecycle"]


def test_probes_are_grpc_on_the_admin_port(objects):
    """CKV_K8S_8/9 only want a liveness and a readiness probe to exist."""
    c = container(objects)
    admin_port = port_of(config(objects)["server"]["admin_listen"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == admin_port, probe
        assert c[probe].get("grpc", {}).get("service", "") == ""
    # A slow start is the startup probe's business, not liveness's.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


def rust_seconds(path: str, pattern: str) -> int:
    """A duration constant read from credgate's source, so this arithmetic
    follows the code instead of a copy of its numbers."""
    match = re.search(pattern, (REPO / path).read_text())
    assert match, f"{pattern} not found in {path}"
    return int(match.group(1))


def test_termination_grace_covers_the_longest_drain_and_exit(objects):
    spec = pod_spec(objects)
    server = config(objects)["server"]
    grace = seconds(server["shutdown_grace"])
    request_timeout = seconds(server["request_timeout"])
    pre_stop = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    # After SIGTERM credgate waits for every attempt that went to IAM until its
    # audit event is written, past shutdown_grace: up to its deadline, then the
    # upstream wait, then a few seconds for the state store (server::longest_drain).
    upstream = rust_seconds("src/change/attempt.rs", r"UPSTREAM_TIMEOUT: Duration = Duration::from_secs\((\d+)\)")
    after = rust_seconds("src/server.rs", r"UPSTREAM_TIMEOUT\.saturating_add\(Duration::from_secs\((\d+)\)\)")
    drain = max(grace, request_timeout + upstream + after)
    # Then the last log lines and the telemetry flush, each on a budget (src/cli.rs).
    logs = rust_seconds("src/cli.rs", r"LOG_FLUSH_BUDGET: Duration = Duration::from_secs\((\d+)\)")
    telemetry = rust_seconds("src/cli.rs", r"TELEMETRY_FLUSH_BUDGET: Duration = Duration::from_secs\((\d+)\)")
    assert drain == 45, "the defaults' longest drain"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain + logs + telemetry


def test_topology_spread_across_nodes(objects):
    spec = pod_spec(objects)
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    node = constraints["kubernetes.io/hostname"]
    assert node["maxSkew"] == 1
    assert node["labelSelector"]["matchLabels"].items() <= labels.items()
    assert node["labelSelector"]["matchLabels"] == SELECTOR_LABELS


# ------------------------------------------------------------ companions
# checkov has no check on labels, Services, PDBs, HPAs or selectors, and for
# NetworkPolicies only CKV2_K8S_6 (some policy selects the pod), not what it allows.


def test_common_labels(objects):
    for obj in objects:
        assert COMMON_LABELS.items() <= obj["metadata"].get("labels", {}).items(), obj["kind"]


def test_service(objects):
    service = only(objects, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = service["spec"]["ports"]
    assert len(ports) == 1, "only the mTLS port is exposed; the admin port is for the kubelet"
    port = ports[0]
    assert port["appProtocol"] == "grpc"
    assert port["port"] == 8443
    assert port["name"] == "grpc"
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == SELECTOR_LABELS
    assert service["spec"]["selector"].items() <= labels.items()


def test_pod_disruption_budget(objects):
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == SELECTOR_LABELS


def test_horizontal_pod_autoscaler(objects):
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    pdb = only(objects, "PodDisruptionBudget")
    deployment = only(objects, "Deployment")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert spec["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    assert spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]
    cpu = [
        m["resource"]["target"]
        for m in spec["metrics"]
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert len(cpu) == 1 and cpu[0]["type"] == "Utilization"
    assert 0 < cpu[0]["averageUtilization"] <= 100
    # Utilization is relative to the request: there must be one.
    assert "cpu" in container(objects)["resources"]["requests"]


def test_network_policy(objects):
    netpol = only(objects, "NetworkPolicy")
    spec = netpol["spec"]
    assert spec["podSelector"] == {"matchLabels": SELECTOR_LABELS}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    cfg = config(objects)
    grpc_port, admin_port = port_of(cfg["server"]["listen"]), port_of(cfg["server"]["admin_listen"])

    allowed_ingress: dict[int, list[Any]] = {}
    for rule in spec["ingress"]:
        assert rule.get("ports"), "an ingress rule without ports would open every port"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
            allowed_ingress.setdefault(port["port"], []).append(rule.get("from"))
    assert set(allowed_ingress) == {grpc_port, admin_port}
    # The mTLS port: only from namespaces labelled as credgate clients.
    for peers in allowed_ingress[grpc_port]:
        assert peers, "the gRPC port is not open to everyone"
        for peer in peers:
            assert set(peer) == {"namespaceSelector"}, peer
            assert peer["namespaceSelector"] == {"matchLabels": {"credgate.io/client": "true"}}

    egress = set()
    for rule in spec["egress"]:
        assert rule.get("ports"), "an egress rule without ports would allow everything"
        for port in rule["ports"]:
            assert "endPort" not in port
            egress.add((port.get("protocol", "TCP"), port["port"]))
    expected = {("UDP", 53), ("TCP", 53), ("TCP", 443)}
    if uses_redis(objects):
        expected.add(("TCP", 6379))
        # Redis only, and only to labelled pods in a named namespace.
        (rule,) = [r for r in spec["egress"] if any(p["port"] == 6379 for p in r["ports"])]
        assert [p["port"] for p in rule["ports"]] == [6379]
        assert rule.get("to"), "Redis egress must name its peers"
        for peer in rule["to"]:
            assert peer.get("podSelector", {}).get("matchLabels"), peer
            assert peer.get("namespaceSelector", {}).get("matchLabels"), peer
    assert egress == expected


@pytest.mark.parametrize("kind", ["Deployment", "PodDisruptionBudget", "NetworkPolicy", "Service"])
def test_selectors_are_never_empty(objects, kind):
    """An empty selector in a PDB or NetworkPolicy selects every pod of the namespace."""
    obj = only(objects, kind)
    selector = {
        "Deployment": lambda o: o["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": lambda o: o["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": lambda o: o["spec"]["podSelector"]["matchLabels"],
        "Service": lambda o: o["spec"]["selector"],
    }[kind](obj)
    assert selector == SELECTOR_LABELS
