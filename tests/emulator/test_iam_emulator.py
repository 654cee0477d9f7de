"""Pins the IAM emulator's behaviour: the launcher runs as a subprocess, as credgate's tests run it."""

from __future__ import annotations

import http.client
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError

LAUNCHER = Path(__file__).with_name("iam_emulator.py")
READY_TIMEOUT_SECONDS = 30
EXIT_TIMEOUT_SECONDS = 10
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
IAM_NS = "{https://iam.amazonaws.com/doc/2010-05-08/}"
STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
ACCOUNT_ID = "123456789012"
ROOT_SIGNER = "<root_account>"
INITIAL_PASSWORD = "Initial-Passw0rd!"
USER_PERMISSIONS = ["iam:ChangePassword", "iam:GetAccountPasswordPolicy", "iam:GetUser"]


@dataclass
class Emulator:
    process: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def endpoint(self) -> str:
        return self.info["endpoint"]

    def iam(self, access_key_id: str, secret_access_key: str, **config: Any) -> Any:
        # One attempt only: botocore would otherwise retry Throttling and 5xx
        # itself, hiding what the emulator answered and skewing call counts.
        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=self.info["region"],
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(retries={"total_max_attempts": 1}, **config),
        )

    def sts(self, access_key_id: str, secret_access_key: str, session_token: str | None = None) -> Any:
        """An STS client for the same endpoint (moto routes by the signing service name)."""
        return boto3.client(
            "sts",
            endpoint_url=self.endpoint,
            region_name=self.info["region"],
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def admin(self) -> Any:
        return self.iam(self.info["admin_access_key_id"], self.info["admin_secret_access_key"])

    def secretsmanager(self, access_key_id: str, secret_access_key: str) -> Any:
        """A Secrets Manager client for the same endpoint (moto routes by the signing service name)."""
        return boto3.client(
            "secretsmanager",
            endpoint_url=self.endpoint,
            region_name=self.info["region"],
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def admin_secrets(self) -> Any:
        return self.secretsmanager(self.info["admin_access_key_id"], self.info["admin_secret_access_key"])

    def root_key(self) -> tuple[str, str]:
        """A fresh emulated root key pair from POST /_emulator/root-key."""
        status, body = self.control("POST", "/_emulator/root-key", {})
        assert status == 200
        return body["access_key_id"], body["secret_access_key"]

    def check_password(self, user: str, password: str) -> bool:
        status, body = self.control("POST", "/_emulator/check-password", {"user": user, "password": password})
        assert status == 200
        return body["matches"]

    def control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call the unsigned /_emulator/* API; returns (status, decoded JSON)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def add_fault(self, **fault: Any) -> None:
        assert self.control("POST", "/_emulator/faults", fault) == (200, {"ok": True})

    def calls(self, action: str, user: str | None = None) -> int:
        query = {"action": action} | ({"user": user} if user else {})
        status, body = self.control("GET", "/_emulator/calls?" + urllib.parse.urlencode(query))
        assert status == 200
        return body["count"]

    def signed_request(
        self,
        access_key_id: str,
        secret_access_key: str,
        params: dict[str, str],
        service: str = "iam",
        quote: Any = urllib.parse.quote_plus,
    ) -> tuple[dict[str, str], bytes]:
        """The headers and body of a SigV4-signed IAM (or STS) query request.

        `quote` encodes each key and value: `quote_plus` (a space is `+`, as
        boto3 sends), or SigV4's own percent-encoding (`%20`, as aws-sdk-rust
        sends): the signature covers the bytes as sent either way.
        """
        version = {"iam": "2010-05-08", "sts": "2011-06-15"}[service]
        body = urllib.parse.urlencode({**params, "Version": version}, quote_via=quote)
        request = botocore.awsrequest.AWSRequest(
            method="POST",
            url=self.endpoint + "/",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        credentials = botocore.credentials.Credentials(access_key_id, secret_access_key)
        botocore.auth.SigV4Auth(credentials, service, self.info["region"]).add_auth(request)
        return dict(request.prepare().headers), body.encode()

    def signed_post(
        self, access_key_id: str, secret_access_key: str, params: dict[str, str], service: str = "iam"
    ) -> tuple[int, dict[str, str], str]:
        """A raw SigV4-signed IAM (or STS) query request, to see the exact status, headers and XML."""
        headers, body = self.signed_request(access_key_id, secret_access_key, params, service)
        return self.signed_post_raw(headers, body)

    def signed_post_raw(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], str]:
        """POSTs these headers and exactly these body bytes: (status, headers, text)."""
        # urllib sets the body's own Content-Length (the signed one may differ).
        headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        http_request = urllib.request.Request(self.endpoint + "/", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=10) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()


@dataclass
class IamUser:
    name: str
    access_key_id: str
    secret_access_key: str
    client: Any


def start_emulator() -> Emulator:
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_SECONDS)
    if not ready:
        process.kill()
        pytest.fail(f"emulator printed no JSON line within {READY_TIMEOUT_SECONDS}s")
    line = process.stdout.readline()
    if not line:
        pytest.fail(f"emulator exited before it was ready (exit code {process.wait()})")
    return Emulator(process, json.loads(line))


def stop_emulator(emulator: Emulator) -> None:
    if emulator.process.poll() is None:
        emulator.process.stdin.close()
        try:
            emulator.process.wait(EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            emulator.process.kill()
            emulator.process.wait()
            pytest.fail("emulator did not exit after its stdin was closed")


@pytest.fixture
def emulator() -> Any:
    # A fresh emulator per test: the password policy is account-wide state.
    started = start_emulator()
    yield started
    stop_emulator(started)


def create_user(
    emulator: Emulator,
    name: str,
    password: str | None = INITIAL_PASSWORD,
    permissions: list[str] | None = USER_PERMISSIONS,
) -> IamUser:
    """An IAM user made with the admin keys: optional login profile and inline policy."""
    admin = emulator.admin()
    admin.create_user(UserName=name)
    if password is not None:
        admin.create_login_profile(UserName=name, Password=password)
    if permissions:
        grant_self_service(emulator, name, permissions)
    key = admin.create_access_key(UserName=name)["AccessKey"]
    client = emulator.iam(key["AccessKeyId"], key["SecretAccessKey"])
    return IamUser(name, key["AccessKeyId"], key["SecretAccessKey"], client)


def grant_self_service(emulator: Emulator, name: str, permissions: list[str] = USER_PERMISSIONS) -> None:
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": permissions, "Resource": "*"}],
    }
    emulator.admin().put_user_policy(UserName=name, PolicyName="self-service", PolicyDocument=json.dumps(document))


def error_of(call: Any, **kwargs: Any) -> tuple[str, int, str]:
    """(code, HTTP status, message) of the ClientError that the call must raise."""
    with pytest.raises(ClientError) as raised:
        call(**kwargs)
    response = raised.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def assert_password_is(user: IamUser, password: str) -> None:
    """The password is exactly this: ChangePassword to itself succeeds with no reuse policy."""
    user.client.change_password(OldPassword=password, NewPassword=password)


def assert_password_is_not(user: IamUser, password: str) -> None:
    code, _, message = error_of(user.client.change_password, OldPassword=password, NewPassword=password)
    assert (code, message) == ("InvalidUserType", "The old password is incorrect.")


# --- startup, lifetime, stdout -------------------------------------------------------


def test_ready_line_describes_the_endpoint_and_admin(emulator: Emulator) -> None:
    info = emulator.info
    assert set(info) == {"endpoint", "region", "account_id", "admin_access_key_id", "admin_secret_access_key"}
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info["endpoint"])
    assert info["region"] == "us-east-1"
    assert info["account_id"] == "123456789012"
    user = emulator.admin().get_user()["User"]
    assert user["UserName"] == "emulator-admin"
    assert user["Arn"] == "arn:aws:iam::123456789012:user/emulator-admin"


def test_exits_when_stdin_closes_and_prints_nothing_else() -> None:
    started = start_emulator()
    started.admin().get_user()
    started.process.stdin.close()
    assert started.process.wait(EXIT_TIMEOUT_SECONDS) == 0
    assert started.process.stdout.read() == ""


def test_exits_on_sigterm() -> None:
    started = start_emulator()
    try:
        started.process.send_signal(signal.SIGTERM)
        assert started.process.wait(EXIT_TIMEOUT_SECONDS) == 0
    finally:
        stop_emulator(started)


# --- authentication and authorization (moto's, on from the first request) ---------


def test_unknown_access_key_is_rejected_on_the_very_first_request(emulator: Emulator) -> None:
    client = emulator.iam("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert error_of(client.get_user)[:2] == ("InvalidClientTokenId", 403)


def test_wrong_secret_is_rejected(emulator: Emulator) -> None:
    client = emulator.iam(emulator.info["admin_access_key_id"], "not-the-secret")
    assert error_of(client.get_user)[:2] == ("SignatureDoesNotMatch", 403)


def test_user_without_permission_is_denied(emulator: Emulator) -> None:
    user = create_user(emulator, "alice", permissions=None)
    code, status, message = error_of(
        user.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="Another-Passw0rd!"
    )
    assert (code, status) == ("AccessDenied", 403)
    assert "iam:ChangePassword" in message
    grant_self_service(emulator, user.name)
    assert_password_is(user, INITIAL_PASSWORD)


def test_auth_errors_use_iam_xml_and_carry_the_request_id(emulator: Emulator) -> None:
    status, headers, body = emulator.signed_post(
        emulator.info["admin_access_key_id"], "not-the-secret", {"Action": "GetUser"}
    )
    assert status == 403
    assert_iam_error_xml(body, headers, "SignatureDoesNotMatch", "Sender")


def assert_iam_error_xml(
    body: str, headers: dict[str, str], code: str, fault_type: str, namespace: str = IAM_NS
) -> None:
    assert headers.get("Content-Type", "").startswith("text/xml")
    root = ET.fromstring(body)
    assert root.tag in ("ErrorResponse", namespace + "ErrorResponse")
    ns = namespace if root.tag.startswith("{") else ""
    error = root.find(ns + "Error")
    assert error is not None, body  # directly under ErrorResponse, where the SDKs look
    assert error.findtext(ns + "Code") == code
    assert error.findtext(ns + "Type") == fault_type
    request_id = root.findtext(ns + "RequestId")
    assert request_id and UUID_RE.match(request_id), body
    assert headers.get("x-amzn-RequestId") == request_id


# --- ChangePassword ------------------------------------------------------------------


def test_change_password_changes_the_password(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    status, headers, body = emulator.signed_post(
        alice.access_key_id,
        alice.secret_access_key,
        {"Action": "ChangePassword", "OldPassword": INITIAL_PASSWORD, "NewPassword": "Second-Passw0rd!"},
    )
    assert status == 200
    root = ET.fromstring(body)
    assert root.tag == IAM_NS + "ChangePasswordResponse"
    request_id = root.findtext(f"{IAM_NS}ResponseMetadata/{IAM_NS}RequestId")
    assert request_id and UUID_RE.match(request_id)
    assert headers["x-amzn-RequestId"] == request_id

    alice.client.change_password(OldPassword="Second-Passw0rd!", NewPassword="Third-Passw0rd!")
    assert_password_is_not(alice, INITIAL_PASSWORD)
    assert_password_is_not(alice, "Second-Passw0rd!")
    assert_password_is(alice, "Third-Passw0rd!")


def sigv4_quote(value: str, safe: str = "", encoding: str | None = None, errors: str | None = None) -> str:
    """SigV4's URI encoding (what aws-sdk-rust writes in a query body): every
    byte but A-Z a-z 0-9 - _ . ~ as %XX, so a space is %20, never +."""
    return urllib.parse.quote(value, safe="-_.~", encoding=encoding, errors=errors)


# Every character a form encoding treats specially, and Latin-1 beyond ASCII.
AWKWARD_PASSWORD = "Sp ace+Plus&Amp=Eq!Ünï-çødé 9"


@pytest.mark.parametrize("quote", [sigv4_quote, urllib.parse.quote_plus], ids=["percent-20", "plus"])
def test_the_signature_is_checked_over_the_body_as_received(emulator: Emulator, quote: Any) -> None:
    """moto re-encodes the parsed form with `+` before checking SigV4, so a
    body signed as sent with %20 (aws-sdk-rust) failed; the emulator checks
    the received bytes, and both encodings of one password change it."""
    alice = create_user(emulator, "alice")
    change = {"Action": "ChangePassword", "OldPassword": INITIAL_PASSWORD, "NewPassword": AWKWARD_PASSWORD}
    headers, body = emulator.signed_request(alice.access_key_id, alice.secret_access_key, change, quote=quote)
    assert (b"%20" in body) == (quote is sigv4_quote) and b"%C3%9C" in body, body
    status, _, text = emulator.signed_post_raw(headers, body)
    assert status == 200, text
    assert emulator.check_password("alice", AWKWARD_PASSWORD)
    assert not emulator.check_password("alice", INITIAL_PASSWORD)

    # Back, with the old password holding every awkward character.
    back = {"Action": "ChangePassword", "OldPassword": AWKWARD_PASSWORD, "NewPassword": INITIAL_PASSWORD}
    headers, body = emulator.signed_request(alice.access_key_id, alice.secret_access_key, back, quote=quote)
    assert emulator.signed_post_raw(headers, body)[0] == 200
    assert emulator.check_password("alice", INITIAL_PASSWORD)


def test_a_body_changed_after_signing_fails_the_signature(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    change = {"Action": "ChangePassword", "OldPassword": INITIAL_PASSWORD, "NewPassword": "Other Passw0rd!"}
    headers, body = emulator.signed_request(alice.access_key_id, alice.secret_access_key, change, quote=sigv4_quote)
    # The same form, re-encoded the way moto used to check it (`+`): other bytes.
    tampered = body.replace(b"%20", b"+")
    assert tampered != body
    status, _, text = emulator.signed_post_raw(headers, tampered)
    assert status == 403 and "<Code>SignatureDoesNotMatch</Code>" in text, text
    assert emulator.check_password("alice", INITIAL_PASSWORD)


def test_change_password_only_changes_the_signers_password(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    bob = create_user(emulator, "bob", password="Bobs-Passw0rd!")
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Alices-New-Passw0rd!")
    assert_password_is(bob, "Bobs-Passw0rd!")
    assert_password_is(alice, "Alices-New-Passw0rd!")


def test_change_password_clears_password_reset_required(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_login_profile(UserName="alice", Password=INITIAL_PASSWORD, PasswordResetRequired=True)
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    profile = emulator.admin().get_login_profile(UserName="alice")["LoginProfile"]
    assert profile["PasswordResetRequired"] is False


def test_wrong_old_password_is_invalid_user_type(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    code, status, message = error_of(
        alice.client.change_password, OldPassword="Not-The-Passw0rd!", NewPassword="Second-Passw0rd!"
    )
    assert (code, status, message) == ("InvalidUserType", 400, "The old password is incorrect.")
    assert_password_is(alice, INITIAL_PASSWORD)


def test_user_without_login_profile_gets_no_such_entity(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", password=None)
    code, status, message = error_of(
        alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!"
    )
    assert (code, status, message) == ("NoSuchEntity", 404, "Login Profile for User alice cannot be found.")


def test_password_set_by_the_admin_is_the_current_one(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_login_profile(UserName="alice", Password="Admin-Set-Passw0rd!")
    assert_password_is_not(alice, INITIAL_PASSWORD)
    alice.client.change_password(OldPassword="Admin-Set-Passw0rd!", NewPassword="Second-Passw0rd!")
    assert_password_is(alice, "Second-Passw0rd!")


def test_assumed_role_credentials_are_invalid_user_type(emulator: Emulator) -> None:
    admin = emulator.admin()
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = admin.create_role(RoleName="changer", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iam:ChangePassword", "Resource": "*"}]}
    admin.put_role_policy(RoleName="changer", PolicyName="p", PolicyDocument=json.dumps(allow))
    sts = boto3.client(
        "sts",
        endpoint_url=emulator.endpoint,
        region_name="us-east-1",
        aws_access_key_id=emulator.info["admin_access_key_id"],
        aws_secret_access_key=emulator.info["admin_secret_access_key"],
    )
    credentials = sts.assume_role(RoleArn=role["Arn"], RoleSessionName="session")["Credentials"]
    client = boto3.client(
        "iam",
        endpoint_url=emulator.endpoint,
        region_name="us-east-1",
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        config=Config(retries={"total_max_attempts": 1}),
    )
    code, status, _ = error_of(client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert (code, status) == ("InvalidUserType", 400)


def test_user_key_with_a_session_token_is_rejected_before_change_password(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    client = boto3.client(
        "iam",
        endpoint_url=emulator.endpoint,
        region_name="us-east-1",
        aws_access_key_id=alice.access_key_id,
        aws_secret_access_key=alice.secret_access_key,
        aws_session_token="not-a-session-token",
        config=Config(retries={"total_max_attempts": 1}),
    )
    code, status, _ = error_of(client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    assert (code, status) == ("InvalidClientTokenId", 403)
    assert_password_is(alice, INITIAL_PASSWORD)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (INITIAL_PASSWORD, "\u0100" + "Passw0rd!", "newPassword"),
        (INITIAL_PASSWORD, "x" * 129, "newPassword"),
        (INITIAL_PASSWORD, "", "newPassword"),
        (INITIAL_PASSWORD, "emoji-\U0001f600-Passw0rd!", "newPassword"),
        ("x" * 129, "Second-Passw0rd!", "oldPassword"),
        ("\u0100", "Second-Passw0rd!", "oldPassword"),
    ],
    ids=["new-u0100", "new-129-chars", "new-empty", "new-emoji", "old-129-chars", "old-u0100"],
)
def test_out_of_range_passwords_are_validation_errors(emulator: Emulator, old: str, new: str, field: str) -> None:
    alice = create_user(emulator, "alice")
    # botocore would refuse an empty password itself; IAM's own answer is what is pinned.
    client = emulator.iam(alice.access_key_id, alice.secret_access_key, parameter_validation=False)
    code, status, message = error_of(client.change_password, OldPassword=old, NewPassword=new)
    assert (code, status) == ("ValidationError", 400)
    assert f"'{field}'" in message
    if new:
        assert new not in message  # passwords are never echoed
    assert_password_is(alice, INITIAL_PASSWORD)


def test_boundary_passwords_are_accepted(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    longest = "\xff\t" + "y" * 126
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword=longest)
    alice.client.change_password(OldPassword=longest, NewPassword="z")
    assert_password_is(alice, "z")


# --- account password policy -----------------------------------------------------------


def test_get_account_password_policy_without_policy_is_no_such_entity(emulator: Emulator) -> None:
    code, status, _ = error_of(emulator.admin().get_account_password_policy)
    assert (code, status) == ("NoSuchEntity", 404)


def test_without_policy_any_valid_password_is_accepted(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="a")
    assert_password_is(alice, "a")


@pytest.mark.parametrize(
    ("policy", "weak", "strong", "rule"),
    [
        ({"MinimumPasswordLength": 12}, "Short-Pw0rd", "Long-Enough-Pw0rd", "minimum length of 12"),
        ({"RequireSymbols": True}, "NoSymbolsPassw0rd", "Symbol'Passw0rd", "at least one symbol"),
        ({"RequireNumbers": True}, "No-Numbers-Password", "With-Numb3r-Password", "at least one number"),
        ({"RequireUppercaseCharacters": True}, "no-upper-passw0rd", "one-Upper-passw0rd", "uppercase"),
        ({"RequireLowercaseCharacters": True}, "NO-LOWER-PASSW0RD", "ONE-lOWER-PASSW0RD", "lowercase"),
    ],
    ids=["length", "symbols", "numbers", "uppercase", "lowercase"],
)
def test_each_policy_rule_is_enforced(
    emulator: Emulator, policy: dict[str, Any], weak: str, strong: str, rule: str
) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_account_password_policy(**{"MinimumPasswordLength": 6, **policy})
    code, status, message = error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword=weak)
    assert (code, status) == ("PasswordPolicyViolation", 400)
    assert rule in message
    assert weak not in message
    assert_password_is_not(alice, weak)
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword=strong)
    assert_password_is(alice, strong)


def test_policy_violation_names_every_unmet_rule(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_account_password_policy(
        MinimumPasswordLength=20,
        RequireSymbols=True,
        RequireNumbers=True,
        RequireUppercaseCharacters=True,
        RequireLowercaseCharacters=True,
    )
    _, _, message = error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="short")
    for rule in ("minimum length of 20", "symbol", "number", "uppercase"):
        assert rule in message
    assert "lowercase" not in message


def test_reuse_prevention_covers_the_last_n_passwords(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", password="Pass-A-0!")
    emulator.admin().update_account_password_policy(MinimumPasswordLength=6, PasswordReusePrevention=3)

    def change(old: str, new: str) -> None:
        alice.client.change_password(OldPassword=old, NewPassword=new)

    def rejected(old: str, new: str) -> None:
        code, _, message = error_of(alice.client.change_password, OldPassword=old, NewPassword=new)
        assert code == "PasswordPolicyViolation"
        assert "last 3 passwords" in message

    rejected("Pass-A-0!", "Pass-A-0!")  # the current password is one of the last 3
    change("Pass-A-0!", "Pass-B-0!")
    change("Pass-B-0!", "Pass-C-0!")
    rejected("Pass-C-0!", "Pass-A-0!")  # A, B, C are the last 3
    rejected("Pass-C-0!", "Pass-B-0!")
    change("Pass-C-0!", "Pass-D-0!")
    change("Pass-D-0!", "Pass-A-0!")  # now B, C, D are: A may come back
    assert_password_is_not(alice, "Pass-D-0!")


def test_reuse_prevention_counts_a_password_set_by_the_admin(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", password="Pass-A-0!")
    emulator.admin().update_account_password_policy(MinimumPasswordLength=6, PasswordReusePrevention=1)
    alice.client.change_password(OldPassword="Pass-A-0!", NewPassword="Pass-B-0!")
    emulator.admin().update_login_profile(UserName="alice", Password="Pass-C-0!")
    code, _, _ = error_of(alice.client.change_password, OldPassword="Pass-C-0!", NewPassword="Pass-C-0!")
    assert code == "PasswordPolicyViolation"
    alice.client.change_password(OldPassword="Pass-C-0!", NewPassword="Pass-B-0!")  # only 1 remembered


def test_without_reuse_prevention_the_current_password_may_be_kept(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_account_password_policy(MinimumPasswordLength=6)
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword=INITIAL_PASSWORD)
    assert_password_is(alice, INITIAL_PASSWORD)


# --- fault switch ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "status", "fault_type"),
    [
        ({"error": "Throttling"}, "Throttling", 400, "Sender"),
        ({"error": "LimitExceeded"}, "LimitExceeded", 409, "Sender"),
        ({"error": "EntityTemporarilyUnmodifiable"}, "EntityTemporarilyUnmodifiable", 409, "Sender"),
        ({"error": "ServiceFailure"}, "ServiceFailure", 500, "Receiver"),
        ({"error": "SomethingElse"}, "SomethingElse", 400, "Sender"),
        ({"error": "Busy", "status": 503, "message": "come back later"}, "Busy", 503, "Receiver"),
    ],
    ids=["throttling", "limit", "unmodifiable", "service-failure", "other", "custom-status"],
)
def test_fault_answers_the_error_and_changes_nothing(
    emulator: Emulator, fault: dict[str, Any], code: str, status: int, fault_type: str
) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", **fault)
    got_status, headers, body = emulator.signed_post(
        alice.access_key_id,
        alice.secret_access_key,
        {"Action": "ChangePassword", "OldPassword": INITIAL_PASSWORD, "NewPassword": "Second-Passw0rd!"},
    )
    assert got_status == status
    assert_iam_error_xml(body, headers, code, fault_type)
    if "message" in fault:
        assert fault["message"] in body
    # count defaults to 1: the next request is processed, and proves nothing changed.
    assert_password_is(alice, INITIAL_PASSWORD)


def test_fault_is_matched_by_user(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    bob = create_user(emulator, "bob")
    emulator.add_fault(action="ChangePassword", user="alice", error="Throttling")
    bob.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Bobs-New-Passw0rd!")
    code, _, _ = error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    assert code == "Throttling"


def test_fault_is_matched_by_action(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="GetUser", error="ServiceFailure")
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert error_of(alice.client.get_user)[:2] == ("ServiceFailure", 500)
    assert alice.client.get_user()["User"]["UserName"] == "alice"


def test_fault_on_get_account_password_policy(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.admin().update_account_password_policy(MinimumPasswordLength=9)
    emulator.add_fault(action="GetAccountPasswordPolicy", error="Throttling", count=2)
    assert error_of(alice.client.get_account_password_policy)[:2] == ("Throttling", 400)
    assert error_of(alice.client.get_account_password_policy)[:2] == ("Throttling", 400)
    policy = alice.client.get_account_password_policy()["PasswordPolicy"]
    assert policy["MinimumPasswordLength"] == 9


def test_fault_never_bypasses_authentication(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", error="ServiceFailure")
    wrong_secret = emulator.iam(alice.access_key_id, "not-the-secret")
    code, _, _ = error_of(wrong_secret.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    assert code == "SignatureDoesNotMatch"
    # The fault was not used up by the rejected request.
    code, _, _ = error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    assert code == "ServiceFailure"


def test_forever_fault_until_cleared(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", error="Throttling", count=-1)
    for _ in range(3):
        code, _, _ = error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
        assert code == "Throttling"
    assert emulator.control("DELETE", "/_emulator/faults") == (200, {"ok": True})
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert_password_is(alice, "Second-Passw0rd!")


def test_delay_without_error_then_processes_normally(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", user="alice", delay_seconds=1.0)
    started = time.monotonic()
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    assert_password_is(alice, "Second-Passw0rd!")
    assert time.monotonic() - started < 1.0


def test_delay_with_error(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", error="ServiceFailure", delay_seconds=0.5)
    started = time.monotonic()
    assert error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")[0] == (
        "ServiceFailure"
    )
    assert time.monotonic() - started >= 0.5
    assert_password_is(alice, INITIAL_PASSWORD)


@pytest.mark.parametrize(
    "body",
    [
        {"error": "Throttling"},
        {"action": "ChangePassword"},
        {"action": "ChangePassword", "error": "Throttling", "count": 0},
        {"action": "ChangePassword", "error": "Throttling", "status": "500"},
        {"action": "ChangePassword", "delay_seconds": -1},
        "not an object",
        {"action": "ChangePassword", "response": "garbled"},
        {"action": "ChangePassword", "response": "truncated", "error": "Throttling"},
        {"action": "ChangePassword", "response": "truncated", "message": "m"},
        {"action": "ChangePassword", "response": "truncated", "status": 500},
        {"action": "ChangePassword", "response": "truncated", "apply": False},
        {"action": "ChangePassword", "response": "bare"},
        {"action": "ChangePassword", "response": "bare", "apply": "yes"},
        {"action": "ChangePassword", "response": "bare", "apply": True, "status": 404},
        {"action": "ChangePassword", "response": "bare", "apply": True, "error": "ServiceFailure"},
        {"action": "ChangePassword", "error": "Throttling", "apply": True},
    ],
    ids=[
        "no-action",
        "neither-error-nor-delay",
        "count-0",
        "status-string",
        "negative-delay",
        "not-object",
        "unknown-response",
        "truncated-with-error",
        "truncated-with-message",
        "truncated-with-status",
        "truncated-not-applied",
        "bare-without-apply",
        "bare-apply-not-bool",
        "bare-not-5xx",
        "bare-with-error",
        "apply-without-response",
    ],
)
def test_bad_fault_requests_are_refused(emulator: Emulator, body: Any) -> None:
    status, answer = emulator.control("POST", "/_emulator/faults", body)
    assert status == 400
    assert answer["ok"] is False
    assert answer["error"]


# --- call counting ---------------------------------------------------------------------


def test_calls_are_counted_per_action_and_user(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    bob = create_user(emulator, "bob")
    assert emulator.calls("ChangePassword") == 0
    alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    error_of(alice.client.change_password, OldPassword="wrong-Passw0rd!", NewPassword="x-Passw0rd!")
    bob.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Bobs-New-Passw0rd!")
    bob.client.get_user()
    assert emulator.calls("ChangePassword", "alice") == 2
    assert emulator.calls("ChangePassword", "bob") == 1
    assert emulator.calls("ChangePassword") == 3
    assert emulator.calls("GetUser", "bob") == 1


def test_calls_count_faulted_and_rejected_requests(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", error="Throttling")
    error_of(alice.client.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    wrong_secret = emulator.iam(alice.access_key_id, "not-the-secret")
    error_of(wrong_secret.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="x-Passw0rd!")
    assert emulator.calls("ChangePassword", "alice") == 2


def test_calls_are_counted_on_arrival_before_the_delay(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", delay_seconds=2)
    worker = threading.Thread(
        target=alice.client.change_password,
        kwargs={"OldPassword": INITIAL_PASSWORD, "NewPassword": "Second-Passw0rd!"},
    )
    worker.start()
    deadline = time.monotonic() + 1.5
    while emulator.calls("ChangePassword", "alice") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emulator.calls("ChangePassword", "alice") == 1
    assert worker.is_alive()  # still sleeping in the emulator
    worker.join(10)


# --- request ids --------------------------------------------------------------------------


def test_every_response_carries_a_uuid_request_id_header(emulator: Emulator) -> None:
    admin_key = (emulator.info["admin_access_key_id"], emulator.info["admin_secret_access_key"])
    emulator.add_fault(action="ListUsers", error="LimitExceeded")
    for params, expected_status in [
        ({"Action": "GetUser"}, 200),  # moto's own success
        ({"Action": "GetAccountPasswordPolicy"}, 404),  # moto's own error
        ({"Action": "ListUsers"}, 409),  # injected fault
        ({"Action": "ChangePassword", "OldPassword": "a", "NewPassword": "b"}, 404),  # no login profile
    ]:
        status, headers, body = emulator.signed_post(*admin_key, params)
        assert status == expected_status, body
        assert UUID_RE.match(headers.get("x-amzn-RequestId", "")), headers
        assert f"<RequestId>{headers['x-amzn-RequestId']}</RequestId>" in body


def test_unknown_control_endpoint_is_404(emulator: Emulator) -> None:
    status, answer = emulator.control("GET", "/_emulator/nope")
    assert status == 404
    assert answer["ok"] is False


def test_boto3_request_id_matches_header(emulator: Emulator) -> None:
    response = emulator.admin().get_user()
    metadata = response["ResponseMetadata"]
    assert UUID_RE.match(metadata["RequestId"])
    assert metadata["HTTPHeaders"]["x-amzn-requestid"] == metadata["RequestId"]


def test_two_emulators_are_independent() -> None:
    first, second = start_emulator(), start_emulator()
    try:
        assert first.info["endpoint"] != second.info["endpoint"]
        assert first.info["admin_access_key_id"] != second.info["admin_access_key_id"]
        create_user(first, "alice")
        assert error_of(second.admin().get_user, UserName="alice")[:2] == ("NoSuchEntity", 404)
    finally:
        stop_emulator(first)
        stop_emulator(second)


def test_check_password_tells_the_current_password_without_changing_it(emulator: Emulator) -> None:
    user = create_user(emulator, "checked")
    url = emulator.endpoint + "/_emulator/check-password"

    def check(name: str, password: str) -> Any:
        body = json.dumps({"user": name, "password": password}).encode()
        request = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["matches"]

    assert check(user.name, INITIAL_PASSWORD) is True
    assert check(user.name, INITIAL_PASSWORD + "x") is False
    assert_password_is(user, INITIAL_PASSWORD)
    with pytest.raises(urllib.error.HTTPError) as missing:
        check("nobody", INITIAL_PASSWORD)
    assert missing.value.code == 404


# --- response-shape faults -------------------------------------------------------------


def raw_exchange(emulator: Emulator, headers: dict[str, str], body: bytes) -> tuple[str, dict[str, str], bytes]:
    """One request on a fresh socket, read until the server closes it: (status line, headers, body bytes)."""
    url = urllib.parse.urlsplit(emulator.endpoint)
    assert url.hostname and url.port
    lines = ["POST / HTTP/1.1", f"Host: {url.hostname}:{url.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "Content-Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return status_line, response_headers, rest


CHANGE_TO_SECOND = {"Action": "ChangePassword", "OldPassword": INITIAL_PASSWORD, "NewPassword": "Second-Passw0rd!"}


def test_truncated_response_applies_the_change_then_cuts_the_body(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", user="alice", response="truncated")
    headers, body = emulator.signed_request(alice.access_key_id, alice.secret_access_key, CHANGE_TO_SECOND)
    status_line, response_headers, received = raw_exchange(emulator, headers, body)
    assert status_line.startswith("HTTP/1.1 200 ")
    assert response_headers["content-type"].startswith("text/xml")
    assert UUID_RE.match(response_headers["x-amzn-requestid"])
    # Part of IAM's XML, fewer bytes than announced, then the connection closed.
    assert 0 < len(received) < int(response_headers["content-length"])
    assert received.startswith(b"<ChangePasswordResponse")
    assert emulator.check_password("alice", "Second-Passw0rd!")
    # count defaults to 1: the next answer is whole again.
    alice.client.change_password(OldPassword="Second-Passw0rd!", NewPassword="Third-Passw0rd!")


def test_truncated_response_is_an_error_for_http_clients(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", response="truncated")
    headers, body = emulator.signed_request(alice.access_key_id, alice.secret_access_key, CHANGE_TO_SECOND)
    url = urllib.parse.urlsplit(emulator.endpoint)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        connection.close()
    assert emulator.check_password("alice", "Second-Passw0rd!")


def test_truncated_response_is_not_a_success_for_boto3(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", user="alice", response="truncated")
    # botocore reads without enforcing Content-Length, then cannot parse the half XML.
    with pytest.raises(ResponseParserError):
        alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert emulator.check_password("alice", "Second-Passw0rd!")
    assert emulator.calls("ChangePassword", "alice") == 1


@pytest.mark.parametrize(
    ("apply", "status", "phrase"),
    [(True, 502, "Bad Gateway"), (False, 504, "Gateway Timeout")],
    ids=["applied", "not-applied"],
)
def test_bare_gateway_error(emulator: Emulator, apply: bool, status: int, phrase: str) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", user="alice", response="bare", status=status, apply=apply)
    got_status, headers, body = emulator.signed_post(alice.access_key_id, alice.secret_access_key, CHANGE_TO_SECOND)
    assert got_status == status
    lowered = {name.lower(): value for name, value in headers.items()}
    assert lowered["content-type"].startswith("text/html")
    assert "x-amzn-requestid" not in lowered
    assert phrase in body
    assert "<ErrorResponse" not in body and "<Code>" not in body and "RequestId" not in body
    # applied: the proxy lost IAM's answer to a change that happened.
    assert emulator.check_password("alice", "Second-Passw0rd!") is apply
    assert emulator.check_password("alice", INITIAL_PASSWORD) is not apply


def test_bare_gateway_error_defaults_to_502_for_boto3(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", response="bare", apply=False)
    with pytest.raises(ClientError) as raised:
        alice.client.change_password(OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    response = raised.value.response
    # No IAM error code: botocore falls back to the HTTP status and reason.
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) == ("502", 502)
    assert "RequestId" not in response["ResponseMetadata"]
    assert_password_is(alice, INITIAL_PASSWORD)


def test_response_fault_never_bypasses_authentication(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="ChangePassword", response="bare", apply=True)
    status, headers, body = emulator.signed_post(alice.access_key_id, "not-the-secret", CHANGE_TO_SECOND)
    assert status == 403
    assert_iam_error_xml(body, headers, "SignatureDoesNotMatch", "Sender")
    assert emulator.check_password("alice", INITIAL_PASSWORD)
    status, _, _ = emulator.signed_post(alice.access_key_id, alice.secret_access_key, CHANGE_TO_SECOND)
    assert status == 502
    assert emulator.check_password("alice", "Second-Passw0rd!")
    assert emulator.calls("ChangePassword", "alice") == 2


def test_response_fault_with_count_and_delay(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    emulator.add_fault(action="GetUser", response="bare", status=503, apply=True, count=2, delay_seconds=0.3)
    started = time.monotonic()
    for _ in range(2):
        assert error_of(alice.client.get_user)[:2] == ("503", 503)
    assert time.monotonic() - started >= 0.6
    assert alice.client.get_user()["User"]["UserName"] == "alice"


# --- STS GetCallerIdentity (same port) --------------------------------------------------


def test_get_caller_identity_needs_no_permission(emulator: Emulator) -> None:
    admin = emulator.admin()
    deny_sts = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "sts:*", "Resource": "*"}]}
    for name, permissions in (("no-policy", None), ("iam-only", USER_PERMISSIONS), ("deny-sts", None)):
        user = create_user(emulator, name, permissions=permissions)
        if name == "deny-sts":  # AWS: allowed even when a policy explicitly denies it
            admin.put_user_policy(UserName=name, PolicyName="deny", PolicyDocument=json.dumps(deny_sts))
        identity = emulator.sts(user.access_key_id, user.secret_access_key).get_caller_identity()
        assert identity["Arn"] == f"arn:aws:iam::{ACCOUNT_ID}:user/{name}"
        assert identity["Account"] == ACCOUNT_ID
        assert identity["UserId"] == admin.get_user(UserName=name)["User"]["UserId"]
        assert UUID_RE.match(identity["ResponseMetadata"]["RequestId"])


def test_get_caller_identity_arn_carries_the_user_path(emulator: Emulator) -> None:
    admin = emulator.admin()
    admin.create_user(UserName="pathed", Path="/team/ops/")
    key = admin.create_access_key(UserName="pathed")["AccessKey"]
    identity = emulator.sts(key["AccessKeyId"], key["SecretAccessKey"]).get_caller_identity()
    assert identity["Arn"] == f"arn:aws:iam::{ACCOUNT_ID}:user/team/ops/pathed"


def test_get_caller_identity_raw_xml_and_request_id(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    status, headers, body = emulator.signed_post(
        alice.access_key_id, alice.secret_access_key, {"Action": "GetCallerIdentity"}, service="sts"
    )
    assert status == 200
    root = ET.fromstring(body)
    assert root.tag == STS_NS + "GetCallerIdentityResponse"
    assert root.findtext(f"{STS_NS}GetCallerIdentityResult/{STS_NS}Arn") == f"arn:aws:iam::{ACCOUNT_ID}:user/alice"
    assert root.findtext(f"{STS_NS}GetCallerIdentityResult/{STS_NS}Account") == ACCOUNT_ID
    assert root.findtext(f"{STS_NS}GetCallerIdentityResult/{STS_NS}UserId")
    request_id = root.findtext(f"{STS_NS}ResponseMetadata/{STS_NS}RequestId")
    assert request_id and UUID_RE.match(request_id)
    assert headers["x-amzn-RequestId"] == request_id


@pytest.mark.parametrize(
    ("key", "code"),
    [("unknown", "InvalidClientTokenId"), ("wrong-secret", "SignatureDoesNotMatch")],
)
def test_get_caller_identity_still_checks_the_signature(emulator: Emulator, key: str, code: str) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    key_id = "AKIAIOSFODNN7EXAMPLE" if key == "unknown" else alice.access_key_id
    status, headers, body = emulator.signed_post(key_id, "not-the-secret", {"Action": "GetCallerIdentity"}, service="sts")
    assert status == 403
    assert_iam_error_xml(body, headers, code, "Sender", namespace=STS_NS)
    client = emulator.sts(key_id, "not-the-secret")
    assert error_of(client.get_caller_identity)[:2] == (code, 403)


def test_get_caller_identity_calls_are_counted_per_signer(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    bob = create_user(emulator, "bob", permissions=None)
    for _ in range(2):
        emulator.sts(alice.access_key_id, alice.secret_access_key).get_caller_identity()
    emulator.sts(bob.access_key_id, bob.secret_access_key).get_caller_identity()
    error_of(emulator.sts(alice.access_key_id, "not-the-secret").get_caller_identity)
    assert emulator.calls("GetCallerIdentity", "alice") == 3
    assert emulator.calls("GetCallerIdentity", "bob") == 1
    assert emulator.calls("GetCallerIdentity") == 4


def test_faults_target_get_caller_identity(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    bob = create_user(emulator, "bob", permissions=None)
    sts = emulator.sts(alice.access_key_id, alice.secret_access_key)
    emulator.add_fault(action="GetCallerIdentity", user="alice", error="AccessDenied", status=403)
    emulator.sts(bob.access_key_id, bob.secret_access_key).get_caller_identity()
    status, headers, body = emulator.signed_post(
        alice.access_key_id, alice.secret_access_key, {"Action": "GetCallerIdentity"}, service="sts"
    )
    assert status == 403
    assert_iam_error_xml(body, headers, "AccessDenied", "Sender", namespace=STS_NS)
    emulator.add_fault(action="GetCallerIdentity", user="alice", delay_seconds=1.0)
    started = time.monotonic()
    assert sts.get_caller_identity()["Arn"].endswith(":user/alice")
    assert time.monotonic() - started >= 1.0
    emulator.add_fault(action="GetCallerIdentity", response="truncated")
    with pytest.raises(ResponseParserError):
        sts.get_caller_identity()


def test_get_caller_identity_with_assumed_role_credentials(emulator: Emulator) -> None:
    admin = emulator.admin()
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = admin.create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    admin_sts = emulator.sts(emulator.info["admin_access_key_id"], emulator.info["admin_secret_access_key"])
    assumed = admin_sts.assume_role(RoleArn=role["Arn"], RoleSessionName="session-1")
    credentials = assumed["Credentials"]
    # The role has no policy at all.
    session = emulator.sts(credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"])
    identity = session.get_caller_identity()
    assert identity["Arn"] == f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/reader/session-1"
    assert identity["Arn"] == assumed["AssumedRoleUser"]["Arn"]
    assert identity["UserId"] == f"{role['RoleId']}:session-1"
    assert identity["Account"] == ACCOUNT_ID
    assert emulator.calls("GetCallerIdentity") == 1


# --- emulated root credentials ------------------------------------------------------------


def test_root_key_is_an_akia_key_that_sts_reports_as_the_root(emulator: Emulator) -> None:
    status, body = emulator.control("POST", "/_emulator/root-key", {})
    assert status == 200
    assert re.fullmatch(r"AKIA[A-Z0-9]{16}", body["access_key_id"])
    assert len(body["secret_access_key"]) == 40
    assert body["arn"] == f"arn:aws:iam::{ACCOUNT_ID}:root"
    assert body["account_id"] == ACCOUNT_ID
    identity = emulator.sts(body["access_key_id"], body["secret_access_key"]).get_caller_identity()
    assert identity["Arn"] == f"arn:aws:iam::{ACCOUNT_ID}:root"
    assert identity["UserId"] == ACCOUNT_ID
    assert identity["Account"] == ACCOUNT_ID
    assert UUID_RE.match(identity["ResponseMetadata"]["RequestId"])
    # Each call makes another key; all of them stay valid.
    second = emulator.root_key()
    assert second[0] != body["access_key_id"]
    assert emulator.sts(*second).get_caller_identity()["Arn"] == identity["Arn"]
    assert emulator.sts(body["access_key_id"], body["secret_access_key"]).get_caller_identity()["Arn"] == identity["Arn"]


def test_root_key_belongs_to_no_iam_user(emulator: Emulator) -> None:
    key_id, _ = emulator.root_key()
    admin = emulator.admin()
    assert [user["UserName"] for user in admin.list_users()["Users"]] == ["emulator-admin"]
    assert key_id not in {key["AccessKeyId"] for key in admin.list_access_keys()["AccessKeyMetadata"]}


def test_root_may_call_iam_actions_without_any_policy(emulator: Emulator) -> None:
    root = emulator.iam(*emulator.root_key())
    root.update_account_password_policy(MinimumPasswordLength=10)
    assert root.get_account_password_policy()["PasswordPolicy"]["MinimumPasswordLength"] == 10
    root.create_user(UserName="made-by-root")
    user = root.get_user()["User"]
    assert user["Arn"] == f"arn:aws:iam::{ACCOUNT_ID}:root"
    assert user["UserId"] == ACCOUNT_ID
    assert "UserName" not in user  # IAM names no user for the root
    assert root.get_user(UserName="made-by-root")["User"]["UserName"] == "made-by-root"


def test_root_change_password_is_invalid_user_type(emulator: Emulator) -> None:
    create_user(emulator, "alice")
    root = emulator.iam(*emulator.root_key())
    code, status, _ = error_of(root.change_password, OldPassword=INITIAL_PASSWORD, NewPassword="Second-Passw0rd!")
    assert (code, status) == ("InvalidUserType", 400)
    assert emulator.check_password("alice", INITIAL_PASSWORD)
    # The parameters are still validated first, as for everyone.
    client = emulator.iam(*emulator.root_key(), parameter_validation=False)
    assert error_of(client.change_password, OldPassword="", NewPassword="x")[0] == "ValidationError"


def test_root_key_still_needs_a_valid_signature(emulator: Emulator) -> None:
    key_id, secret = emulator.root_key()
    assert error_of(emulator.sts(key_id, "not-the-secret").get_caller_identity)[:2] == ("SignatureDoesNotMatch", 403)
    assert error_of(emulator.iam(key_id, "not-the-secret").get_user)[:2] == ("SignatureDoesNotMatch", 403)
    with_token = emulator.sts(key_id, secret, session_token="not-a-session-token")
    assert error_of(with_token.get_caller_identity)[:2] == ("InvalidClientTokenId", 403)


def test_root_calls_and_faults_use_the_root_signer_name(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    root_sts = emulator.sts(*emulator.root_key())
    emulator.add_fault(action="GetCallerIdentity", user=ROOT_SIGNER, error="AccessDenied", status=403)
    emulator.sts(alice.access_key_id, alice.secret_access_key).get_caller_identity()
    assert error_of(root_sts.get_caller_identity)[:2] == ("AccessDenied", 403)
    root_sts.get_caller_identity()
    assert emulator.calls("GetCallerIdentity", ROOT_SIGNER) == 2
    assert emulator.calls("GetCallerIdentity", "alice") == 1


# --- concurrent counting ----------------------------------------------------------------------


def test_concurrent_get_account_password_policy_calls_are_counted_per_signer(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice")
    bob = create_user(emulator, "bob")
    emulator.admin().update_account_password_policy(MinimumPasswordLength=9)

    def get_policy(user: IamUser) -> int:
        return emulator.signed_post(user.access_key_id, user.secret_access_key, {"Action": "GetAccountPasswordPolicy"})[0]

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(get_policy, [alice] * 60 + [bob] * 40))
    assert statuses == [200] * 100
    assert emulator.calls("GetAccountPasswordPolicy", "alice") == 60
    assert emulator.calls("GetAccountPasswordPolicy", "bob") == 40
    assert emulator.calls("GetAccountPasswordPolicy") == 100


# --- access keys, scoped policies and Secrets Manager (key custody) ---------------------------


def put_policy(emulator: Emulator, user: str, statements: list[dict[str, Any]]) -> None:
    document = {"Version": "2012-10-17", "Statement": statements}
    emulator.admin().put_user_policy(UserName=user, PolicyName="scoped", PolicyDocument=json.dumps(document))


def test_a_deactivated_key_no_longer_signs(emulator: Emulator) -> None:
    user = create_user(emulator, "rotated")
    sts = emulator.sts(user.access_key_id, user.secret_access_key)
    assert sts.get_caller_identity()["Arn"].endswith(":user/rotated")
    emulator.admin().update_access_key(UserName="rotated", AccessKeyId=user.access_key_id, Status="Inactive")
    code, status, _ = error_of(sts.get_caller_identity)
    assert (code, status) == ("InvalidClientTokenId", 403)
    code, _, _ = error_of(user.client.get_user)
    assert code == "InvalidClientTokenId"
    emulator.admin().update_access_key(UserName="rotated", AccessKeyId=user.access_key_id, Status="Active")
    assert sts.get_caller_identity()["Arn"].endswith(":user/rotated")


def test_a_user_has_two_keys_at_most(emulator: Emulator) -> None:
    create_user(emulator, "two-keys")
    admin = emulator.admin()
    admin.create_access_key(UserName="two-keys")
    code, status, message = error_of(admin.create_access_key, UserName="two-keys")
    assert (code, status) == ("LimitExceeded", 409), message
    assert len(admin.list_access_keys(UserName="two-keys")["AccessKeyMetadata"]) == 2


def test_a_policy_scoped_to_aws_username_lets_a_user_manage_only_its_own_keys(emulator: Emulator) -> None:
    alice = create_user(emulator, "alice", permissions=None)
    create_user(emulator, "bob", permissions=None)
    own = "arn:aws:iam::*:user/${aws:username}"
    put_policy(
        emulator,
        "alice",
        [
            {
                "Effect": "Allow",
                "Action": ["iam:ListAccessKeys", "iam:CreateAccessKey", "iam:GetAccessKeyLastUsed"],
                "Resource": own,
            }
        ],
    )
    keys = alice.client.list_access_keys(UserName="alice")["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [alice.access_key_id]
    unnamed = alice.client.list_access_keys()["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in unnamed] == [alice.access_key_id], "the signer's, when no user is named"
    assert alice.client.get_access_key_last_used(AccessKeyId=alice.access_key_id)["UserName"] == "alice"
    for call, kwargs in [
        (alice.client.list_access_keys, {"UserName": "bob"}),
        (alice.client.create_access_key, {"UserName": "bob"}),
    ]:
        code, status, _ = error_of(call, **kwargs)
        assert (code, status) == ("AccessDenied", 403), kwargs
    # Not granted at all: UpdateAccessKey even on itself.
    code, _, _ = error_of(
        alice.client.update_access_key, UserName="alice", AccessKeyId=alice.access_key_id, Status="Inactive"
    )
    assert code == "AccessDenied"


def test_secrets_manager_is_served_with_policies_on_the_secrets_arn(emulator: Emulator) -> None:
    reader = create_user(emulator, "credgate-role", password=None, permissions=None)
    put_policy(
        emulator,
        "credgate-role",
        [
            {
                "Effect": "Allow",
                "Action": ["secretsmanager:GetSecretValue", "secretsmanager:ListSecretVersionIds"],
                "Resource": "arn:aws:secretsmanager:*:*:secret:credgate/*",
            },
            {"Effect": "Allow", "Action": "secretsmanager:ListSecrets", "Resource": "*"},
        ],
    )
    admin = emulator.admin_secrets()
    admin.create_secret(Name="credgate/portal-svc", SecretString=json.dumps({"access_key_id": "AKIA1"}))
    admin.create_secret(Name="other/portal-svc", SecretString="{}")
    secrets = emulator.secretsmanager(reader.access_key_id, reader.secret_access_key)
    value = secrets.get_secret_value(SecretId="credgate/portal-svc")
    assert json.loads(value["SecretString"]) == {"access_key_id": "AKIA1"}
    assert value["VersionStages"] == ["AWSCURRENT"]
    code, status, _ = error_of(secrets.get_secret_value, SecretId="other/portal-svc")
    assert (code, status) == ("AccessDeniedException", 403)
    code, _, _ = error_of(secrets.get_secret_value, SecretId="credgate/nobody")
    assert code == "ResourceNotFoundException"
    listed = secrets.list_secrets(Filters=[{"Key": "name", "Values": ["credgate/"]}])["SecretList"]
    assert [s["Name"] for s in listed] == ["credgate/portal-svc"]
    # Not granted: writing.
    code, _, _ = error_of(secrets.put_secret_value, SecretId="credgate/portal-svc", SecretString="{}")
    assert code == "AccessDeniedException"
    # A bad key is the JSON protocol's error, not IAM's.
    stranger = emulator.secretsmanager(reader.access_key_id, "wrong-secret")
    code, _, _ = error_of(stranger.get_secret_value, SecretId="credgate/portal-svc")
    assert code == "InvalidSignatureException"


def test_secret_stages_move_as_a_rotation_needs(emulator: Emulator) -> None:
    secrets = emulator.admin_secrets()
    first = secrets.create_secret(Name="credgate/u", SecretString='{"k": 1}')["VersionId"]
    token = "7d5c2b1a-0e4f-4a3b-9c8d-7e6f5a4b3c2d"
    put = secrets.put_secret_value(
        SecretId="credgate/u", SecretString='{"k": 2}', ClientRequestToken=token, VersionStages=["AWSPENDING"]
    )
    assert (put["VersionId"], put["VersionStages"]) == (token, ["AWSPENDING"])
    # The same token and value again (a resend): the same version, nothing new.
    again = secrets.put_secret_value(
        SecretId="credgate/u", SecretString='{"k": 2}', ClientRequestToken=token, VersionStages=["AWSPENDING"]
    )
    assert again["VersionId"] == token
    assert json.loads(secrets.get_secret_value(SecretId="credgate/u")["SecretString"]) == {"k": 1}
    assert secrets.get_secret_value(SecretId="credgate/u", VersionStage="AWSPENDING")["VersionId"] == token
    secrets.update_secret_version_stage(
        SecretId="credgate/u", VersionStage="AWSCURRENT", MoveToVersionId=token, RemoveFromVersionId=first
    )
    secrets.update_secret_version_stage(SecretId="credgate/u", VersionStage="AWSPENDING", RemoveFromVersionId=token)
    stages = {
        v["VersionId"]: sorted(v["VersionStages"])
        for v in secrets.list_secret_version_ids(SecretId="credgate/u")["Versions"]
    }
    assert stages == {first: ["AWSPREVIOUS"], token: ["AWSCURRENT"]}
    assert json.loads(secrets.get_secret_value(SecretId="credgate/u")["SecretString"]) == {"k": 2}


def test_secrets_manager_calls_are_counted_and_faulted(emulator: Emulator) -> None:
    secrets = emulator.admin_secrets()
    secrets.create_secret(Name="credgate/f", SecretString="{}")
    emulator.add_fault(action="GetSecretValue", error="InternalServiceError", status=500)
    code, status, message = error_of(secrets.get_secret_value, SecretId="credgate/f")
    assert (code, status) == ("InternalServiceError", 500), message
    secrets.get_secret_value(SecretId="credgate/f")
    assert emulator.calls("GetSecretValue", "emulator-admin") == 2
    assert emulator.calls("CreateSecret") == 1
