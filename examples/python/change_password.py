#!/usr/bin/env python3
"""Change the caller's AWS IAM console password through credgate, over mTLS.

The passwords come from $CREDGATE_OLD_PASSWORD and $CREDGATE_NEW_PASSWORD (or a
prompt), never from the command line. Stubs: generate them from proto/ with
grpcio-tools and pass the output folder as --stubs or $CREDGATE_PY_STUBS
(examples/python/README.md). Exit status: 0 changed (or valid, with
--validate-only), 1 refused, 2 usage, 3 gave up while the outcome is unknown or
still retryable: rerun with the printed --request-id to finish that change.
"""

import argparse
import getpass
import os
import random
import sys
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Reasons after which credgate guarantees that IAM was not asked to change anything.
NOT_APPLIED = {"IAM_THROTTLED", "ENTITY_TEMPORARILY_UNMODIFIABLE", "IAM_SERVICE_FAILURE",
               "IAM_UNREACHABLE", "STATE_UNAVAILABLE", "CALLER_CONCURRENCY_EXCEEDED",
               "DEADLINE_BEFORE_SEND", "AUDIT_UNAVAILABLE"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:8443", help="credgate's mTLS address (host:port)")
    p.add_argument("--ca", required=True, help="CA bundle that signed credgate's server certificate")
    p.add_argument("--cert", required=True, help="this service's client certificate (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--stubs", default=os.environ.get("CREDGATE_PY_STUBS"), help="folder of generated stubs")
    # A little above credgate's request_timeout (10 s), so credgate reports its own timeout.
    p.add_argument("--timeout", type=float, default=12.0, help="deadline of one attempt, seconds")
    p.add_argument("--deadline", type=float, default=60.0, help="budget for all attempts, seconds")
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--request-id", help="resume an earlier change: reuse the request_id it printed")
    p.add_argument("--validate-only", action="store_true", help="check the new password; change nothing")
    return p.parse_args()


def details(err):
    """(ErrorInfo or None, [other detail messages]) from the google.rpc.Status trailer."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # trailer disagrees with the gRPC status: trust neither
        status = None
    info, extra = None, []
    for any_msg in status.details if status else []:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                if isinstance(msg, error_details_pb2.ErrorInfo) and info is None:
                    info = msg
                else:
                    extra.append(msg)
    return info, extra


def retry_delay(extra, attempt):
    """RetryInfo's delay if credgate sent one, else exponential backoff with jitter."""
    for msg in extra:
        if isinstance(msg, error_details_pb2.RetryInfo):
            return msg.retry_delay.ToTimedelta().total_seconds()
    return min(0.5 * 2 ** (attempt - 1), 8.0) * random.uniform(0.8, 1.2)


def explain(code, info, extra, err):
    reason = info.reason if info else "no ErrorInfo"
    print(f"  {code.name} / {reason}: {err.details()}")
    if info and info.metadata:
        print("  " + ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())))
    for msg in extra:
        if isinstance(msg, error_details_pb2.BadRequest):
            for v in msg.field_violations:
                print(f"  - {v.field}: {v.description}")
        elif isinstance(msg, error_details_pb2.QuotaFailure):
            for v in msg.violations:
                print(f"  - quota {v.subject}: {v.description}")
        elif isinstance(msg, error_details_pb2.RetryInfo) and reason == "TOO_MANY_FAILED_ATTEMPTS":
            wait = msg.retry_delay.ToTimedelta().total_seconds()
            print(f"  too many wrong old passwords: try again in {wait:.0f} s "
                  f"(after {time.strftime('%H:%M:%S', time.localtime(time.time() + wait))})")


def main():
    args = parse_args()
    if args.stubs:
        sys.path.insert(0, args.stubs)
    try:
        from credgate.v1 import password_service_pb2 as pb, password_service_pb2_grpc as pb_grpc
    except ImportError as e:
        print(f"no credgate.v1 stubs ({e}): generate them, pass --stubs (README.md)", file=sys.stderr)
        return 2
    if args.request_id:
        try:
            uuid.UUID(args.request_id)
        except ValueError:
            print(f"--request-id {args.request_id!r} is not a UUID", file=sys.stderr)
            return 2
    old = os.environ.get("CREDGATE_OLD_PASSWORD") or getpass.getpass("old password: ")
    new = os.environ.get("CREDGATE_NEW_PASSWORD") or getpass.getpass("new password: ")
    with open(args.ca, "rb") as ca, open(args.cert, "rb") as crt, open(args.key, "rb") as key:
        creds = grpc.ssl_channel_credentials(ca.read(), key.read(), crt.read())

    # One intended change, one request_id: every retry below reuses it, so credgate
    # sends the change to IAM at most once and replays the first attempt's outcome.
    request_id = args.request_id or str(uuid.uuid4())
    request = pb.ChangePasswordRequest(old_password=old, new_password=new,
                                       validate_only=args.validate_only, request_id=request_id)
    give_up_at = time.monotonic() + args.deadline
    print(f"request_id {request_id}")
    with grpc.secure_channel(args.target, creds) as channel:
        stub = pb_grpc.PasswordServiceStub(channel)
        for attempt in range(1, args.max_attempts + 1):
            timeout = min(args.timeout, give_up_at - time.monotonic())
            try:
                resp = stub.ChangePassword(request, timeout=timeout)
            except grpc.RpcError as err:
                code, (info, extra) = err.code(), details(err)
                reason = info.reason if info and info.domain == "credgate" else None
                print(f"attempt {attempt}/{args.max_attempts} with request_id {request_id} failed:")
                explain(code, info, extra, err)
                if reason in NOT_APPLIED:
                    why = "credgate did not send the change to IAM"
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED and reason in (None, "OUTCOME_UNKNOWN"):
                    why = "the change may have been applied; credgate will replay its outcome"
                elif code == grpc.StatusCode.UNAVAILABLE and info is None:
                    why = "the call may not have reached credgate"
                else:
                    print("not retrying: this needs a different request, or an operator")
                    return 1
                delay = retry_delay(extra, attempt)
                if attempt == args.max_attempts or time.monotonic() + delay + 0.1 >= give_up_at:
                    break
                print(f"  {why}: retrying with the same request_id in {delay:.1f} s")
                time.sleep(delay)
                continue
            if args.validate_only:
                print(f"OK: the new password is acceptable for IAM user {resp.iam_user} (nothing changed)")
            else:
                # replayed: the stored outcome of an earlier attempt with this request_id
                # (its first try went through); IAM was not called again.
                replayed = ", replayed from an earlier attempt" if resp.replayed else ""
                print(f"OK: password changed for IAM user {resp.iam_user} (IAM request id {resp.iam_request_id}{replayed})")
            return 0
    print(f"gave up: the outcome is unknown or still retryable; rerun with --request-id {request_id}")
    return 3


if __name__ == "__main__":
    sys.exit(main())
