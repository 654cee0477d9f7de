"""bench/python-peer/peer.py (the benchmark's Python peer, not part of credgate)
against the IAM emulator, behind dev-pki mTLS, called with a grpcio client."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from examples_support import (
    OLD_PASSWORD,
    PEER,
    Process,
    clean_env,
    dev_pki,
    import_stubs,
    write_aws_files,
)

NEW_PASSWORD = "New-Passw0rd!peer"
CALLER = "spiffe://credgate.test/ns/bench/sa/peer-client"
STRANGER = "spiffe://credgate.test/ns/bench/sa/stranger"
USER = "peer-svc"


@pytest.fixture
def peer(credgate_bin: Path, emulator, stubs_dir: Path, tmp_path: Path):
    """The peer on a free port, one caller mapped to a fresh IAM user."""
    emulator.admin().update_account_password_policy(
        MinimumPasswordLength=12, RequireSymbols=True, RequireNumbers=True, PasswordReusePrevention=3,
        AllowUsersToChangePassword=True,
    )  # fmt: skip
    keys = emulator.create_user(USER)
    aws_env = write_aws_files(tmp_path / "aws", {USER: keys}, emulator.region)
    pki = dev_pki(credgate_bin, tmp_path / "pki", [CALLER, STRANGER])
    callers = tmp_path / "callers.toml"
    callers.write_text(f'[[callers]]\nspiffe_id = "{CALLER}"\niam_user = "{USER}"\naws_profile = "{USER}"\n')
    argv = [
        sys.executable, str(PEER), "--listen", "127.0.0.1:0", "--workers", "4",
        "--cert", str(pki["server_crt"]), "--key", str(pki["server_key"]), "--client-ca", str(pki["ca"]),
        "--callers", str(callers), "--endpoint-url", emulator.endpoint, "--region", emulator.region,
        "--stubs", str(stubs_dir),
    ]  # fmt: skip
    env = clean_env(**aws_env)
    proc = Process(argv, env=env, stdin_pipe=True)
    try:
        ready = proc.wait_for_json(lambda e: "listening" in e, timeout=30, what="peer ready line")
        port = ready["listening"].rsplit(":", 1)[1]
        yield SimpleNamespace(proc=proc, ready=ready, target=f"localhost:{port}", pki=pki, argv=argv, env=env)
    finally:
        proc.stop()


def channel_for(pki, spiffe_id: str, target: str) -> grpc.Channel:
    crt, key = pki["clients"][spiffe_id]
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), key.read_bytes(), crt.read_bytes())
    return grpc.secure_channel(target, creds)


def test_peer_changes_a_password_and_reads_the_policy(peer, emulator, stubs_dir):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    pb2, pb2_grpc = import_stubs(stubs_dir)
    target, pki = peer.target, peer.pki
    assert peer.ready == {"listening": f"127.0.0.1:{target.rsplit(':', 1)[1]}"}

    with channel_for(pki, CALLER, target) as channel:
        stub = pb2_grpc.PasswordServiceStub(channel)
        policy = stub.GetPasswordPolicy(pb2.GetPasswordPolicyRequest(), timeout=10).policy
        assert policy.minimum_password_length == 12
        assert policy.require_symbols and policy.require_numbers
        assert not policy.require_uppercase_characters
        assert policy.password_reuse_prevention == 3
        assert policy.allow_users_to_change_password

        response = stub.ChangePassword(
            pb2.ChangePasswordRequest(old_password=OLD_PASSWORD, new_password=NEW_PASSWORD), timeout=10
        )
        assert response.iam_user == USER
        assert response.iam_request_id, "IAM's request id"
        assert response.request_id == response.iam_request_id, "the deprecated field, same value"
        assert emulator.password_matches(USER, NEW_PASSWORD)
        assert emulator.calls("ChangePassword", USER) == 1

        # Errors carry credgate's details: a wrong old password ...
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChangePassword(
                pb2.ChangePasswordRequest(old_password=OLD_PASSWORD, new_password="Another-Passw0rd!"), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = rpc_status.from_call(caught.value)
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert (info.domain, info.reason) == ("credgate", "OLD_PASSWORD_INCORRECT")
        assert info.metadata["awsErrorCode"] == "InvalidUserType"

        # ... and validate_only checks the policy without calling ChangePassword.
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChangePassword(
                pb2.ChangePasswordRequest(old_password=NEW_PASSWORD, new_password="short", validate_only=True),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert emulator.calls("ChangePassword", USER) == 2

    # An identity missing from the mapping is refused.
    with channel_for(pki, STRANGER, target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb2_grpc.PasswordServiceStub(channel).GetPasswordPolicy(pb2.GetPasswordPolicyRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_peer_exits_on_sigterm_and_on_stdin_eof(peer):
    peer.proc.proc.send_signal(signal.SIGTERM)
    assert peer.proc.proc.wait(timeout=15) == 0, peer.proc.output()

    # stdin EOF: the same, with a second peer started the same way.
    second = Process(peer.argv, env=peer.env, stdin_pipe=True)
    try:
        second.wait_for_json(lambda e: "listening" in e, timeout=30, what="peer ready line")
        second.proc.stdin.close()
        assert second.proc.wait(timeout=15) == 0, second.output()
    finally:
        second.stop()
