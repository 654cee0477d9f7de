"""deploy/observability: alert rules, dashboard and the metric list they rely on.

metrics.json is the single list of what credgate exports, by Prometheus name
(as an OpenTelemetry Collector's prometheus exporter writes it), plus the
external series the rules use. Every PromQL expression of the rules and the
dashboard is parsed with Prometheus' own grammar (check-promql.mjs, npm
@prometheus-io/lezer-promql) and may only use those names, their labels and,
for error_type, credgate's reasons. rules.yaml and prometheus-rule.yaml must
hold the same groups.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from deploy_support import OBSERVABILITY_DIR, REPO, unavailable

RULES = OBSERVABILITY_DIR / "rules.yaml"
PROMETHEUS_RULE = OBSERVABILITY_DIR / "prometheus-rule.yaml"
DASHBOARD = OBSERVABILITY_DIR / "dashboard.json"
METRICS = OBSERVABILITY_DIR / "metrics.json"
README = OBSERVABILITY_DIR / "README.md"
CHECKER = OBSERVABILITY_DIR / "check-promql.mjs"
SERVICE = "credgate.v1.PasswordService"
# Where runbook_url points (README.md "Alerts and runbooks": replace it with your copy's address).
RUNBOOK_BASE = "https://github.com/corp-example/credgate/blob/main/"
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"critical", "warning"}
PROM_DURATION = re.compile(r"^(\d+[smhdwy])+$")
# OTel unit -> Prometheus name suffix (the collector's default translation).
UNIT_SUFFIX = {"": "", "ms": "_milliseconds", "s": "_seconds", "By": "_bytes"}
# Labels the collector's prometheus exporter adds to every series, and PromQL's own.
EXPORTER_LABELS = {"job", "instance", "otel_scope_name", "otel_scope_version"}


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    return json.loads(METRICS.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def alerts(rules) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules if "alert" in r}


@pytest.fixture(scope="module")
def promql() -> list[dict[str, Any]]:
    """check-promql.mjs --json over the three files: every expression, parsed."""
    node = shutil.which("node")
    if not node:
        unavailable("node is not installed (scripts/test needs it for npm tools)")
    if not (REPO / "node_modules" / "@prometheus-io" / "lezer-promql").is_dir():
        unavailable("node_modules lacks @prometheus-io/lezer-promql: run `npm ci`")
    proc = subprocess.run(
        [node, str(CHECKER), "--json", str(RULES), str(PROMETHEUS_RULE), str(DASHBOARD)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    results = json.loads(proc.stdout) if proc.stdout.strip() else []
    errors = [f"{r['source']}: {e}" for r in results for e in r["errors"]]
    assert proc.returncode == 0 and not errors, "PromQL errors:\n" + "\n".join(errors) + proc.stderr
    return results


def series_index(metrics: dict[str, Any]) -> dict[str, set[str]]:
    """Prometheus series name -> the labels it may carry."""
    index: dict[str, set[str]] = {}
    for m in metrics["series"]:
        labels = {a["label"] for a in m["attributes"].values()} | EXPORTER_LABELS
        for name in m["prometheus_series"]:
            index[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    for ext in metrics["external"]:
        index[ext["name"]] = set(ext["labels"]) | {"job", "instance"}
    return index


# ------------------------------------------------------------- metrics.json


def test_metrics_json_follows_the_collectors_naming(metrics):
    for m in metrics["series"]:
        base = m["otel_name"].replace(".", "_") + UNIT_SUFFIX[m["unit"]]
        expected = {
            "counter": [f"{base}_total"],
            "gauge": [base],
            "histogram": [f"{base}_bucket", f"{base}_sum", f"{base}_count"],
        }[m["otel_type"]]
        assert m["prometheus_series"] == expected, m["otel_name"]
        assert m["prometheus_type"] == m["otel_type"]
        for attribute, spec in m["attributes"].items():
            assert spec["label"] == attribute.replace(".", "_"), attribute
    names = [n for m in metrics["series"] for n in m["prometheus_series"]] + [e["name"] for e in metrics["external"]]
    assert len(names) == len(set(names))


def test_metrics_json_lists_what_the_brief_names(metrics):
    otel = {m["otel_name"]: m for m in metrics["series"]}
    assert set(otel) == {
        "rpc.server.duration", "credgate.iam.outcomes", "credgate.limit.decisions",
        "credgate.idempotency.replays", "credgate.state.up", "credgate.state.errors",
        "credgate.state.duration", "credgate.state.lost_records",
        "credgate.tls.crl.expires_in", "credgate.keys.oldest_age", "credgate.keys.over_age",
        "credgate.keys.rotations",
    }  # fmt: skip
    # Keys: no per-user labels (DESIGN.md, "Telemetry").
    assert otel["credgate.keys.oldest_age"]["unit"] == "s"
    for name in ("credgate.keys.oldest_age", "credgate.keys.over_age"):
        assert otel[name]["attributes"] == {}, name
    assert set(otel["credgate.keys.rotations"]["attributes"]) == {"outcome"}
    assert otel["credgate.tls.crl.expires_in"]["unit"] == "s"
    assert {m for m, spec in otel.items() if spec.get("only_with_crl")} == {"credgate.tls.crl.expires_in"}
    assert "GetCallerIdentity" in otel["credgate.iam.outcomes"]["attributes"]["rpc.method"]["values"]
    rpc = otel["rpc.server.duration"]["attributes"]
    assert set(rpc) == {"rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code", "error.type"}
    assert rpc["rpc.service"]["values"] == [SERVICE]
    reasons = rpc["error.type"]
    assert set(reasons["values"]) == {r for cls in reasons["classes"].values() for r in cls}
    assert {m for m, spec in otel.items() if spec["only_with_state"]} == {
        "credgate.state.up", "credgate.state.errors", "credgate.state.duration",
        "credgate.state.lost_records",
    }  # fmt: skip
    assert {e["name"] for e in metrics["external"]} >= {
        "kube_pod_container_status_restarts_total",
        "kube_deployment_status_replicas_available",
    }


# -------------------------------------------------------------------- rules


def test_both_rule_files_hold_the_same_groups():
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert set(plain) == {"groups"}
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert set(operator) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(operator["spec"]) == {"groups"}
    assert operator["metadata"]["name"] == "credgate"
    assert operator["spec"]["groups"] == plain["groups"], (
        "prometheus-rule.yaml's spec.groups must equal rules.yaml's groups (indent rules.yaml by two spaces)"
    )


def test_rules_are_well_formed(rules, alerts):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    assert len(alerts) == len([r for r in rules if "alert" in r]), "alert names are unique"
    anchors = {
        "#" + re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", README.read_text(), re.M)
    }
    for rule in rules:
        assert set(rule) <= RULE_FIELDS, set(rule) - RULE_FIELDS
        assert ("alert" in rule) != ("record" in rule)
        if "for" in rule:
            assert PROM_DURATION.match(rule["for"]), rule["for"]
    for name, alert in alerts.items():
        assert re.fullmatch(r"Credgate[A-Z][A-Za-z0-9]+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert alert["labels"]["service"] == "credgate"
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook", "runbook_url"}, name
        assert annotations["summary"] and annotations["description"]
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == "deploy/observability/README.md" and f"#{anchor}" in anchors, annotations["runbook"]
        assert anchor == name.lower(), "one runbook section per alert, named after it"
        # The same section as a link Alertmanager and Grafana can follow.
        assert annotations["runbook_url"] == RUNBOOK_BASE + annotations["runbook"], annotations["runbook_url"]


def test_readme_documents_every_alert_with_its_severity(alerts):
    text = README.read_text()
    for name, alert in alerts.items():
        section = re.search(rf"^### {name}\n(.*?)(?=^### |\Z)", text, re.M | re.S)
        assert section, f"README.md has no runbook section for {name}"
        assert f"Severity **{alert['labels']['severity']}**" in section.group(1), name


REQUIRED = {
    # alert: what its expression must select
    "CredgateServerErrorRatioHigh": 'error_type!~"',
    "CredgateCallerErrorRatioHigh": 'error_type=~"PASSWORD_INVALID|',
    "CredgateOutcomeUnknown": 'error_type="OUTCOME_UNKNOWN"',
    "CredgateTooManyFailedAttempts": 'error_type="TOO_MANY_FAILED_ATTEMPTS"',
    "CredgateUpstreamCredentialsRejected": 'error_type=~"UPSTREAM_CREDENTIALS_REJECTED|IAM_USER_MISMATCH|IAM_USER_NOT_PROVISIONED"',
    "CredgateStateUnavailable": 'error_type="STATE_UNAVAILABLE"',
    "CredgateStateDown": "credgate_state_up == 0",
    "CredgateStateLostRecords": "credgate_state_lost_records_total",
    "CredgateLatencyHigh": "histogram_quantile(0.99",
    "CredgatePodRestarting": "kube_pod_container_status_restarts_total",
    "CredgateReplicasUnavailable": "kube_deployment_status_replicas_available",
    "CredgateIamUserNotProvisioned": 'error_type="IAM_USER_NOT_PROVISIONED"',
    "CredgateKeySourceUnavailable": 'error_type="KEY_SOURCE_UNAVAILABLE"',
    "CredgateKeyOverAge": "credgate_keys_over_age",
    "CredgateKeyRotationFailed": 'credgate_keys_rotations_total{outcome="failed"}',
}


def test_the_required_alerts_exist(alerts):
    for name, fragment in REQUIRED.items():
        assert name in alerts, name
        assert fragment in alerts[name]["expr"], (name, fragment)
    # p99 "near" the 10s request_timeout: above half of it, below it.
    threshold = float(re.search(r">\s*(\d+)\s*$", alerts["CredgateLatencyHigh"]["expr"].strip()).group(1))
    assert 5000 <= threshold < 10000


def test_error_classes_in_rules_match_metrics_json(alerts, metrics):
    classes = next(m for m in metrics["series"] if m["otel_name"] == "rpc.server.duration")["attributes"][
        "error.type"
    ]["classes"]
    caller = "|".join(classes["caller"])
    assert f'error_type!~"{caller}"' in alerts["CredgateServerErrorRatioHigh"]["expr"]
    assert f'error_type=~"{caller}"' in alerts["CredgateCallerErrorRatioHigh"]["expr"]
    dashboard = DASHBOARD.read_text()
    assert dashboard.count(caller) == 2, "the dashboard's class panel uses the same caller list"


# ----------------------------------------------------------- PromQL checks


def test_every_expression_was_parsed(promql, rules):
    sources = [r["source"] for r in promql]
    assert sum(s.startswith("rules.yaml:") for s in sources) == len(rules)
    assert sum(s.startswith("prometheus-rule.yaml:") for s in sources) == len(rules)
    panels, targets = list(json.loads(DASHBOARD.read_text())["panels"]), []
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        targets += [t for t in panel.get("targets", []) if "expr" in t]
    assert sum(s.startswith("dashboard.json:") for s in sources) == len(targets) > 0
    assert all(r["metrics"] for r in promql), "every expression reads some metric"


def test_expressions_use_only_known_metrics_and_labels(promql, metrics):
    index = series_index(metrics)
    rpc = next(m for m in metrics["series"] if m["otel_name"] == "rpc.server.duration")
    reasons = set(rpc["attributes"]["error.type"]["values"])
    problems = []
    for result in promql:
        for selector in result["selectors"]:
            metric = selector["metric"]
            if metric not in index:
                problems.append(f"{result['source']}: unknown metric {metric}")
                continue
            for m in selector["matchers"]:
                if m["label"] not in index[metric]:
                    problems.append(f"{result['source']}: {metric} has no label {m['label']}")
                if m["label"] == "error_type" and m["value"]:
                    values = m["value"].split("|") if m["op"] in ("=~", "!~") else [m["value"]]
                    unknown = [v for v in values if v not in reasons]
                    if unknown:
                        problems.append(f"{result['source']}: unknown error_type {unknown}")
    assert not problems, "\n".join(problems)


def test_credgate_rpc_metrics_are_selected_by_service_not_job(promql):
    for result in promql:
        for selector in result["selectors"]:
            labels = {m["label"]: m for m in selector["matchers"]}
            if result["source"].startswith("dashboard.json:"):
                # The dashboard's $job/$instance only narrow (regex, default all).
                for label in ("job", "instance"):
                    if label in labels:
                        assert labels[label]["op"] == "=~", result["source"]
            else:
                assert "job" not in labels, f"{result['source']}: select by rpc_service, not job"
            if selector["metric"].startswith("rpc_server_duration_"):
                assert labels.get("rpc_service") == {"label": "rpc_service", "op": "=", "value": SERVICE}, result[
                    "source"
                ]


def test_every_referenced_name_is_in_metrics_json(promql, metrics):
    known = {n for m in metrics["series"] for n in m["prometheus_series"]} | {e["name"] for e in metrics["external"]}
    used = {name for r in promql for name in r["metrics"]}
    assert used <= known, used - known
    # ... and every credgate metric is shown somewhere (dashboard or alerts).
    credgate = {m["prometheus_series"][0].removesuffix("_bucket") for m in metrics["series"]}
    shown = {u.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for u in used}
    assert {c.removesuffix("_bucket") for c in credgate} <= shown


# ---------------------------------------------------------------- dashboard


def test_dashboard_loads_with_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # One deployment or one replica (service.instance.id) at a time; all by default.
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["allValue"] == ".*", name
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert f", {name})" in variable["query"]["query"], variable["query"]
    ids = []
    panels = list(dash["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) > 0, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    assert len(ids) == len(set(ids))
    # No data source is baked in: nothing but the variable names one.
    assert '"uid": "${datasource}"' in DASHBOARD.read_text()
    assert not re.search(r'"uid": "(?!\$\{datasource\}|credgate")', DASHBOARD.read_text())


def test_every_credgate_panel_follows_the_job_and_instance_variables(promql):
    for result in promql:
        if not result["source"].startswith("dashboard.json:"):
            continue
        for selector in result["selectors"]:
            if not selector["metric"].startswith(("rpc_server_duration_", "credgate_")):
                continue
            labels = {m["label"] for m in selector["matchers"]}
            assert {"job", "instance"} <= labels, f"{result['source']}: {selector['metric']} ignores $job/$instance"
