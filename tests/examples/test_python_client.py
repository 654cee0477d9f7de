"""examples/python/change_password.py against a real credgate and the IAM emulator.

Each test starts its own emulator, dev PKI and credgate (conftest.py), generates
the Python stubs from proto/ with grpcio-tools, and runs the example as a
subprocess, exactly as its README says.
"""

from __future__ import annotations

import re

NEW_PASSWORD = "New-Passw0rd!example"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def request_ids(output: str) -> tuple[str, list[str]]:
    """The request_id the client announced, and the one each attempt line names."""
    announced = re.findall(rf"^request_id ({UUID})$", output, re.M)
    assert len(announced) == 1, output
    return announced[0], re.findall(rf"^attempt \d+/\d+ with request_id ({UUID}) failed:$", output, re.M)


def test_success_changes_the_password(credgate_stack, run_example):
    stack = credgate_stack()
    proc = run_example(stack, "Old-Passw0rd!example", NEW_PASSWORD)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"OK: password changed for IAM user {stack.iam_user} \(IAM request id {UUID}\)", proc.stdout)
    assert "failed" not in proc.stdout, "no retry needed"
    assert stack.emulator.password_matches(stack.iam_user, NEW_PASSWORD)
    assert not stack.emulator.password_matches(stack.iam_user, "Old-Passw0rd!example")
    assert stack.emulator.calls("ChangePassword", stack.iam_user) == 1


def test_validate_only_changes_nothing(credgate_stack, run_example):
    stack = credgate_stack()
    proc = run_example(stack, "Old-Passw0rd!example", NEW_PASSWORD, "--validate-only")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK: the new password is acceptable for IAM user {stack.iam_user} (nothing changed)" in proc.stdout
    assert stack.emulator.password_matches(stack.iam_user, "Old-Passw0rd!example")
    assert stack.emulator.calls("ChangePassword", stack.iam_user) == 0


def test_policy_violation_lists_every_unmet_rule(credgate_stack, run_example):
    stack = credgate_stack(
        account_policy={
            "MinimumPasswordLength": 20,
            "RequireSymbols": True,
            "RequireNumbers": True,
            "RequireUppercaseCharacters": True,
            "RequireLowercaseCharacters": True,
            "AllowUsersToChangePassword": True,
        }
    )
    # Too short, no symbol, no digit, no uppercase: four unmet rules.
    proc = run_example(stack, "Old-Passw0rd!example", "lowercaseonly")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "INVALID_ARGUMENT / PASSWORD_POLICY_VIOLATION" in proc.stdout
    violations = re.findall(r"^  - new_password: (.+)$", proc.stdout, re.M)
    assert len(violations) >= 4, proc.stdout
    assert "not retrying" in proc.stdout
    assert len(request_ids(proc.stdout)[1]) == 1, "exactly one attempt"
    assert "lowercaseonly" not in proc.stdout, "no password in the output"
    assert stack.emulator.password_matches(stack.iam_user, "Old-Passw0rd!example")


def test_wrong_old_password_is_not_retried(credgate_stack, run_example):
    stack = credgate_stack()
    proc = run_example(stack, "not-the-old-password", NEW_PASSWORD)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PERMISSION_DENIED / OLD_PASSWORD_INCORRECT" in proc.stdout
    assert "not retrying" in proc.stdout
    assert len(request_ids(proc.stdout)[1]) == 1, "exactly one attempt"
    assert stack.emulator.calls("ChangePassword", stack.iam_user) == 1
    assert stack.emulator.password_matches(stack.iam_user, "Old-Passw0rd!example")


def test_outcome_unknown_is_resolved_by_a_retry_with_the_same_request_id(credgate_stack, run_example):
    """Needs credgate's request_id support (AIP-155): without it, the retry sends
    a second ChangePassword to IAM, and the emulator counts two."""
    stack = credgate_stack()
    # The first ChangePassword sits at IAM for 3 s, longer than one 1 s attempt.
    stack.emulator.add_fault(
        {"action": "ChangePassword", "user": stack.iam_user, "delay_seconds": 3, "count": 1}
    )
    proc = run_example(
        stack, "Old-Passw0rd!example", NEW_PASSWORD,
        "--timeout", "1", "--max-attempts", "8", "--deadline", "30",
    )  # fmt: skip

    announced, attempts = request_ids(proc.stdout)
    assert attempts, f"the first attempt was meant to time out:\n{proc.stdout}"
    assert set(attempts) == {announced}, "every retry reuses the first attempt's request_id"
    assert "DEADLINE_EXCEEDED" in proc.stdout
    assert "retrying with the same request_id" in proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(
        rf"OK: password changed for IAM user {stack.iam_user} \(IAM request id {UUID}, replayed from an earlier attempt\)",
        proc.stdout,
    ), f"the retry's answer is the first attempt's stored outcome:\n{proc.stdout}"
    assert stack.emulator.password_matches(stack.iam_user, NEW_PASSWORD)
    assert stack.emulator.calls("ChangePassword", stack.iam_user) == 1, (
        "IAM saw the change more than once: credgate did not deduplicate by request_id"
    )


def test_unreachable_credgate_is_retried_with_the_same_request_id_then_given_up(
    credgate_bin, run_example, tmp_path
):
    """UNAVAILABLE without an ErrorInfo (nothing answered): retried, bounded, resumable."""
    import socket

    from examples_support import Stack, dev_pki

    spiffe_id = "spiffe://credgate.test/ns/examples/sa/nobody-listens"
    pki = dev_pki(credgate_bin, tmp_path / "pki", [spiffe_id])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    crt, key = pki["clients"][spiffe_id]
    stack = Stack(None, "", spiffe_id, pki["ca"], crt, key, f"127.0.0.1:{port}", None)

    proc = run_example(stack, "Old-Passw0rd!example", NEW_PASSWORD, "--timeout", "1", "--max-attempts", "3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    announced, attempts = request_ids(proc.stdout)
    assert attempts == [announced] * 3, proc.stdout
    assert "UNAVAILABLE / no ErrorInfo" in proc.stdout
    assert f"rerun with --request-id {announced}" in proc.stdout

    # Resuming that change reuses the printed id instead of making a new one.
    proc = run_example(stack, "Old-Passw0rd!example", NEW_PASSWORD, "--max-attempts", "1", "--request-id", announced)
    assert proc.returncode == 3 and request_ids(proc.stdout) == (announced, [announced]), proc.stdout
    proc = run_example(stack, "Old-Passw0rd!example", NEW_PASSWORD, "--request-id", "not-a-uuid")
    assert proc.returncode == 2 and "not a UUID" in proc.stderr
