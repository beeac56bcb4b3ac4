#!/usr/bin/env python3
"""check_manifests.py — what a schema cannot see in infra/deploy: the manifests against the code.

Run by infra/check.sh with the venv's Python (PyYAML), after kubernetes-validate has checked every
object against the Kubernetes schema:
  check_manifests.py --repo ROOT [--rendered FILE]

It checks, and exits 1 naming every problem:
- every kustomization lists exactly the YAML files beside it, and those exist;
- every flag a container passes (`--name`) and every environment variable it sets is one its binary
  reads (clap `#[arg(long ...)]`/`env = "..."` or `std::env::var("...")` in services/<binary>/src, or
  `std::env::var("...")` in a services/<lib> crate it depends on, such as bus),
  except variables that only feed `$(VAR)` in its arguments and a few read by the runtime (RUST_LOG,
  NVIDIA_*); the image `cocoon/<binary>` names the binary;
- Services select some workload's pods, and their named target ports exist there; probes use ports the
  container opens; PodDisruptionBudgets and HPAs point at workloads that exist;
- keys taken from ConfigMaps defined here exist in them;
- invariants: only the settler's pod references the settler's key; the node agent references no Secret
  (it never holds database credentials); a pod given NATS credentials passes them
  (COCOON_NATS_CREDENTIALS) when its binary reads that variable, and is reported when it cannot yet;
  a projector's COCOON_PROJECTOR_INSTANCES equals its replicas, and no HPA scales it.
With --rendered (the output of `kubectl kustomize`), the same object checks run on the rendered set too.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import yaml

RUNTIME_ENV = {"RUST_LOG"}
RUNTIME_ENV_PREFIXES = ("NVIDIA_",)
SETTLER_KEY_SECRET = "cocoon-settler-key"
NATS_CREDENTIALS_ENV = "COCOON_NATS_CREDENTIALS"
NATS_CREDENTIALS_VOLUME = "nats-credentials"
PROJECTOR_INSTANCES_ENV = "COCOON_PROJECTOR_INSTANCES"
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}

problems: list[str] = []
notes: set[str] = set()


def fail(msg: str) -> None:
    problems.append(msg)


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------------------------------------------
# What each binary reads, from its source.

def binary_interface(repo: Path, binary: str) -> tuple[set[str], set[str]] | None:
    """The long flags and environment variables a binary reads, or None when there is no such crate."""
    src = repo / "services" / binary / "src"
    if not src.is_dir():
        return None
    flags, env = set(), set()
    for path in sorted(src.rglob("*.rs")):
        lines = path.read_text().splitlines()
        pending: list[str] = []
        for line in lines:
            field = re.match(r"\s*(?:pub\s+)?([a-z_][a-z0-9_]*)\s*:\s*[A-Za-z(<\[]", line)
            stripped = line.strip()
            if stripped.startswith("#[arg(") or (pending and not field):
                pending.append(line)
                continue
            if field and pending:
                attrs = " ".join(pending)
                if "#[arg(" in attrs:
                    long = re.search(r"\blong\s*=\s*\"([^\"]+)\"", attrs)
                    if long:
                        flags.add(long.group(1))
                    elif re.search(r"\blong\b(?!\s*=)", attrs):
                        flags.add(field.group(1).replace("_", "-"))
                    env.update(re.findall(r"\benv\s*=\s*\"([^\"]+)\"", attrs))
            pending = []
        env.update(env_reads(path))
    # Variables read by the support libraries it links (services/bus: COCOON_LOG_FORMAT), not flags.
    manifest = tomllib.loads((repo / "services" / binary / "Cargo.toml").read_text())
    for dep in sorted(manifest.get("dependencies", {})):
        lib = repo / "services" / dep / "src"
        if dep != binary and lib.is_dir():
            for path in sorted(lib.rglob("*.rs")):
                env.update(env_reads(path))
    return flags, env


def env_reads(path: Path) -> set[str]:
    """The variables `std::env::var("...")` (or `var_os`) reads in one source file."""
    return set(re.findall(r"env::var(?:_os)?\(\s*\"([^\"]+)\"", path.read_text()))


# ---------------------------------------------------------------------------------------------------

def check_kustomizations(deploy: Path) -> None:
    for kfile in sorted(deploy.rglob("kustomization.yaml")):
        k = yaml.safe_load(kfile.read_text())
        listed = set(k.get("resources", []))
        here = {p.name for p in kfile.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
        for r in sorted(listed):
            if not (kfile.parent / r).exists():
                fail(f"{kfile}: resource {r} does not exist")
        for orphan in sorted(here - listed):
            fail(f"{kfile}: {orphan} lies beside it but is not listed in resources")
        for c in k.get("components", []) or []:
            if not (kfile.parent / c / "kustomization.yaml").exists():
                fail(f"{kfile}: component {c} has no kustomization.yaml")


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def check_objects(label: str, objects: list[dict], repo: Path) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    configmaps = by_kind.get("ConfigMap", {})

    for w in workloads:
        name = f"{label}: {w['kind']} {w['metadata']['name']}"
        spec = pod_spec(w)
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        selector = w["spec"].get("selector", {}).get("matchLabels")
        if selector is not None and any(labels.get(k) != v for k, v in selector.items()):
            fail(f"{name}: selector {selector} does not match its pod labels {labels}")
        secrets_used = set()
        for v in spec.get("volumes", []):
            if "secret" in v:
                secrets_used.add(v["secret"]["secretName"])
            for src in v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    secrets_used.add(src["secret"]["name"])
            if "configMap" in v and v["configMap"]["name"] in configmaps:
                for item in v["configMap"].get("items", []):
                    if item["key"] not in configmaps[v["configMap"]["name"]].get("data", {}):
                        fail(f"{name}: ConfigMap {v['configMap']['name']} has no key {item['key']}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cname = f"{name} container {c['name']}"
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                p = c.get(probe)
                if p:
                    port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                    if port is not None and port not in ports:
                        fail(f"{cname}: {probe} uses port {port!r}, which the container does not open")
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {})
                if "secretKeyRef" in ref:
                    secrets_used.add(ref["secretKeyRef"]["name"])
                cm = ref.get("configMapKeyRef")
                if cm and cm["name"] in configmaps and cm["key"] not in configmaps[cm["name"]].get("data", {}):
                    fail(f"{cname}: env {e['name']}: ConfigMap {cm['name']} has no key {cm['key']}")
            image = c["image"].split("@")[0]
            m = re.fullmatch(r"(?:.*/)?cocoon/([a-z-]+)(?::.*)?", image)
            if not m:
                continue  # not one of ours (nats)
            binary = m.group(1)
            iface = binary_interface(repo, binary)
            if iface is None:
                fail(f"{cname}: image {image} names no crate services/{binary}")
                continue
            flags, env = iface
            args = [str(a) for a in c.get("command", []) + c.get("args", [])]
            substituted = set(re.findall(r"\$\(([A-Z0-9_]+)\)", " ".join(args)))
            for a in args:
                if a.startswith("--") and len(a) > 2:
                    flag = a[2:].split("=", 1)[0]
                    if flag not in flags:
                        fail(f"{cname}: flag --{flag} is not one that services/{binary} reads "
                             f"(it reads: {', '.join(sorted('--' + f for f in flags))})")
            for e in c.get("env", []):
                n = e["name"]
                if n in env or n in substituted or n in RUNTIME_ENV or n.startswith(RUNTIME_ENV_PREFIXES):
                    continue
                fail(f"{cname}: environment variable {n} is read neither by services/{binary} nor by $(…) "
                     f"in its arguments (it reads: {', '.join(sorted(env))})")
            for n in substituted:
                if n not in {e["name"] for e in c.get("env", [])}:
                    fail(f"{cname}: $({n}) in its arguments is not set in its env")
            env_values = {e["name"]: e.get("value") for e in c.get("env", [])}
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            if NATS_CREDENTIALS_VOLUME in mounts:
                path = env_values.get(NATS_CREDENTIALS_ENV)
                if NATS_CREDENTIALS_ENV not in env:
                    notes.add(f"services/{binary} does not read {NATS_CREDENTIALS_ENV} yet: the credentials "
                              f"mounted into {w['metadata']['name']} are unused until it does "
                              f"(then set {NATS_CREDENTIALS_ENV}=/etc/cocoon/nats/nats.creds there)")
                elif path is None:
                    fail(f"{cname}: mounts NATS credentials but does not pass them ({NATS_CREDENTIALS_ENV})")
                elif not path.startswith(mounts[NATS_CREDENTIALS_VOLUME].rstrip("/") + "/"):
                    fail(f"{cname}: {NATS_CREDENTIALS_ENV}={path} is not under the mounted credentials "
                         f"({mounts[NATS_CREDENTIALS_VOLUME]})")
            elif NATS_CREDENTIALS_ENV in env:
                fail(f"{cname}: services/{binary} reads {NATS_CREDENTIALS_ENV}, but the pod mounts no "
                     f"`{NATS_CREDENTIALS_VOLUME}` volume")
            if PROJECTOR_INSTANCES_ENV in env:
                replicas = w["spec"].get("replicas", 1)
                if w["kind"] != "StatefulSet":
                    fail(f"{cname}: instances of a partitioned projector need stable ordinals: use a StatefulSet")
                if str(env_values.get(PROJECTOR_INSTANCES_ENV)) != str(replicas):
                    fail(f"{cname}: {PROJECTOR_INSTANCES_ENV}={env_values.get(PROJECTOR_INSTANCES_ENV)} "
                         f"but replicas={replicas}: partitions would be left unprojected or doubly owned")
                for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
                    if hpa["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]:
                        fail(f"{label}: HPA {hpa['metadata']['name']} scales {w['metadata']['name']}, whose "
                             f"instance count ({PROJECTOR_INSTANCES_ENV}) is fixed")
        is_settler = any("cocoon/settler" in c["image"] for c in spec.get("containers", []))
        if SETTLER_KEY_SECRET in secrets_used and not is_settler:
            fail(f"{name}: references {SETTLER_KEY_SECRET}; only the settler's pod may")
        is_agent = any("cocoon/node-agent" in c["image"] for c in spec.get("containers", []))
        if is_agent and secrets_used:
            fail(f"{name}: the node agent references Secrets {sorted(secrets_used)}; it must hold none")

    def workload_labels():
        for w in workloads:
            yield w, w["spec"]["template"]["metadata"].get("labels", {})

    for s in by_kind.get("Service", {}).values():
        sel = s["spec"].get("selector", {})
        matched = [w for w, lab in workload_labels() if sel and all(lab.get(k) == v for k, v in sel.items())]
        if not matched:
            fail(f"{label}: Service {s['metadata']['name']} selects no workload's pods ({sel})")
            continue
        for p in s["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            for w in matched:
                opened = set()
                for c in pod_spec(w)["containers"]:
                    opened |= {x.get("name") for x in c.get("ports", [])} | {x["containerPort"] for x in c.get("ports", [])}
                if target not in opened:
                    fail(f"{label}: Service {s['metadata']['name']} port {p.get('name')} targets {target!r}, "
                         f"not opened by {w['kind']} {w['metadata']['name']}")
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(all(lab.get(k) == v for k, v in sel.items()) for _, lab in workload_labels()):
            fail(f"{label}: PodDisruptionBudget {pdb['metadata']['name']} selects no workload ({sel})")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            fail(f"{label}: HPA {hpa['metadata']['name']} scales {ref['kind']} {ref['name']}, which is not here")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--rendered", type=Path, action="append", default=[])
    args = ap.parse_args()
    repo = args.repo.resolve()
    deploy = repo / "infra" / "deploy"

    check_kustomizations(deploy)
    files = [p for p in sorted(deploy.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    objects = [o for p in files for o in load(p)]
    check_objects("infra/deploy", objects, repo)
    print(f"  {len(files)} files, {len(objects)} objects: kustomizations, flags and variables against "
          "services/*/src, selectors, ports, ConfigMap keys, secret invariants")
    for rendered in args.rendered:
        objs = load(rendered)
        check_objects(f"rendered {rendered.name}", objs, repo)
        print(f"  rendered {rendered.name}: {len(objs)} objects, same checks")

    for n in sorted(notes):
        print(f"  NOTE: {n}")
    if problems:
        print(f"\ndeploy: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
