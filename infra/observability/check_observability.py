#!/usr/bin/env python3
"""check_observability.py — keeps infra/observability in step with the services' code.

Run by infra/check.sh with the venv's Python (promql-parser, PyYAML) and Debian's promtool:
  check_observability.py --repo ROOT --promtool PATH

It checks, and exits 1 naming every problem:
- the metric catalogue: every `counter!`/`gauge!`/`histogram!` in services/*/src, with names given as
  literals or as `const NAME: &str = "..."` constants of the same crate;
- prometheus.yml: `promtool check config`; one job per service whose code serves Prometheus metrics,
  on the port its deploy manifest opens;
- cocoon-rules.yml: `promtool check rules` and `promtool test rules cocoon-rules.test.yml`;
- cocoon-dashboard.json: valid JSON and Grafana structure (unique ids, grid, datasources, the six topics
  of issue 8), every PromQL expression parsed by Prometheus's own parser (promtool) and by promql-parser,
  every SQL query naming only tables and columns the migrations create;
- every PromQL expression (dashboard, rules, prometheus-adapter.yaml) selecting only series the catalogue
  produces: counters and gauges by name, histograms as name_bucket/_sum/_count when the crate sets
  buckets, otherwise as summaries (name{quantile=...}, _sum, _count), plus Prometheus's own `up`;
- prometheus-adapter.yaml serves every external metric an HPA in infra/deploy names.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import promql_parser
import yaml

# The services of the pool (BRIEF.md). `cocoon` is the operator CLI, not a long-running service.
SERVICES = ["projector", "allocator", "attestor", "settler", "api", "node-agent"]
# Series Prometheus makes itself for every target.
BUILTIN_SERIES = {"up"}
# Grafana's interval variables, replaced by a duration before parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# The issue's topics: each must be the title of a dashboard row (case-insensitive substring).
DASHBOARD_TOPICS = ["throughput", "latency", "lag", "queue depth", "gpu utilization", "payouts"]

problems: list[str] = []


def fail(msg: str) -> None:
    problems.append(msg)


# ---------------------------------------------------------------------------------------------------
# The metric catalogue, from the Rust source.

MACRO = re.compile(
    r"\b(counter|gauge|histogram)!\(\s*(?:\"([^\"]+)\"|((?:[A-Za-z_][A-Za-z0-9_]*::)*)([A-Za-z_][A-Za-z0-9_]*))",
    re.S,
)
CONST = re.compile(r"\bconst\s+([A-Z_][A-Z0-9_]*)\s*:\s*&(?:'static\s+)?str\s*=\s*\"([^\"]+)\"")
BUCKETS_FOR = re.compile(r"set_buckets_for_metric\(\s*Matcher::Full\(\s*(?:\"([^\"]+)\"|(?:[\w:]+::)?([A-Z_][A-Z0-9_]*))")
BUCKETS_ALL = re.compile(r"\.set_buckets\(")


class Catalogue:
    def __init__(self) -> None:
        self.kind: dict[str, str] = {}  # name -> counter | gauge | histogram
        self.where: dict[str, str] = {}  # name -> crate
        self.bucketed: set[str] = set()  # histograms rendered with buckets

    def series(self) -> dict[str, str]:
        """Every series name a scrape can hold, and what it is."""
        out = {name: "builtin" for name in BUILTIN_SERIES}
        for name, kind in self.kind.items():
            if kind != "histogram":
                out[name] = kind
            elif name in self.bucketed:
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = "histogram"
            else:
                out[name] = "summary"
                for suffix in ("_sum", "_count"):
                    out[name + suffix] = "summary"
        return out


def catalogue(repo: Path) -> Catalogue:
    cat = Catalogue()
    for crate in sorted((repo / "services").iterdir()):
        src = crate / "src"
        if not src.is_dir():
            continue
        files = {p: p.read_text() for p in sorted(src.rglob("*.rs"))}
        consts: dict[str, str] = {}
        for text in files.values():
            for ident, value in CONST.findall(text):
                consts[ident] = value
        crate_bucketed = any(BUCKETS_ALL.search(t) for t in files.values())
        named_buckets = set()
        for text in files.values():
            for literal, ident in BUCKETS_FOR.findall(text):
                named_buckets.add(literal or consts.get(ident, ""))
        for path, text in files.items():
            for kind, literal, _path, ident in MACRO.findall(text):
                name = literal or consts.get(ident)
                if name is None:
                    fail(f"{path.relative_to(repo)}: {kind}!({ident}) names no string constant of its crate; "
                         "cannot tell the metric's name")
                    continue
                previous = cat.kind.get(name)
                if previous and previous != kind:
                    fail(f"metric {name} is a {previous} in one place and a {kind} in {path.relative_to(repo)}")
                cat.kind[name] = kind
                cat.where[name] = crate.name
                if kind == "histogram" and (crate_bucketed or name in named_buckets):
                    cat.bucketed.add(name)
    if not cat.kind:
        fail("found no metric in services/*/src: the extraction is broken")
    return cat


def services_serving_metrics(repo: Path) -> tuple[set[str], set[str]]:
    """Services whose binary serves Prometheus metrics, and those whose binary does not."""
    serving, silent = set(), set()
    for name in SERVICES:
        src = repo / "services" / name / "src"
        text = "".join(p.read_text() for p in src.rglob("*.rs")) if src.is_dir() else ""
        # A metrics listener (with_http_listener) or a /metrics route on the service's own HTTP server.
        if "with_http_listener" in text or re.search(r"\.route\(\s*\"/metrics\"", text):
            serving.add(name)
        else:
            silent.add(name)
    return serving, silent


# ---------------------------------------------------------------------------------------------------
# PromQL.

def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def selected_series(expr: str) -> set[str]:
    """The metric names an expression selects (raises ValueError on a syntax error)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    if m.op != promql_parser.MatchOp.Equal:
                        raise ValueError(f"a regex on __name__ ({m}) cannot be checked; name the metric")
                    names.add(m.value)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    if not names:
        raise ValueError("selects no metric")
    return names


