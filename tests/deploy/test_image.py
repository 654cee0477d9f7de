"""deploy/Dockerfile built and run: the image the Deployment names is real,
small, and serves as the pod would run it.

The image is built by podman from the shipped Dockerfile itself, on a local
stand-in for its distroless base and with the host's binary and libgcc_s as
the builder stage's output (image_support.py says what differs from a
registry build).
What the image is — size, layers, files, linked libraries, SBOM — is written
to target/container/report.txt (scripts/test prints it) and asserted here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import time
from pathlib import PurePosixPath
from typing import Any

import pytest

from deploy_support import (
    POD_FIELDS,
    Process,
    aws_secret,
    config,
    config_map_for,
    container,
    create_iam_user,
    dev_pki,
    free_port,
    http_json,
    kubelet_env,
    kubelet_expand,
    lay_out_mounts,
    log_field,
    pod_spec,
    port_of,
    seconds,
    tls_secret_from_pki,
    toml_dumps,
)
from image_support import Image, pod_run_args, pod_security

# Uncompressed: what `podman images` / `docker images` show and a node's disk holds.
SIZE_LIMIT = 40_000_000
# What the dynamic loader may resolve for the binary: glibc (in the
# distroless base-nossl image) and libgcc_s (added by the Dockerfile).
ALLOWED_LIBRARIES = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2"}
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "busybox", "toybox"}
INTERPRETERS = {"perl", "python", "python3", "lua", "ruby", "node"}
PACKAGE_MANAGERS = {"dpkg", "apt", "apt-get", "aptitude", "apk", "rpm", "yum", "dnf", "microdnf", "pip", "pip3"}
# Crates the SBOM must list at the Cargo.lock version: the gRPC, TLS and AWS stacks.
SBOM_MUST_LIST = ("tonic", "prost", "rustls", "aws-lc-rs", "tokio", "hyper", "h2", "aws-sdk-iam", "aws-config")
OLD_PASSWORD = "Old-Passw0rd!image"
NEW_PASSWORD = "New-Passw0rd!image"
DRAINED_PASSWORD = "New-Passw0rd!image-drained"
IAM_DELAY_SECONDS = 2.0


def test_the_shipped_dockerfile_builds_on_the_stand_in_base(image: Image, dockerfile):
    """One layer per COPY on top of the base, holding the host's binary and
    libgcc-s1's library and dpkg status, nothing else; the binary built by the
    Rust the builder stage would use."""
    (pinned,) = re.findall(r"^ARG RUST_VERSION=(\S+)$", dockerfile.content, re.MULTILINE)
    host = subprocess.run(["rustc", "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    assert host == pinned or host.startswith(f"{pinned}."), f"the host builds with rustc {host}, the Dockerfile {pinned}"
    base_layers = image.base["RootFS"]["Layers"]
    layers = image.inspect["RootFS"]["Layers"]
    assert layers[: len(base_layers)] == base_layers, "built FROM the stand-in base"
    assert len(layers) == len(base_layers) + 3, f"one layer per COPY: {layers}"
    added = {path for path, info in image.files.items() if not info.isdir()} - image.base_files
    assert added == {
        "usr/local/bin/credgate",
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "var/lib/dpkg/status.d/libgcc-s1",
    } == set(image.added), added
    assert image.digests["usr/local/bin/credgate"] == image.elf["sha256"], "the host's binary, unchanged"
    for path, output in image.added.items():
        assert image.digests[path] == hashlib.sha256(output.data).hexdigest(), f"{path} is not the builder's"
        assert image.files[path].mode & 0o777 == output.mode, (path, oct(image.files[path].mode))
    assert image.added["usr/local/bin/credgate"].mode == 0o755
    # A scanner reading distroless's status.d sees the package libgcc_s comes from.
    status = image.added["var/lib/dpkg/status.d/libgcc-s1"].data.decode()
    assert status.startswith("Package: libgcc-s1\n") and "\nVersion: 12." in status, status


def test_the_image_is_small(image_report: dict[str, Any]):
    size = image_report["size"]
    assert size["uncompressed"] < SIZE_LIMIT, f"{size['uncompressed']:,} bytes (limit {SIZE_LIMIT:,})\n{size}"
    assert size["compressed"] < size["uncompressed"]
    # The runtime stage's layers are the binary, libgcc-s1 and a few tar headers.
    assert 0 <= size["uncompressed"] - size["base"] - size["added"] < 64 * 1024, size


def test_the_image_has_no_shell_and_no_package_manager(image: Image, engine):
    names = {PurePosixPath(path).name: path for path, info in image.files.items() if not info.isdir()}
    for forbidden in (SHELLS, INTERPRETERS, PACKAGE_MANAGERS):
        found = {names[n] for n in forbidden if n in names}
        assert not found, f"the image carries {sorted(found)}"
    assert not any(p.startswith(("var/lib/dpkg/info", "var/lib/apt", "etc/apt")) for p in image.files)
    # And at run time: nothing to exec for `kubectl exec ... sh`.
    for shell in ("sh", "/bin/sh", "bash"):
        proc = engine("run", "--rm", "--pull=never", "--network", "none", "--entrypoint", shell, image.ref, check=False)
        assert proc.returncode == 127, f"{shell}: {proc.returncode} {proc.stderr}"


def test_the_binary_links_only_glibc_and_libgcc(image: Image, image_report: dict[str, Any]):
    libraries = image_report["libraries"]
    assert set(libraries["needed"]) <= ALLOWED_LIBRARIES, libraries["needed"]
    assert libraries["interpreter"] == "/lib64/ld-linux-x86-64.so.2"
    assert image.has_file(libraries["interpreter"])
    resolved = libraries["resolved_in_image"]
    assert not [line for line in resolved if "not found" in line], resolved
    for needed in libraries["needed"]:
        line = next((entry for entry in resolved if entry.startswith(needed) or f"/{needed}" in entry), None)
        assert line, f"{needed} is not resolved in the image: {resolved}"
        if "=>" in line:
            path = line.split("=>", 1)[1].split("(", 1)[0].strip()
            assert image.has_file(path), f"{needed} resolves to {path}, which the image lacks"
            if needed == "libgcc_s.so.1":
                assert path.lstrip("/") in image.added, f"libgcc_s resolves to {path}, not the Dockerfile's copy"
    # base-nossl has no libgcc_s (nor libssl, libstdc++): without the
    # Dockerfile's COPY the binary would not start.
    assert not [path for path in image.base_files if "libgcc_s" in path or "libssl" in path or "libstdc++" in path]


def test_the_sbom_lists_what_the_binary_is_built_from(image_report: dict[str, Any]):
    from image_support import cargo_lock_versions, compiled_crates

    sbom = json.loads(open(image_report["sbom"]["path"]).read())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    described = sbom["metadata"]["component"]
    lock = cargo_lock_versions()
    assert described["name"] == "credgate" and described["version"] in lock["credgate"], described
    listed = {(c["name"], c["version"]) for c in sbom["components"]}
    for crate in SBOM_MUST_LIST:
        assert any(name == crate for name, _ in listed), f"{crate} is not in the SBOM"
    for component in sbom["components"]:
        assert component["version"] in lock.get(component["name"], set()), component["bom-ref"]
        assert component["purl"].startswith(f"pkg:cargo/{component['name']}@{component['version']}")
    # Complete: every crate cargo compiles into the binary is listed ...
    compiled = compiled_crates() - {("credgate", described["version"])}
    missing = compiled - listed
    assert not missing, f"compiled into the binary but not in the SBOM: {sorted(missing)}"
    # ... and nothing only tests or the build use (dev- and build-dependencies).
    for not_linked in ("proptest", "tempfile", "protoc-bin-vendored", "prost-build", "tonic-prost-build", "cc"):
        assert not any(name == not_linked for name, _ in listed), f"{not_linked} is not part of the binary"
    assert image_report["sbom"]["components"] == len(sbom["components"])


def test_the_image_and_the_manifests_agree(objects: list[dict[str, Any]], image: Image):
    """What the kubelet would start from this image is what the manifests describe."""
    c = container(objects)
    cfg = config(objects)
    image_config = image.config

    # The process: the image's ENTRYPOINT (no `command` override) is a binary in the image.
    argv = list(c.get("command") or image_config["Entrypoint"])
    argv += c["args"] if "args" in c else ([] if "command" in c else image_config.get("Cmd") or [])
    executable = argv[0]
    if not executable.startswith("/"):
        path = image.env()["PATH"].split(":")
        executable = next((f"{d}/{executable}" for d in path if image.has_file(f"{d}/{executable}")), executable)
    assert image.has_file(executable), f"{argv[0]} is not in the image"
    assert image.files[executable.lstrip("/")].mode & 0o111, f"{executable} is not executable"
    assert argv[1] == "serve", argv

    # The user: numeric in the image (runAsNonRoot can verify it), the same in the pod.
    security = pod_security(objects)
    assert image_config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    home = image.passwd().get(security["runAsUser"])
    assert home and image.has_file(home), "the user has a passwd entry and a home (HOME) in the image"
    assert image.has_file(image_config["WorkingDir"])

    # The ports: EXPOSE'd = the container's = the config's listeners; the probes use the admin one.
    exposed = {tuple(p.split("/")) for p in image_config["ExposedPorts"]}
    declared = {(str(p["containerPort"]), p.get("protocol", "TCP").lower()) for p in c["ports"]}
    assert exposed == declared
    admin = port_of(cfg["server"]["admin_listen"])
    assert {int(p) for p, _ in exposed} == {port_of(cfg["server"]["listen"]), admin}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == admin, probe

    # The files: every absolute path the process is told about is on a read-only
    # mount, and no mount hides a file of the image.
    mounts = {PurePosixPath(m["mountPath"]): m for m in c.get("volumeMounts", [])}
    named = [v for v in argv if v.startswith("/") and v != argv[0]]
    named += [e["value"] for e in c.get("env", []) if str(e.get("value", "")).startswith("/")]
    named += config_paths(cfg)
    assert named, "the config names its files"
    for path in map(PurePosixPath, named):
        mount = next((m for m in mounts if path.is_relative_to(m)), None)
        assert mount is not None, f"{path} is on no volumeMount ({sorted(map(str, mounts))})"
        assert mounts[mount].get("readOnly"), f"{mount} is mounted writable"
    for mount in mounts:
        hidden = [p for p in image.files if PurePosixPath("/", p).is_relative_to(mount)]
        assert not hidden, f"the {mount} mount hides {hidden[:5]}"

    # A read-only root: the image declares no VOLUME and the pod adds no writable mount.
    assert security["readOnlyRootFilesystem"] is True
    assert not image_config.get("Volumes"), image_config.get("Volumes")
    assert all(m.get("readOnly") for m in mounts.values())
    # The CA roots the AWS SDK loads (rustls-native-certs reads SSL_CERT_FILE) are there.
    assert image.has_file(image.env()["SSL_CERT_FILE"])


def config_paths(value: Any) -> list[str]:
    """Every absolute path among credgate.toml's string values."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in config_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in config_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_the_container_serves_and_drains_as_the_pod(
    base_objects, image: Image, engine, iam_emulator, grpc_stubs, tmp_path
):
    """As the Deployment runs it: user 65532, read-only root, the config/TLS/AWS
    volumes mounted as the kubelet mounts them; health answers, a real
    ChangePassword goes through IAM, and SIGTERM drains a call in flight and
    exits 0. Host networking (the emulator listens on the host's loopback), so
    the listeners move to free loopback ports; everything else is the shipped config."""
    import boto3
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pb2, pb2_grpc = grpc_stubs
    objs = base_objects
    shipped = config(objs)
    grace = seconds(shipped["server"]["shutdown_grace"])
    caller = dict(shipped["callers"][0])

    admin_iam = boto3.client(
        "iam",
        endpoint_url=iam_emulator["endpoint"],
        region_name=iam_emulator["region"],
        aws_access_key_id=iam_emulator["admin_access_key_id"],
        aws_secret_access_key=iam_emulator["admin_secret_access_key"],
    )
    key_id, secret = create_iam_user(admin_iam, caller["iam_user"], OLD_PASSWORD)

    cfg = copy.deepcopy(shipped)
    cfg["server"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    cfg["aws"]["endpoint_url"] = iam_emulator["endpoint"]
    pki = dev_pki(image.binary, tmp_path / "pki", [caller["spiffe_id"]])
    root = tmp_path / "volumes"
    security = pod_security(objs)
    # Each Secret volume the Deployment mounts, filled as its operator would.
    contents = {
        "tls": tls_secret_from_pki(pki["dir"]),
        "aws": aws_secret({caller["aws_profile"]: (key_id, secret)}, iam_emulator["region"]),
    }
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    lay_out_mounts(
        objs,
        root,
        secrets={volumes[v]["secret"]["secretName"]: data for v, data in contents.items() if v in volumes},
        config_maps={config_map_for(objs)["metadata"]["name"]: {"credgate.toml": toml_dumps(cfg)}},
        fs_group=security.get("fsGroup"),
    )

    name = f"credgate-test-{free_port()}"
    credgate = Process(engine.popen(*pod_run_args(objs, image.ref, root, name)), engine.env)
    channels: list[grpc.Channel] = []
    try:
        listening = credgate.wait_for_message("credgate listening", timeout=60)
        assert log_field(listening, "tls_addr") == cfg["server"]["listen"], listening
        assert log_field(listening, "admin_addr") == cfg["server"]["admin_listen"], listening

        # The process as the kernel sees it: the pod's user, groups, no capabilities, no privilege gain, seccomp.
        pid = container_pid(engine, name, credgate)
        status = process_status(pid)
        assert status["Uid"].split() == [str(security["runAsUser"])] * 4, status["Uid"]
        assert status["Gid"].split() == [str(security["runAsGroup"])] * 4, status["Gid"]
        assert str(security["fsGroup"]) in status["Groups"].split(), status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        assert "ro" in root_mount_options(pid), "the root filesystem is read-only"
        # The Deployment's env as the kubelet resolves it: the downward API's pod
        # name is the exported service.instance.id (two replicas never merge).
        environ = process_environ(pid)
        assert environ["HOSTNAME"] == POD_FIELDS["metadata.name"], environ
        assert environ["POD_NAME"] == POD_FIELDS["metadata.name"], environ
        assert environ["POD_NAMESPACE"] == POD_FIELDS["metadata.namespace"], environ
        resource = dict(kv.split("=", 1) for kv in environ["OTEL_RESOURCE_ATTRIBUTES"].split(","))
        assert resource["service.instance.id"] == POD_FIELDS["metadata.name"], resource
        assert resource["k8s.namespace.name"] == POD_FIELDS["metadata.namespace"], resource

        # Health on the admin port, as the kubelet's gRPC probe asks it.
        admin_channel = grpc.insecure_channel(cfg["server"]["admin_listen"])
        channels.append(admin_channel)
        health = health_pb2_grpc.HealthStub(admin_channel)
        deadline = time.monotonic() + 30
        serving = None
        while time.monotonic() < deadline:
            try:
                serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            except grpc.RpcError:
                serving = None
            if serving == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert serving == health_pb2.HealthCheckResponse.SERVING, credgate.output()

        # A real ChangePassword over mTLS, signed with the mounted AWS profile.
        crt, key = pki["clients"][caller["spiffe_id"]]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki["dir"] / "ca.crt").read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=crt.read_bytes(),
        )
        channel = grpc.secure_channel(
            cfg["server"]["listen"], credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        channels.append(channel)
        stub = pb2_grpc.PasswordServiceStub(channel)
        response = stub.ChangePassword(
            pb2.ChangePasswordRequest(old_password=OLD_PASSWORD, new_password=NEW_PASSWORD), timeout=30
        )
        assert response.iam_user == caller["iam_user"] and response.request_id

        # SIGTERM (the kubelet's, after preStop) while a call waits on IAM.
        code, _ = http_json(
            "POST",
            f"{iam_emulator['endpoint']}/_emulator/faults",
            {"action": "ChangePassword", "user": None, "error": None,
             "delay_seconds": IAM_DELAY_SECONDS, "count": -1},
        )  # fmt: skip
        assert code == 200
        calls_url = f"{iam_emulator['endpoint']}/_emulator/calls?action=ChangePassword"
        before = http_json("GET", calls_url)[1]["count"]
        in_flight = stub.ChangePassword.future(
            pb2.ChangePasswordRequest(old_password=NEW_PASSWORD, new_password=DRAINED_PASSWORD), timeout=grace
        )
        deadline = time.monotonic() + 15
        while http_json("GET", calls_url)[1]["count"] <= before:
            assert time.monotonic() < deadline and not in_flight.done(), f"no call reached IAM\n{credgate.output()}"
            time.sleep(0.05)
        sigterm = time.monotonic()
        engine("kill", "--signal", "TERM", name)
        try:
            drained = in_flight.result(timeout=grace)
        except grpc.RpcError as error:
            pytest.fail(f"the in-flight call failed: {error.code()} {error.details()}\n{credgate.output()}")
        assert drained.iam_user == caller["iam_user"]
        try:
            returncode = credgate.proc.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the container still runs {grace + 10}s after SIGTERM\n{credgate.output()}")
        exited_after = time.monotonic() - sigterm
        assert returncode == 0, f"exit {returncode}\n{credgate.output()}"
        assert exited_after <= grace, f"exited {exited_after:.1f}s after SIGTERM (shutdown_grace {grace}s)"
    finally:
        for channel in channels:
            channel.close()
        engine("rm", "--force", "--time", "0", name, check=False)
        credgate.stop()
        http_json("DELETE", f"{iam_emulator['endpoint']}/_emulator/faults")

    # IAM holds the drained call's password: the user can change away from it.
    own = boto3.client(
        "iam",
        endpoint_url=iam_emulator["endpoint"],
        region_name=iam_emulator["region"],
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
    own.change_password(OldPassword=DRAINED_PASSWORD, NewPassword=DRAINED_PASSWORD + "-next")
    everything = credgate.output()
    for password in (OLD_PASSWORD, NEW_PASSWORD, DRAINED_PASSWORD, secret):
        assert password not in everything, "a secret in the container's output"


def test_the_env_is_replayed_as_the_kubelet_resolves_it(base_objects):
    """The replay behind pod_run_args (and test_pod_life): the downward API's
    fields, $(VAR) expansion with Kubernetes' rules, and a clear refusal of
    every source it cannot fill as a cluster would."""
    env = kubelet_env(container(base_objects))
    pod = POD_FIELDS["metadata.name"]
    assert env["POD_NAME"] == pod and env["POD_NAMESPACE"] == POD_FIELDS["metadata.namespace"]
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
        f"service.instance.id={pod},k8s.pod.name={pod},k8s.namespace.name={POD_FIELDS['metadata.namespace']}"
    )
    defined = {"A": "1"}
    for written, expanded in [
        ("a=$(A),b=$(B)", "a=1,b=$(B)"),  # undefined: kept as written
        ("$$(A)", "$(A)"),  # $$ escapes
        ("$$$(A)", "$1"),
        ("$x$(A)$", "$x1$"),  # a lone $ is kept
        ("$(A", "$(A"),  # never closed
        ("", ""),
    ]:
        assert kubelet_expand(written, defined) == expanded, written
    for refused in [
        {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]},
        {"env": [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}}]},
        {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]},
        {"envFrom": [{"secretRef": {"name": "s"}}]},
    ]:
        with pytest.raises(AssertionError, match="not replayed"):
            kubelet_env(refused)


def container_pid(engine, name: str, credgate: Process) -> int:
    pid = int(engine("inspect", "--format", "{{.State.Pid}}", name, check=False).stdout.strip() or 0)
    if pid == 0:
        pytest.fail(f"the container is not running\n{credgate.output()}")
    return pid


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status of the container's PID 1, read on the host."""
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def process_environ(pid: int) -> dict[str, str]:
    """/proc/PID/environ of the container's PID 1, read on the host."""
    entries = open(f"/proc/{pid}/environ", "rb").read().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def root_mount_options(pid: int) -> set[str]:
    for line in open(f"/proc/{pid}/mountinfo").read().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return set(fields[5].split(","))
    pytest.fail("the container has no / mount")
