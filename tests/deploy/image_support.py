"""The container image of deploy/Dockerfile, built and run with podman
(tests/deploy/test_image.py); fixtures are in conftest.py.

No registry is reachable here, so two inputs of a registry build are replaced,
and nothing else:
  - the runtime stage's base, gcr.io/distroless/base-nossl-debian12:nonroot,
    by a stand-in made the way distroless makes it: the same Debian 12
    packages' files extracted without maintainer scripts, its
    passwd/group/home/tmp entries, a CA bundle built from ca-certificates, and
    its image config (PATH, SSL_CERT_FILE, user 65532, workdir /home/nonroot),
    imported under exactly the name the Dockerfile's runtime stage uses;
  - the builder stage (rust:1.95-bookworm running `cargo build --release`, and
    installing libgcc_s from its libgcc-s1), by what the same commands make on
    the host, the same toolchain on the same Debian 12: its release binary and
    its libgcc_s, handed to the unchanged Dockerfile as the `builder` build
    context.
podman keeps its images in the checkout (target/container/storage), so a real
distroless image that a developer pulled is never replaced by the stand-in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from deploy_support import (
    DOCKERFILE,
    NONROOT_ID,
    POD_FIELDS,
    REPO,
    container,
    kubelet_env,
    pod_spec,
    unavailable,
)

WORK = REPO / "target" / "container"
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
# The image's binary: the builder stage's `cargo build --release --locked --bin
# credgate`, run by scripts/test on the host.
IMAGE_BIN = REPO / "target" / "release" / "credgate"

# What the stand-in stands in for, and how distroless builds it (its
# static/static.bzl with static/config.bzl's STATIC_PACKAGES, and base/base.bzl's
# base_nossl_image with base/config.bzl's BASE_NOSSL_PACKAGES, for debian12):
# these packages' data, unpacked as they are, no maintainer scripts run. No
# libssl3 (that is `base`), no libgcc-s1, libstdc++6, libgomp1 (that is `cc`).
STANDIN_FOR = "gcr.io/distroless/base-nossl-debian12:nonroot"
DISTROLESS_PACKAGES = (
    "base-files", "netbase", "tzdata", "media-types",  # static
    "libc6",  # base-nossl
)  # fmt: skip
# Of ca-certificates, distroless keeps only the copyright and the bundle that
# SSL_CERT_FILE names, concatenated from the package's certificates in path
# order, mode 0555 (rules_distroless's cacerts rule).
CA_PACKAGE = "ca-certificates"
CA_CERTS = "usr/share/ca-certificates/"
CA_COPYRIGHT = "usr/share/doc/ca-certificates/copyright"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
DISTROLESS_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"ENV SSL_CERT_FILE=/{CA_BUNDLE}",
    f"USER {NONROOT_ID}",
    "WORKDIR /home/nonroot",
)
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    f"nonroot:x:{NONROOT_ID}:{NONROOT_ID}:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = f"root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:{NONROOT_ID}:\n"
NSSWITCH = (
    "passwd:         compat\ngroup:          compat\nshadow:         compat\ngshadow:        files\n\n"
    "hosts:          files dns\nnetworks:       files\n\n"
    "protocols:      db files\nservices:       db files\nethers:         db files\nrpc:            db files\n\n"
    "netgroup:       nis\n"
)
# Directories distroless creates: (path, mode, uid).
DISTROLESS_DIRS = (("root", 0o700, 0), ("home", 0o755, 0), ("home/nonroot", 0o700, NONROOT_ID), ("tmp", 0o1777, 0))

# Exit codes of `podman run` that mean the engine, not the image, failed.
PODMAN_ENGINE_FAILED = 125


class Podman:
    """podman with the checkout's configuration and image storage."""

    def __init__(self, work: Path):
        self.argv = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "run")]
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str) -> list[str]:
        """The argv of a long-running `podman ...`, for deploy_support.Process with self.env."""
        return [*self.argv, *args]

    def inspect_image(self, ref: str) -> dict[str, Any]:
        (info,) = json.loads(self("image", "inspect", ref).stdout)
        return info


