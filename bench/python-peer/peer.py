#!/usr/bin/env python3
"""BENCHMARK PEER — NOT PART OF CREDGATE. Do not deploy it.

The quick alternative a team might write instead of credgate: credgate.v1's
PasswordService in Python (grpcio + boto3) behind the same mTLS, used by
credgate's benchmark as a point of comparison. It maps the client
certificate's SPIFFE URI SAN to an AWS profile and calls IAM with boto3. It
deliberately lacks what credgate adds: no request_id deduplication (the field
is ignored), no policy cache, no failed-attempt limit, no per-caller
concurrency limit, no certificate reload or CRL, no audit or telemetry.

    peer.py --listen 127.0.0.1:0 --cert server.crt --key server.key \
            --client-ca ca.crt --callers callers.toml --endpoint-url URL [--workers 16]

Stubs: credgate.v1 generated from proto/ with grpcio-tools into the folder given
by --stubs or $CREDGATE_PY_STUBS (README.md). Prints one JSON line {"listening": "127.0.0.1:PORT"} on stdout when ready;
exits on SIGTERM, SIGINT or stdin EOF (unless --ignore-stdin).
"""

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import tomllib
from concurrent import futures

import boto3
import botocore.config
import botocore.exceptions
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

IAM_CHARS = set("\t\n\r") | {chr(c) for c in range(0x20, 0x100)}
SYMBOLS = set("!@#$%^&*()_+-=[]{}|'")
# IAM error code -> (gRPC code, reason, seconds to wait or None), as in DESIGN.md's table.
IAM_ERRORS = {
    "InvalidUserType": (code_pb2.PERMISSION_DENIED, "OLD_PASSWORD_INCORRECT", None),
    "PasswordPolicyViolation": (code_pb2.INVALID_ARGUMENT, "PASSWORD_POLICY_VIOLATION", None),
    "NoSuchEntity": (code_pb2.FAILED_PRECONDITION, "LOGIN_PROFILE_MISSING", None),
    "AccessDenied": (code_pb2.PERMISSION_DENIED, "IAM_ACCESS_DENIED", None),
    "LimitExceeded": (code_pb2.RESOURCE_EXHAUSTED, "IAM_LIMIT_EXCEEDED", None),
    "Throttling": (code_pb2.UNAVAILABLE, "IAM_THROTTLED", 1),
    "EntityTemporarilyUnmodifiable": (code_pb2.UNAVAILABLE, "ENTITY_TEMPORARILY_UNMODIFIABLE", 1),
    "ServiceFailure": (code_pb2.UNAVAILABLE, "IAM_SERVICE_FAILURE", 1),
    "InvalidClientTokenId": (code_pb2.FAILED_PRECONDITION, "UPSTREAM_CREDENTIALS_REJECTED", None),
    "SignatureDoesNotMatch": (code_pb2.FAILED_PRECONDITION, "UPSTREAM_CREDENTIALS_REJECTED", None),
    "ExpiredToken": (code_pb2.FAILED_PRECONDITION, "UPSTREAM_CREDENTIALS_REJECTED", None),
}


def abort(context, code, reason, message, metadata=None, violations=(), retry_after=None):
    """Ends the RPC with a google.rpc.Status: one ErrorInfo (domain credgate) plus extras."""
    details = [error_details_pb2.ErrorInfo(domain="credgate", reason=reason, metadata=metadata or {})]
    if violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]))
    if retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after)))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed)))


def check_password(context, field, value):
    if not 1 <= len(value) <= 128 or not set(value) <= IAM_CHARS:
        abort(context, code_pb2.INVALID_ARGUMENT, "PASSWORD_INVALID", f"{field} is not a valid IAM password",
              violations=[(field, "1 to 128 characters from tab, newline, CR and U+0020..U+00FF")])


def policy_violations(policy, password):
    rules = [
        (len(password) >= policy.get("MinimumPasswordLength", 0),
         f"must be at least {policy.get('MinimumPasswordLength', 0)} characters"),
        (not policy.get("RequireSymbols") or bool(set(password) & SYMBOLS), "must contain a symbol"),
        (not policy.get("RequireNumbers") or any(c.isdigit() for c in password), "must contain a number"),
        (not policy.get("RequireUppercaseCharacters") or any("A" <= c <= "Z" for c in password),
         "must contain an uppercase letter"),
        (not policy.get("RequireLowercaseCharacters") or any("a" <= c <= "z" for c in password),
         "must contain a lowercase letter"),
    ]
    return [("new_password", why) for ok, why in rules if not ok]


