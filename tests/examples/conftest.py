"""Fixtures for tests/examples: the IAM emulator, a dev PKI, a real credgate, stubs.

Helpers that are not fixtures live in examples_support.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from examples_support import (
    EMULATOR,
    PROTO_FILE,
    REPO,
    Emulator,
    Process,
    Stack,
    clean_env,
    dev_pki,
    generate_stubs,
    log_field,
    unavailable,
    write_aws_files,
)


@pytest.fixture(scope="session")
def credgate_bin() -> Path:
    """The credgate binary: $CREDGATE_BIN, default target/debug/credgate."""
    path = Path(os.environ.get("CREDGATE_BIN", REPO / "target" / "debug" / "credgate"))
    if not path.is_absolute():
        path = REPO / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"no credgate binary at {path}: run `cargo build` or set CREDGATE_BIN")
    return path


@pytest.fixture(scope="session")
def stubs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """credgate.v1 stubs generated from proto/ at test time (never committed)."""
    if not PROTO_FILE.is_file():
        unavailable(f"{PROTO_FILE} does not exist")
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture
def emulator():
    """A private IAM emulator (tests/emulator/iam_emulator.py) on a free port."""
    proc = Process([sys.executable, str(EMULATOR), "--port", "0"], stdin_pipe=True)
    try:
        ready = proc.wait_for_json(lambda e: "endpoint" in e, timeout=60, what="emulator ready line")
        yield Emulator(ready)
    finally:
        proc.stop()  # closes stdin: the emulator exits at EOF


@pytest.fixture
def credgate_stack(
    credgate_bin: Path, emulator: Emulator, tmp_path: Path
) -> Callable[..., Stack]:
    """Starts credgate with one caller mapped to a fresh IAM user.

    account_policy: keyword arguments for IAM UpdateAccountPasswordPolicy, set
    before credgate starts so its policy cache sees it.
    """
    started: list[Process] = []

    def start(iam_user: str = "example-svc", account_policy: dict[str, Any] | None = None) -> Stack:
        spiffe_id = f"spiffe://credgate.test/ns/examples/sa/{iam_user}"
        if account_policy:
            emulator.admin().update_account_password_policy(**account_policy)
        keys = emulator.create_user(iam_user)
        aws_env = write_aws_files(tmp_path / "aws", {iam_user: keys}, emulator.region)
        pki = dev_pki(credgate_bin, tmp_path / "pki", [spiffe_id])
        config = tmp_path / "credgate.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[tls]
cert = {json.dumps(str(pki["server_crt"]))}
key = {json.dumps(str(pki["server_key"]))}
client_ca = {json.dumps(str(pki["ca"]))}

[aws]
region = {json.dumps(emulator.region)}
endpoint_url = {json.dumps(emulator.endpoint)}

[telemetry]
log_format = "json"

[[callers]]
spiffe_id = {json.dumps(spiffe_id)}
iam_user = {json.dumps(iam_user)}
aws_profile = {json.dumps(iam_user)}
"""
        )
        proc = Process([str(credgate_bin), "serve", "--config", str(config)], env=clean_env(**aws_env))
        started.append(proc)
        listening = proc.wait_for_json(
            lambda e: log_field(e, "message") == "credgate listening", timeout=30, what='"credgate listening"'
        )
        port = str(log_field(listening, "tls_addr")).rsplit(":", 1)[1]
        crt, key = pki["clients"][spiffe_id]
        return Stack(emulator, iam_user, spiffe_id, pki["ca"], crt, key, f"localhost:{port}", proc)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def run_example(stubs_dir: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs examples/python/change_password.py against a Stack, as a user would."""
    from examples_support import EXAMPLE

    def run(stack: Stack, old: str, new: str, *flags: str, timeout: float = 90) -> subprocess.CompletedProcess:
        argv = [
            sys.executable, str(EXAMPLE), "--target", stack.target,
            "--ca", str(stack.ca), "--cert", str(stack.cert), "--key", str(stack.key), *flags,
        ]  # fmt: skip
        env = clean_env(CREDGATE_PY_STUBS=str(stubs_dir), CREDGATE_OLD_PASSWORD=old, CREDGATE_NEW_PASSWORD=new)
        proc = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
        print(f"$ change_password.py {' '.join(flags)}\n{proc.stdout}{proc.stderr}")
        return proc

    return run
