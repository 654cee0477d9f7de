"""Helpers for the offline deployment tests (tests/deploy); fixtures are in conftest.py.

Nothing here needs a cluster or a container engine: the kustomize trees are
rendered with `kubectl kustomize` (scripts/ensure-kubectl finds or installs a
kubectl), the rendered objects are checked like an API server and a security
linter would, and the pod is re-created locally from the rendered Deployment,
ConfigMap and image metadata (deploy/Dockerfile).
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE_TREES = {
    "base": DEPLOY / "kubernetes" / "base",
    "cert-manager": DEPLOY / "kubernetes" / "overlays" / "cert-manager",
    "redis": DEPLOY / "kubernetes" / "overlays" / "redis",
    "secretsmanager": DEPLOY / "kubernetes" / "overlays" / "secretsmanager",
}
CERT_MANAGER_DIR = KUSTOMIZE_TREES["cert-manager"]
REDIS_DIR = KUSTOMIZE_TREES["redis"]
SECRETS_MANAGER_DIR = KUSTOMIZE_TREES["secretsmanager"]
OBSERVABILITY_DIR = DEPLOY / "observability"
# API groups of the CRDs the overlays use (no schema in kubernetes-validate).
CERT_MANAGER_GROUP = "cert-manager.io/"
APPROVER_POLICY_GROUP = "policy.cert-manager.io/"
CRD_GROUPS = (CERT_MANAGER_GROUP, APPROVER_POLICY_GROUP)
# Kinds that carry no namespace.
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CertificateRequestPolicy"}
DOCKERFILE = DEPLOY / "Dockerfile"
PROTO_ROOT = REPO / "proto"
PROTO_FILE = PROTO_ROOT / "credgate" / "v1" / "password_service.proto"
EMULATOR = REPO / "tests" / "emulator" / "iam_emulator.py"

# The newest Kubernetes minor whose schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"
# Where the pod sees its files; tests lay them out under a temp dir instead.
POD_PREFIX = "/etc/credgate"
# Labels every object carries (kustomization `labels`).
COMMON_LABELS = {"app.kubernetes.io/name": "credgate"}
SELECTOR_LABELS = {"app.kubernetes.io/name": "credgate", "app.kubernetes.io/instance": "credgate"}
NONROOT_ID = 65532
# credgate check-config's exit code for any configuration problem (EX_USAGE).
EX_USAGE = 64


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(message: str) -> None:
    """A prerequisite built elsewhere in the project is missing: fail in CI, skip locally."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def kustomize_build(kubectl: str, tree: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(tree)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {tree} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def only(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objs, "Deployment")["spec"]["template"]["spec"]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objs)["containers"]
    assert len(containers) == 1, "credgate's pod has exactly one container"
    return containers[0]


def config_map_for(objs: list[dict[str, Any]], volume: str = "config") -> dict[str, Any]:
    """The ConfigMap behind the Deployment's `config` volume."""
    vols = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    return only(objs, "ConfigMap", vols[volume]["configMap"]["name"])


def config_text(objs: list[dict[str, Any]]) -> str:
    return config_map_for(objs)["data"]["credgate.toml"]


def config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(config_text(objs))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def seconds(duration: str) -> float:
    """A humantime duration as written in credgate.toml ("20s", "15m", "1m30s", "30d")."""
    parts = _DURATION.findall(duration)
    assert parts and _DURATION.sub("", duration).strip() == "", f"not a duration: {duration!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[unit] for n, unit in parts)


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def image_entrypoint_and_cmd(parser: DockerfileParser) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of the final stage, both in exec (JSON) form."""
    stages: list[list[dict[str, Any]]] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    entrypoint: list[str] = []
    cmd: list[str] = []
    for instr in stages[-1]:
        if instr["instruction"] == "ENTRYPOINT":
            entrypoint = json.loads(instr["value"])
            cmd = []  # Docker: a new ENTRYPOINT resets an inherited CMD
        elif instr["instruction"] == "CMD":
            cmd = json.loads(instr["value"])
    return entrypoint, cmd


def pod_argv(objs: list[dict[str, Any]], parser: DockerfileParser) -> list[str]:
    """The process the kubelet starts: Kubernetes command/args over the image's ENTRYPOINT/CMD."""
    c = container(objs)
    entrypoint, cmd = image_entrypoint_and_cmd(parser)
    if "command" in c:
        return list(c["command"]) + list(c.get("args", []))
    return entrypoint + list(c["args"] if "args" in c else cmd)