class PasswordService:
    """credgate.v1.PasswordService; pb is the generated password_service_pb2 module."""

    def __init__(self, pb, callers, endpoint_url, region, pool_size):
        self.pb = pb
        config = botocore.config.Config(retries={"total_max_attempts": 1}, max_pool_connections=pool_size,
                                        connect_timeout=5, read_timeout=10)
        # One boto3 client per caller, built up front: clients are thread-safe, sessions are not.
        self.callers = {
            c["spiffe_id"]: (c["iam_user"], boto3.session.Session(profile_name=c["aws_profile"]).client(
                "iam", endpoint_url=endpoint_url, region_name=region, config=config))
            for c in callers
        }

    def caller(self, context):
        uris = context.auth_context().get("peer_spiffe_id") or []
        caller = self.callers.get(uris[0].decode()) if len(uris) == 1 else None
        if caller is None:
            abort(context, code_pb2.PERMISSION_DENIED, "CALLER_NOT_MAPPED", "caller identity is not mapped")
        return caller

    def iam(self, context, call, **kwargs):
        try:
            return call(**kwargs)
        except botocore.exceptions.ClientError as e:
            error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, reason, retry = IAM_ERRORS.get(error.get("Code"), (code_pb2.INTERNAL, "IAM_ERROR", None))
            violations = [("new_password", error.get("Message", ""))] if reason == "PASSWORD_POLICY_VIOLATION" else ()
            abort(context, code, reason, f"IAM answered {error.get('Code')}", violations=violations,
                  metadata={"awsErrorCode": error.get("Code", ""), "awsRequestId": meta.get("RequestId", "")},
                  retry_after=retry)
        except botocore.exceptions.EndpointConnectionError:
            abort(context, code_pb2.UNAVAILABLE, "IAM_UNREACHABLE", "IAM is unreachable", retry_after=1)
        except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError):
            abort(context, code_pb2.DEADLINE_EXCEEDED, "OUTCOME_UNKNOWN", "IAM did not answer in time")

    @staticmethod
    def account_policy(iam):
        try:
            return iam.get_account_password_policy()["PasswordPolicy"]
        except iam.exceptions.NoSuchEntityException:
            return None

    def ChangePassword(self, request, context):
        pb = self.pb
        iam_user, iam = self.caller(context)
        check_password(context, "old_password", request.old_password)
        check_password(context, "new_password", request.new_password)
        if request.validate_only:
            policy = self.iam(context, self.account_policy, iam=iam)
            violations = policy_violations(policy, request.new_password) if policy else []
            if violations:
                abort(context, code_pb2.INVALID_ARGUMENT, "PASSWORD_POLICY_VIOLATION",
                      "new_password does not meet the account password policy", violations=violations)
            return pb.ChangePasswordResponse(iam_user=iam_user)
        out = self.iam(context, iam.change_password, OldPassword=request.old_password,
                       NewPassword=request.new_password)
        iam_request_id = out["ResponseMetadata"]["RequestId"]
        # request_id (2) is the deprecated name of iam_request_id (3): both, like credgate.
        return pb.ChangePasswordResponse(iam_user=iam_user, request_id=iam_request_id, iam_request_id=iam_request_id)

    def GetPasswordPolicy(self, request, context):
        pb = self.pb
        _, iam = self.caller(context)
        p = self.iam(context, self.account_policy, iam=iam)
        if p is None:
            return pb.GetPasswordPolicyResponse()
        return pb.GetPasswordPolicyResponse(policy=pb.PasswordPolicy(
            minimum_password_length=p.get("MinimumPasswordLength", 0),
            require_symbols=p.get("RequireSymbols", False),
            require_numbers=p.get("RequireNumbers", False),
            require_uppercase_characters=p.get("RequireUppercaseCharacters", False),
            require_lowercase_characters=p.get("RequireLowercaseCharacters", False),
            allow_users_to_change_password=p.get("AllowUsersToChangePassword", False),
            max_password_age_days=p.get("MaxPasswordAge", 0),
            password_reuse_prevention=p.get("PasswordReusePrevention", 0),
            hard_expiry=p.get("HardExpiry", False)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--cert", required=True, help="server certificate (PEM)")
    p.add_argument("--key", required=True, help="server private key (PEM)")
    p.add_argument("--client-ca", required=True, help="CA that client certificates must chain to")
    p.add_argument("--callers", required=True, help='TOML: [[callers]] spiffe_id, iam_user, aws_profile')
    p.add_argument("--endpoint-url", help="IAM endpoint (an emulator); default: AWS")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--workers", type=int, default=16, help="thread pool size (concurrent RPCs)")
    p.add_argument("--stubs", default=os.environ.get("CREDGATE_PY_STUBS"), help="folder of generated stubs")
    p.add_argument("--ignore-stdin", action="store_true", help="do not exit at stdin EOF")
    args = p.parse_args()
    if args.stubs:
        sys.path.insert(0, args.stubs)
    pb = importlib.import_module("credgate.v1.password_service_pb2")
    pb_grpc = importlib.import_module("credgate.v1.password_service_pb2_grpc")

    with open(args.callers, "rb") as f:
        callers = tomllib.load(f)["callers"]
    with open(args.cert, "rb") as c, open(args.key, "rb") as k, open(args.client_ca, "rb") as ca:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())], root_certificates=ca.read(),
                                            require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_PasswordServiceServicer_to_server(
        PasswordService(pb, callers, args.endpoint_url, args.region, args.workers), server)
    port = server.add_secure_port(args.listen, creds)
    if port == 0:
        sys.exit(f"cannot listen on {args.listen}")
    server.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if not args.ignore_stdin:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    host = args.listen.rsplit(":", 1)[0]
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(grace=5).wait()


if __name__ == "__main__":
    main()
