"""credgate.toml, the manifests and the image agree with each other.

The ports the config listens on are the ports the probes, the container and
the Service use; the files it names are where the volumes are mounted; the
config path the pod passes is the ConfigMap's; its keys are DESIGN.md's.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import yaml

from deploy_support import (
    CERT_MANAGER_DIR,
    KUSTOMIZE_TREES,
    NONROOT_ID,
    REDIS_DIR,
    SECRETS_MANAGER_DIR,
    config,
    config_map_for,
    container,
    image_entrypoint_and_cmd,
    only,
    pod_argv,
    pod_spec,
    port_of,
    seconds,
    uses_redis,
    uses_secrets_manager,
)

# DESIGN.md "Configuration": every key credgate accepts (unknown keys are errors).
ALLOWED_KEYS = {
    "server": {
        "listen", "admin_listen", "request_timeout", "shutdown_grace", "max_concurrent_requests",
        "max_requests_per_caller", "max_connections", "max_connections_per_caller", "idle_timeout",
        "max_connection_age",
    },
    "tls": {"cert", "key", "client_ca", "crl"},
    "aws": {"region", "endpoint_url", "sts_endpoint_url"},
    "limits": {"failed_attempts", "failed_attempts_window"},
    "state": {
        "backend", "url", "cluster_nodes", "sentinels", "sentinel_master", "key_prefix",
        "max_request_ids_per_caller", "password_file", "ca_file", "client_cert", "client_key",
        "command_timeout",
    },
    "telemetry": {"log_format"},
    "keys": {"source", "secret_name", "refresh", "rotate_after", "old_key_grace", "warn_key_age"},
}  # fmt: skip
CALLER_KEYS = {"spiffe_id", "dns_name", "common_name", "iam_user", "aws_profile"}
MATCHERS = {"spiffe_id", "dns_name", "common_name"}
# The keys of a cert-manager (kubernetes.io/tls) Secret.
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}


def mount_path(objs, volume: str) -> PurePosixPath:
    return PurePosixPath(next(m for m in container(objs)["volumeMounts"] if m["name"] == volume)["mountPath"])


def test_config_keys_are_the_designed_ones(objects):
    cfg = config(objects)
    assert set(cfg) <= set(ALLOWED_KEYS) | {"callers"}
    for table, keys in ALLOWED_KEYS.items():
        assert set(cfg.get(table, {})) <= keys, table
    assert cfg["callers"], "at least one example caller"
    identities = set()
    for caller in cfg["callers"]:
        assert set(caller) <= CALLER_KEYS
        matchers = set(caller) & MATCHERS
        assert len(matchers) == 1, f"exactly one matcher per caller: {caller}"
        (matcher,) = matchers
        identity = (matcher, caller[matcher])
        assert identity not in identities, f"duplicate identity {identity}"
        identities.add(identity)
        assert caller["iam_user"]
        # The key is a profile's, or (Secrets Manager) the secret of iam_user.
        assert ("aws_profile" in caller) != uses_secrets_manager(objects), caller


def test_config_values(objects):
    cfg = config(objects)
    assert cfg["server"]["listen"] == "0.0.0.0:8443"
    assert cfg["server"]["admin_listen"] == "0.0.0.0:8081"
    assert cfg["aws"]["region"] == "us-east-1"
    assert "endpoint_url" not in cfg["aws"], "production talks to the real IAM endpoint"
    assert cfg["telemetry"]["log_format"] == "json"
    assert seconds(cfg["server"]["shutdown_grace"]) == 20
    assert seconds(cfg["server"]["request_timeout"]) < seconds(cfg["server"]["shutdown_grace"]), (
        "a request admitted just before SIGTERM can finish within the drain"
    )


def test_ports_agree(objects):
    cfg = config(objects)
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == port_of(cfg["server"]["listen"])
    assert ports["admin"] == port_of(cfg["server"]["admin_listen"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port_of(cfg["server"]["admin_listen"])
    service_port = only(objects, "Service")["spec"]["ports"][0]
    target = service_port["targetPort"]
    resolved = ports[target] if isinstance(target, str) else target
    assert resolved == port_of(cfg["server"]["listen"]), "the Service forwards to the mTLS listener"
    # Both listeners must be reachable from outside the pod (kubelet, Service).
    for addr in (cfg["server"]["listen"], cfg["server"]["admin_listen"]):
        assert addr.rsplit(":", 1)[0] in ("0.0.0.0", "[::]"), addr


def test_tls_files_are_in_the_tls_secret(objects):
    tls = config(objects)["tls"]
    mount = mount_path(objects, "tls")
    for field in ("cert", "key", "client_ca"):
        path = PurePosixPath(tls[field])
        assert path.parent == mount, f"tls.{field} = {path} is not in the {mount} mount"
        assert path.name in TLS_SECRET_KEYS
    assert "crl" not in tls, "cert-manager's Secret carries no CRL"


def test_pod_is_started_with_the_config_map(objects, dockerfile):
    argv = pod_argv(objects, dockerfile)
    assert PurePosixPath(argv[0]).name == "credgate" and argv[1] == "serve"
    assert argv.count("--config") == 1
    path = PurePosixPath(argv[argv.index("--config") + 1])
    assert path.parent == mount_path(objects, "config")
    assert path.name in config_map_for(objects)["data"]


def test_image_defaults_match_the_deployment(objects, dockerfile):
    """Without the Deployment's args the image would start the same process."""
    entrypoint, cmd = image_entrypoint_and_cmd(dockerfile)
    c = container(objects)
    assert "command" not in c, "the image's ENTRYPOINT is used"
    assert c["args"] == cmd
    # An absolute path: the process does not depend on the base image's PATH.
    assert entrypoint == ["/usr/local/bin/credgate", "serve"]
    exposed = {
        int(p.split("/")[0])
        for i in dockerfile.structure
        if i["instruction"] == "EXPOSE"
        for p in i["value"].split()
    }
    assert exposed == {p["containerPort"] for p in c["ports"]}
    user = [i["value"] for i in dockerfile.structure if i["instruction"] == "USER"][-1]
    assert user == f"{NONROOT_ID}:{NONROOT_ID}"