def rewrite(value: str, root: Path) -> str:
    """A path (or text) as the pod sees it, moved under `root`."""
    return value.replace(POD_PREFIX, str(root) + POD_PREFIX)


# What the downward API gives the test "pod", by fieldPath: a name as the
# Deployment's ReplicaSet would make it (NAME-TEMPLATEHASH-SUFFIX), a namespace.
POD_FIELDS = {"metadata.name": "credgate-5d8c7b9f4-x7k2q", "metadata.namespace": "credgate"}


def kubelet_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's `env` as the kubelet resolves it: a fieldRef from
    POD_FIELDS, a `value` with each $(VAR) of a variable defined before it
    expanded. What this replay cannot fill as a cluster would (Secret or
    ConfigMap keys, resource fields, other pod fields, envFrom) is refused.
    Not replayed: the service links the kubelet adds (CREDGATE_SERVICE_HOST, ...),
    none of which credgate reads."""
    assert "envFrom" not in c, f"envFrom is not replayed: {c['envFrom']}"
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "valueFrom" in var:
            source = var["valueFrom"]
            assert set(source) == {"fieldRef"}, f"env from a reference is not replayed: {var}"
            path = source["fieldRef"]["fieldPath"]
            assert path in POD_FIELDS, f"fieldRef {path} is not replayed (only {sorted(POD_FIELDS)}): {var}"
            env[var["name"]] = POD_FIELDS[path]
        else:
            env[var["name"]] = kubelet_expand(var.get("value", ""), env)
    return env


def kubelet_expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (k8s.io/kubernetes third_party/forked/golang/expansion):
    $(NAME) of a defined variable is its value, of an undefined one stays as
    written; $$ is a literal $; any other $ is kept."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] != "$" or i + 1 == len(value):
            out.append(value[i])
            i += 1
        elif value[i + 1] == "$":
            out.append("$")
            i += 2
        elif value[i + 1] == "(" and (close := value.find(")", i + 2)) != -1:
            name = value[i + 2 : close]
            out.append(defined.get(name, f"$({name})"))
            i = close + 1
        else:  # "$x", or a "$(" never closed: kept as written
            out.append(value[i : i + 2])
            i += 2
    return "".join(out)


def pod_env(objs: list[dict[str, Any]], root: Path) -> dict[str, str]:
    """The container's environment, with /etc/credgate paths moved under root.

    Built from scratch (not inherited), like a container's: only PATH and HOME
    come from the outside, so no AWS_* or OTEL_* variable of the test machine
    leaks into the process.
    """
    home = root / "home" / "nonroot"
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env.update((name, rewrite(value, root)) for name, value in kubelet_env(container(objs)).items())
    return env


def lay_out_mounts(
    objs: list[dict[str, Any]],
    root: Path,
    secrets: dict[str, dict[str, bytes]],
    config_maps: dict[str, dict[str, str]] | None = None,
    *,
    fs_group: int | None = None,
) -> None:
    """Write every volumeMount of the container under root, as the kubelet would.

    secrets: secretName -> {key: content}. config_maps: name -> {key: text};
    defaults to the rendered ConfigMaps, with /etc/credgate paths rewritten.
    fs_group: lay each volume out as the kubelet's atomic writer does (the
    files in a timestamped directory behind `..data`, each key a symlink to
    `..data/KEY`), group-owned by the pod's fsGroup (needs root).
    """
    if config_maps is None:
        config_maps = {
            cm["metadata"]["name"]: {k: rewrite(v, root) for k, v in cm.get("data", {}).items()}
            for cm in objs
            if cm["kind"] == "ConfigMap"
        }
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    for mount in container(objs)["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source = volume["configMap"]
            data: dict[str, bytes] = {
                k: v.encode() for k, v in config_maps[source["name"]].items()
            }
        elif "secret" in volume:
            source = volume["secret"]
            data = secrets[source["secretName"]]
        else:
            raise AssertionError(f"unexpected volume type: {volume}")
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        files = target
        if fs_group is not None:
            files = target / time.strftime("..%Y_%m_%d_%H_%M_%S.0000000001", time.gmtime())
            files.mkdir()
            (target / "..data").symlink_to(files.name)
        items = {i["key"]: i["path"] for i in source.get("items", [])} or {k: k for k in data}
        for key, rel in items.items():
            path = files / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])
            path.chmod(source.get("defaultMode", 0o644))
            if fs_group is not None:
                os.chown(path, 0, fs_group)
                top = rel.split("/", 1)[0]
                if not (target / top).is_symlink():
                    (target / top).symlink_to(f"..data/{top}")


def volume_secret_name(objs: list[dict[str, Any]], volume: str) -> str:
    vols = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    return vols[volume]["secret"]["secretName"]


def uses_redis(objs: list[dict[str, Any]]) -> bool:
    """Whether credgate.toml configures the Redis/Valkey state backend."""
    state = config(objs).get("state", {})
    return "url" in state or state.get("backend") == "redis"


def uses_secrets_manager(objs: list[dict[str, Any]]) -> bool:
    """Whether credgate.toml reads the users' keys from AWS Secrets Manager."""
    return config(objs).get("keys", {}).get("source") == "secretsmanager"


