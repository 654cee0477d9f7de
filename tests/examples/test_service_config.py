"""examples/service-config.json: grpcio accepts it, and its retry policy
retries exactly what credgate's error table says is safe.

UNAVAILABLE from credgate always means "nothing was applied"
(IAM_THROTTLED, ENTITY_TEMPORARILY_UNMODIFIABLE, IAM_SERVICE_FAILURE,
IAM_UNREACHABLE, STATE_UNAVAILABLE), and a retried ChangePassword carries the
same request message, so the same request_id: credgate replays instead of
changing twice. DEADLINE_EXCEEDED (OUTCOME_UNKNOWN) is left to the
application, which retries it with the same request_id under a new deadline,
as the examples do.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc

from examples_support import REPO, import_stubs

CONFIG = REPO / "examples" / "service-config.json"


def channel(stack, config: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        Path(stack.ca).read_bytes(), Path(stack.key).read_bytes(), Path(stack.cert).read_bytes()
    )
    options = [("grpc.service_config", config), ("grpc.enable_retries", 1)]
    return grpc.secure_channel(stack.target, creds, options=options)


def test_retries_are_limited_to_what_the_error_table_marks_safe():
    config = json.loads(CONFIG.read_text())
    for method in config["methodConfig"]:
        policy = method["retryPolicy"]
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"], method["name"]
        assert 2 <= policy["maxAttempts"] <= 5


def test_grpcio_uses_the_config_and_a_not_applied_failure_is_retried_once_changed(
    credgate_stack, stubs_dir
):
    pb, pb_grpc = import_stubs(stubs_dir)
    stack = credgate_stack()
    # IAM throttles twice (credgate's own retries absorb those), then a third
    # time: credgate answers UNAVAILABLE / IAM_THROTTLED (not applied) and the
    # channel's retry policy sends the same request again, which succeeds.
    stack.emulator.add_fault(
        {"action": "ChangePassword", "user": stack.iam_user, "error": "Throttling", "count": 3}
    )
    with channel(stack, CONFIG.read_text()) as ch:
        stub = pb_grpc.PasswordServiceStub(ch)
        request = pb.ChangePasswordRequest(
            old_password="Old-Passw0rd!example",
            new_password="New-Passw0rd!config",
            request_id=str(uuid.uuid4()),
        )
        response = stub.ChangePassword(request)
        assert response.iam_user == stack.iam_user
        # Wrong old passwords are PERMISSION_DENIED: never retried.
        wrong = pb.ChangePasswordRequest(old_password="Nope-1!", new_password="Nope-2!")
        try:
            stub.ChangePassword(wrong)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        else:
            raise AssertionError("a wrong old password succeeded")
    assert stack.emulator.password_matches(stack.iam_user, "New-Passw0rd!config")
    # 3 throttled + 1 applied, then exactly one wrong guess.
    assert stack.emulator.calls("ChangePassword", stack.iam_user) == 5