def find_podman() -> Podman:
    """The checkout's podman, or a skip that says why podman cannot run here."""
    if shutil.which("podman") is None:
        unavailable("podman is not installed (scripts/test installs the Debian packages podman and runc)")
    engine = Podman(WORK)
    proc = engine("info", "--format", "json", check=False, timeout=120)
    if proc.returncode != 0 and "database configuration mismatch" in proc.stderr:
        # The storage of a checkout copied from another path (target/ with
        # it): podman's database names the old path. It only caches test
        # images; start it afresh.
        for stale in (WORK / "storage", WORK / "run"):
            shutil.rmtree(stale, ignore_errors=True)
        proc = engine("info", "--format", "json", check=False, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"podman cannot run on this machine (`podman info` failed):\n{proc.stderr}")
    return engine


def host_is_debian12() -> None:
    """The stand-in is made of the host's Debian 12 packages, and the binary
    links against the host's glibc: both must be bookworm's, like the images'."""
    release = dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
    )
    codename = release.get("VERSION_CODENAME", "").strip('"')
    if codename != "bookworm":
        unavailable(
            f"this host is {release.get('PRETTY_NAME', '?')}: the image test builds its base from Debian 12"
            " (bookworm) packages with the host's apt, and its binary with the host's glibc"
        )


def runtime_base(dockerfile: DockerfileParser) -> str:
    base = dockerfile.parent_images[-1]
    assert base == STANDIN_FOR, (
        f"deploy/Dockerfile's runtime stage is FROM {base}; image_support.py makes a stand-in for"
        f" {STANDIN_FOR} only: write the recipe for the new base"
    )
    return base


@dataclass(frozen=True)
class BuilderFile:
    """A file the builder stage leaves for the runtime stage, as the same
    command makes it on the host."""

    stage_path: PurePosixPath
    data: bytes
    mode: int
    # What it is: the Debian package it comes from, or how it is built.
    origin: str


def builder_outputs(binary: Path) -> list[BuilderFile]:
    """What deploy/Dockerfile's builder stage writes to /out, made as its RUN
    lines make it, on the host (Debian 12 and the pinned Rust, like the stage):
      install -D -m 0755 target/release/credgate /out/credgate
      install -D -m 0644 -t /out/lib/$multiarch /lib/$multiarch/libgcc_s.so.1
      dpkg-query --status libgcc-s1 > /out/status.d/libgcc-s1"""
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True, check=True).stdout.strip()
    libgcc = Path(f"/lib/{multiarch}/libgcc_s.so.1")
    status = subprocess.run(["dpkg-query", "--status", "libgcc-s1"], capture_output=True, check=True).stdout
    fields = dict(line.split(": ", 1) for line in status.decode().splitlines() if ": " in line and line[0] != " ")
    package = f"{fields['Package']} {fields['Version']}"
    owner = subprocess.run(["dpkg-query", "--search", str(libgcc)], capture_output=True, text=True, check=True)
    assert owner.stdout.startswith(f"{fields['Package']}:"), f"{libgcc} is not libgcc-s1's: {owner.stdout}"
    return [
        BuilderFile(PurePosixPath("/out/credgate"), binary.read_bytes(), 0o755, "cargo build --release --locked"),
        BuilderFile(PurePosixPath(f"/out/lib/{multiarch}/{libgcc.name}"), libgcc.read_bytes(), 0o644, package),
        BuilderFile(PurePosixPath("/out/status.d/libgcc-s1"), status, 0o644, f"{package}, dpkg status"),
    ]


def runtime_copies(dockerfile: DockerfileParser) -> list[tuple[str, str, str]]:
    """(stage, source, destination) of each `COPY --from=STAGE SOURCE DESTINATION`
    of the runtime stage, in order."""
    copies = []
    in_runtime = False
    for instr in dockerfile.structure:
        if instr["instruction"] == "FROM":
            in_runtime = instr["value"].split()[0] == dockerfile.parent_images[-1]
        elif in_runtime and instr["instruction"] == "COPY":
            words = instr["value"].split()
            assert len(words) == 3 and words[0].startswith("--from="), f"COPY {instr['value']}: from the builder only"
            copies.append((words[0].removeprefix("--from="), words[1], words[2]))
    return copies


def image_paths(copies: list[tuple[str, str, str]], outputs: list[BuilderFile]) -> dict[str, BuilderFile]:
    """Where each builder output lands in the image ("usr/local/bin/credgate"),
    by COPY's rules: a directory's contents go under the destination, a file
    to the destination or, if it ends in "/", into it. Every COPY must take
    something the host can make, and every output must be taken."""
    landed: dict[str, BuilderFile] = {}
    for _, source_text, dest_text in copies:
        source, dest = PurePosixPath(source_text), PurePosixPath(dest_text)
        taken = [o for o in outputs if o.stage_path.is_relative_to(source)]
        assert taken, (
            f"the runtime stage copies {source}, which image_support.builder_outputs does not make:"
            " write the recipe for it"
        )
        for output in taken:
            if output.stage_path != source:
                path = dest / output.stage_path.relative_to(source)
            elif dest_text.endswith("/"):
                path = dest / source.name
            else:
                path = dest
            landed[str(path.relative_to("/"))] = output
    untaken = {str(o.stage_path) for o in outputs} - {str(o.stage_path) for o in landed.values()}
    assert not untaken, f"the runtime stage copies none of {sorted(untaken)}"
    return landed


def _deb_members(deb: Path) -> tarfile.TarFile:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:")


def _normal(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


def standin_rootfs(out: Path, debs: Path) -> dict[str, str]:
    """Writes the stand-in's root filesystem to `out` (a tar); returns {package: version}."""
    if debs.exists():
        shutil.rmtree(debs)
    debs.mkdir(parents=True)
    packages = (*DISTROLESS_PACKAGES, CA_PACKAGE)
    proc = subprocess.run(
        ["apt-get", "download", "-q", *packages], cwd=debs, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"apt-get download failed (run `apt-get update`?):\n{proc.stderr}"
    versions: dict[str, str] = {}
    seen: set[str] = set()
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.name = _normal(info.name) or "."
            if info.name in seen:
                return
            seen.add(info.name)
            info.uname = info.gname = ""
            if info.islnk():
                info.linkname = _normal(info.linkname)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        def synthesized(name: str, mode: int, data: bytes | None = None, uid: int = 0) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = mode, uid, uid
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            add(info, data)

        # distroless's own files first: they win over a package's (base-files' /root, /tmp ...).
        synthesized(".", 0o755)
        for name, mode, uid in DISTROLESS_DIRS:
            synthesized(name, mode, uid=uid)
        synthesized("etc", 0o755)
        synthesized("etc/passwd", 0o644, PASSWD.encode())
        synthesized("etc/group", 0o644, GROUP.encode())
        synthesized("etc/nsswitch.conf", 0o644, NSSWITCH.encode())

        certs: list[tuple[str, bytes]] = []
        for deb in sorted(debs.glob("*.deb")):
            package, version = deb.name.split("_")[:2]
            versions[package] = version.replace("%3a", ":")
            with _deb_members(deb) as members:
                for member in members:
                    name = _normal(member.name)
                    data = members.extractfile(member).read() if member.isreg() else None
                    if package == CA_PACKAGE:
                        if name.startswith(CA_CERTS) and name.endswith(".crt"):
                            certs.append((name, data))
                        if not (name == CA_COPYRIGHT or member.isdir() and CA_COPYRIGHT.startswith(f"{name}/")):
                            continue
                    add(member, data)
        assert set(versions) == set(packages), f"apt-get download fetched {sorted(versions)}"
        assert certs, "ca-certificates carried no certificates"
        synthesized("etc/ssl", 0o755)
        synthesized("etc/ssl/certs", 0o755)
        synthesized(CA_BUNDLE, 0o555, b"".join(data for _, data in sorted(certs)))
    return versions


@dataclass
class Image:
    """The built image: what podman says about it, and its files."""

    ref: str
    inspect: dict[str, Any]
    base: dict[str, Any]
    files: dict[str, tarfile.TarInfo]
    # sha256 of every regular file, and the text of /etc/passwd.
    digests: dict[str, str]
    passwd_text: str
    base_files: set[str]
    binary: Path
    # What the runtime stage adds: image path -> the builder's file.
    added: dict[str, BuilderFile]
    elf: dict[str, Any]
    build_argv: list[str]
    base_packages: dict[str, str]

    @property
    def config(self) -> dict[str, Any]:
        return self.inspect["Config"]

    def env(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.config.get("Env") or [])

    def has_file(self, path: str | PurePosixPath) -> bool:
        return _normal(str(path).lstrip("/")) in self.files

    def passwd(self) -> dict[int, str]:
        """uid -> home directory, from the image's /etc/passwd."""
        entries = (line.split(":") for line in self.passwd_text.splitlines() if line.count(":") == 6)
        return {int(e[2]): e[5] for e in entries}


def build_image(engine: Podman, dockerfile: DockerfileParser, binary: Path, tag: str) -> Image:
    """The stand-in base, then `podman build` of deploy/Dockerfile itself."""
    host_is_debian12()
    base_name = runtime_base(dockerfile)
    rootfs = WORK / "standin-rootfs.tar"
    packages = standin_rootfs(rootfs, WORK / "debs")
    engine("import", *(arg for change in DISTROLESS_CHANGES for arg in ("--change", change)), str(rootfs), base_name)
    can_run(engine, base_name)

    copies = runtime_copies(dockerfile)
    outputs = builder_outputs(binary)
    added = image_paths(copies, outputs)
    (stage,) = {stage for stage, _, _ in copies}
    context = WORK / "builder"
    if context.exists():
        shutil.rmtree(context)
    for output in outputs:
        target = context / output.stage_path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)  # `install -D`: 0755 directories
        target.write_bytes(output.data)
        target.chmod(output.mode)

    build_argv = [
        "build", "--pull=never", "--build-context", f"{stage}={context}",
        "-f", str(DOCKERFILE), "-t", tag, str(REPO),
    ]  # fmt: skip
    engine(*build_argv, timeout=600)
    # The previous run's images, untagged now: storage holds one build at a time.
    engine("image", "prune", "--force")
    files, digests, texts = filesystem(engine, tag)
    base_files, _, _ = filesystem(engine, base_name)
    return Image(
        ref=tag,
        inspect=engine.inspect_image(tag),
        base=engine.inspect_image(base_name),
        files=files,
        digests=digests,
        passwd_text=texts["etc/passwd"],
        base_files={path for path, info in base_files.items() if not info.isdir()},
        binary=binary,
        added=added,
        elf=elf_facts(binary),
        build_argv=["podman", *build_argv],
        base_packages=packages,
    )


def can_run(engine: Podman, image: str) -> None:
    """Skip (only) when podman cannot start any container on this machine."""
    proc = engine(
        "run", "--rm", "--pull=never", "--network", "none",
        "--entrypoint", "/lib64/ld-linux-x86-64.so.2", image, "--version",
        check=False, timeout=120,
    )  # fmt: skip
    if proc.returncode == PODMAN_ENGINE_FAILED:
        pytest.skip(f"podman cannot start containers on this machine:\n{proc.stderr}")
    assert proc.returncode == 0 and "GLIBC" in proc.stdout, (
        f"the stand-in base's dynamic loader did not run: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )


def filesystem(engine: Podman, image: str) -> tuple[dict[str, tarfile.TarInfo], dict[str, str], dict[str, str]]:
    """Every path in the image, the sha256 of every regular file, and the text
    of /etc/passwd (`podman export` of a container created, never started)."""
    name = f"credgate-export-{os.getpid()}"
    out = WORK / "export.tar"
    # A command for images without one (the base); the container never starts.
    engine("create", "--pull=never", "--name", name, image, "/nonexistent")
    try:
        engine("export", "-o", str(out), name)
    finally:
        engine("rm", "--force", name, check=False)
    files: dict[str, tarfile.TarInfo] = {}
    digests: dict[str, str] = {}
    texts: dict[str, str] = {}
    with tarfile.open(out) as tar:
        for member in tar:
            path = _normal(member.name)
            if not path:
                continue
            files[path] = member
            if member.isreg():
                data = tar.extractfile(member).read()
                digests[path] = hashlib.sha256(data).hexdigest()
                if path == "etc/passwd":
                    texts[path] = data.decode()
    out.unlink()
    return files, digests, texts


def compressed_size(engine: Podman, image: str) -> int:
    """Bytes a registry stores and a node pulls: the gzip-compressed layers and the config."""
    out = WORK / "compressed"
    if out.exists():
        shutil.rmtree(out)
    engine("save", "--format", "docker-dir", "--compress", "-o", str(out), image)
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(layer["size"] for layer in manifest["layers"]) + manifest["config"]["size"]
    shutil.rmtree(out)
    return size


def linked_libraries(engine: Podman, image: Image, interpreter: str) -> list[str]:
    """`ld.so --list` of the binary inside the image: what the loader resolves there."""
    binary = image.config["Entrypoint"][0]
    proc = engine(
        "run", "--rm", "--pull=never", "--network", "none", "--read-only",
        "--entrypoint", interpreter, image.ref, "--list", binary,
    )  # fmt: skip
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def elf_facts(binary: Path) -> dict[str, Any]:
    """NEEDED libraries and program interpreter, from readelf on the host copy."""
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    headers = subprocess.run(["readelf", "-l", str(binary)], capture_output=True, text=True, check=True).stdout
    interp = re.search(r"Requesting program interpreter: ([^\]]+)\]", headers)
    sections = subprocess.run(["readelf", "-S", "-W", str(binary)], capture_output=True, text=True, check=True).stdout
    return {
        "needed": re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic),
        "interpreter": interp.group(1) if interp else None,
        "symbols": ".symtab" in sections,
        "sha256": hashlib.sha256(binary.read_bytes()).hexdigest(),
    }


def compiled_crates() -> set[tuple[str, str]]:
    """(name, version) of every crate compiled into the binary for this host,
    as cargo's own feature resolver sees it (`cargo tree -e normal`)."""
    out = subprocess.run(
        ["cargo", "tree", "--locked", "--offline", "-e", "normal", "--prefix", "none", "-f", "{p}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    crates = set()
    for line in out.splitlines():
        name, version = line.split()[:2]
        crates.add((name, version.removeprefix("v")))
    return crates


def cargo_lock_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(package["name"], set()).add(package["version"])
    return versions


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?$")
_SCALE = {None: 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity ("500m", "256Mi") as a number."""
    match = _QUANTITY.match(str(value))
    assert match, f"unsupported quantity {value!r}"
    return float(match.group(1)) * _SCALE[match.group(2)]


def pod_security(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's effective securityContext: its own fields over the pod's."""
    return {**pod_spec(objs).get("securityContext", {}), **container(objs).get("securityContext", {})}


def pod_run_args(objs: list[dict[str, Any]], image: str, volumes: Path, name: str) -> list[str]:
    """`podman run` arguments that start the image as the rendered Deployment's pod
    would: its user, groups, securityContext, limits, env (resolved as the
    kubelet resolves it for the pod deploy_support.POD_FIELDS describes), its
    hostname, volume mounts (laid out under `volumes` by lay_out_mounts) and
    command/args. Host networking: the listeners must be on free loopback ports."""
    c = container(objs)
    security = pod_security(objs)
    args = ["run", "--rm", "--pull=never", "--name", name, "--network", "host"]
    # A pod's hostname (and the runtime's HOSTNAME) is its name.
    args += ["--hostname", POD_FIELDS["metadata.name"]]
    args += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if "fsGroup" in security:  # a pod-level field only
        args += ["--group-add", str(security["fsGroup"])]
    if security.get("readOnlyRootFilesystem"):
        # Kubernetes adds no tmpfs to a read-only root; podman does unless told not to.
        args += ["--read-only", "--read-only-tmpfs=false"]
    for cap in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    for cap in security.get("capabilities", {}).get("add", []):
        args += ["--cap-add", cap]
    assert not security.get("privileged"), "a privileged pod"
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    # seccompProfile RuntimeDefault: podman's default profile applies.
    assert security.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault"
    limits = c.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        args += ["--cpus", str(quantity(limits["cpu"]))]
    for key, value in kubelet_env(c).items():
        args += ["--env", f"{key}={value}"]
    for mount in c.get("volumeMounts", []):
        assert "subPath" not in mount, mount
        mode = "ro" if mount.get("readOnly") else "rw"
        args += ["--volume", f"{volumes}{mount['mountPath']}:{mount['mountPath']}:{mode}"]
    if "command" in c:
        args += ["--entrypoint", json.dumps(c["command"])]
    args.append(image)
    args += c.get("args", [])
    return args


# cargo-cyclonedx, installed by scripts/test into .tools (pinned there).
CARGO_CYCLONEDX = REPO / ".tools" / "bin" / "cargo-cyclonedx"


def write_sbom(out: Path) -> Path:
    """The binary's CycloneDX SBOM (cargo-cyclonedx over Cargo.lock), moved to `out`."""
    if not CARGO_CYCLONEDX.is_file():
        unavailable(f"no {CARGO_CYCLONEDX.relative_to(REPO)}: scripts/test installs cargo-cyclonedx")
    # It writes next to Cargo.toml. --describe binaries: the `credgate` binary,
    # not the tests or examples; --no-build-deps: what is compiled into it, not
    # what builds it (protoc, cc, prost-build).
    written = REPO / "credgate_bin.cdx.json"
    written.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(CARGO_CYCLONEDX), "cyclonedx", "--quiet", "--format", "json", "--spec-version", "1.5",
         "--describe", "binaries", "--no-build-deps", "--manifest-path", str(REPO / "Cargo.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and written.is_file(), f"cargo-cyclonedx failed:\n{proc.stdout}\n{proc.stderr}"
    target = out / "credgate.cdx.json"
    shutil.move(written, target)
    return target


def describe(engine: Podman, image: Image) -> dict[str, Any]:
    """What the image is, written to target/container/report.json and report.txt."""
    sbom_path = write_sbom(WORK)
    sbom = json.loads(sbom_path.read_text())
    compiled = compiled_crates()
    history = json.loads(engine("history", "--format", "json", image.ref).stdout)
    executables = sorted(
        path for path, info in image.files.items() if info.isreg() and info.mode & 0o111 and ".so" not in path
    )
    report: dict[str, Any] = {
        "image": image.ref,
        "id": image.inspect["Id"],
        "build": " ".join(image.build_argv),
        "base": {"stands_in_for": STANDIN_FOR, "debian_packages": image.base_packages},
        "size": {
            "uncompressed": image.inspect["Size"],
            "compressed": compressed_size(engine, image.ref),
            "base": image.base["Size"],
            "binary": image.binary.stat().st_size,
            # Everything the runtime stage adds, the binary included.
            "added": sum(len(output.data) for output in image.added.values()),
        },
        "added": {
            f"/{path}": {"size": len(output.data), "from": output.origin}
            for path, output in image.added.items()
        },
        "layers": [
            {"created_by": h["CreatedBy"].removeprefix("/bin/sh -c #(nop) "), "size": h["size"]}
            for h in reversed(history)
        ],
        "config": {
            key: image.config.get(key) for key in ("Entrypoint", "Cmd", "User", "ExposedPorts", "Env", "WorkingDir")
        },
        "files": len(image.files),
        "executables": executables,
        "libraries": {
            "needed": image.elf["needed"],
            "interpreter": image.elf["interpreter"],
            "resolved_in_image": linked_libraries(engine, image, image.elf["interpreter"]),
        },
        "binary": {
            "path": str(image.binary.relative_to(REPO)),
            "sha256": image.elf["sha256"],
            "symbols": image.elf["symbols"],
        },
        "sbom": {
            "path": str(sbom_path),
            "format": f"{sbom['bomFormat']} {sbom['specVersion']}",
            "components": len(sbom.get("components", [])),
            # Listed, yet not compiled in by cargo's resolver: cargo-cyclonedx
            # reads `cargo metadata`, whose feature resolution is the older,
            # unified one (a superset: safe for a vulnerability scan).
            "not_compiled": sorted(
                f"{c['name']} {c['version']}"
                for c in sbom.get("components", [])
                if (c["name"], c["version"]) not in compiled
            ),
        },
    }
    (WORK / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (WORK / "report.txt").write_text(report_text(report))
    return report


def report_text(report: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    size = report["size"]
    lines = [
        f"image      {report['image']}  {report['id'][:12]}",
        f"build      {report['build']}",
        f"base       stand-in for {report['base']['stands_in_for']} (Debian: "
        + ", ".join(f"{p} {v}" for p, v in sorted(report["base"]["debian_packages"].items()))
        + ")",
        f"size       {mb(size['uncompressed'])} uncompressed, {mb(size['compressed'])} compressed"
        f" (base {mb(size['base'])}, binary {mb(size['binary'])}, all added {mb(size['added'])})",
        "added",
        *(f"  {mb(a['size']):>9}  {path} ({a['from']})" for path, a in report["added"].items()),
        "layers",
        *(f"  {mb(layer['size']):>9}  {layer['created_by']}" for layer in report["layers"]),
        f"config     entrypoint {report['config']['Entrypoint']} cmd {report['config']['Cmd']}"
        f" user {report['config']['User']} ports {sorted(report['config']['ExposedPorts'] or {})}",
        f"files      {report['files']}; executable files other than shared libraries: {report['executables']}",
        f"binary     {report['binary']['path']} sha256 {report['binary']['sha256'][:16]}…"
        f" symbols {'kept' if report['binary']['symbols'] else 'stripped'}",
        f"libraries  NEEDED {report['libraries']['needed']}, interpreter {report['libraries']['interpreter']}",
        *(f"  {line}" for line in report["libraries"]["resolved_in_image"]),
        f"sbom       {report['sbom']['path']} ({report['sbom']['format']}, {report['sbom']['components']}"
        f" components; listed but not compiled in: {', '.join(report['sbom']['not_compiled']) or 'none'})",
    ]
    return "\n".join(lines) + "\n"
