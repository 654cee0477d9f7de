"""Shared pytest fixtures for the offline deployment tests (tests/deploy).

Helpers that are not fixtures live in deploy_support.py (a uniquely named
module: `from conftest import ...` breaks once other test folders have a
conftest.py of their own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from deploy_support import (
    DOCKERFILE,
    EMULATOR,
    KUSTOMIZE_TREES,
    PROTO_FILE,
    PROTO_ROOT,
    REPO,
    kustomize_build,
    readline_with_timeout,
    unavailable,
)


@pytest.fixture(scope="session")
def kubectl() -> str:
    proc = subprocess.run(
        [str(REPO / "scripts" / "ensure-kubectl")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/ensure-kubectl failed:\n{proc.stderr}"
    path = proc.stdout.strip()
    assert path and Path(path).is_file(), f"ensure-kubectl printed {proc.stdout!r}"
    return path


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Every kustomize tree, rendered: {"base": [...], "cert-manager": [...], "redis": [...]}."""
    return {name: kustomize_build(kubectl, tree) for name, tree in KUSTOMIZE_TREES.items()}


@pytest.fixture(params=sorted(KUSTOMIZE_TREES))
def objects(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]):
    """The rendered objects of one tree (the test runs once per tree)."""
    return rendered[request.param]


@pytest.fixture(scope="session")
def base_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["base"]


@pytest.fixture(scope="session")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), cache_content=True)


@pytest.fixture(scope="session")
def credgate_bin() -> Path:
    """The credgate binary: $CREDGATE_BIN, default target/debug/credgate."""
    path = Path(os.environ.get("CREDGATE_BIN", REPO / "target" / "debug" / "credgate"))
    if not path.is_absolute():
        path = REPO / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"no credgate binary at {path}: run `cargo build` or set CREDGATE_BIN")
    proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.startswith("credgate"):
        unavailable(f"{path} --version did not answer like credgate: {proc.stdout!r} {proc.stderr!r}")
    return path


@pytest.fixture
def iam_emulator():
    """tests/emulator/iam_emulator.py on a free port; yields its ready line (a dict)."""
    if not EMULATOR.is_file():
        unavailable(f"the IAM emulator {EMULATOR} does not exist yet")
    proc = subprocess.Popen(
        [sys.executable, str(EMULATOR), "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = readline_with_timeout(proc, timeout=60)
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            unavailable(f"the IAM emulator exited before it was ready:\n{err}")
        info = json.loads(line)
        yield info
    finally:
        if proc.stdin:
            proc.stdin.close()  # the emulator exits at stdin EOF
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory: pytest.TempPathFactory):
    """Python stubs for credgate.v1, generated from proto/ with grpcio-tools."""
    import importlib

    if not PROTO_FILE.is_file():
        unavailable(f"{PROTO_FILE.relative_to(REPO)} does not exist yet")
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    well_known = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_FILE),
        ]
    )
    assert rc == 0, "grpcio-tools could not compile the proto"
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("credgate.v1.password_service_pb2")
        pb2_grpc = importlib.import_module("credgate.v1.password_service_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


@pytest.fixture(scope="session")
def engine():
    """podman with the checkout's configuration and storage (image_support.Podman)."""
    from image_support import find_podman

    return find_podman()


@pytest.fixture(scope="session")
def image(engine, dockerfile):
    """deploy/Dockerfile built on the stand-in base (image_support.build_image)."""
    from image_support import IMAGE_BIN, build_image

    binary = Path(os.environ.get("CREDGATE_IMAGE_BIN", IMAGE_BIN))
    if not binary.is_file():
        unavailable(
            f"no image binary at {binary}: run `cargo build --locked --release --bin credgate`"
            " (scripts/test does) or set CREDGATE_IMAGE_BIN"
        )
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    return build_image(engine, dockerfile, binary, tag=f"localhost/credgate:{cargo['package']['version']}")


@pytest.fixture(scope="session")
def image_report(engine, image):
    """What the image is (size, layers, libraries, SBOM), written to target/container/report.*."""
    from image_support import describe

    return describe(engine, image)
