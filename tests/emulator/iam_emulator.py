#!/usr/bin/env python3
"""IAM emulator for credgate's tests: moto's server (IAM, STS and Secrets Manager on
one port) with signing and IAM policy checks on, plus what moto lacks
(ChangePassword, root credentials, inactive keys refused, policies scoped to
users and secrets with ${aws:username}) and a test-only fault switch.

Usage: python tests/emulator/iam_emulator.py [--host 127.0.0.1] [--port 0]
                                              [--region us-east-1] [--ignore-stdin] [--verbose]

When it accepts connections it prints exactly one JSON line on stdout (endpoint,
region, account id and the bootstrap admin's keys). It exits on SIGTERM/SIGINT
and when its stdin reaches EOF, so a test process that dies cannot leak it.
See README.md beside this file for the HTTP fault-switch API.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, NoReturn
from xml.sax.saxutils import escape

# moto reads this once, when moto.settings is imported: 0 means "authenticate and
# authorize every request", including the very first one (the default, infinity,
# switches IAM checks off entirely).
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"

from botocore.credentials import Credentials  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.core.exceptions import _RESTError  # noqa: E402
from moto.core.responses import ActionResult, BaseResponse  # noqa: E402
from moto.iam import access_control  # noqa: E402
from moto.iam import urls as iam_urls  # noqa: E402
from moto.iam.exceptions import NoSuchEntity  # noqa: E402
from moto.iam.models import AccessKey, IAMBackend, User, iam_backends  # noqa: E402
from moto.iam.responses import IamResponse  # noqa: E402
from moto.secretsmanager import urls as secretsmanager_urls  # noqa: E402
from moto.secretsmanager.models import SecretsManagerBackend, secretsmanager_backends  # noqa: E402
from moto.secretsmanager.responses import SecretsManagerResponse  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.sts import urls as sts_urls  # noqa: E402
from moto.sts.responses import TokenResponse  # noqa: E402
from moto.utilities.utils import get_partition  # noqa: E402
from werkzeug.exceptions import HTTPException  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

log = logging.getLogger("iam_emulator")

IAM_XMLNS = "https://iam.amazonaws.com/doc/2010-05-08/"
STS_XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"
ADMIN_USER = "emulator-admin"
# How calls and faults name the account root as a signer. IAM user names are
# [\w+=,.@-]+, so no user can be called this; it is the credential report's
# name for the root.
ROOT_SIGNER = "<root_account>"
# moto resolves the account from MOTO_ACCOUNT_ID first, then from the access key.
ACCOUNT_ID = os.environ.get("MOTO_ACCOUNT_ID", DEFAULT_ACCOUNT_ID)

# IAM's passwordType: 1..128 characters of [\t\n\r\x20-\xFF].
PASSWORD_PATTERN = re.compile(r"[\t\n\r\x20-\xff]+")
PASSWORD_MAX_LENGTH = 128
# The characters IAM counts as symbols for RequireSymbols (IAM API reference).
PASSWORD_SYMBOLS = frozenset("!@#$%^&*()_+-=[]{}|'")

# Default HTTP status of injected faults, as IAM answers them.
FAULT_DEFAULT_STATUS = {
    "Throttling": 400,
    "LimitExceeded": 409,
    "EntityTemporarilyUnmodifiable": 409,
    "ServiceFailure": 500,
}
# Response-shape faults: what a network path (not IAM) does to an answer.
RESPONSE_TRUNCATED = "truncated"
RESPONSE_BARE = "bare"
BARE_DEFAULT_STATUS = 502
# The moto handler marks a request whose answer a response-shape fault replaces
# here, in the WSGI environ that build_app's wrapper shares with it.
RESPONSE_FAULT_ENVIRON_KEY = "iam_emulator.response_fault"
# The request body exactly as received, kept here by build_app's wrapper: the
# signature is checked over these bytes (see EmulatorResponse).
RAW_BODY_ENVIRON_KEY = "iam_emulator.raw_body"
# IAM's documented meaning of InvalidUserType. The AWS CLI reference says that
# ChangePassword called with root credentials returns InvalidUserType, but not
# with which message, so the documented description stands in for it.
ROOT_CHANGE_PASSWORD_MESSAGE = (
    "The request was rejected because the type of user for the transaction was incorrect."
)


class JsonError(HTTPException):
    """An error of an AWS JSON-protocol service (Secrets Manager): {"__type", "message"}."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__()
        self.code = status
        self.error_code = code
        self.message = message
        self.description = json.dumps({"__type": code, "message": message})

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [("Content-Type", "application/x-amz-json-1.1")]