def check_promql(where: str, expr: str, series: dict[str, str], cat: Catalogue) -> None:
    try:
        names = selected_series(expr)
    except ValueError as e:
        fail(f"{where}: {e}: {expr!r}")
        return
    for name in sorted(names):
        if name in series:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name.endswith("_bucket") and cat.kind.get(base) == "histogram":
            fail(f"{where}: {name}: {base} is rendered as a summary ({cat.where[base]} sets no buckets), "
                 f"so there is no _bucket series; use {base}{{quantile=\"0.99\"}}")
        else:
            fail(f"{where}: metric {name} is not recorded anywhere in services/*/src")


def promtool_parse(promtool: str, exprs: list[tuple[str, str]]) -> None:
    """Parses every expression with Prometheus's own parser, as recording rules."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rules, f)
        f.flush()
        out = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        fail("promtool rejects a dashboard expression:\n" + out.stdout + out.stderr
             + "\n(expression numbers follow the dashboard's order: "
             + ", ".join(f"{i}={w}" for i, (w, _) in enumerate(exprs)) + ")")


# ---------------------------------------------------------------------------------------------------
# SQL against the migrations.

SQL_WORDS = set("""
select from where and or not as order by desc asc limit offset interval now avg count sum min max nullif coalesce
float8 bigint numeric integer text group having is null true false case when then else end in join on left right
inner outer distinct round cast filter
""".split())


def schema(repo: Path) -> dict[str, set[str]]:
    """Tables and views the migrations leave, with their columns (views: every word of their definition)."""
    tables: dict[str, set[str]] = {}
    for path in sorted((repo / "schemas" / "migrations").glob("*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text())
        for stmt in text.split(";"):
            s = stmt.strip()
            m = re.match(r"CREATE TABLE\s+(?:IF NOT EXISTS\s+)?(\w+)\s*\((.*)\)\s*$", s, re.S | re.I)
            if m:
                cols = set()
                depth = 0
                for line in m.group(2).splitlines():
                    if depth == 0:
                        c = re.match(r"\s*([a-z_][a-z0-9_]*)\s+[a-z]", line)
                        if c and c.group(1).upper() not in {"CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "EXCLUDE"}:
                            cols.add(c.group(1))
                    depth += line.count("(") - line.count(")")
                tables[m.group(1)] = cols
                continue
            m = re.match(r"CREATE (?:OR REPLACE )?(?:MATERIALIZED )?VIEW\s+(\w+)\s+AS\s+(.*)$", s, re.S | re.I)
            if m:
                tables[m.group(1)] = set(re.findall(r"[a-z_][a-z0-9_]*", m.group(2)))
                continue
            for t, col in re.findall(r"ALTER TABLE\s+(\w+)\s+ADD COLUMN\s+(?:IF NOT EXISTS\s+)?(\w+)", s, re.I):
                tables.setdefault(t, set()).add(col)
            for t, col in re.findall(r"ALTER TABLE\s+(\w+)\s+DROP COLUMN\s+(?:IF EXISTS\s+)?(\w+)", s, re.I):
                tables.get(t, set()).discard(col)
            for t, old, new in re.findall(r"ALTER TABLE\s+(\w+)\s+RENAME COLUMN\s+(\w+)\s+TO\s+(\w+)", s, re.I):
                tables.get(t, set()).discard(old)
                tables.setdefault(t, set()).add(new)
            for t in re.findall(r"DROP (?:TABLE|VIEW)\s+(?:IF EXISTS\s+)?(\w+)", s, re.I):
                tables.pop(t, None)
    return tables


def check_sql(where: str, query: str, tables: dict[str, set[str]]) -> None:
    q = re.sub(r"'(?:[^']|'')*'", " ", query)  # string literals
    q = re.sub(r"\"[^\"]*\"", " ", q)  # quoted identifiers (output names)
    q = re.sub(r"\$__\w+(\([^)]*\))?", " ", q)  # Grafana macros
    q = re.sub(r"\b\d+(\.\d+)?(e\d+)?\b", " ", q)
    used = re.findall(r"\b(?:FROM|JOIN)\s+([a-z_][a-z0-9_]*)", q, re.I)
    if not used:
        fail(f"{where}: the query reads no table")
    for t in used:
        if t not in tables:
            fail(f"{where}: table {t} is not created by schemas/migrations")
    columns = set().union(*(tables.get(t, set()) for t in used)) | set(used)
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", q):
        w = word.lower()
        if w not in SQL_WORDS and w not in columns:
            fail(f"{where}: {word} is neither SQL nor a column of {', '.join(used)} in schemas/migrations")


# ---------------------------------------------------------------------------------------------------

def check_dashboard(path: Path, series, cat, tables, promtool) -> int:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path.name}: not valid JSON: {e}")
        return 0
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dash:
            fail(f"{path.name}: no {key!r}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ids, exprs, rows = set(), [], []
    for panel in dash.get("panels", []):
        pid, title = panel.get("id"), panel.get("title", "?")
        where = f"{path.name}: panel {pid} {title!r}"
        if pid in ids:
            fail(f"{where}: duplicate id")
        ids.add(pid)
        g = panel.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g.get("x", 0) + g.get("w", 0) > 24:
            fail(f"{where}: gridPos {g} is not a grid place within 24 columns")
        if panel.get("type") == "row":
            rows.append(title.lower())
            continue
        ds = panel.get("datasource", {})
        uid = ds.get("uid", "")
        m = re.fullmatch(r"\$\{(\w+)\}", uid)
        if not m or m.group(1) not in variables:
            fail(f"{where}: datasource uid {uid!r} is not one of the dashboard's datasource variables")
        elif variables[m.group(1)].get("query") != ds.get("type"):
            fail(f"{where}: datasource type {ds.get('type')!r} differs from variable ${m.group(1)}'s")
        targets = panel.get("targets") or []
        if not targets:
            fail(f"{where}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            fail(f"{where}: duplicate refIds {refs}")
        for t in targets:
            twhere = f"{where} target {t.get('refId')}"
            if ds.get("type") == "prometheus":
                expr = t.get("expr", "")
                if not expr.strip():
                    fail(f"{twhere}: empty expr")
                    continue
                e = grafana_to_promql(expr)
                if "$" in e:
                    fail(f"{twhere}: unknown Grafana variable in {expr!r}")
                    continue
                exprs.append((f"panel {pid}/{t.get('refId')}", e))
                check_promql(twhere, e, series, cat)
            elif ds.get("type") == "grafana-postgresql-datasource":
                check_sql(twhere, t.get("rawSql", ""), tables)
            else:
                fail(f"{twhere}: datasource type {ds.get('type')!r} is not checked")
    for topic in DASHBOARD_TOPICS:
        if not any(topic in r for r in rows):
            fail(f"{path.name}: no row titled with {topic!r} (issue 8 asks for it)")
    if exprs:
        promtool_parse(promtool, exprs)
    return len(exprs)


def check_rules(obs: Path, series, cat, promtool) -> int:
    n = 0
    for group in yaml.safe_load((obs / "cocoon-rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            n += 1
            check_promql(f"cocoon-rules.yml: {rule.get('alert') or rule.get('record')}", rule["expr"], series, cat)
    for cmd in (["check", "rules", "cocoon-rules.yml"], ["test", "rules", "cocoon-rules.test.yml"]):
        out = subprocess.run([promtool, *cmd], cwd=obs, capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"promtool {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return n


def check_prometheus(obs: Path, repo: Path, serving: set[str], promtool) -> None:
    out = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=obs, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"promtool check config prometheus.yml failed:\n{out.stdout}{out.stderr}")
    config = yaml.safe_load((obs / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config.get("scrape_configs", [])}
    if set(jobs) != serving:
        fail(f"prometheus.yml scrapes {sorted(jobs)}, but the services serving metrics are {sorted(serving)}")
    # The port each job scrapes must be the `metrics` port of its <job>-metrics Service.
    ports = {}
    for path in sorted((repo / "infra" / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Service" and doc["metadata"]["name"].endswith("-metrics"):
                for p in doc["spec"]["ports"]:
                    if p.get("name") == "metrics":
                        ports[doc["metadata"]["name"][: -len("-metrics")]] = p["port"]
    for name, job in jobs.items():
        sd = job.get("dns_sd_configs") or [{}]
        if sd[0].get("port") != ports.get(name):
            fail(f"prometheus.yml job {name} scrapes port {sd[0].get('port')}, "
                 f"but infra/deploy's {name}-metrics Service serves {ports.get(name)}")


def check_adapter(obs: Path, repo: Path, series, cat) -> None:
    adapter = yaml.safe_load((obs / "prometheus-adapter.yaml").read_text())
    served = set()
    for i, rule in enumerate(adapter.get("externalRules", [])):
        where = f"prometheus-adapter.yaml rule {i}"
        check_promql(where + " seriesQuery", rule["seriesQuery"], series, cat)
        served.add(rule["name"]["as"])
        names = selected_series(rule["seriesQuery"])
        q = (rule["metricsQuery"].replace("<<.Series>>", next(iter(names)))
             .replace("<<.LabelMatchers>>", 'namespace="cocoon"').replace("<<.GroupBy>>", "namespace"))
        check_promql(where + " metricsQuery", q, series, cat)
    wanted = set()
    for path in sorted((repo / "infra" / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "HorizontalPodAutoscaler":
                for m in doc["spec"].get("metrics", []):
                    if m["type"] in ("External", "Pods", "Object"):
                        key = m["type"].lower()
                        wanted.add((path.relative_to(repo), m[key]["metric"]["name"]))
    for path, name in sorted(wanted):
        if name not in served:
            fail(f"{path}: the HPA's metric {name} is not served by prometheus-adapter.yaml")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--promtool", required=True)
    args = ap.parse_args()
    repo = args.repo.resolve()
    obs = repo / "infra" / "observability"

    cat = catalogue(repo)
    series = cat.series()
    serving, silent = services_serving_metrics(repo)
    tables = schema(repo)
    print(f"  metrics in the source: {len(cat.kind)} "
          f"({sum(k == 'histogram' for k in cat.kind.values())} histograms, {len(cat.bucketed)} with buckets)")
    print(f"  services serving metrics: {', '.join(sorted(serving))}")
    if silent:
        print(f"  services WITHOUT a metrics endpoint: {', '.join(sorted(silent))}")

    check_prometheus(obs, repo, serving, args.promtool)
    print("  prometheus.yml: promtool check config, jobs and ports against the code and infra/deploy")
    n_rules = check_rules(obs, series, cat, args.promtool)
    print(f"  cocoon-rules.yml: {n_rules} rules, promtool check rules + test rules, metric names")
    n_exprs = check_dashboard(obs / "cocoon-dashboard.json", series, cat, tables, args.promtool)
    print(f"  cocoon-dashboard.json: {n_exprs} PromQL expressions (promtool + metric names), SQL against the migrations")
    check_adapter(obs, repo, series, cat)
    print("  prometheus-adapter.yaml: queries' metric names, every HPA metric served")

    if problems:
        print(f"\nobservability: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