def test_config_map_is_generated_with_a_hash(rendered):
    """configMapGenerator: the name carries a content hash, so a config change rolls the pods."""
    for objs in rendered.values():
        cm = config_map_for(objs)
        assert re.fullmatch(r"credgate-config-[a-z0-9]{10}", cm["metadata"]["name"])
        assert set(cm["data"]) == {"credgate.toml"}
    source = (KUSTOMIZE_TREES["base"] / "credgate.toml").read_text()
    assert config_map_for(rendered["base"])["data"]["credgate.toml"] == source
    assert config_map_for(rendered["cert-manager"])["data"]["credgate.toml"] == source
    assert config_map_for(rendered["redis"])["data"]["credgate.toml"] == (REDIS_DIR / "credgate.toml").read_text()
    assert (
        config_map_for(rendered["secretsmanager"])["data"]["credgate.toml"]
        == (SECRETS_MANAGER_DIR / "credgate.toml").read_text()
    )
    names = {config_map_for(objs)["metadata"]["name"] for objs in rendered.values()}
    assert len(names) == 3, "each overlay's config has its own hash, so applying it rolls the pods"
    kustomization = yaml.safe_load((KUSTOMIZE_TREES["base"] / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "credgate-config" and generator["files"] == ["credgate.toml"]
    # Only the checkov annotation: no disableNameSuffixHash, which would stop the rollouts.
    assert set(generator.get("options", {})) <= {"annotations"}
    assert "generatorOptions" not in kustomization, "disableNameSuffixHash would stop the rollouts"


def test_redis_overlay_config_is_the_base_plus_state(rendered):
    """overlays/redis carries a full copy of credgate.toml (kustomize cannot
    append to a file): it must be the base's, plus [state] and nothing else."""
    base, redis = config(rendered["base"]), config(rendered["redis"])
    assert "state" not in base, "the base documents [state] in comments only: memory mode"
    state = redis.pop("state")
    assert redis == base, "overlays/redis/credgate.toml drifted from base/credgate.toml"
    assert state["url"].startswith(("redis://", "rediss://"))
    authority = state["url"].split("://", 1)[1].split("/", 1)[0]
    assert "@" not in authority, "no credentials in the URL: use password_file"
    assert state["key_prefix"] == "credgate:"
    assert seconds(state["command_timeout"]) < seconds(base["server"]["request_timeout"])
    if not state["url"].startswith("rediss://"):
        assert not {"ca_file", "client_cert", "client_key"} & set(state), "TLS files need rediss://"


def test_secrets_manager_overlay_config_is_the_redis_one_plus_keys(rendered):
    """overlays/secretsmanager carries a full copy of credgate.toml too: the
    redis overlay's, plus [keys], its callers without aws_profile."""
    redis, sm = config(rendered["redis"]), config(rendered["secretsmanager"])
    keys = sm.pop("keys")
    for caller in redis["callers"]:
        caller.pop("aws_profile")
    assert sm == redis, "overlays/secretsmanager/credgate.toml drifted from overlays/redis/credgate.toml"
    assert keys["source"] == "secretsmanager"
    assert keys["secret_name"].startswith("credgate/") and keys["secret_name"].endswith("{iam_user}")
    assert seconds(keys["old_key_grace"]) >= 2 * seconds(keys["refresh"])
    assert seconds(keys["rotate_after"]) > seconds(keys["old_key_grace"])
    assert "state" in sm, "rotation by 2+ replicas needs the shared lease"


def test_redis_password_is_a_file_in_the_redis_secret(rendered):
    objs = rendered["redis"]
    assert uses_redis(objs) and not any(uses_redis(rendered[t]) for t in ("base", "cert-manager"))
    assert uses_redis(rendered["secretsmanager"])
    state = config(objs)["state"]
    mount = mount_path(objs, "redis")
    for key in ("password_file", "ca_file", "client_cert", "client_key"):
        if key in state:
            assert PurePosixPath(state[key]).parent == mount, f"state.{key} is not in the {mount} mount"
    assert PurePosixPath(state["password_file"]).name == "password"
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    assert volumes["redis"]["secret"]["secretName"] == "credgate-redis"
    assert "items" not in volumes["redis"]["secret"], "the whole Secret: password, and ca.crt for rediss://"
    # The host the URL names is the one the NetworkPolicy rule is written for.
    host = state["url"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    assert host.endswith(".credgate.svc") or host.endswith(".credgate.svc.cluster.local"), host


def test_example_client_certificate_is_a_configured_caller(base_objects):
    docs = list(yaml.safe_load_all((CERT_MANAGER_DIR / "client-certificate.example.yaml").read_text()))
    client = only([d for d in docs if d], "Certificate")
    spiffe_ids = {c.get("spiffe_id") for c in config(base_objects)["callers"]}
    assert client["spec"]["uris"][0] in spiffe_ids
