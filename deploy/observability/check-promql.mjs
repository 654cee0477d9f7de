#!/usr/bin/env node
// Parses every PromQL expression of the alerting rules and the dashboard with
// Prometheus' own PromQL grammar (@prometheus-io/lezer-promql, the parser of
// the Prometheus UI), fails on any syntax error, and prints the metric names
// (and label matchers) each expression uses.
//
//   node deploy/observability/check-promql.mjs [--json] [FILE ...]
//
// FILEs: Prometheus rules files (groups:), PrometheusRule objects
// (spec.groups), Grafana dashboards (.json). Default: rules.yaml,
// prometheus-rule.yaml and dashboard.json beside this script.
// Grafana variables are replaced before parsing: $__rate_interval, $__interval
// and $__range by 5m, the dashboard's own variables by their current value;
// any other $variable is an error. Exit status 1 on any error.
// tests/deploy/test_observability.py runs it with --json and checks the names
// against metrics.json.
import { readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parser } from '@prometheus-io/lezer-promql';
import { parse as parseYaml } from 'yaml';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const json = args.includes('--json');
const files = args.filter((a) => a !== '--json');
if (files.length === 0) {
  files.push(...['rules.yaml', 'prometheus-rule.yaml', 'dashboard.json'].map((f) => join(here, f)));
}

const GRAFANA_INTERVALS = ['__rate_interval', '__interval', '__range'];

/** [{source, expr, vars}] from one file. */
function expressions(file) {
  const text = readFileSync(file, 'utf8');
  const out = [];
  if (file.endsWith('.json')) {
    const dash = JSON.parse(text);
    const vars = {};
    for (const v of dash.templating?.list ?? []) {
      if (v.type !== 'datasource') vars[v.name] = String(v.current?.value ?? v.query ?? '');
    }
    const walk = (panels, trail) => {
      for (const p of panels ?? []) {
        for (const t of p.targets ?? []) {
          if (t.expr !== undefined) {
            out.push({ source: `${basename(file)}: ${trail}${p.title} [${t.refId}]`, expr: t.expr, vars });
          }
        }
        walk(p.panels, `${trail}${p.title} / `);
      }
    };
    walk(dash.panels, '');
    return out;
  }
  const doc = parseYaml(text);
  const groups = doc.kind === 'PrometheusRule' ? doc.spec?.groups : doc.groups;
  if (!Array.isArray(groups)) throw new Error(`${file}: no rule groups`);
  for (const g of groups) {
    for (const r of g.rules ?? []) {
      const name = r.alert ?? r.record;
      out.push({ source: `${basename(file)}: ${g.name} / ${name}`, expr: String(r.expr), vars: {} });
    }
  }
  return out;
}

/** Replaces Grafana variables; returns [expr, errors]. */
function substitute(expr, vars) {
  const errors = [];
  const result = expr.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)/g, (match, braced, bare) => {
    const name = braced ?? bare;
    if (GRAFANA_INTERVALS.includes(name)) return '5m';
    if (name in vars) return vars[name];
    errors.push(`unknown Grafana variable ${match}`);
    return match;
  });
  return [result, errors];
}

const unquote = (s) => JSON.parse(s.startsWith("'") ? `"${s.slice(1, -1).replace(/"/g, '\\"')}"` : s.startsWith('`') ? JSON.stringify(s.slice(1, -1)) : s);

/** {errors, selectors: [{metric, matchers: [{label, op, value}]}]} of one expression. */
function analyse(expr) {
  const tree = parser.parse(expr);
  const errors = [];
  const selectors = [];
  const text = (n) => expr.slice(n.from, n.to);
  tree.iterate({
    enter(ref) {
      if (ref.type.isError) {
        errors.push(`syntax error at offset ${ref.from}: ${JSON.stringify(expr.slice(Math.max(0, ref.from - 20), ref.from + 20))}`);
      }
      if (ref.name !== 'VectorSelector') return;
      const node = ref.node;
      let metric = null;
      const matchers = [];
      for (let child = node.firstChild; child; child = child.nextSibling) {
        if (child.name === 'Identifier') metric = text(child);
        if (child.name !== 'LabelMatchers') continue;
        for (let m = child.firstChild; m; m = m.nextSibling) {
          if (m.name === 'QuotedLabelName') {
            metric = unquote(text(m)); // {"metric.name"}
          } else if (m.name === 'UnquotedLabelMatcher' || m.name === 'QuotedLabelMatcher') {
            const label = m.getChild('LabelName') ?? m.getChild('QuotedLabelName');
            const op = m.getChild('MatchOp');
            const value = m.getChild('StringLiteral');
            const labelName = label.name === 'QuotedLabelName' ? unquote(text(label)) : text(label);
            matchers.push({ label: labelName, op: text(op), value: unquote(text(value)) });
          }
        }
      }
      const nameMatcher = matchers.find((m) => m.label === '__name__');
      if (nameMatcher) {
        if (nameMatcher.op !== '=') errors.push(`metric name by ${nameMatcher.op} matcher: use a literal name`);
        metric = nameMatcher.value;
      }
      if (!metric) errors.push(`selector without a metric name: ${text(node)}`);
      selectors.push({ metric, matchers: matchers.filter((m) => m.label !== '__name__') });
    },
  });
  return { errors, selectors };
}

const results = [];
let failed = false;
for (const file of files) {
  let exprs;
  try {
    exprs = expressions(file);
  } catch (e) {
    results.push({ source: file, expr: '', metrics: [], selectors: [], errors: [String(e.message ?? e)] });
    failed = true;
    continue;
  }
  for (const { source, expr, vars } of exprs) {
    const [substituted, varErrors] = substitute(expr, vars);
    const { errors, selectors } = analyse(substituted);
    const all = [...varErrors, ...errors];
    if (all.length) failed = true;
    const metrics = [...new Set(selectors.map((s) => s.metric).filter(Boolean))].sort();
    results.push({ source, expr, metrics, selectors, errors: all });
  }
}

if (json) {
  process.stdout.write(JSON.stringify(results, null, 2) + '\n');
} else {
  for (const r of results) {
    const status = r.errors.length ? 'ERROR' : 'ok';
    process.stdout.write(`${status} ${r.source}: ${r.metrics.join(', ')}\n`);
    for (const e of r.errors) process.stdout.write(`      ${e}\n`);
  }
  process.stdout.write(`${results.length} expressions, ${results.filter((r) => r.errors.length).length} with errors\n`);
}
// exitCode, not exit(): exit() ends the process before a pipe has taken
// more than its 64 KiB buffer of the output above.
process.exitCode = failed ? 1 : 0;
