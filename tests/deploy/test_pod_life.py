"""The pod's life, locally: start credgate exactly as the rendered Deployment
would, see it become ready through the admin port's gRPC health service, and
terminate it like the kubelet does while ChangePassword calls are in flight.

Exactly as the Deployment would: the process is the image's ENTRYPOINT with
the Deployment's args, its environment is the Deployment's env (paths moved
into a temp dir, nothing inherited), its files are laid out as the volumes are
mounted, and its config is the ConfigMap's credgate.toml with only what a
laptop needs changed: paths moved, listeners on free 127.0.0.1 ports, IAM at
the emulator, and two more callers so that several calls are in flight for
distinct IAM users. The kubelet's preStop sleep is the one step not replayed
(it happens before SIGTERM and involves no credgate code).
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time

import pytest

from deploy_support import (
    Process,
    aws_secret,
    config,
    config_map_for,
    create_iam_user,
    dev_pki,
    free_port,
    http_json,
    lay_out_mounts,
    log_field,
    pod_argv,
    pod_env,
    rewrite,
    seconds,
    tls_secret_from_pki,
    toml_dumps,
    volume_secret_name,
)

OLD_PASSWORD = "Old-Passw0rd!drain"
IAM_DELAY_SECONDS = 2.0
# How soon after SIGTERM the admin health must stop saying SERVING.
HEALTH_FLIP_SECONDS = 2.0


def new_password(i: int) -> str:
    return f"New-Passw0rd!drain-{i}"


def test_sigterm_drains_in_flight_calls(
    base_objects, dockerfile, credgate_bin, iam_emulator, grpc_stubs, tmp_path
):
    import boto3
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    pb2, pb2_grpc = grpc_stubs
    objs = base_objects
    root = tmp_path / "pod"
    shipped = config(objs)
    grace = seconds(shipped["server"]["shutdown_grace"])
    assert seconds(shipped["server"]["request_timeout"]) > IAM_DELAY_SECONDS + 1

    # Callers: the ConfigMap's example caller and two more, one IAM user each.
    callers = [dict(shipped["callers"][0])] + [
        {
            "spiffe_id": f"spiffe://credgate.test/ns/drain/sa/caller-{i}",
            "iam_user": f"drain-caller-{i}",
            "aws_profile": f"drain-caller-{i}",
        }
        for i in (2, 3)
    ]
    assert "spiffe_id" in callers[0]

    # IAM: one user per caller, with a console password, a key and the right to change it.
    region = iam_emulator["region"]
    admin = boto3.client(
        "iam",
        endpoint_url=iam_emulator["endpoint"],
        region_name=region,
        aws_access_key_id=iam_emulator["admin_access_key_id"],
        aws_secret_access_key=iam_emulator["admin_secret_access_key"],
    )
    profiles = {c["aws_profile"]: create_iam_user(admin, c["iam_user"], OLD_PASSWORD) for c in callers}

    # The config: the ConfigMap's, with only the local differences.
    cfg = copy.deepcopy(shipped)
    cfg["server"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    cfg["tls"] = {k: rewrite(v, root) for k, v in cfg["tls"].items()}
    cfg["aws"]["endpoint_url"] = iam_emulator["endpoint"]
    cfg["callers"] = callers
    cm_name = config_map_for(objs)["metadata"]["name"]

    pki = dev_pki(credgate_bin, tmp_path / "pki", [c["spiffe_id"] for c in callers])
    lay_out_mounts(
        objs,
        root,
        secrets={
            volume_secret_name(objs, "tls"): tls_secret_from_pki(pki["dir"]),
            volume_secret_name(objs, "aws"): aws_secret(profiles, region),
        },
        config_maps={cm_name: {"credgate.toml": toml_dumps(cfg)}},
    )

    argv = [rewrite(a, root) for a in pod_argv(objs, dockerfile)]
    assert argv[0] == "/usr/local/bin/credgate"  # the image's binary; here the host's
    argv[0] = str(credgate_bin)
    credgate = Process(argv, pod_env(objs, root))
    channels: list[grpc.Channel] = []
    try:
        listening = credgate.wait_for_message("credgate listening", timeout=30)
        tls_addr, admin_addr = log_field(listening, "tls_addr"), log_field(listening, "admin_addr")
        assert tls_addr == cfg["server"]["listen"], listening
        assert admin_addr == cfg["server"]["admin_listen"], listening

        # Readiness, as the kubelet's gRPC probe asks it: plaintext, no client cert.
        admin_channel = grpc.insecure_channel(admin_addr)
        channels.append(admin_channel)
        health = health_pb2_grpc.HealthStub(admin_channel)
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING, credgate.output()

        # Every ChangePassword now takes IAM_DELAY_SECONDS at IAM.
        code, _ = http_json(
            "POST",
            f"{iam_emulator['endpoint']}/_emulator/faults",
            {"action": "ChangePassword", "user": None, "error": None,
             "delay_seconds": IAM_DELAY_SECONDS, "count": -1},
        )  # fmt: skip
        assert code == 200

        ca = (pki["dir"] / "ca.crt").read_bytes()
        calls = []
        for i, caller in enumerate(callers):
            crt, key = pki["clients"][caller["spiffe_id"]]
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key.read_bytes(), certificate_chain=crt.read_bytes()
            )
            channel = grpc.secure_channel(
                tls_addr, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
            )
            channels.append(channel)
            stub = pb2_grpc.PasswordServiceStub(channel)
            request = pb2.ChangePasswordRequest(old_password=OLD_PASSWORD, new_password=new_password(i))
            calls.append(stub.ChangePassword.future(request, timeout=grace))

        # Wait until all of them have reached IAM (and sit in its delay).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, body = http_json("GET", f"{iam_emulator['endpoint']}/_emulator/calls?action=ChangePassword")
            if code != 200:  # an emulator without the call counter
                time.sleep(1.0)
                break
            if body["count"] >= len(callers):
                break
            assert not any(c.done() for c in calls), (
                f"calls finished before reaching IAM's delay: {[c.exception() for c in calls if c.done()]}"
                f" {body}\n{credgate.output()}"
            )
            time.sleep(0.05)
        else:
            pytest.fail(f"the calls did not reach IAM\n{credgate.output()}")
        assert not any(c.done() for c in calls), "the calls are in flight when SIGTERM comes"

        # The kubelet's SIGTERM (after the preStop sleep).
        sigterm = time.monotonic()
        credgate.proc.send_signal(signal.SIGTERM)

        # Readiness turns NOT_SERVING (or the admin port goes away) at once.
        flipped = None
        while time.monotonic() - sigterm < HEALTH_FLIP_SECONDS:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    flipped = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            except grpc.RpcError as error:
                flipped = f"admin port answers {error.code().name}"
            if flipped:
                break
            time.sleep(0.05)
        assert flipped, f"admin health still SERVING {HEALTH_FLIP_SECONDS}s after SIGTERM\n{credgate.output()}"
        assert not all(c.done() for c in calls), "readiness flips before the drain ends"

        # The in-flight calls complete, successfully.
        for i, (caller, call) in enumerate(zip(callers, calls)):
            try:
                response = call.result(timeout=grace)
            except grpc.RpcError as error:
                pytest.fail(f"in-flight call {i} failed: {error.code()} {error.details()}\n{credgate.output()}")
            assert response.iam_user == caller["iam_user"]
            assert response.iam_request_id, "IAM's request id"
            assert not response.replayed

        # And the process exits 0 within shutdown_grace.
        try:
            returncode = credgate.proc.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"credgate still running {grace + 5}s after SIGTERM\n{credgate.output()}")
        exited_after = time.monotonic() - sigterm
        print(f"readiness: {flipped} after SIGTERM; exit {returncode} after {exited_after:.2f}s")
        assert returncode == 0, credgate.output()
        assert exited_after <= grace, f"exited {exited_after:.1f}s after SIGTERM (grace {grace}s)"
    finally:
        for channel in channels:
            channel.close()
        credgate.stop()

    # The passwords really changed: each user can now change away from its new one.
    assert http_json("DELETE", f"{iam_emulator['endpoint']}/_emulator/faults")[0] == 200
    for i, caller in enumerate(callers):
        key_id, secret = profiles[caller["aws_profile"]]
        own = boto3.client(
            "iam",
            endpoint_url=iam_emulator["endpoint"],
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )
        own.change_password(OldPassword=new_password(i), NewPassword=new_password(i) + "-next")

    # Its logs: one JSON object per line, and no password anywhere.
    for line in credgate.lines:
        assert isinstance(json.loads(line), dict), line
    everything = credgate.output()
    for secret in [OLD_PASSWORD] + [new_password(i) for i in range(len(callers))]:
        assert secret not in everything, "a password in credgate's output"
