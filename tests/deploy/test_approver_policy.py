"""approver-policy: who may obtain which certificate from credgate's CA.

credgate trusts every certificate `credgate-ca-issuer` signs and maps a
client certificate's SPIFFE ID to an IAM user, so issuance is the
authorization boundary. overlays/cert-manager/approver-policy.yaml ships
CertificateRequestPolicies (policy.cert-manager.io/v1alpha1) that bind a
SPIFFE ID to the requesting namespace, and RBAC that lets the cert-manager
controller use them; cluster-issuer.example.yaml has one for its CA bootstrap.

No CRD schema is available offline, so the objects are checked field by field
against the v1alpha1 API (approver-policy's pkg/apis/policy/v1alpha1 types:
spec.allowed/constraints/selector/plugins, ...). Their intent is then checked
on example CertificateRequests with a model of approver-policy's evaluation
(selection by issuerRef and namespace, RBAC `use` binding, `allowed` with its
`*` wildcards and CEL validations, `constraints`; approved when one bound,
selected policy permits the request) in which the CEL rules run in a real CEL
evaluator (cel-python, with `self` = the value and `cr` = {namespace, name},
as approver-policy binds them) against real CSRs built with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from deploy_support import CERT_MANAGER_DIR, only
from test_cert_manager import KEY_USAGES

GROUP = "policy.cert-manager.io"
API_VERSION = f"{GROUP}/v1alpha1"
CERT_MANAGER_SA = "system:serviceaccount:cert-manager:cert-manager"
TRUST_DOMAIN = "corp.example"
CA_ISSUER = {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "credgate-ca-issuer"}

# CertificateRequestPolicy v1alpha1 fields (approver-policy API types).
SPEC_FIELDS = {"allowed", "constraints", "plugins", "selector"}
ALLOWED_FIELDS = {
    "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses", "isCA", "usages", "subject",
    "otherNames",
}  # fmt: skip
ALLOWED_STRING_FIELDS = {"value", "required", "validations"}
ALLOWED_SLICE_FIELDS = {"values", "required", "validations"}
VALIDATION_FIELDS = {"rule", "message"}
CONSTRAINTS_FIELDS = {"minDuration", "maxDuration", "privateKey"}
PRIVATE_KEY_CONSTRAINT_FIELDS = {"algorithm", "minSize", "maxSize"}
SELECTOR_FIELDS = {"issuerRef", "namespace"}
ISSUER_REF_SELECTOR_FIELDS = {"name", "kind", "group"}
NAMESPACE_SELECTOR_FIELDS = {"matchNames", "matchLabels"}
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CERT_MANAGER_DIR / name).read_text()) if d]


def hours(duration: str) -> float:
    match = GO_DURATION.match(duration)
    assert match and duration, f"not a whole h/m/s Go duration: {duration!r}"
    scale = {"h": 1, "m": 1 / 60, "s": 1 / 3600}
    return sum(float(part[:-1]) * scale[part[-1]] for part in match.groups() if part)


@pytest.fixture(params=["cert-manager", "redis"])
def overlay(request, rendered) -> list[dict[str, Any]]:
    return rendered[request.param]


@pytest.fixture(scope="module")
def policies(rendered) -> dict[str, dict[str, Any]]:
    """Every CertificateRequestPolicy shipped: the overlay's and the CA bootstrap's."""
    docs = [o for o in rendered["cert-manager"] if o["kind"] == "CertificateRequestPolicy"]
    docs += [d for d in load("cluster-issuer.example.yaml") if d["kind"] == "CertificateRequestPolicy"]
    return {d["metadata"]["name"]: d for d in docs}


@pytest.fixture(scope="module")
def bindings(rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ClusterRole, ClusterRoleBinding) pairs shipped with the policies."""
    docs = rendered["cert-manager"] + load("cluster-issuer.example.yaml")
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    return [(roles[b["roleRef"]["name"]], b) for b in docs if b["kind"] == "ClusterRoleBinding"]


# --------------------------------------------------------------- the objects


def check_validations(validations: list[dict[str, Any]]) -> None:
    assert isinstance(validations, list)
    for v in validations:
        assert set(v) <= VALIDATION_FIELDS and v["rule"], v
        assert "\n" not in v.get("message", ""), "messages must be one line"
        assert v.get("message"), f"give each rule a message: {v['rule']}"
        compile_rule(v["rule"])


def check_policy(policy: dict[str, Any]) -> dict[str, Any]:
    assert policy["apiVersion"] == API_VERSION
    assert policy["kind"] == "CertificateRequestPolicy"
    assert set(policy) <= {"apiVersion", "kind", "metadata", "spec"}
    assert "namespace" not in policy["metadata"], "CertificateRequestPolicy is cluster-scoped"
    spec = policy["spec"]
    assert set(spec) <= SPEC_FIELDS and "selector" in spec, set(spec) - SPEC_FIELDS
    assert "plugins" not in spec, "no plugins are installed with approver-policy by default"

    selector = spec["selector"]
    assert set(selector) <= SELECTOR_FIELDS and selector, selector
    assert set(selector.get("issuerRef", {})) <= ISSUER_REF_SELECTOR_FIELDS
    # Exact issuers only: a wildcard here would reach other teams' issuers.
    assert "*" not in "".join(selector["issuerRef"].values()) and len(selector["issuerRef"]) == 3
    namespace = selector.get("namespace", {})
    assert set(namespace) <= NAMESPACE_SELECTOR_FIELDS
    assert all("*" not in n for n in namespace.get("matchNames", []))

    allowed = spec["allowed"]
    assert set(allowed) <= ALLOWED_FIELDS, set(allowed) - ALLOWED_FIELDS
    for name in ("commonName",):
        if name in allowed:
            assert set(allowed[name]) <= ALLOWED_STRING_FIELDS
            check_validations(allowed[name].get("validations", []))
    for name in ("dnsNames", "ipAddresses", "uris", "emailAddresses"):
        if name in allowed:
            assert set(allowed[name]) <= ALLOWED_SLICE_FIELDS
            assert isinstance(allowed[name].get("values", []), list)
            check_validations(allowed[name].get("validations", []))
    assert isinstance(allowed.get("isCA", False), bool)
    assert set(allowed["usages"]) <= KEY_USAGES, set(allowed["usages"]) - KEY_USAGES

    constraints = spec["constraints"]
    assert set(constraints) <= CONSTRAINTS_FIELDS
    # Bounded lifetime, always.
    assert 0 < hours(constraints["minDuration"]) <= hours(constraints["maxDuration"])
    key = constraints["privateKey"]
    assert set(key) <= PRIVATE_KEY_CONSTRAINT_FIELDS
    assert key["algorithm"] in ("RSA", "ECDSA", "Ed25519")
    return spec


def test_every_policy_is_well_formed(policies):
    assert set(policies) == {"credgate-client-certificates", "credgate-server-certificate", "credgate-ca-bootstrap"}
    for policy in policies.values():
        check_policy(policy)


def test_client_policy(policies):
    spec = check_policy(policies["credgate-client-certificates"])
    assert spec["selector"] == {"issuerRef": CA_ISSUER}, "every namespace, credgate's CA only"
    allowed = spec["allowed"]
    # Nothing but a SPIFFE URI SAN: no DNS/IP/email SANs, no subject, no CA.
    assert set(allowed) == {"uris", "usages", "isCA"}
    assert allowed["isCA"] is False
    assert "client auth" in allowed["usages"] and "server auth" not in allowed["usages"]
    assert not {"cert sign", "crl sign", "any"} & set(allowed["usages"])
    uris = allowed["uris"]
    assert uris["required"] is True
    assert uris["values"] == [f"spiffe://{TRUST_DOMAIN}/ns/*/sa/*"]
    rules = [v["rule"] for v in uris["validations"]]
    assert f"self.startsWith('spiffe://{TRUST_DOMAIN}/ns/' + cr.namespace + '/')" in rules
    # The example client certificate fits the bounds.
    client = only(load("client-certificate.example.yaml"), "Certificate")["spec"]
    assert hours(spec["constraints"]["minDuration"]) <= hours(client["duration"]) <= hours(
        spec["constraints"]["maxDuration"]
    )
    assert hours(spec["constraints"]["maxDuration"]) <= 24 * 90


def test_server_policy(policies, overlay):
    spec = check_policy(policies["credgate-server-certificate"])
    namespace = only(overlay, "Namespace")["metadata"]["name"]
    assert spec["selector"] == {"issuerRef": CA_ISSUER, "namespace": {"matchNames": [namespace]}}
    server = only(overlay, "Certificate")["spec"]
    allowed = spec["allowed"]
    assert set(allowed) == {"dnsNames", "uris", "usages", "isCA"}
    # Exactly the server's own names: no wildcards, no validations to loosen them.
    assert allowed["dnsNames"] == {"required": True, "values": server["dnsNames"]}
    assert allowed["uris"] == {"values": server["uris"]}
    assert allowed["isCA"] is False
    assert "server auth" in allowed["usages"] and "client auth" not in allowed["usages"]
    assert set(server["usages"]) <= set(allowed["usages"])
    assert hours(server["duration"]) <= hours(spec["constraints"]["maxDuration"])


def test_ca_bootstrap_policy(policies):
    spec = check_policy(policies["credgate-ca-bootstrap"])
    docs = load("cluster-issuer.example.yaml")
    ca = only(docs, "Certificate")
    assert spec["selector"] == {
        "issuerRef": ca["spec"]["issuerRef"],
        "namespace": {"matchNames": [ca["metadata"]["namespace"]]},
    }
    assert ca["spec"]["issuerRef"]["name"] != CA_ISSUER["name"], "isCA only from the bootstrap issuer"
    assert spec["allowed"]["isCA"] is True
    assert spec["allowed"]["commonName"] == {"required": True, "value": ca["spec"]["commonName"]}
    assert set(spec["allowed"]) == {"commonName", "isCA", "usages"}


def test_rbac_lets_only_the_cert_manager_controller_use_the_policies(policies, bindings, overlay):
    used: set[str] = set()
    for role, binding in bindings:
        assert role["rules"] == [
            {
                "apiGroups": [GROUP],
                "resources": ["certificaterequestpolicies"],
                "verbs": ["use"],
                "resourceNames": role["rules"][0]["resourceNames"],
            }
        ], "verb `use` on named policies, nothing else"
        used |= set(role["rules"][0]["resourceNames"])
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        }
        # The cert-manager controller creates the CertificateRequests of
        # Certificates; nobody else (not system:authenticated) is bound.
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cert-manager", "namespace": "cert-manager"}]
    assert used == set(policies)
    # The overlay renders its own two with their RBAC, cluster-scoped.
    rendered_names = {o["metadata"]["name"] for o in overlay if o["kind"] == "CertificateRequestPolicy"}
    assert rendered_names == {"credgate-client-certificates", "credgate-server-certificate"}
    role = only(overlay, "ClusterRole")
    assert set(role["rules"][0]["resourceNames"]) == rendered_names
    assert only(overlay, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]


# -------------------------------------------------- evaluating the intent

_CEL = celpy.Environment()


def compile_rule(rule: str):
    return _CEL.program(_CEL.compile(rule))


def cel_validate(rule: str, value: str, namespace: str, name: str) -> bool:
    result = compile_rule(rule).evaluate(
        {
            "self": celtypes.StringType(value),
            "cr": celtypes.MapType(
                {celtypes.StringType("namespace"): celtypes.StringType(namespace),
                 celtypes.StringType("name"): celtypes.StringType(name)}
            ),
        }
    )  # fmt: skip
    assert isinstance(result, celtypes.BoolType), f"{rule} must evaluate to a bool, got {result!r}"
    return bool(result)


def wildcard(pattern: str, value: str) -> bool:
    """approver-policy's util.WildcardMatches: `*` matches any run of characters."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), value, re.DOTALL) is not None


@dataclass
class Request:
    """A cert-manager CertificateRequest, with the CSR built for real."""

    namespace: str
    uris: list[str] = field(default_factory=list)
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    common_name: str = ""
    usages: list[str] = field(default_factory=lambda: ["digital signature", "client auth"])
    is_ca: bool = False
    duration: str | None = "720h"
    key: tuple[str, int] = ("ECDSA", 256)
    issuer: dict[str, str] = field(default_factory=lambda: dict(CA_ISSUER))
    username: str = CERT_MANAGER_SA
    name: str = "request-1"

    def csr(self) -> x509.CertificateSigningRequest:
        algorithm, size = self.key
        if algorithm == "RSA":
            private = rsa.generate_private_key(public_exponent=65537, key_size=size)
        elif algorithm == "ECDSA":
            private = ec.generate_private_key({256: ec.SECP256R1(), 384: ec.SECP384R1()}[size])
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.common_name)] if self.common_name else [])
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns_names]
        sans += [x509.UniformResourceIdentifier(u) for u in self.uris]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(private, None if algorithm == "Ed25519" else hashes.SHA256())


def from_certificate(cert: dict[str, Any]) -> Request:
    """The CertificateRequest the cert-manager controller makes for a Certificate."""
    spec = cert["spec"]
    key = spec.get("privateKey", {})
    algorithm = key.get("algorithm", "RSA")
    return Request(
        namespace=cert["metadata"]["namespace"],
        uris=spec.get("uris", []),
        dns_names=spec.get("dnsNames", []),
        common_name=spec.get("commonName", ""),
        usages=spec.get("usages", []),
        is_ca=spec.get("isCA", False),
        duration=spec.get("duration", "2160h"),
        key=(algorithm, key.get("size", {"RSA": 2048, "ECDSA": 256, "Ed25519": 0}[algorithm])),
        issuer={"group": "cert-manager.io", "kind": "Issuer", **spec["issuerRef"]},
    )


def denials(policy: dict[str, Any], req: Request) -> list[str]:
    """Why `policy` does not permit `req` (empty: it permits it)."""
    spec, csr = policy["spec"], req.csr()
    allowed, out = spec.get("allowed", {}), []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]

    def run(name: str, values: list[str], crp: dict[str, Any] | None, single: bool) -> None:
        if not values:
            if crp and crp.get("required"):
                out.append(f"{name}: required")
            return
        patterns = [crp["value"]] if crp and single and "value" in crp else (crp or {}).get("values")
        if crp is None or (patterns is None and not crp.get("validations")):
            out.append(f"{name}: no allowed values for {values}")
            return
        for value in values:
            if patterns is not None and not any(wildcard(p, value) for p in patterns):
                out.append(f"{name}: {value} not in {patterns}")
            for v in crp.get("validations", []):
                if not cel_validate(v["rule"], value, req.namespace, req.name):
                    out.append(f"{name}: {value}: {v['message']}")

    run("commonName", cns, allowed.get("commonName"), single=True)
    run("dnsNames", san.get_values_for_type(x509.DNSName), allowed.get("dnsNames"), single=False)
    run("ipAddresses", [str(i) for i in san.get_values_for_type(x509.IPAddress)], allowed.get("ipAddresses"), False)
    run("uris", san.get_values_for_type(x509.UniformResourceIdentifier), allowed.get("uris"), single=False)
    run("emailAddresses", san.get_values_for_type(x509.RFC822Name), allowed.get("emailAddresses"), False)
    if req.is_ca and not allowed.get("isCA"):
        out.append("isCA: not allowed")
    if req.usages:
        permitted = allowed.get("usages")
        if permitted is None or not all(any(wildcard(p, u) for p in permitted) for u in req.usages):
            out.append(f"usages: {req.usages} not within {permitted}")

    constraints = spec.get("constraints", {})
    for bound, ok in (("maxDuration", lambda d, b: d <= b), ("minDuration", lambda d, b: d >= b)):
        if bound in constraints and (req.duration is None or not ok(hours(req.duration), hours(constraints[bound]))):
            out.append(f"{bound}: {req.duration} vs {constraints[bound]}")
    key = constraints.get("privateKey")
    if key:
        public = csr.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            algorithm, size = "RSA", public.key_size
        elif isinstance(public, ec.EllipticCurvePublicKey):
            algorithm, size = "ECDSA", public.curve.key_size
        else:
            algorithm, size = "Ed25519", -1
        if "algorithm" in key and key["algorithm"] != algorithm:
            out.append(f"privateKey.algorithm: {algorithm}")
        if "minSize" in key and size < key["minSize"]:
            out.append(f"privateKey.minSize: {size}")
        if "maxSize" in key and size > key["maxSize"]:
            out.append(f"privateKey.maxSize: {size}")
    return out


def selects(policy: dict[str, Any], req: Request) -> bool:
    selector = policy["spec"]["selector"]
    issuer = selector.get("issuerRef", {})
    if not all(wildcard(issuer[k], req.issuer.get(k, "")) for k in issuer):
        return False
    names = selector.get("namespace", {}).get("matchNames")
    return names is None or any(wildcard(n, req.namespace) for n in names)


def bound(policy_name: str, req: Request, bindings) -> bool:
    """RBAC: may the request's creator `use` the policy (a SubjectAccessReview)?"""
    for role, binding in bindings:
        if policy_name in role["rules"][0]["resourceNames"]:
            for s in binding["subjects"]:
                if s["kind"] == "ServiceAccount" and req.username == f"system:serviceaccount:{s['namespace']}:{s['name']}":
                    return True
    return False


def decide(policies, bindings, req: Request) -> tuple[str, dict[str, list[str]]]:
    """approved | denied | unprocessed (no policy applies: cert-manager never signs it)."""
    applicable = {n: p for n, p in policies.items() if bound(n, req, bindings) and selects(p, req)}
    if not applicable:
        return "unprocessed", {}
    reasons = {n: denials(p, req) for n, p in applicable.items()}
    return ("approved" if any(not r for r in reasons.values()) else "denied"), reasons


def test_the_shipped_certificates_are_approved(policies, bindings, rendered):
    server = only(rendered["cert-manager"], "Certificate")
    client = only(load("client-certificate.example.yaml"), "Certificate")
    ca = only(load("cluster-issuer.example.yaml"), "Certificate")
    for cert in (server, client, ca):
        verdict, reasons = decide(policies, bindings, from_certificate(cert))
        assert verdict == "approved", (cert["metadata"]["name"], reasons)


def portal(**changes) -> Request:
    """The example caller's request (namespace portal), with some changes."""
    changes.setdefault("uris", [f"spiffe://{TRUST_DOMAIN}/ns/portal/sa/portal"])
    return Request(namespace="portal", **changes)


SPIFFE = f"spiffe://{TRUST_DOMAIN}"
CASES = {
    # What the policy is for: a namespace gets SPIFFE IDs of its own namespace.
    "own namespace": (portal(), "approved"),
    "own namespace, other service account": (portal(uris=[f"{SPIFFE}/ns/portal/sa/batch"]), "approved"),
    "another namespace's identity": (Request("evil", uris=[f"{SPIFFE}/ns/portal/sa/portal"]), "denied"),
    "a namespace whose name extends yours": (portal(uris=[f"{SPIFFE}/ns/portal-admin/sa/x"]), "denied"),
    "yours as a prefix of a longer ID": (portal(uris=[f"{SPIFFE}/ns/portal/sa/portal/../../billing"]), "denied"),
    "two IDs, one foreign": (portal(uris=[f"{SPIFFE}/ns/portal/sa/portal", f"{SPIFFE}/ns/billing/sa/b"]), "denied"),
    "another trust domain": (portal(uris=["spiffe://evil.example/ns/portal/sa/portal"]), "denied"),
    "not SPIFFE": (portal(uris=["https://corp.example/ns/portal/sa/portal"]), "denied"),
    "no URI at all": (Request("portal", dns_names=["portal.portal.svc"]), "denied"),
    # Never a CA, never a server certificate, nothing but the URI SAN.
    "isCA": (portal(is_ca=True, usages=["cert sign", "digital signature"]), "denied"),
    "server auth": (portal(usages=["digital signature", "server auth"]), "denied"),
    "a DNS name too": (portal(dns_names=["credgate.credgate.svc"]), "denied"),
    "an IP address too": (portal(ip_addresses=["10.0.0.1"]), "denied"),
    "a common name too": (portal(common_name="portal-svc"), "denied"),
    # Bounded lifetime and key.
    "a year": (portal(duration="8760h"), "denied"),
    "ten minutes": (portal(duration="10m"), "denied"),
    "RSA": (portal(key=("RSA", 2048)), "denied"),
    # credgate's server certificate: only its own names, only in its namespace.
    "server names from a caller's namespace": (
        Request("portal", dns_names=["credgate.credgate.svc"], usages=["digital signature", "server auth"]),
        "denied",
    ),
    "server names in credgate's namespace": (
        Request(
            "credgate",
            dns_names=["credgate.credgate.svc"],
            uris=[f"{SPIFFE}/ns/credgate/sa/credgate"],
            usages=["digital signature", "server auth"],
            duration="2160h",
        ),
        "approved",
    ),
    "another DNS name in credgate's namespace": (
        Request("credgate", dns_names=["iam.amazonaws.com"], usages=["server auth"], duration="2160h"),
        "denied",
    ),
    "a server certificate that is a CA": (
        Request("credgate", dns_names=["credgate"], usages=["server auth", "cert sign"], is_ca=True, duration="2160h"),
        "denied",
    ),
    # Outside the policies' reach: left for other policies (none here).
    "another issuer": (portal(issuer={"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "other"}), "unprocessed"),
    "a request made by hand, not by cert-manager": (portal(username="system:serviceaccount:portal:portal"), "unprocessed"),
    "isCA from the bootstrap issuer outside cert-manager's namespace": (
        Request(
            "portal",
            common_name="credgate-ca",
            usages=[],
            is_ca=True,
            duration="87600h",
            issuer={"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "credgate-selfsigned-bootstrap"},
        ),
        "unprocessed",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_intent(policies, bindings, case):
    req, expected = CASES[case]
    verdict, reasons = decide(policies, bindings, req)
    assert verdict == expected, reasons


def test_the_namespace_rule_is_what_denies_foreign_identities(policies):
    """Without the cr.namespace validation, the wildcard alone would approve
    another namespace's SPIFFE ID: the CEL rule carries the protection."""
    loose = yaml.safe_load(yaml.safe_dump(policies["credgate-client-certificates"]))
    loose["spec"]["allowed"]["uris"].pop("validations")
    assert denials(loose, Request("evil", uris=[f"{SPIFFE}/ns/portal/sa/portal"])) == []
    assert denials(policies["credgate-client-certificates"], Request("evil", uris=[f"{SPIFFE}/ns/portal/sa/portal"]))


def test_cel_sees_the_requests_namespace_and_name():
    assert cel_validate("cr.namespace == 'portal' && cr.name == 'r'", "x", "portal", "r")
    assert not cel_validate("self.startsWith('a')", "b", "portal", "r")
    with pytest.raises(Exception):
        compile_rule("self.startsWith(")