# How the JSON-protocol services name the authentication errors moto raises
# with IAM's names.
JSON_AUTH_ERRORS = {
    "InvalidClientTokenId": "UnrecognizedClientException",
    "SignatureDoesNotMatch": "InvalidSignatureException",
    "AccessDenied": "AccessDeniedException",
}


class IamError(HTTPException):
    """An IAM error in IAM's own XML shape.

    moto's generic auth errors are wrapped as <ErrorResponse><Errors><Error>,
    which the AWS SDKs' awsQuery error parser does not look into (it wants
    <ErrorResponse><Error>), so every error this emulator emits or passes on
    uses this class. The <RequestId> placeholder is filled in by
    EmulatorResponse._enrich_response, which also sets the header. (STS errors
    use the same shape, in STS's namespace.)
    """

    def __init__(self, code: str, message: str, status: int = 400, xmlns: str = IAM_XMLNS):
        super().__init__()
        self.code = status
        self.error_code = code
        self.message = message
        fault_type = "Receiver" if status >= 500 else "Sender"
        self.description = (
            f'<ErrorResponse xmlns="{xmlns}"><Error><Type>{fault_type}</Type>'
            f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
            "<RequestId>-</RequestId></ErrorResponse>"
        )

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [("Content-Type", "text/xml")]


@dataclass
class Fault:
    action: str
    user: str | None
    error: str | None
    status: int
    message: str
    remaining: int  # -1 = forever
    delay_seconds: float
    response: str | None  # None, RESPONSE_TRUNCATED or RESPONSE_BARE
    apply: bool  # whether the action runs before a response-shape fault answers


