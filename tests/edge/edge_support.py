"""Helpers for tests/edge (fixtures are in conftest.py beside this file).

A uniquely named module, so that `from edge_support import ...` works whichever
other test folders (with conftest.py files of their own) run in the same
pytest session.

The hostile peers here are real TLS + HTTP/2 clients: Python's `ssl` for the
handshake (with a client certificate from the dev PKI, or one made here that
maps to no caller) and the `h2` state machine for the frames, so that a test
can do what grpcio never would: open streams and send no body, ignore the
server's MAX_CONCURRENT_STREAMS, stop half-way through a message, or say
nothing at all after the handshake.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import queue
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = PROTO_ROOT / "credgate" / "v1" / "password_service.proto"
EMULATOR = REPO / "tests" / "emulator" / "iam_emulator.py"

CHANGE_PASSWORD = "/credgate.v1.PasswordService/ChangePassword"
GET_PASSWORD_POLICY = "/credgate.v1.PasswordService/GetPasswordPolicy"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

# gRPC status codes used here.
OK = 0
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8

# HTTP/2 error codes (RFC 9113 section 7).
REFUSED_STREAM = 0x7

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


# --------------------------------------------------------------------------
# Child processes: the IAM emulator and credgate.


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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

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

    def stop(self, grace: float = 5) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def log_field(event: dict[str, Any], name: str) -> Any:
    """A field of a JSON log line, top-level or under tracing's "fields"."""
    if name in event:
        return event[name]
    return (event.get("fields") or {}).get(name)


def clean_env(**extra: str) -> dict[str, str]:
    """PATH and HOME only, so no AWS_* or OTEL_* variable of the test machine leaks in."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra)
    return env


def snapshot_binary(source: Path, out_dir: Path, attempts: int = 3, wait: float = 30) -> Path:
    """A private copy of the credgate binary that answers --version.

    The binary in target/ may be rebuilt while the tests run (missing, or half
    written); the copy is immune to that. A missing or broken binary is
    retried every `wait` seconds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "credgate"
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait)
        if not (source.is_file() and os.access(source, os.X_OK)):
            problem = f"no credgate binary at {source}"
            continue
        try:
            shutil.copy2(source, target)
            proc = subprocess.run(
                [str(target), "--version"], capture_output=True, text=True, timeout=30, env=clean_env(), check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            problem = f"{source}: {error}"
            continue
        if proc.returncode == 0:
            return target
        problem = f"{source} --version exited {proc.returncode}: {proc.stderr.strip()}"
    unavailable(f"{problem}: run `cargo build` or set CREDGATE_BIN")
    raise AssertionError("unreachable")


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

    def create_user(self, name: str, password: str) -> tuple[str, str]:
        """An IAM user with a console password, an access key and the right to change it."""
        iam = self.admin()
        iam.create_user(UserName=name)
        iam.create_login_profile(UserName=name, Password=password, PasswordResetRequired=False)
        iam.put_user_policy(UserName=name, PolicyName="credgate-self-service", PolicyDocument=SELF_SERVICE)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def add_fault(self, fault: dict[str, Any]) -> None:
        code, body = http_json("POST", f"{self.endpoint}/_emulator/faults", fault)
        assert code == 200, f"fault {fault} refused: {body}"

    def clear_faults(self) -> None:
        assert http_json("DELETE", f"{self.endpoint}/_emulator/faults")[0] == 200


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


# --------------------------------------------------------------------------
# PKI: dev-pki's CA and mapped clients, plus a certificate that maps to nobody.


def dev_pki(credgate_bin: Path, out: Path, clients: list[str]) -> dict[str, Any]:
    """`credgate dev-pki`; returns {"dir", "ca", "ca_key", "server_crt", "server_key", "clients": {spiffe_id: (crt, key)}}."""
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
        "ca_key": out / "ca.key",
        "server_crt": out / "server.crt",
        "server_key": out / "server.key",
        "clients": by_uri,
    }