def toml_dumps(doc: dict[str, Any]) -> str:
    """Enough TOML for credgate.toml: tables of scalars and arrays of tables."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        raise TypeError(f"unsupported TOML value: {v!r}")

    out: list[str] = []
    for key, value in doc.items():
        if not isinstance(value, (dict, list)):
            out.append(f"{key} = {scalar(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            out.append(f"\n[{key}]")
            out.extend(f"{k} = {scalar(v)}" for k, v in value.items())
        elif isinstance(value, list):
            for table in value:
                out.append(f"\n[[{key}]]")
                out.extend(f"{k} = {scalar(v)}" for k, v in table.items())
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_credgate(bin_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [str(bin_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=False,
    )


def dev_pki(bin_path: Path, out: Path, clients: list[str]) -> dict[str, Any]:
    """`credgate dev-pki --out DIR --client ...`; returns the files, clients keyed by SPIFFE ID."""
    args = ["dev-pki", "--out", str(out)]
    for spiffe_id in clients:
        args += ["--client", spiffe_id]
    proc = run_credgate(bin_path, *args)
    assert proc.returncode == 0, f"credgate {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    for name in ("ca.crt", "server.crt", "server.key"):
        assert (out / name).is_file(), f"dev-pki wrote no {name}: {sorted(os.listdir(out))}"
    by_uri: dict[str, tuple[Path, Path]] = {}
    for crt in sorted(out.glob("client-*.crt")):
        key = crt.with_suffix(".key")
        for uri in uri_sans(crt.read_bytes()):
            by_uri[uri] = (crt, key)
    missing = [c for c in clients if c not in by_uri]
    assert not missing, f"dev-pki wrote no client certificate for {missing}"
    return {"dir": out, "clients": by_uri}


def uri_sans(pem: bytes) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def tls_secret_from_pki(pki_dir: Path) -> dict[str, bytes]:
    """The server Secret in cert-manager's layout, filled from dev-pki's files."""
    return {
        "tls.crt": (pki_dir / "server.crt").read_bytes(),
        "tls.key": (pki_dir / "server.key").read_bytes(),
        "ca.crt": (pki_dir / "ca.crt").read_bytes(),
    }


def aws_secret(profiles: dict[str, tuple[str, str]], region: str) -> dict[str, bytes]:
    """The AWS Secret: a shared credentials file and a config file, one profile each."""
    creds = "".join(
        f"[{name}]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n\n"
        for name, (key_id, secret) in profiles.items()
    )
    conf = "".join(f"[profile {name}]\nregion = {region}\n\n" for name in profiles)
    return {"credentials": creds.encode(), "config": conf.encode()}


def readline_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    import threading

    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        pytest.fail(f"no ready line from {proc.args} within {timeout}s")
    return result[0] if result else ""


INLINE_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iam:ChangePassword", "iam:GetAccountPasswordPolicy"],
                "Resource": "*",
            }
        ],
    }
)



def log_field(event: dict[str, Any], name: str) -> Any:
    """A field of a JSON log line, top-level or under tracing's "fields"."""
    if name in event:
        return event[name]
    return event.get("fields", {}).get(name)


class Process:
    """credgate as a child process, its stdout lines collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self.events: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.events.put(line)

    def output(self) -> str:
        return "stdout:\n" + "".join(self.lines) + "\nstderr:\n" + "".join(self.stderr)

    def wait_for_message(self, message: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"credgate exited with {self.proc.returncode}\n{self.output()}")
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if log_field(event, "message") == message:
                return event
        pytest.fail(f"no {message!r} log line within {timeout}s\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def create_iam_user(iam, name: str, password: str) -> tuple[str, str]:
    """An IAM user with a console password, an access key and the right to change its password."""
    iam.create_user(UserName=name)
    iam.create_login_profile(UserName=name, Password=password, PasswordResetRequired=False)
    iam.put_user_policy(UserName=name, PolicyName="credgate-change-own-password", PolicyDocument=INLINE_POLICY)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]
