"""Fixtures for tests/edge: one IAM emulator, one dev PKI and one set of callers
for the whole session; each test module starts the credgate (its own [server]
limits) it attacks.

Helpers that are not fixtures live in edge_support.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from edge_support import (
    EMULATOR,
    PROTO_FILE,
    REPO,
    Account,
    Cert,
    Credgate,
    Emulator,
    Process,
    clean_env,
    credgate_toml,
    dev_pki,
    generate_stubs,
    import_stubs,
    snapshot_binary,
    start_credgate,
    unavailable,
    unmapped_client_cert,
    write_aws_files,
)

# The mapped callers every credgate of this folder knows (one IAM user each).
CALLERS = {
    # The well-behaved caller whose service must not suffer.
    "victim": "spiffe://credgate.test/ns/edge/sa/victim",
    # A mapped caller that attacks: it is bounded by its own per-caller cap.
    "hostile": "spiffe://credgate.test/ns/edge/sa/hostile",
    # A caller with long-running ChangePassword calls (emulator delay faults).
    "busy": "spiffe://credgate.test/ns/edge/sa/busy",
}
INITIAL_PASSWORD = "Edge-Passw0rd!initial"


@pytest.fixture(scope="session")
def edge_credgate_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of $CREDGATE_BIN (default target/debug/credgate), immune to rebuilds mid-run."""
    path = Path(os.environ.get("CREDGATE_BIN", REPO / "target" / "debug" / "credgate"))
    if not path.is_absolute():
        path = REPO / path
    copy = snapshot_binary(path, tmp_path_factory.mktemp("bin"))
    yield copy
    copy.unlink(missing_ok=True)  # ~100 MB; pytest keeps the last few temp dirs


@pytest.fixture(scope="session")
def edge_stubs(tmp_path_factory: pytest.TempPathFactory):
    """(pb2, pb2_grpc) for credgate.v1, generated from proto/ at test time."""
    if not PROTO_FILE.is_file():
        unavailable(f"{PROTO_FILE} does not exist")
    return import_stubs(generate_stubs(tmp_path_factory.mktemp("stubs")))


@pytest.fixture(scope="session")
def edge_emulator():
    """One IAM emulator (tests/emulator/iam_emulator.py) on a free port for the session."""
    proc = Process([sys.executable, str(EMULATOR), "--port", "0"], stdin_pipe=True)
    try:
        ready = proc.wait_for_json(lambda e: "endpoint" in e, timeout=60, what="emulator ready line")
        yield Emulator(ready)
    finally:
        proc.stop()  # closes stdin: the emulator exits at EOF


@pytest.fixture(scope="session")
def edge_pki(edge_credgate_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dev-pki's CA, server and mapped client certificates, plus an unmapped client certificate."""
    out = tmp_path_factory.mktemp("pki")
    pki = dev_pki(edge_credgate_bin, out / "dev", list(CALLERS.values()))
    crt, key = unmapped_client_cert(pki["ca"], pki["ca_key"], out / "unmapped")
    pki["unmapped"] = Cert(crt, key)
    return pki


@pytest.fixture(scope="session")
def edge_accounts(edge_emulator: Emulator, edge_pki, tmp_path_factory) -> dict[str, Any]:
    """The mapped callers (name -> Account) and the AWS env that holds their keys."""
    accounts: dict[str, Account] = {}
    keys = {}
    for name, spiffe_id in CALLERS.items():
        iam_user = f"edge-{name}"
        keys[iam_user] = edge_emulator.create_user(iam_user, INITIAL_PASSWORD)
        crt, key = edge_pki["clients"][spiffe_id]
        accounts[name] = Account(spiffe_id, iam_user, Cert(crt, key), INITIAL_PASSWORD)
    env = write_aws_files(tmp_path_factory.mktemp("aws"), keys, edge_emulator.region)
    return {"accounts": accounts, "env": env}


@pytest.fixture(scope="session")
def unmapped_cert(edge_pki) -> Cert:
    return edge_pki["unmapped"]


@pytest.fixture(scope="session")
def accounts(edge_accounts) -> dict[str, Account]:
    return edge_accounts["accounts"]


@pytest.fixture(scope="session")
def launch_credgate(
    edge_credgate_bin: Path, edge_emulator: Emulator, edge_pki, edge_accounts, tmp_path_factory
) -> Callable[[dict[str, Any]], Credgate]:
    """launch_credgate(server_settings) -> a running credgate with every caller of CALLERS.

    Module fixtures call it and stop what it returns.
    """

    def launch(server: dict[str, Any]) -> Credgate:
        directory = tmp_path_factory.mktemp("credgate")
        config = directory / "credgate.toml"
        config.write_text(
            credgate_toml(edge_pki, edge_emulator, list(edge_accounts["accounts"].values()), server)
        )
        return start_credgate(edge_credgate_bin, config, clean_env(**edge_accounts["env"]), edge_pki["ca"])

    return launch
