"""checkov, the standard Kubernetes policy scan, over every rendered tree: no failed check.

The rendered trees (`kubectl kustomize`) are scanned by the pinned checkov
(tests/deploy/requirements.txt) with the kubernetes framework only, fully
offline:

- `--skip-download`: nothing is fetched from Bridgecrew/Prisma Cloud (no
  guidelines, severities, custom policies or platform suppressions);
- no API key: the environment is built from scratch (no BC_API_KEY,
  PRISMA_API_URL, CKV_* or CHECKOV_* of the machine, HOME is a temp dir so no
  ~/.checkov.yaml), and the working directory is a temp dir (no .checkov.yaml);
- HTTP(S)_PROXY point at a local listener that counts connections: any HTTP
  request checkov might make (a PyPI version check, a platform call) lands
  there and fails the test.

A check that does not fit is skipped in the manifest, never here: a
`checkov.io/skipN: "CHECK_ID=reason"` annotation on the object (the reason
must not contain "="; checkov splits on it). EXPECTED_SKIPS lists every skip
so that adding one is a reviewed change.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deploy_support import DEPLOY, KUSTOMIZE_TREES

CHECKOV = Path(sys.executable).parent / "checkov"
CHECKOV_VERSION = "3.1.47"
SCAN_BUDGET_SECONDS = 60
# A digest for the digest-pinned rendering (any well-formed sha256 will do offline).
EXAMPLE_DIGEST = "sha256:" + "0123456789abcdef" * 4
# The image name after the base's `images:` transformer: what an operator's
# overlay must match to pin the digest.
BASE_IMAGE = "registry.example.com/credgate/credgate"

# (check id, kind, name) skipped by annotation, per scanned file. Generated
# ConfigMap names lose their hash suffix here.
NAMESPACE_SKIPS = {
    ("CKV_K8S_21", "ServiceAccount", "credgate"),
    ("CKV_K8S_21", "ConfigMap", "credgate-config"),
    ("CKV_K8S_21", "Service", "credgate"),
    ("CKV_K8S_21", "Deployment", "credgate"),
}
DIGEST_SKIP = ("CKV_K8S_43", "Deployment", "credgate")
EXPECTED_SKIPS = {
    # The base has no namespace (applied with -n) and a placeholder image.
    "base": NAMESPACE_SKIPS | {DIGEST_SKIP},
    # Overlays set the namespace and drop that skip: CKV_K8S_21 runs there.
    "cert-manager": {DIGEST_SKIP},
    "redis": {DIGEST_SKIP},
    "secretsmanager": {DIGEST_SKIP},
    # An operator's overlay that pins the digest and drops the skip: nothing skipped.
    "digest-pinned": set(),
}


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that records the first line of every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "<no request line>"
                self.requests.append(first)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def offline_env(home: Path, proxy_port: int) -> dict[str, str]:
    proxy = f"http://127.0.0.1:{proxy_port}"
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_COLOR": "1",
    }


def write_digest_pinned_overlay(root: Path) -> Path:
    """What docs/operations.md "Deploying" tells an operator to do: an overlay that pins the
    pushed image by digest, and so drops the base's CKV_K8S_43 skip."""
    overlay = root / "digest-pinned"
    overlay.mkdir()
    base = os.path.relpath(KUSTOMIZE_TREES["cert-manager"], overlay)
    (overlay / "kustomization.yaml").write_text(
        f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: {BASE_IMAGE}
    digest: {EXAMPLE_DIGEST}
patches:
  - target:
      kind: Deployment
      name: credgate
    patch: |-
      - op: remove
        path: /metadata/annotations/checkov.io~1skip2
"""
    )
    return overlay


def resource_key(check: dict[str, Any]) -> tuple[str, str, str]:
    """(check id, kind, name) of a result; checkov names resources KIND.NAMESPACE.NAME."""
    kind, _, rest = check["resource"].partition(".")
    _, _, name = rest.partition(".")
    name = re.sub(r"^(credgate-config)-[a-z0-9]{10}$", r"\1", name)
    return check["check_id"], kind, name


def scanned_file(check: dict[str, Any]) -> str:
    return Path(check["file_path"]).stem


@pytest.fixture(scope="session")
def checkov_scan(kubectl, tmp_path_factory) -> dict[str, Any]:
    if not CHECKOV.is_file():
        pytest.fail(f"no checkov at {CHECKOV}: pip install -r tests/deploy/requirements.txt")
    work = tmp_path_factory.mktemp("checkov")
    trees = dict(KUSTOMIZE_TREES)
    trees["base"] = DEPLOY / "kubernetes"  # the top-level tree DESIGN.md names (renders the base)
    trees["digest-pinned"] = write_digest_pinned_overlay(work)
    scan_dir = work / "scan"
    scan_dir.mkdir()
    files = []
    for name, tree in trees.items():
        out = scan_dir / f"{name}.yaml"
        proc = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0, f"kubectl kustomize {tree}:\n{proc.stderr.decode()}"
        out.write_bytes(proc.stdout)
        files += ["--file", str(out)]
    home = work / "home"
    home.mkdir()
    proxy = ConnectionCounter()
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(CHECKOV), *files, "--framework", "kubernetes", "--skip-download", "--output", "json"],
            cwd=scan_dir,
            env=offline_env(home, proxy.port),
            capture_output=True,
            text=True,
            timeout=SCAN_BUDGET_SECONDS * 2,
            check=False,
        )
    finally:
        elapsed = time.monotonic() - started
        proxy.close()
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    if isinstance(report, list):  # one report per framework; only kubernetes runs
        (report,) = report
    assert report["check_type"] == "kubernetes"
    return {
        "results": report["results"],
        "summary": report["summary"],
        "elapsed": elapsed,
        "network": proxy.requests,
        "files": set(trees),
    }


def test_scan_is_offline_fast_and_pinned(checkov_scan):
    assert checkov_scan["network"] == [], f"checkov tried to reach the network: {checkov_scan['network']}"
    assert checkov_scan["elapsed"] < SCAN_BUDGET_SECONDS, f"the scan took {checkov_scan['elapsed']:.0f}s"
    assert checkov_scan["summary"]["checkov_version"] == CHECKOV_VERSION, "tests/deploy/requirements.txt pins it"
    assert checkov_scan["summary"]["parsing_errors"] == 0


def test_no_failed_checks(checkov_scan):
    failed = checkov_scan["results"]["failed_checks"]
    lines = sorted(
        f"{c['check_id']} {c['check_name']}: {c['resource']} in {scanned_file(c)}.yaml" for c in failed
    )
    assert not lines, "checkov failed checks (fix the manifest, or skip in it with a reason):\n" + "\n".join(lines)


def test_every_tree_was_scanned(checkov_scan):
    passed = checkov_scan["results"]["passed_checks"]
    scanned = {scanned_file(c) for c in passed}
    assert scanned == checkov_scan["files"]
    for name in checkov_scan["files"]:
        ids = {c["check_id"] for c in passed if scanned_file(c) == name}
        # The pod-hardening checks ran on each Deployment (not merely parsed).
        assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_38", "CKV2_K8S_6"} <= ids, name


def test_skips_are_in_the_manifests_and_reviewed(checkov_scan):
    skipped = checkov_scan["results"]["skipped_checks"]
    actual: dict[str, set[tuple[str, str, str]]] = {name: set() for name in checkov_scan["files"]}
    for check in skipped:
        actual[scanned_file(check)].add(resource_key(check))
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 40 and reason != "No comment provided", (check["check_id"], reason)
    assert actual == EXPECTED_SKIPS


def test_namespace_and_digest_checks_pass_where_they_apply(checkov_scan):
    """The skips are about the base's placeholders only: with a namespace (every
    overlay) CKV_K8S_21 passes, and with a pinned digest CKV_K8S_43 passes."""
    passed = {(scanned_file(c), *resource_key(c)) for c in checkov_scan["results"]["passed_checks"]}
    for tree in ("cert-manager", "redis", "secretsmanager", "digest-pinned"):
        for check_id, kind, name in NAMESPACE_SKIPS:
            assert (tree, check_id, kind, name) in passed, (tree, check_id, kind)
    assert ("digest-pinned", *DIGEST_SKIP) in passed
    # imagePullPolicy: Always (CKV_K8S_15) and a fixed tag (CKV_K8S_14) everywhere.
    for tree in checkov_scan["files"]:
        assert (tree, "CKV_K8S_15", "Deployment", "credgate") in passed
        assert (tree, "CKV_K8S_14", "Deployment", "credgate") in passed