def unmapped_client_cert(ca_crt: Path, ca_key: Path, out: Path) -> tuple[Path, Path]:
    """A valid client leaf from the dev CA with no SAN and an empty subject (no CN).

    It passes the TLS handshake (the CA signed it; CA:FALSE, digitalSignature,
    clientAuth) but names no identity, so it can match no `[[callers]]` entry.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
        .sign(signer, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    crt_path, key_path = out / "unmapped.crt", out / "unmapped.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt_path, key_path


@dataclass(frozen=True)
class Cert:
    """A client certificate and its key."""

    crt: Path
    key: Path


# --------------------------------------------------------------------------
# Callers and credgate.


@dataclass
class Account:
    """A mapped caller: its identity, IAM user and the console password it has now."""

    spiffe_id: str
    iam_user: str
    cert: Cert
    password: str
    changes: int = 0

    def next_password(self) -> str:
        self.changes += 1
        return f"Edge-Passw0rd!{self.iam_user}-{self.changes}"


@dataclass
class Credgate:
    """A running `credgate serve`."""

    process: Process
    tls_port: int
    admin_addr: str
    ca: Path
    config: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def rss_kib(self) -> int:
        """VmRSS of the credgate process, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def assert_alive(self) -> None:
        assert self.process.alive(), (
            f"credgate exited with {self.process.proc.returncode}\n{self.process.output()}"
        )


def credgate_toml(pki: dict[str, Any], emulator: Emulator, accounts: list[Account], server: dict[str, Any]) -> str:
    """A credgate.toml: listeners on free 127.0.0.1 ports, the dev PKI, the emulator, these callers."""

    def value(v: Any) -> str:
        return json.dumps(v)  # TOML basic strings and integers look like JSON's

    server_lines = "".join(f"{k} = {value(v)}\n" for k, v in server.items())
    callers = "".join(
        f"""
[[callers]]
spiffe_id = {value(a.spiffe_id)}
iam_user = {value(a.iam_user)}
aws_profile = {value(a.iam_user)}
"""
        for a in accounts
    )
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server_lines}
[tls]
cert = {value(str(pki["server_crt"]))}
key = {value(str(pki["server_key"]))}
client_ca = {value(str(pki["ca"]))}

[aws]
region = {value(emulator.region)}
endpoint_url = {value(emulator.endpoint)}

[telemetry]
log_format = "json"
{callers}"""


def start_credgate(credgate_bin: Path, config: Path, env: dict[str, str], ca: Path) -> Credgate:
    proc = Process([str(credgate_bin), "serve", "--config", str(config)], env=env)
    try:
        listening = proc.wait_for_json(
            lambda e: log_field(e, "message") == "credgate listening", timeout=30, what='"credgate listening"'
        )
    except BaseException:
        proc.stop()
        raise
    port = int(str(log_field(listening, "tls_addr")).rsplit(":", 1)[1])
    return Credgate(proc, port, str(log_field(listening, "admin_addr")), ca, config)


# --------------------------------------------------------------------------
# gRPC helpers: framing, status details, grpcio stubs.


def grpc_frame(message: bytes, declared_length: int | None = None) -> bytes:
    """A gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length, bytes."""
    length = len(message) if declared_length is None else declared_length
    return b"\x00" + struct.pack(">I", length) + message


def proto_string_field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint((number << 3) | 2) + _varint(len(value)) + value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass
class GrpcStatus:
    code: int | None
    message: str
    reason: str | None
    metadata: dict[str, str]

    def __str__(self) -> str:
        return f"grpc-status {self.code} reason {self.reason} ({self.message!r})"


def grpc_status(headers: dict[str, str]) -> GrpcStatus:
    """grpc-status, grpc-message and the ErrorInfo in grpc-status-details-bin of a header block."""
    from google.rpc import error_details_pb2, status_pb2

    code = headers.get("grpc-status")
    reason, metadata = None, {}
    details = headers.get("grpc-status-details-bin")
    if details:
        raw = base64.b64decode(details + "=" * (-len(details) % 4))
        status = status_pb2.Status.FromString(raw)
        for any_ in status.details:
            info = error_details_pb2.ErrorInfo()
            if any_.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
    message = urllib.parse.unquote(headers.get("grpc-message", ""))
    return GrpcStatus(int(code) if code is not None else None, message, reason, metadata)


def rpc_error_reason(error) -> str | None:
    """The ErrorInfo reason of a grpcio RpcError."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    if status is None:
        return None
    for any_ in status.details:
        info = error_details_pb2.ErrorInfo()
        if any_.Unpack(info):
            return info.reason
    return None


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