class FaultSwitch:
    """Injected faults and per-(action, user) arrival counts, shared by all request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._calls: dict[tuple[str, str | None], int] = {}

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def record_call(self, action: str, user: str | None) -> None:
        with self._lock:
            self._calls[(action, user)] = self._calls.get((action, user), 0) + 1

    def call_count(self, action: str | None, user: str | None) -> int:
        with self._lock:
            return sum(
                n
                for (a, u), n in self._calls.items()
                if (action is None or a == action) and (user is None or u == user)
            )

    def take(self, action: str, user: str | None) -> Fault | None:
        """The first fault that matches this request, using up one of its count."""
        with self._lock:
            for fault in self._faults:
                if fault.action == action and fault.user in (None, user):
                    if fault.remaining > 0:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self._faults.remove(fault)
                    return fault
        return None


FAULTS = FaultSwitch()
# When the emulated root "was created" (its GetUser CreateDate): emulator start.
ROOT_CREATED = time.time()

# Passwords each user has had, oldest first, for PasswordReusePrevention. Keyed by
# moto's User object so that a deleted and re-created user (or a moto reset) starts
# with no history.
PASSWORD_HISTORY: weakref.WeakKeyDictionary[User, list[str]] = weakref.WeakKeyDictionary()
# ChangePassword reads the policy, the history and the current password, then
# writes them: one at a time, as the server is threaded.
CHANGE_PASSWORD_LOCK = threading.Lock()


# Emulated root access keys: id -> secret. moto has no account root principal
# (with authentication on, only IAM users' keys and assumed-role sessions sign),
# so POST /_emulator/root-key makes these, and create_access_key below teaches
# moto's authentication about them. Only ever added to; a dict write is atomic.
ROOT_KEYS: dict[str, str] = {}
# The root is not subject to identity-based policies: it may call every action.
ROOT_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def root_arn(account_id: str, partition: str = "aws") -> str:
    return f"arn:{partition}:iam::{account_id}:root"


class RootAccessKey:
    """An emulated root key, in the shape moto's authentication expects of a key
    (IAMUserAccessKey's duck type): signature checked with its secret, every action allowed."""

    def __init__(self, account_id: str, partition: str, access_key_id: str, secret_access_key: str):
        self.account_id = account_id
        self.partition = partition
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key

    @property
    def arn(self) -> str:
        return root_arn(self.account_id, self.partition)

    def create_credentials(self) -> Credentials:
        return Credentials(self._access_key_id, self._secret_access_key)

    def collect_policies(self) -> list[str]:
        return [ROOT_POLICY]


_moto_create_access_key = access_control.create_access_key


def create_access_key(account_id: str, partition: str, access_key_id: str, headers: Any) -> Any:
    """moto's key lookup for authentication, which also knows the emulated root keys,
    refuses inactive keys, and resolves ${aws:username} in the signer's policies."""
    secret = ROOT_KEYS.get(access_key_id)
    if secret is None:
        key = _moto_create_access_key(account_id, partition, access_key_id, headers)
        if isinstance(key, access_control.IAMUserAccessKey):
            # IAM refuses a deactivated key as it refuses an unknown one
            # (InvalidClientTokenId); moto would go on signing with it.
            stored = iam_backends[account_id][partition].access_keys.get(access_key_id)
            if stored is not None and stored.status != "Active":
                raise access_control.CreateAccessKeyFailure(reason="InvalidId")
            resolve_username(key)
        return key
    # A long-term key sent with a session token is refused, as moto does for
    # IAM users' keys (InvalidClientTokenId).
    if "X-Amz-Security-Token" in headers:
        raise access_control.CreateAccessKeyFailure(reason="InvalidToken")
    return RootAccessKey(account_id, partition, access_key_id, secret)


def resolve_username(key: Any) -> None:
    """Makes the user key's policies read ${aws:username} as the signing user's
    name, as IAM evaluates that policy variable (moto would match it literally)."""
    collect = key.collect_policies
    user = key._owner_user_name

    def collect_resolved() -> list[str]:
        documents = []
        for policy in collect():
            document = access_control.IAMPolicy(policy)._policy_json
            documents.append(json.dumps(document).replace("${aws:username}", user))
        return documents

    key.collect_policies = collect_resolved


# IAMRequestBase looks the function up in its module on every request.
access_control.create_access_key = create_access_key


_moto_update_secret_version_stage = SecretsManagerBackend.update_secret_version_stage


def update_secret_version_stage(
    self: SecretsManagerBackend,
    secret_id: str,
    version_stage: str,
    remove_from_version_id: str,
    move_to_version_id: str,
) -> tuple[str, str]:
    """moto's stage move, after which GetSecretValue without a stage also reads the
    version AWSCURRENT moved to (moto would go on answering the version it left)."""
    result = _moto_update_secret_version_stage(
        self, secret_id, version_stage, remove_from_version_id, move_to_version_id
    )
    if version_stage == "AWSCURRENT" and move_to_version_id:
        self.secrets[secret_id].set_default_version_id(move_to_version_id)
    return result


SecretsManagerBackend.update_secret_version_stage = update_secret_version_stage  # type: ignore[method-assign]


def new_root_key() -> tuple[str, str]:
    """A fresh AKIA key pair for the emulated account root."""
    # moto's AccessKey makes ids shaped like IAM's (AKIA, account encoded); it
    # is used only as a generator and is never stored in moto's backend.
    key = AccessKey(None, prefix="AKIA", account_id=ACCOUNT_ID)
    ROOT_KEYS[key.access_key_id] = key.secret_access_key
    return key.access_key_id, key.secret_access_key


class EmulatorResponse(BaseResponse):
    """What the emulator adds to each moto handler it serves (IAM and STS): call
    counting, the fault switch, errors in the service's own XML and UUID request ids.

    Listed before moto's handler class in the bases, so super() reaches moto's.
    """

    # The namespace of the service's errors.
    XMLNS: ClassVar[str] = IAM_XMLNS

    @property
    def _iam_backend(self) -> IAMBackend:
        return iam_backends[self.current_account][self.partition]

    def _signer_access_key_id(self) -> str | None:
        # Authorization: AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...
        match = re.search(r"Credential=([^/,\s]+)/", self.headers.get("Authorization", ""))
        return match.group(1) if match else None

    def _signer_user(self) -> User | None:
        """The IAM user owning the signing access key; None for unknown, root or STS keys."""
        key_id = self._signer_access_key_id()
        return self._iam_backend.get_user_from_access_key_id(key_id) if key_id else None

    def _signer_is_root(self) -> bool:
        return self._signer_access_key_id() in ROOT_KEYS

    def _signer_name(self) -> str | None:
        """Who signed, as calls and faults name it: a user name, ROOT_SIGNER or None."""
        if self._signer_is_root():
            return ROOT_SIGNER
        signer = self._signer_user()
        return signer.name if signer else None

    def _authenticate_and_authorize_normal_action(self, resource: str = "*") -> None:
        # moto calls this first for every request, before dispatching to the
        # action, and turns any HTTPException raised here into the response.
        # So: count the arrival, let moto check signature and policies, then
        # apply a fault, if one matches, before the action can change anything.
        action = self._get_action()
        signer = self._signer_name()
        FAULTS.record_call(action, signer)
        # moto signs what it re-encodes from the parsed form (werkzeug keeps
        # no raw body for a form request), with `+` for a space, while
        # aws-sdk-rust signed `%20`: any password with a space would fail with
        # SignatureDoesNotMatch. AWS checks the bytes it received; so does
        # moto's check (an AWSRequest built from them, botocore's SigV4Auth)
        # once it is given them.
        self.raw_body = self.normalized_request.environ.get(RAW_BODY_ENVIRON_KEY) or self.raw_body
        try:
            super()._authenticate_and_authorize_normal_action(resource)
        except _RESTError as error:
            self._reject(self._error(error.error_type, error.message, error.code))
        fault = FAULTS.take(action, signer)
        if fault is None:
            return
        log.info(
            "fault for %s by %s: %s after %ss",
            action,
            signer,
            fault.response or fault.error,
            fault.delay_seconds,
        )
        time.sleep(fault.delay_seconds)
        if fault.response is not None:
            # build_app's wrapper replaces whatever moto answers; it finds the
            # fault in the environ, which this request shares with it.
            self.normalized_request.environ[RESPONSE_FAULT_ENVIRON_KEY] = fault
            if not fault.apply:
                # Stop here so the action never runs; this answer is replaced.
                self._reject(self._error("ServiceUnavailable", "replaced", fault.status))
            return
        if fault.error is not None:
            self._reject(self._error(fault.error, fault.message, fault.status))

    def _error(self, code: str, message: str, status: int) -> HTTPException:
        """An error in this service's own shape (IAM's and STS's XML)."""
        return IamError(code, message, status, self.XMLNS)

    def _reject(self, error: HTTPException) -> NoReturn:
        # moto answers an exception raised during authentication with its
        # description alone, without its headers: add the content type here.
        self.response_headers["Content-Type"] = dict(error.get_headers())["Content-Type"]
        raise error

    @staticmethod
    def _enrich_response(headers: dict[str, str], body: Any) -> tuple[dict[str, str], Any]:
        # moto's version invents 52-character ids; IAM's and STS's are UUIDs, in
        # the body and in x-amzn-RequestId (where the SDKs' request_id() looks).
        # moto also leaves its internal "status" entry in the headers, which
        # AWS never sends.
        headers.pop("status", None)
        request_id = str(uuid.uuid4())
        headers["x-amzn-RequestId"] = request_id
        if isinstance(body, str):
            body = re.sub(r"(?<=<RequestId>).*?(?=</RequestId>)", request_id, body)
        return headers, body


class EmulatorStsResponse(EmulatorResponse, TokenResponse):
    """moto's STS handler (same port: moto routes by the signing service name) plus
    the emulator's additions and the emulated root's GetCallerIdentity."""

    XMLNS = STS_XMLNS

    def get_caller_identity(self) -> ActionResult:
        # moto already allows GetCallerIdentity with no permission (as AWS does)
        # and answers for IAM users and assumed roles; the root is the emulator's.
        if self._signer_is_root():
            account = self.current_account
            return ActionResult(
                {"UserId": account, "Account": account, "Arn": root_arn(account, self.partition)}
            )
        return super().get_caller_identity()


# IAM actions on a user, whose resource is that user's ARN (moto evaluates
# every IAM action against "*", so a policy scoped to users would never match).
USER_ACTIONS = frozenset(
    {
        "ChangePassword",
        "GetUser",
        "ListAccessKeys",
        "CreateAccessKey",
        "UpdateAccessKey",
        "DeleteAccessKey",
        "GetAccessKeyLastUsed",
    }
)


class EmulatorIamResponse(EmulatorResponse, IamResponse):
    """moto's IAM handler plus ChangePassword, the emulator's additions and the emulated root."""

    def _determine_resource(self) -> str:
        # IAM authorizes these actions against the user they act on: the one
        # named, the owner of the key named, else the signer.
        if self._get_action() not in USER_ACTIONS:
            return super()._determine_resource()
        name = self._get_param("UserName")
        backend = self._iam_backend
        key_id = self._get_param("AccessKeyId")
        if not name and self._get_action() == "GetAccessKeyLastUsed" and key_id:
            owner = backend.get_user_from_access_key_id(key_id)
            name = owner.name if owner else None
        if not name:
            signer = self._signer_user()
            name = signer.name if signer else None
        if not name:
            return "*"
        try:
            return backend.get_user(name).arn
        except NoSuchEntity:
            return f"arn:{self.partition}:iam::{self.current_account}:user/{name}"

    def get_user(self) -> Any:
        # GetUser without UserName describes the caller. For the root, IAM
        # answers its ARN and the account id as UserId, with no UserName or Path
        # (moto would invent a "default_user").
        if self._get_param("UserName") or not self._signer_is_root():
            return super().get_user()
        account = self.current_account
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ROOT_CREATED))
        body = (
            f'<GetUserResponse xmlns="{IAM_XMLNS}"><GetUserResult><User>'
            f"<UserId>{account}</UserId><Arn>{root_arn(account, self.partition)}</Arn>"
            f"<CreateDate>{created}</CreateDate></User></GetUserResult>"
            "<ResponseMetadata><RequestId>-</RequestId></ResponseMetadata></GetUserResponse>"
        )
        return body, {"status": 200, "Content-Type": "text/xml"}

    def change_password(self) -> tuple[str, dict[str, Any]]:
        """IAM ChangePassword: the signing IAM user changes their own console password."""
        old_password = self._get_param("OldPassword") or ""
        new_password = self._get_param("NewPassword") or ""
        validate_password_parameters(old_password, new_password)

        # The root's password is not IAM's to change: the AWS CLI reference
        # says ChangePassword with root credentials returns InvalidUserType.
        if self._signer_is_root():
            raise IamError("InvalidUserType", ROOT_CHANGE_PASSWORD_MESSAGE)
        # Assumed-role (STS) keys pass moto's authentication but belong to no IAM
        # user. (An IAM user's key sent with a session token never gets here:
        # moto answers InvalidClientTokenId, as IAM does.)
        user = self._signer_user()
        if user is None:
            raise IamError(
                "InvalidUserType",
                "Only IAM users can change their own password; "
                "the request was not signed by an IAM user's access key.",
            )
        with CHANGE_PASSWORD_LOCK:
            if not user.password:
                raise IamError(
                    "NoSuchEntity", f"Login Profile for User {user.name} cannot be found.", 404
                )
            if old_password != user.password:
                raise IamError("InvalidUserType", "The old password is incorrect.")

            history = PASSWORD_HISTORY.setdefault(user, [])
            # The password may have been set by CreateLoginProfile or
            # UpdateLoginProfile since the last ChangePassword.
            if not history or history[-1] != user.password:
                history.append(user.password)
            violations = password_policy_violations(
                self.backend.account_password_policy, new_password, history
            )
            if violations:
                raise IamError(
                    "PasswordPolicyViolation",
                    "Password does not conform to the account password policy: "
                    + "; ".join(violations)
                    + ".",
                )
            # A changed password also satisfies "must reset at next sign-in".
            self.backend.update_login_profile(user.name, new_password, False)
            history.append(new_password)

        body = (
            f'<ChangePasswordResponse xmlns="{IAM_XMLNS}"><ResponseMetadata>'
            "<RequestId>-</RequestId></ResponseMetadata></ChangePasswordResponse>"
        )
        return body, {"status": 200, "Content-Type": "text/xml"}


