"""The cert-manager objects, checked field by field.

kubernetes-validate has no schemas for CRDs, so the cert-manager.io/v1 kinds
are checked here against the fields cert-manager v1 defines (an unknown or
misspelt field fails, like a strict schema would) and against what credgate
needs: the Service's DNS names on the server certificate, exactly one SPIFFE
URI SAN on a client certificate, a Secret wired into the Deployment.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from deploy_support import CERT_MANAGER_DIR, only, pod_spec

CERTIFICATE_SPEC_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject",
    "uris", "usages",
}  # fmt: skip
PRIVATE_KEY_FIELDS = {"algorithm", "encoding", "rotationPolicy", "size"}
ISSUER_REF_FIELDS = {"name", "kind", "group"}
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}
CLUSTER_ISSUER = "credgate-ca-issuer"
NAMESPACE = "credgate"
SERVICE = "credgate"


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CERT_MANAGER_DIR / name).read_text()) if d]


def duration_hours(value: str) -> float:
    assert value.endswith("h") and value[:-1].isdigit(), f"use whole hours: {value}"
    return float(value[:-1])


def check_certificate(cert: dict[str, Any]) -> dict[str, Any]:
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert set(cert) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = cert["spec"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS, set(spec) - CERTIFICATE_SPEC_FIELDS
    assert spec["secretName"]
    assert set(spec["issuerRef"]) <= ISSUER_REF_FIELDS
    assert spec["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
    assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    assert set(spec.get("privateKey", {})) <= PRIVATE_KEY_FIELDS
    key = spec.get("privateKey", {})
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    assert key.get("rotationPolicy", "Always") in ("Always", "Never")
    assert set(spec.get("usages", [])) <= KEY_USAGES
    if "duration" in spec and "renewBefore" in spec:
        assert duration_hours(spec["renewBefore"]) < duration_hours(spec["duration"])
    for field in ("dnsNames", "uris", "ipAddresses", "emailAddresses"):
        assert isinstance(spec.get(field, []), list)
    return spec


@pytest.fixture
def overlay(rendered) -> list[dict[str, Any]]:
    return rendered["cert-manager"]


def test_server_certificate(overlay):
    cert = only(overlay, "Certificate")
    spec = check_certificate(cert)
    assert cert["metadata"]["namespace"] == NAMESPACE
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": CLUSTER_ISSUER}
    service = only(overlay, "Service")
    assert service["metadata"]["name"] == SERVICE
    assert spec["dnsNames"] == [
        SERVICE,
        f"{SERVICE}.{NAMESPACE}",
        f"{SERVICE}.{NAMESPACE}.svc",
        f"{SERVICE}.{NAMESPACE}.svc.cluster.local",
    ]
    assert "server auth" in spec["usages"]
    assert "client auth" not in spec["usages"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert not spec.get("isCA", False)
    # Its own SPIFFE identity: exactly one URI SAN.
    assert len(spec["uris"]) == 1 and spec["uris"][0].startswith("spiffe://")


def test_server_secret_is_wired_into_the_deployment(overlay, rendered):
    secret = only(overlay, "Certificate")["spec"]["secretName"]
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == secret
    # The patch changes only that: the base's Secret name is a different, documented one.
    base_volumes = {v["name"]: v for v in pod_spec(rendered["base"])["volumes"]}
    assert base_volumes["tls"]["secret"]["secretName"] == "credgate-tls"
    assert "items" not in volumes["tls"]["secret"], "all of tls.crt, tls.key, ca.crt are mounted"
    assert volumes["aws"] == base_volumes["aws"]


def test_example_client_certificate():
    client = only(load("client-certificate.example.yaml"), "Certificate")
    spec = check_certificate(client)
    assert client["metadata"]["namespace"] != NAMESPACE, "it lives in the caller's namespace"
    assert spec["issuerRef"]["name"] == CLUSTER_ISSUER, "signed by the CA credgate trusts"
    assert spec["issuerRef"]["kind"] == "ClusterIssuer"
    assert len(spec["uris"]) == 1, "credgate rejects a certificate with several URI SANs"
    assert spec["uris"][0].startswith("spiffe://")
    assert "client auth" in spec["usages"]
    assert "server auth" not in spec["usages"]
    assert not spec.get("dnsNames") and not spec.get("commonName")


def test_cluster_issuer_example():
    docs = load("cluster-issuer.example.yaml")
    # The bootstrap's own approver-policy objects: test_approver_policy.py.
    docs = [d for d in docs if not d["apiVersion"].startswith(("policy.cert-manager.io/", "rbac."))]
    for doc in docs:
        assert doc["apiVersion"] == "cert-manager.io/v1"
        if doc["kind"] == "Certificate":
            check_certificate(doc)
        else:
            assert doc["kind"] == "ClusterIssuer"
            assert "namespace" not in doc["metadata"], "cluster-scoped"
            assert len(set(doc["spec"]) & ISSUER_TYPES) == 1 and set(doc["spec"]) <= ISSUER_TYPES
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterIssuer"}
    ca_issuer = issuers[CLUSTER_ISSUER]
    ca_cert = only(docs, "Certificate")
    assert ca_cert["spec"]["isCA"] is True
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert ca_cert["spec"]["issuerRef"]["name"] in issuers
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]