class MappedClient:
    """A well-behaved caller: grpcio over mTLS with a dev-pki client certificate."""

    def __init__(self, credgate: Credgate, account: Account, stubs, own_connection: bool = False):
        """`own_connection`: a connection of this client's own (grpcio otherwise shares one
        connection among channels to the same target)."""
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        self.account = account
        self.pb2, pb2_grpc = stubs
        credentials = grpc.ssl_channel_credentials(
            root_certificates=credgate.ca.read_bytes(),
            private_key=account.cert.key.read_bytes(),
            certificate_chain=account.cert.crt.read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self.channel = grpc.secure_channel(credgate.target, credentials, options=options)
        self.stub = pb2_grpc.PasswordServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def timed(self, what: str, call: Callable[[], Any]) -> tuple[float, Any]:
        start = time.monotonic()
        try:
            result = call()
        except Exception as error:  # grpc.RpcError
            elapsed = time.monotonic() - start
            reason = rpc_error_reason(error) if hasattr(error, "code") else None
            code = error.code() if hasattr(error, "code") else None
            pytest.fail(f"{what} failed after {elapsed:.2f}s: {code} {reason} {error}")
        return time.monotonic() - start, result

    def get_password_policy(self, timeout: float = 10) -> float:
        elapsed, _ = self.timed(
            "GetPasswordPolicy",
            lambda: self.stub.GetPasswordPolicy(self.pb2.GetPasswordPolicyRequest(), timeout=timeout),
        )
        return elapsed

    def change_password(self, timeout: float = 10) -> float:
        new = self.account.next_password()
        request = self.pb2.ChangePasswordRequest(old_password=self.account.password, new_password=new)
        elapsed, response = self.timed("ChangePassword", lambda: self.stub.ChangePassword(request, timeout=timeout))
        assert response.iam_user == self.account.iam_user, response
        self.account.password = new
        return elapsed

    def health_check(self, timeout: float = 10) -> float:
        from grpc_health.v1 import health_pb2

        elapsed, response = self.timed(
            "Health/Check", lambda: self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING, response
        return elapsed

    def close(self) -> None:
        self.channel.close()


def admin_health_serving(admin_addr: str, timeout: float = 5) -> str:
    """The admin port's health status name (plaintext, as a Kubernetes probe asks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(admin_addr) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return f"error {error.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# --------------------------------------------------------------------------
# Raw TLS and HTTP/2 peers.


def client_context(ca: Path, cert: Cert, alpn: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert.crt), keyfile=str(cert.key))
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    return ctx


def tls_connect(port: int, ca: Path, cert: Cert, timeout: float = 10) -> ssl.SSLSocket:
    """A completed mTLS handshake with credgate (blocking, bounded by timeout)."""
    sock = PendingHandshake(port, ca, cert)
    if not sock.advance(timeout):
        sock.close()
        raise TimeoutError(f"TLS handshake with 127.0.0.1:{port} did not complete within {timeout}s")
    return sock.ssl


class PendingHandshake:
    """A TCP connection whose TLS handshake is driven step by step (non-blocking).

    `advance(t)` drives it for at most t seconds and says whether it completed;
    a handshake that timed out can be advanced again later.
    """

    def __init__(self, port: int, ca: Path, cert: Cert, connect_timeout: float = 5):
        raw = socket.create_connection(("127.0.0.1", port), timeout=connect_timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setblocking(False)
        self.ssl = client_context(ca, cert).wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        self.done = False

    def advance(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.done:
            try:
                self.ssl.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([self.ssl], [], [], remaining)
            except ssl.SSLWantWriteError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([], [self.ssl], [], remaining)
        self.ssl.setblocking(True)
        return True

    def close(self) -> None:
        try:
            self.ssl.close()
        except OSError:
            pass


def wait_closed_by_peer(sock: ssl.SSLSocket, timeout: float) -> str | None:
    """How the peer ended an mTLS connection on which we send nothing ("EOF", an error), or None."""
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not sock.pending():
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                return None
        try:
            data = sock.recv(4096)
        except ssl.SSLWantReadError:
            continue  # a TLS 1.3 session ticket, no application data
        except (ssl.SSLError, OSError) as error:
            return type(error).__name__
        if not data:
            return "EOF"
        return f"unexpected data {data[:40]!r}"


@dataclass
class Stream:
    """What one HTTP/2 stream saw."""

    stream_id: int
    path: str
    opened: float  # monotonic time its HEADERS were flushed
    headers: dict[str, str] | None = None
    trailers: dict[str, str] | None = None
    data: bytearray = field(default_factory=bytearray)
    ended_at: float | None = None  # END_STREAM from the server
    reset_code: int | None = None  # RST_STREAM from the server
    reset_at: float | None = None
    first_answer_at: float | None = None  # the server's first frame on this stream
    sent: int = 0  # DATA bytes sent by us
    sent_at_answer: int | None = None  # DATA bytes we had sent when the first answer came
    sent_at_done: int | None = None  # DATA bytes we had sent when the stream ended or was reset

    @property
    def done(self) -> bool:
        return self.ended_at is not None or self.reset_code is not None

    @property
    def answered(self) -> bool:
        return self.first_answer_at is not None

    def status(self) -> GrpcStatus:
        """The gRPC status: trailers, or the headers of a trailers-only response."""
        block = self.trailers if self.trailers is not None else (self.headers or {})
        return grpc_status(block)

    def describe(self) -> str:
        if self.reset_code is not None and self.headers is None:
            return f"stream {self.stream_id} reset with code {self.reset_code}"
        return f"stream {self.stream_id} {self.status()} reset={self.reset_code}"


def _h2_connection_class():
    import h2.connection
    import h2.events

    class HostilePeerConnection(h2.connection.H2Connection):
        """h2's client connection, with two changes a hostile-peer test needs.

        - `ignore_peer_stream_limit`: open streams beyond the peer's
          SETTINGS_MAX_CONCURRENT_STREAMS (h2 refuses to, client-side);
        - a GOAWAY does not close h2's state machine: h2 treats the first
          GOAWAY as the end, but a graceful GOAWAY (RFC 9113, section 6.8)
          lets streams up to its last-stream-id finish, and those are what a
          test of max_connection_age must watch complete.
        """

        ignore_peer_stream_limit = False

        @property
        def open_outbound_streams(self) -> int:
            count = super().open_outbound_streams
            return 0 if self.ignore_peer_stream_limit else count

        def _receive_goaway_frame(self, frame):
            event = h2.events.ConnectionTerminated()
            event.error_code = h2.connection._error_code_from_int(frame.error_code)
            event.last_stream_id = frame.last_stream_id
            event.additional_data = frame.additional_data or None
            return [], [event]

    return HostilePeerConnection


class H2Client:
    """A real TLS + HTTP/2 client driven by hand (not thread-safe: one thread per client)."""

    def __init__(
        self,
        port: int,
        ca: Path,
        cert: Cert,
        sock: ssl.SSLSocket | None = None,
        timeout: float = 10,
        settings: dict[int, int] | None = None,
    ):
        """`settings`: SETTINGS values to announce right after the preface
        (e.g. an INITIAL_WINDOW_SIZE of 0: a client that never lets the server send DATA)."""
        import h2.config

        self.sock = sock if sock is not None else tls_connect(port, ca, cert, timeout)
        # Non-blocking: a read that finds only TLS 1.3 session tickets must not block.
        self.sock.setblocking(False)
        self.connected_at = time.monotonic()
        self.conn = _h2_connection_class()(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, Stream] = {}
        self.goaways: list[tuple[float, int, int]] = []  # (time, error code, last stream id)
        self.goaway_data: list[bytes] = []  # each GOAWAY's debug data
        self.remote_settings: dict[int, int] = {}
        self.settings_at: float | None = None
        self.eof_at: float | None = None
        self.eof_how: str | None = None
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()

    # -- I/O

    def flush(self, timeout: float = 10) -> None:
        data = self.conn.data_to_send()
        if not data or self.eof_at is not None:
            return
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                sent = self.sock.send(view)
                view = view[sent:]
                continue
            except ssl.SSLWantWriteError:
                select.select([], [self.sock], [], 0.05)
            except ssl.SSLWantReadError:
                select.select([self.sock], [], [], 0.05)
            except (OSError, ssl.SSLError) as error:
                self._eof(type(error).__name__)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not write {len(view)} bytes to credgate within {timeout}s")

    def _eof(self, how: str) -> None:
        if self.eof_at is None:
            self.eof_at = time.monotonic()
            self.eof_how = how

    def pump(self, timeout: float) -> bool:
        """Reads and handles what the server sent within timeout; whether anything came."""
        if self.eof_at is not None:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return False
        if not self.sock.pending():
            readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not readable:
                return False
        chunks = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLError, OSError) as error:
                self._eof(type(error).__name__)
                break
            if not data:
                self._eof("EOF")
                break
            chunks.append(data)
            if not self.sock.pending():
                break
        if not chunks:
            return self.eof_at is not None
        events = self.conn.receive_data(b"".join(chunks))
        now = time.monotonic()
        for event in events:
            self._handle(event, now)
        self.flush()
        return True

    def _handle(self, event, now: float) -> None:
        import h2.events as ev

        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if stream is not None and stream.first_answer_at is None and isinstance(
            event, (ev.ResponseReceived, ev.TrailersReceived, ev.DataReceived, ev.StreamReset, ev.StreamEnded)
        ):
            stream.first_answer_at = now
            stream.sent_at_answer = stream.sent
        if isinstance(event, ev.RemoteSettingsChanged):
            for code, setting in event.changed_settings.items():
                self.remote_settings[int(code)] = setting.new_value
            self.settings_at = self.settings_at or now
        elif isinstance(event, ev.ResponseReceived) and stream:
            stream.headers = dict(event.headers)
        elif isinstance(event, ev.TrailersReceived) and stream:
            stream.trailers = dict(event.headers)
        elif isinstance(event, ev.DataReceived):
            if stream:
                stream.data += event.data
            if event.flow_controlled_length:
                try:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                except Exception:  # the stream may be gone already
                    pass
        elif isinstance(event, ev.StreamEnded) and stream:
            stream.ended_at = now
            stream.sent_at_done = stream.sent if stream.sent_at_done is None else stream.sent_at_done
        elif isinstance(event, ev.StreamReset) and stream:
            stream.reset_code = int(event.error_code)
            stream.reset_at = now
            stream.sent_at_done = stream.sent if stream.sent_at_done is None else stream.sent_at_done
        elif isinstance(event, ev.ConnectionTerminated):
            self.goaways.append((now, int(event.error_code), event.last_stream_id))
            self.goaway_data.append(event.additional_data or b"")

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Pumps until predicate() holds or timeout passes; whether it holds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.eof_at is not None:
                return predicate()
            self.pump(min(remaining, 0.1))
        return True

    def wait_settings(self, timeout: float = 5) -> dict[int, int]:
        assert self.wait(lambda: self.settings_at is not None, timeout), "no SETTINGS from the server"
        return self.remote_settings

    # -- streams

    def open_stream(self, path: str, body: bytes | None = None, end: bool = False, flush: bool = True) -> Stream:
        """HEADERS for a gRPC call on path; then body (if any, and if the window allows) and END_STREAM if end."""
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", path),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end and not body)
        stream = Stream(stream_id, path, time.monotonic())
        self.streams[stream_id] = stream
        if body:
            self.send_data(stream, body, end=end, flush=False)
        if flush:
            self.flush()
            stream.opened = time.monotonic()
        return stream

    def send_data(self, stream: Stream, data: bytes | memoryview, end: bool = False, flush: bool = True) -> int:
        """Sends as much of data as flow control allows now; returns how many bytes went."""
        import h2.exceptions

        sent = 0
        view = memoryview(data)
        while sent < len(view):
            try:
                window = self.conn.local_flow_control_window(stream.stream_id)
            except Exception:  # closed stream
                break
            chunk = min(window, self.conn.max_outbound_frame_size, len(view) - sent)
            if chunk <= 0:
                break
            last = end and sent + chunk == len(view)
            try:
                self.conn.send_data(stream.stream_id, view[sent : sent + chunk].tobytes(), end_stream=last)
            except h2.exceptions.StreamClosedError:
                break  # the server ended or reset the stream meanwhile
            sent += chunk
        stream.sent += sent
        if flush:
            self.flush()
        return sent

    def send_all(self, stream: Stream, data: bytes, end: bool, timeout: float) -> None:
        """Sends data (waiting for window updates) within timeout."""
        deadline = time.monotonic() + timeout
        offset = 0
        while True:
            offset += self.send_data(stream, memoryview(data)[offset:], end=end)
            if offset >= len(data):
                if end and not data:
                    self.conn.end_stream(stream.stream_id)
                    self.flush()
                return
            if time.monotonic() > deadline or stream.done or self.eof_at is not None:
                raise AssertionError(f"could not send {len(data)} bytes on stream {stream.stream_id} in {timeout}s")
            self.pump(0.05)

    def call(self, path: str, message: bytes, timeout: float = 10) -> Stream:
        """A complete unary call: the framed message, END_STREAM, and the answer."""
        stream = self.open_stream(path, grpc_frame(message), end=True)
        self.wait(lambda: stream.done, timeout)
        return stream

    def reset(self, stream: Stream, code: int = 0x8) -> None:
        """RST_STREAM (default CANCEL) unless the stream is closed already."""
        try:
            self.conn.reset_stream(stream.stream_id, error_code=code)
        except Exception:
            return
        self.flush()

    def close(self) -> None:
        try:
            if self.eof_at is None:
                self.conn.close_connection()
                self.flush()
        except Exception:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def pump_all(clients: list[H2Client], predicate: Callable[[], bool], timeout: float) -> bool:
    """Pumps several clients from one thread until predicate() holds or timeout passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        live = [c for c in clients if c.eof_at is None]
        if not live:
            return predicate()
        pending = [c for c in live if c.sock.pending()]
        if not pending:
            readable, _, _ = select.select([c.sock for c in live], [], [], min(0.05, max(0.0, deadline - time.monotonic())))
            pending = [c for c in live if c.sock in readable]
        for client in pending:
            client.pump(0)
    return True


class RssSampler:
    """Samples a process's VmRSS in a thread; `peak` is the largest seen, in KiB."""

    def __init__(self, credgate: Credgate, interval: float = 0.02):
        self.credgate = credgate
        self.interval = interval
        self.baseline = credgate.rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.credgate.rss_kib())
            except (OSError, AssertionError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak - self.baseline


class RawFlood:
    """`size` TCP connections to a port that never send a byte (no TLS ClientHello), each
    re-opened the moment the server closes it, from one thread, until stopped.

    `reopened` counts the connections the server closed (and that were opened again).
    """

    def __init__(self, port: int, size: int):
        import selectors

        self.port = port
        self.size = size
        self.reopened = 0
        self.errors: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RawFlood":
        for _ in range(self.size):
            self._open()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _open(self) -> None:
        import selectors

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))  # EINPROGRESS: completes in the background
        self._selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(1)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""  # reset by the server
                if data:
                    self.errors.append(f"the server sent {data!r} to a connection that said nothing")
                self._selector.unregister(sock)
                sock.close()
                self.reopened += 1
                if not self._stop.is_set():
                    self._open()
