"""Helpers for tests/examples (fixtures are in conftest.py beside this file).

A uniquely named module, so that `from examples_support import ...` works
whichever other test folders (with conftest.py files of their own) run in the
same pytest session.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = PROTO_ROOT / "credgate" / "v1" / "password_service.proto"
EMULATOR = REPO / "tests" / "emulator" / "iam_emulator.py"
EXAMPLE = REPO / "examples" / "python" / "change_password.py"
PEER = REPO / "bench" / "python-peer" / "peer.py"

OLD_PASSWORD = "Old-Passw0rd!example"
# What the caller's IAM user may do (moto matches only Resource "*").
SELF_SERVICE = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iam:ChangePassword", "iam:GetAccountPasswordPolicy", "iam:GetUser"],
                "Resource": "*",
            }
        ],
    }
)


def unavailable(message: str) -> None:
    """A prerequisite built elsewhere in the project is missing: fail in CI, skip locally."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


class Process:
    """A child process whose stdout and stderr lines are collected by threads."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stdin_pipe: bool = False):
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.events: queue.Queue[str] = queue.Queue()
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            self.events.put(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_json(self, predicate, timeout: float, what: str) -> dict[str, Any]:
        """The first JSON line (stdout or stderr) for which predicate(obj) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    pytest.fail(f"{self.proc.args[:2]} exited with {self.proc.returncode}\n{self.output()}")
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and predicate(event):
                return event
        pytest.fail(f"no {what} within {timeout}s from {self.proc.args[:2]}\n{self.output()}")

    def stop(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def log_field(event: dict[str, Any], name: str) -> Any:
    """A field of a JSON log line, top-level or under tracing's "fields"."""
    if name in event:
        return event[name]
    return (event.get("fields") or {}).get(name)


def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


class Emulator:
    """A running IAM emulator: its ready line plus the test-only HTTP switches."""

    def __init__(self, ready: dict[str, Any]):
        self.ready = ready
        self.endpoint = ready["endpoint"]
        self.region = ready["region"]

    def admin(self):
        import boto3

        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.ready["admin_access_key_id"],
            aws_secret_access_key=self.ready["admin_secret_access_key"],
        )

    def create_user(self, name: str, password: str = OLD_PASSWORD) -> tuple[str, str]:
        """An IAM user with a console password, an access key and the right to change it."""
        iam = self.admin()
        iam.create_user(UserName=name)
        iam.create_login_profile(UserName=name, Password=password, PasswordResetRequired=False)
        iam.put_user_policy(UserName=name, PolicyName="credgate-self-service", PolicyDocument=SELF_SERVICE)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def password_matches(self, user: str, password: str) -> bool:
        code, body = http_json("POST", f"{self.endpoint}/_emulator/check-password", {"user": user, "password": password})
        assert code == 200, f"check-password answered {code}"
        return body["matches"]

    def calls(self, action: str, user: str | None = None) -> int:
        query = f"action={action}" + (f"&user={user}" if user else "")
        code, body = http_json("GET", f"{self.endpoint}/_emulator/calls?{query}")
        assert code == 200, f"/_emulator/calls answered {code}"
        return body["count"]

    def add_fault(self, fault: dict[str, Any]) -> None:
        code, body = http_json("POST", f"{self.endpoint}/_emulator/faults", fault)
        assert code == 200, f"fault {fault} refused: {body}"


@dataclass
class Stack:
    """A credgate to call: its emulator and IAM user, a client identity and where to connect."""

    emulator: Emulator | None
    iam_user: str
    spiffe_id: str
    ca: Path
    cert: Path
    key: Path
    target: str  # host:port of credgate's mTLS listener
    process: Process | None


def write_aws_files(directory: Path, profiles: dict[str, tuple[str, str]], region: str) -> dict[str, str]:
    """A shared credentials file and config file, one profile each; returns the env to use them."""
    directory.mkdir(parents=True, exist_ok=True)
    creds = directory / "credentials"
    conf = directory / "config"
    creds.write_text(
        "".join(f"[{n}]\naws_access_key_id = {k}\naws_secret_access_key = {s}\n\n" for n, (k, s) in profiles.items())
    )
    conf.write_text("".join(f"[profile {n}]\nregion = {region}\n\n" for n in profiles))
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_CONFIG_FILE": str(conf),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def clean_env(**extra: str) -> dict[str, str]:
    """PATH and HOME only, so no AWS_* or OTEL_* variable of the test machine leaks in."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra)
    return env


def dev_pki(credgate_bin: Path, out: Path, clients: list[str]) -> dict[str, Any]:
    """`credgate dev-pki`; returns {"dir", "ca", "server_crt", "server_key", "clients": {spiffe_id: (crt, key)}}."""
    from cryptography import x509

    argv = [str(credgate_bin), "dev-pki", "--out", str(out)]
    for spiffe_id in clients:
        argv += ["--client", spiffe_id]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env(), check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    by_uri: dict[str, tuple[Path, Path]] = {}
    for crt in sorted(out.glob("client-*.crt")):
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            by_uri[uri] = (crt, crt.with_suffix(".key"))
    assert set(clients) <= set(by_uri), f"dev-pki wrote no client certificate for {set(clients) - set(by_uri)}"
    return {
        "dir": out,
        "ca": out / "ca.crt",
        "server_crt": out / "server.crt",
        "server_key": out / "server.key",
        "clients": by_uri,
    }


def generate_stubs(out: Path) -> Path:
    """credgate.v1 Python stubs from proto/, with grpcio-tools, as examples/python/README.md says."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO_FILE),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"grpc_tools.protoc failed:\n{proc.stderr}"
    assert (out / "credgate" / "v1" / "password_service_pb2_grpc.py").is_file()
    return out


def import_stubs(out: Path):
    """(pb2, pb2_grpc) imported from a stubs folder."""
    import importlib

    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("credgate.v1.password_service_pb2")
        pb2_grpc = importlib.import_module("credgate.v1.password_service_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc
