"""The IAM policies shipped in deploy/aws: linted with parliament (zero findings
beyond the accepted ones, each justified in deploy/aws/parliament-findings.json),
and scoped as docs/security.md says: credgate's own role reaches the secrets under
keys.secret_name's prefix only, and each managed IAM user acts on itself only.

That they are also enough is shown by the integration tests, which run credgate's
own identity and the managed users with exactly these documents against the IAM
emulator (tests/integration/custody.rs)."""

from __future__ import annotations

import copy
import json
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

from deploy_support import DEPLOY, KUSTOMIZE_TREES

with warnings.catch_warnings():
    # parliament 1.6.4 loads its data with pkg_resources (setuptools pinned below 81).
    warnings.simplefilter("ignore", UserWarning)
    from parliament import analyze_policy_string

AWS = DEPLOY / "aws"
POLICIES = sorted(AWS.glob("*-policy*.json"))
USER_RESOURCE = "arn:aws:iam::*:user/${aws:username}"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def findings(document: dict[str, Any]) -> set[tuple[str, tuple[str, ...]]]:
    """(issue, sorted actions) of every finding, community auditors included."""
    policy = analyze_policy_string(json.dumps(document), include_community_auditors=True)
    out = set()
    for finding in policy.findings:
        location = finding.location if isinstance(finding.location, dict) else {}
        actions = location.get("actions") or (finding.detail if isinstance(finding.detail, list) else [])
        out.add((finding.issue, tuple(sorted(a.lower() for a in actions))))
    return out


def accepted() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    by_file: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for entry in load(AWS / "parliament-findings.json")["accepted"]:
        assert len(entry["why"]) > 60, f"{entry['issue']}: say why it is accepted"
        by_file.setdefault(entry["file"], set()).add((entry["issue"], tuple(sorted(entry["actions"]))))
    return by_file


def test_the_shipped_policies_are_the_three_documented_ones():
    assert [p.name for p in POLICIES] == [
        "credgate-role-policy.json",
        "managed-user-policy-profiles.json",
        "managed-user-policy.json",
    ]


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_parliament_finds_nothing_that_is_not_justified(path):
    found = findings(load(path))
    assert found == accepted().get(path.name, set()), (
        f"{path.name}: parliament's findings differ from the justified ones in "
        f"parliament-findings.json (an unjustified finding, or a stale justification): {sorted(found)}"
    )


def test_the_lint_would_catch_a_broadened_policy():
    document = load(AWS / "credgate-role-policy.json")
    broad = copy.deepcopy(document)
    broad["Statement"][0]["Resource"] = "*"
    assert any(issue == "RESOURCE_STAR" for issue, _ in findings(broad))
    writes = copy.deepcopy(document)
    writes["Statement"][0]["Action"].append("secretsmanager:PutResourcePolicy")
    assert any(issue == "PERMISSIONS_MANAGEMENT_ACTIONS" for issue, _ in findings(writes))


def test_credgates_role_reaches_only_the_secrets_under_its_prefix():
    statements = load(AWS / "credgate-role-policy.json")["Statement"]
    assert all(s["Effect"] == "Allow" and "Condition" not in s for s in statements)
    scoped, listing = statements
    assert sorted(scoped["Action"]) == [
        "secretsmanager:GetSecretValue",
        "secretsmanager:ListSecretVersionIds",
        "secretsmanager:PutSecretValue",
        "secretsmanager:UpdateSecretVersionStage",
    ]
    assert scoped["Resource"] == "arn:aws:secretsmanager:*:*:secret:credgate/*"
    # ListSecrets supports no resource-level permission: "*" is the only
    # resource it can have (its name filter is credgate's own, see the Sid).
    assert (listing["Action"], listing["Resource"]) == ("secretsmanager:ListSecrets", "*")


def test_the_role_policys_prefix_is_the_secret_name_the_overlay_configures():
    config = tomllib.loads((KUSTOMIZE_TREES["secretsmanager"] / "credgate.toml").read_text())
    template = config["keys"].get("secret_name", "credgate/{iam_user}")
    prefix = template.split("{iam_user}")[0]
    resource = load(AWS / "credgate-role-policy.json")["Statement"][0]["Resource"]
    assert resource == f"arn:aws:secretsmanager:*:*:secret:{prefix}*"


@pytest.mark.parametrize(
    ("name", "key_actions"),
    [
        (
            "managed-user-policy.json",
            ["iam:CreateAccessKey", "iam:DeleteAccessKey", "iam:GetAccessKeyLastUsed", "iam:ListAccessKeys", "iam:UpdateAccessKey"],
        ),
        ("managed-user-policy-profiles.json", ["iam:GetAccessKeyLastUsed", "iam:ListAccessKeys"]),
    ],
)
def test_a_managed_user_acts_on_itself_only(name, key_actions):
    statements = load(AWS / name)["Statement"]
    own, policy = statements
    assert own["Resource"] == USER_RESOURCE
    assert sorted(own["Action"]) == sorted(["iam:ChangePassword", "iam:GetUser", *key_actions])
    # The account password policy is account-wide: no resource to scope it to.
    assert (policy["Action"], policy["Resource"]) == ("iam:GetAccountPasswordPolicy", "*")