class EmulatorSecretsManagerResponse(EmulatorResponse, SecretsManagerResponse):
    """moto's Secrets Manager handler plus the emulator's call counting and faults,
    errors in Secrets Manager's JSON, and policies evaluated against the secret's ARN."""

    def _error(self, code: str, message: str, status: int) -> HTTPException:
        return JsonError(JSON_AUTH_ERRORS.get(code, code), message, status)

    def _determine_resource(self) -> str:
        secret_id = self._get_param("SecretId")
        if not secret_id:
            return "*"  # ListSecrets and the like act on no one secret.
        if secret_id.startswith("arn:"):
            return secret_id
        backend = secretsmanager_backends[self.current_account][self.region]
        secret = backend.secrets.get(secret_id)
        if secret is not None:
            return secret.arn
        # A secret that does not exist yet: its name under the account's ARN
        # prefix, which name-prefix policies (secret:credgate/*) match.
        return f"arn:{self.partition}:secretsmanager:{self.region}:{self.current_account}:secret:{secret_id}"


def validate_password_parameters(old_password: str, new_password: str) -> None:
    """IAM's model constraints on passwordType, reported as IAM does (without the values)."""
    problems = []
    for field, value in (("oldPassword", old_password), ("newPassword", new_password)):
        if len(value) > PASSWORD_MAX_LENGTH:
            problems.append(
                f"Value at '{field}' failed to satisfy constraint: "
                f"Member must have length less than or equal to {PASSWORD_MAX_LENGTH}"
            )
        if not value:
            problems.append(
                f"Value at '{field}' failed to satisfy constraint: "
                "Member must have length greater than or equal to 1"
            )
        elif not PASSWORD_PATTERN.fullmatch(value):
            problems.append(
                f"Value at '{field}' failed to satisfy constraint: Member must satisfy "
                r"regular expression pattern: [\u0009\u000A\u000D\u0020-\u00FF]+"
            )
    if problems:
        count = f"{len(problems)} validation error{'s' if len(problems) > 1 else ''}"
        raise IamError("ValidationError", f"{count} detected: " + "; ".join(problems))


