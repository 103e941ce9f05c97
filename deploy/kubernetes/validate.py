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
   KEYWAVE_TASKS, consumer workers-<region>).
3. Writes OUT_DIR/scaledobjects.json for validate-keda.mjs (the KEDA schema).

Prints one line per problem and exits 1 when there is any.
"""

import json
import sys
import tomllib

import kubernetes_validate
import yaml

REGION_OVERLAYS = {"eu", "us", "ap"}
TASK_STREAM = "KEYWAVE_TASKS"
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

problems = []


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
        main = keywave and c.get("command", [""])[0] in ("keywave-coordinator", "keywave-worker")
        check_container(f"{where}: container {c.get('name')}", c, probes=main)


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
    if meta.get("stream") != TASK_STREAM:
        problem(where, f"trigger stream must be {TASK_STREAM}, got {meta.get('stream')!r}")
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
        names = {k for k, _ in kinds}
        if region:
            for kind in ("Deployment", "ScaledObject", "NetworkPolicy", "ConfigMap"):
                if kind not in names:
                    problem(f"overlay {overlay}", f"renders no {kind} (a region overlay has the worker, its ScaledObject, NetworkPolicies and worker.toml)")
        elif ("Deployment", "keywave-coordinator") not in kinds:
            problem(f"overlay {overlay}", "renders no keywave-coordinator Deployment")
        print(f"    overlay {overlay}: {len(objects)} objects checked")
    with open(f"{out_dir}/scaledobjects.json", "w") as f:
        json.dump(scaledobjects, f)
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
