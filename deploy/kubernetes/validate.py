"""Checks the rendered Kubernetes manifests of every overlay, offline.

    python validate.py K8S_VERSION OUT_DIR OVERLAY=RENDERED.yaml...

1. Every object but the KEDA ScaledObjects against the Kubernetes schemas of
   K8S_VERSION shipped by kubernetes-validate, strictly (unknown fields are
   errors).
2. keywave's own rules: every container non-root, read-only root file
   system, no privilege escalation, capabilities ALL dropped, requests and
   limits; the coordinator and worker probes on the metrics port and the
   Prometheus annotations; the coordinator's replicas and arguments; each
   region overlay's worker.toml region and its KEDA trigger (stream
   KEYWAVE_TASKS_<region>, consumer workers-<region>); flags and file keys against
   docs/configuration.md; deploy/Dockerfile building the three binaries the
   manifests run, as their user.
3. Writes OUT_DIR/scaledobjects.json for validate-keda.mjs (the KEDA schema).

Prints one line per problem and exits 1 when there is any.
"""

import json
import os
import re
import sys
import tomllib

import kubernetes_validate
import yaml

REGION_OVERLAYS = {"eu", "us", "ap"}
TASK_STREAM_PREFIX = "KEYWAVE_TASKS_"
METRICS_PORT = 9464
# The documented parameters of KEDA's nats-jetstream scaler.
JETSTREAM_METADATA = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
}

# docs/configuration.md is generated from the code (cargo xtask): its tables
# are the flags each binary accepts and the worker file's keys.
CONFIG_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "configuration.md")

# The agent file's keys (AgentFile and CredentialFile in worker/src/agent.rs,
# described in docs/consumers.md); [nats] takes the worker file's nats keys.
AGENT_KEYS = {
    "consumer", "region", "nats_url", "nats", "region_key_file", "reload_command",
    "reload_timeout_secs", "health_command", "health_timeout_secs", "health_retry_secs",
    "credential",
}
AGENT_CREDENTIAL_KEYS = {"id", "path", "template", "principal", "mode"}

problems = []
# The uids the containers running the keywave image use (the image's USER).
KEYWAVE_UIDS = set()


def doc_sections():
    """The first-column entries of each table of docs/configuration.md, by heading."""
    sections, heading = {}, None
    with open(CONFIG_DOC) as f:
        for line in f:
            if line.startswith("#"):
                heading = line.lstrip("#").strip().strip("`")
                sections[heading] = []
            elif heading and line.startswith("| `"):
                sections[heading].append(line.split("|")[1])
    return sections


DOCS = doc_sections()


def documented_flags(*headings):
    flags = set()
    for h in headings:
        if h not in DOCS:
            raise SystemExit(f"docs/configuration.md has no section {h!r}")
        for cell in DOCS[h]:
            flags.update(re.findall(r"`(--[a-z0-9-]+)`", cell))
    return flags


def documented_keys(heading):
    keys = {}
    for cell in DOCS[heading]:
        key = cell.strip().strip("`")
        table, _, leaf = key.rpartition(".")
        keys.setdefault(table.removesuffix("[]"), set()).add(leaf)
    return keys


COORDINATOR_FLAGS = documented_flags("keywave-coordinator")
WORKER_FLAGS = documented_flags("keywave-worker", "keywave-worker run")
AGENT_FLAGS = documented_flags("keywave-worker", "keywave-worker agent")
WORKER_KEYS = documented_keys("Worker configuration file")


def check_flags(where, args, known):
    for a in args:
        if a.startswith("--") and a.split("=", 1)[0] not in known:
            problem(where, f"unknown flag {a.split('=', 1)[0]} (not in docs/configuration.md)")


def check_keys(where, table, known, what):
    for key in sorted(set(table) - known):
        problem(where, f"{what}: unknown key {key!r}")


def problem(where, message):
    problems.append(f"{where}: {message}")


def name_of(obj):
    return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"


def check_schema(where, obj, version):
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        problem(where, f"schema ({version}): {path}: {e.message}")
    except kubernetes_validate.VersionNotSupportedError as e:
        problem(where, f"kubernetes-validate has no schemas for Kubernetes {version}: {e}")
    except kubernetes_validate.SchemaNotFoundError as e:
        problem(where, f"no Kubernetes {version} schema: {e}")
    except kubernetes_validate.InvalidSchemaError as e:
        problem(where, f"schema error: {e}")