def password_policy_violations(policy: Any, password: str, history: list[str]) -> list[str]:
    """The rules of moto's account password policy (None = no policy) that the password breaks."""
    if policy is None:
        return []
    violations = []
    if len(password) < policy.minimum_password_length:
        violations.append(
            f"Password should have a minimum length of {policy.minimum_password_length}"
        )
    if policy.require_symbols and not any(c in PASSWORD_SYMBOLS for c in password):
        violations.append("Password should have at least one symbol")
    if policy.require_numbers and not any("0" <= c <= "9" for c in password):
        violations.append("Password should have at least one number")
    if policy.require_uppercase_characters and not any("A" <= c <= "Z" for c in password):
        violations.append("Password should have at least one uppercase letter")
    if policy.require_lowercase_characters and not any("a" <= c <= "z" for c in password):
        violations.append("Password should have at least one lowercase letter")
    reuse = policy.password_reuse_prevention or 0
    if reuse and password in history[-reuse:]:
        violations.append(f"Password was used within the last {reuse} passwords")
    return violations


def parse_fault(body: Any) -> Fault:
    """A Fault from the JSON body of POST /_emulator/faults; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    action = body.get("action")
    user = body.get("user")
    error = body.get("error")
    status = body.get("status")
    message = body.get("message")
    count = body.get("count", 1)
    delay = body.get("delay_seconds", 0)
    response = body.get("response")
    apply = body.get("apply")
    if not isinstance(action, str) or not action:
        raise ValueError("action must be a non-empty string")
    if user is not None and not isinstance(user, str):
        raise ValueError("user must be a string or null")
    if error is not None and (not isinstance(error, str) or not error):
        raise ValueError("error must be a non-empty string or null")
    if status is not None and (type(status) is not int or not 100 <= status <= 599):
        raise ValueError("status must be an HTTP status code")
    if message is not None and not isinstance(message, str):
        raise ValueError("message must be a string")
    if type(count) is not int or count == 0 or count < -1:
        raise ValueError("count must be a positive integer or -1 (forever)")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError("delay_seconds must be a non-negative number")
    if response is not None and response not in (RESPONSE_TRUNCATED, RESPONSE_BARE):
        raise ValueError(f'response must be "{RESPONSE_TRUNCATED}", "{RESPONSE_BARE}" or null')
    if apply is not None and not isinstance(apply, bool):
        raise ValueError("apply must be true or false")
    if response is None:
        if apply is not None:
            raise ValueError(f'apply is only for response "{RESPONSE_BARE}" (or "{RESPONSE_TRUNCATED}")')
        if error is None and not delay:
            raise ValueError("a fault needs an error, a delay_seconds, a response, or a mix")
    else:
        # A response-shape fault answers without IAM's error, so an IAM error
        # code or message has nowhere to go: refuse rather than ignore them.
        if error is not None or message is not None:
            raise ValueError(f'response "{response}" takes no error or message')
        if response == RESPONSE_TRUNCATED:
            # The truncated answer is the action's own (its status included).
            if status is not None:
                raise ValueError(f'response "{RESPONSE_TRUNCATED}" takes no status')
            if apply is False:
                raise ValueError(f'response "{RESPONSE_TRUNCATED}" always applies the action')
            apply = True
        else:
            if status is not None and not 500 <= status <= 599:
                raise ValueError(f'response "{RESPONSE_BARE}" needs a 5xx status')
            if apply is None:
                raise ValueError(
                    f'response "{RESPONSE_BARE}" needs apply: true (the action runs, its answer '
                    "is lost) or false (the action does not run)"
                )
    default_status = BARE_DEFAULT_STATUS if response == RESPONSE_BARE else 400
    return Fault(
        action=action,
        user=user,
        error=error,
        status=status or FAULT_DEFAULT_STATUS.get(error or "", default_status),
        message=message or f"{error} (injected by the IAM emulator's fault switch)",
        remaining=count,
        delay_seconds=float(delay),
        response=response,
        apply=bool(apply),
    )


def fault_switch_app(request: Request) -> Response:
    """The unsigned, test-only /_emulator/* endpoints."""

    def answer(payload: dict[str, Any], status: int = 200) -> Response:
        return Response(json.dumps(payload), status=status, mimetype="application/json")

    if request.path == "/_emulator/faults" and request.method == "POST":
        try:
            fault = parse_fault(json.loads(request.get_data(as_text=True) or "null"))
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            return answer({"ok": False, "error": str(error)}, 400)
        FAULTS.add(fault)
        return answer({"ok": True})
    if request.path == "/_emulator/faults" and request.method == "DELETE":
        FAULTS.clear()
        return answer({"ok": True})
    if request.path == "/_emulator/calls" and request.method == "GET":
        count = FAULTS.call_count(request.args.get("action"), request.args.get("user"))
        return answer({"count": count})
    if request.path == "/_emulator/check-password" and request.method == "POST":
        # A stand-in for a console sign-in: tests learn whether a password is
        # the user's current one without changing anything (a ChangePassword
        # round trip would trip reuse prevention and needs a working key).
        body = json.loads(request.get_data(as_text=True) or "{}")
        # IAM is global: every standard region shares the "aws" partition.
        backend = iam_backends[ACCOUNT_ID]["aws"]
        try:
            user = backend.get_user(body.get("user", ""))
        except NoSuchEntity:
            return answer({"ok": False, "error": "no such user"}, 404)
        return answer({"matches": bool(user.password) and user.password == body.get("password")})
    if request.path == "/_emulator/root-key" and request.method == "POST":
        access_key_id, secret_access_key = new_root_key()
        return answer(
            {
                "access_key_id": access_key_id,
                "secret_access_key": secret_access_key,
                "arn": root_arn(ACCOUNT_ID),
                "account_id": ACCOUNT_ID,
            }
        )
    return answer({"ok": False, "error": f"no such endpoint: {request.method} {request.path}"}, 404)


def faulted_response(
    fault: Fault, status: str, headers: list[tuple[str, str]], body: bytes, start_response: Any
) -> Iterable[bytes]:
    """Answer a request with a response-shape fault instead of moto's (status, headers, body)."""
    if fault.response == RESPONSE_TRUNCATED:
        # IAM's status line and headers, a Content-Length for the whole body,
        # then only its first half. werkzeug's server closes every connection
        # after one response, so the client reads a body that ends too early.
        kept = [(name, value) for name, value in headers if name.lower() != "content-length"]
        start_response(status, kept + [("Content-Length", str(len(body)))])
        return [body[: len(body) // 2]]
    # A proxy's or gateway's own error page: no IAM XML, no request id.
    try:
        phrase = HTTPStatus(fault.status).phrase
    except ValueError:
        phrase = "Error"
    page = (
        f"<html>\r\n<head><title>{fault.status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{fault.status} {phrase}</h1></center>\r\n</body>\r\n</html>\r\n"
    ).encode()
    start_response(
        f"{fault.status} {phrase}",
        [("Content-Type", "text/html"), ("Content-Length", str(len(page)))],
    )
    return [page]


def build_app() -> Any:
    """moto's server WSGI app, with IAM, STS and Secrets Manager routed to the emulator's handlers,
    response-shape faults applied to their answers, and /_emulator/* in front."""
    # moto builds its IAM and STS Flask apps lazily, from the urls modules'
    # url_paths, on the first request: point the routes at our subclasses first.
    iam_urls.url_paths = {path: EmulatorIamResponse.dispatch for path in iam_urls.url_paths}
    sts_urls.url_paths = {path: EmulatorStsResponse.dispatch for path in sts_urls.url_paths}
    secretsmanager_urls.url_paths = {
        path: EmulatorSecretsManagerResponse.dispatch for path in secretsmanager_urls.url_paths
    }
    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/_emulator/"):
            return fault_switch_app(Request(environ))(environ, start_response)
        keep_raw_body(environ)

        # The handler marks the environ before Flask starts the response, so
        # by then it is known whether moto's answer goes out or is replaced.
        held: dict[str, Any] = {}
        held_body: list[bytes] = []

        def start_or_hold(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if RESPONSE_FAULT_ENVIRON_KEY not in environ:
                return start_response(status, headers, exc_info)
            held["status"], held["headers"] = status, headers
            return held_body.append

        chunks = moto_app(environ, start_or_hold)
        fault: Fault | None = environ.get(RESPONSE_FAULT_ENVIRON_KEY)
        if fault is None:
            return chunks
        try:
            held_body.extend(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return faulted_response(fault, held["status"], held["headers"], b"".join(held_body), start_response)

    return app


def keep_raw_body(environ: dict[str, Any]) -> None:
    """Reads the request body as received into the environ, and gives werkzeug
    the same bytes to parse."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    stream = environ["wsgi.input"]
    if length > 0:
        raw = stream.read(length)
    elif environ.get("wsgi.input_terminated"):
        raw = stream.read()
    else:
        raw = b""
    environ[RAW_BODY_ENVIRON_KEY] = raw
    environ["wsgi.input"] = io.BytesIO(raw)


def bootstrap_admin(region: str) -> tuple[str, str]:
    """Create the all-powerful admin in moto's backend directly (HTTP would need keys already)."""
    backend = iam_backends[ACCOUNT_ID][get_partition(region)]
    backend.create_user(region, ADMIN_USER)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    backend.put_user_policy(ADMIN_USER, "emulator-admin-all", json.dumps(policy))
    key = backend.create_access_key(ADMIN_USER)
    return key.access_key_id, key.secret_access_key


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--region", default="us-east-1", help="region clients should sign for")
    parser.add_argument(
        "--ignore-stdin",
        action="store_true",
        help="do not exit at stdin EOF (for a background process whose stdin is /dev/null)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()

    # stdout carries the one JSON line and nothing else: moto print()s
    # diagnostics, so everything else is sent to stderr.
    json_out = sys.stdout
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="iam-emulator: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)

    access_key_id, secret_access_key = bootstrap_admin(args.region)
    server = make_server(
        args.host, args.port, build_app(), threaded=True, request_handler=MotoRequestHandler
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if not args.ignore_stdin:

        def stop_at_stdin_eof() -> None:
            # os.read on the raw descriptor: a thread blocked inside sys.stdin's
            # buffered reader would hold its lock and abort interpreter shutdown.
            while os.read(0, 4096):
                pass
            stop.set()

        threading.Thread(target=stop_at_stdin_eof, daemon=True).start()
    # A short poll interval keeps shutdown() (which waits for one poll) quick.
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    # The socket is listening since make_server: connections made from now on are served.
    host = f"[{args.host}]" if ":" in args.host else args.host
    ready = {
        "endpoint": f"http://{host}:{server.server_port}",
        "region": args.region,
        "account_id": ACCOUNT_ID,
        "admin_access_key_id": access_key_id,
        "admin_secret_access_key": secret_access_key,
    }
    json_out.write(json.dumps(ready) + "\n")
    json_out.flush()
    log.info("serving IAM on %s", ready["endpoint"])

    stop.wait()
    log.info("shutting down")
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