def check_container(where, c, probes):
    sc = c.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True:
        problem(where, "securityContext.runAsNonRoot must be true")
    if not isinstance(sc.get("runAsUser"), int) or sc["runAsUser"] == 0:
        problem(where, "securityContext.runAsUser must be a non-zero uid")
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(where, "securityContext.readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(where, "securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problem(where, "securityContext.capabilities.drop must contain ALL")
    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                problem(where, f"resources.{kind}.{r} missing")
    if probes:
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            port = get.get("port")
            port = ports.get(port, port)
            if get.get("path") != path or port != METRICS_PORT:
                problem(where, f"{probe} must GET {path} on port {METRICS_PORT}")


def check_workload(where, obj):
    pod = obj["spec"]["template"]
    spec = pod.get("spec") or {}
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        problem(where, "pod securityContext.runAsNonRoot must be true")
    keywave = obj["metadata"]["name"] in ("keywave-coordinator", "keywave-worker")
    if keywave:
        ann = pod.get("metadata", {}).get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(METRICS_PORT):
            problem(where, f"pod annotations prometheus.io/scrape \"true\" and prometheus.io/port \"{METRICS_PORT}\" missing")
    for c in spec.get("initContainers") or []:
        check_container(f"{where}: init container {c.get('name')}", c, probes=False)
    for c in spec.get("containers") or []:
        command = (c.get("command") or [""])[0]
        args = c.get("args") or []
        cwhere = f"{where}: container {c.get('name')}"
        if command == "keywave-coordinator":
            check_flags(cwhere, args, COORDINATOR_FLAGS)
        elif command == "keywave-worker":
            check_flags(cwhere, args, AGENT_FLAGS if "agent" in args else WORKER_FLAGS)
        if command in ("keywave-coordinator", "keywave-worker"):
            KEYWAVE_UIDS.add((c.get("securityContext") or {}).get("runAsUser"))
        main = keywave and command in ("keywave-coordinator", "keywave-worker")
        check_container(cwhere, c, probes=main)


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_coordinator(where, obj):
    if obj["spec"].get("replicas") != 2:
        problem(where, "the coordinator runs 2 replicas (one active, one standby)")
    c = next((c for c in obj["spec"]["template"]["spec"]["containers"] if c.get("command") == ["keywave-coordinator"]), None)
    if c is None:
        problem(where, "no container runs keywave-coordinator")
        return
    args = c.get("args") or []
    if arg_value(args, "--signing-key-file") != "/etc/keywave/coordinator.key":
        problem(where, "--signing-key-file /etc/keywave/coordinator.key missing (tasks are signed)")
    if "--insecure-unsigned-tasks" in args:
        problem(where, "--insecure-unsigned-tasks is for development only")
    regions = set((arg_value(args, "--regions") or "").split(","))
    if regions != REGION_OVERLAYS:
        problem(where, f"--regions must list {','.join(sorted(REGION_OVERLAYS))}, got {sorted(regions)}")
    if arg_value(args, "--metrics-addr") != f"0.0.0.0:{METRICS_PORT}":
        problem(where, f"--metrics-addr 0.0.0.0:{METRICS_PORT} missing")
    if arg_value(args, "--log-format") != "json":
        problem(where, "--log-format json missing")


def check_scaledobject(where, obj, region):
    triggers = obj.get("spec", {}).get("triggers") or []
    js = [t for t in triggers if t.get("type") == "nats-jetstream"]
    if len(js) != 1:
        problem(where, f"needs exactly one nats-jetstream trigger, has {len(js)}")
        return
    meta = js[0].get("metadata") or {}
    for key in sorted(set(meta) - JETSTREAM_METADATA):
        problem(where, f"trigger metadata {key!r} is not a nats-jetstream parameter")
    for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold", "activationLagThreshold"):
        if key not in meta:
            problem(where, f"trigger metadata {key!r} missing")
    if meta.get("stream") != f"{TASK_STREAM_PREFIX}{region}":
        problem(where, f"trigger stream must be {TASK_STREAM_PREFIX}{region} (overlay {region}), got {meta.get('stream')!r}")
    if meta.get("consumer") != f"workers-{region}":
        problem(where, f"trigger consumer must be workers-{region} (overlay {region}), got {meta.get('consumer')!r}")
    target = obj["spec"].get("scaleTargetRef", {}).get("name")
    if target != "keywave-worker":
        problem(where, f"scaleTargetRef must name Deployment keywave-worker, got {target!r}")
    if not isinstance(obj["spec"].get("minReplicaCount"), int) or obj["spec"]["minReplicaCount"] < 1:
        problem(where, "minReplicaCount must be at least 1 (a region without a live worker pauses campaigns)")


def check_worker_config(where, obj, region):
    text = (obj.get("data") or {}).get("worker.toml")
    if text is None:
        problem(where, "has no worker.toml")
        return
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problem(where, f"worker.toml: {e}")
        return
    top = WORKER_KEYS[""] | {"jetstream", "nats", "endpoint"}
    check_keys(where, cfg, top, "worker.toml")
    check_keys(where, cfg.get("jetstream") or {}, WORKER_KEYS["jetstream"], "worker.toml [jetstream]")
    check_keys(where, cfg.get("nats") or {}, WORKER_KEYS["nats"], "worker.toml [nats]")
    for e in cfg.get("endpoint") or []:
        check_keys(where, e, WORKER_KEYS["endpoint"], f"worker.toml [[endpoint]] {e.get('name')}")
    if cfg.get("region") != region:
        problem(where, f"worker.toml region must be {region!r} (the overlay), got {cfg.get('region')!r}")
    if not cfg.get("region_key_file"):
        problem(where, "worker.toml: region_key_file missing")
    if not cfg.get("coordinator_public_keys"):
        problem(where, "worker.toml: coordinator_public_keys missing (tasks are signed)")
    if cfg.get("insecure_unsigned_tasks"):
        problem(where, "worker.toml: insecure_unsigned_tasks is for development only")
    for e in cfg.get("endpoint") or []:
        if "admin_password_env" in e:
            problem(where, f"worker.toml endpoint {e.get('name')}: admin passwords come from files (admin_password_file)")


def check_agent_config(where, obj, region):
    for name, text in (obj.get("data") or {}).items():
        if not name.endswith(".toml"):
            continue
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            problem(where, f"{name}: {e}")
            continue
        check_keys(where, cfg, AGENT_KEYS, name)
        check_keys(where, cfg.get("nats") or {}, WORKER_KEYS["nats"], f"{name} [nats]")
        for c in cfg.get("credential") or []:
            check_keys(where, c, AGENT_CREDENTIAL_KEYS, f"{name} [[credential]] {c.get('id')}")
        if cfg.get("region") != region:
            problem(where, f"{name} region must be {region!r} (the overlay), got {cfg.get('region')!r}")
        if not cfg.get("credential"):
            problem(where, f"{name}: no [[credential]]")


def check_image(uids):
    """deploy/Dockerfile builds the packages and binaries the manifests run,
    as the user they run as."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    where = "deploy/Dockerfile"
    with open(os.path.join(root, "deploy", "Dockerfile")) as f:
        docker = f.read()
    crates = {}
    for d in os.listdir(root):
        manifest = os.path.join(root, d, "Cargo.toml")
        if os.path.isfile(manifest):
            with open(manifest, "rb") as f:
                cargo = tomllib.load(f)
            if "package" in cargo:
                bins = [b["name"] for b in cargo.get("bin", [])] or [cargo["package"]["name"]]
                crates[cargo["package"]["name"]] = bins
    wanted = {"keywave-cli": "keywave", "keywave-coordinator": "keywave-coordinator", "keywave-worker": "keywave-worker"}
    for package, binary in wanted.items():
        if binary not in crates.get(package, []):
            problem(where, f"package {package} has no binary {binary} (Cargo.toml)")
        if f"-p {package}" not in docker:
            problem(where, f"does not build package {package} (-p {package})")
        if f"target/release/{binary}" not in docker:
            problem(where, f"does not copy binary {binary}")
    user = re.search(r"^USER\s+(\d+)", docker, re.M)
    if not user:
        problem(where, "has no numeric USER")
    else:
        for uid in sorted(uids - {int(user.group(1))}):
            problem(where, f"runs as uid {user.group(1)}, but a keywave container runs as {uid}")


def main():
    version, out_dir, *pairs = sys.argv[1:]
    scaledobjects = []
    for pair in pairs:
        overlay, path = pair.split("=", 1)
        region = overlay if overlay in REGION_OVERLAYS else None
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        kinds = {}
        for obj in objects:
            where = f"overlay {overlay}: {name_of(obj)}"
            kinds.setdefault((obj.get("kind"), obj["metadata"]["name"]), obj)
            if obj.get("apiVersion") == "keda.sh/v1alpha1":
                scaledobjects.append({"source": f"overlay {overlay}", "object": obj})
                if obj.get("kind") == "ScaledObject":
                    check_scaledobject(where, obj, region)
                continue
            check_schema(where, obj, version)
            if obj.get("kind") == "Deployment":
                check_workload(where, obj)
                if obj["metadata"]["name"] == "keywave-coordinator":
                    check_coordinator(where, obj)
            if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"].startswith("keywave-worker-config"):
                check_worker_config(where, obj, region)
            if obj.get("kind") == "ConfigMap" and "keywave-agent" in obj["metadata"]["name"]:
                check_agent_config(where, obj, region)
        names = {k for k, _ in kinds}
        if region:
            for kind in ("Deployment", "ScaledObject", "NetworkPolicy", "ConfigMap"):
                if kind not in names:
                    problem(f"overlay {overlay}", f"renders no {kind} (a region overlay has the worker, its ScaledObject, NetworkPolicies and worker.toml)")
        elif ("Deployment", "keywave-coordinator") not in kinds:
            problem(f"overlay {overlay}", "renders no keywave-coordinator Deployment")
        print(f"    overlay {overlay}: {len(objects)} objects checked")
    check_image(KEYWAVE_UIDS)
    with open(f"{out_dir}/scaledobjects.json", "w") as f:
        json.dump(scaledobjects, f)
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
