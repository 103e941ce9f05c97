#!/usr/bin/env bash
# Renders every overlay of deploy/kubernetes with `kubectl kustomize` and
# validates every rendered object offline (docs/kubernetes.md, "Validating"):
#   - Kubernetes objects against the Kubernetes OpenAPI schemas shipped by the
#     Python package kubernetes-validate, strictly (unknown fields fail);
#   - KEDA ScaledObjects against the schema of the npm package
#     @kubernetes-models/keda (generated from KEDA's API types), unknown
#     fields failing too;
#   - keywave's own rules (validate.py): non-root, read-only, no privilege
#     escalation, capabilities dropped, resources, probes on the metrics port,
#     signed tasks, each region's worker.toml region and KEDA consumer
#     workers-<region> on stream KEYWAVE_TASKS_<region>, flags and file keys known,
#     deploy/Dockerfile building the binaries the manifests run.
# The tools are installed once into a cache directory (a Python venv and an
# npm prefix); after that no network is needed.
#
# Environment:
#   KEYWAVE_DEPLOY_CACHE  where the tools and rendered manifests go
#                         [default: $CARGO_TARGET_DIR/deploy-validate, else target/deploy-validate]
#   KEYWAVE_K8S_VERSION   Kubernetes version validated against [default: 1.31.0]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${KEYWAVE_DEPLOY_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/deploy-validate}"
K8S_VERSION="${KEYWAVE_K8S_VERSION:-1.31.0}"
KUBERNETES_VALIDATE_VERSION=1.37.0
KEDA_MODELS_VERSION=2.0.0
OVERLAYS=(home eu us ap)

die() {
    printf 'deploy/kubernetes/validate.sh: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

for tool in kubectl python3 node npm; do
    have "$tool" || die "$tool is not installed (needed to render and validate the manifests)"
done
mkdir -p "$CACHE"

# Python: kubernetes-validate (with jsonschema and PyYAML) in a venv.
venv="$CACHE/venv"
stamp="$venv/.keywave-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
if [ ! -e "$stamp" ]; then
    echo "    installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        || die "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
    touch "$stamp"
fi

# Node: @kubernetes-models/keda (the ScaledObject schema).
npm_prefix="$CACHE/npm"
keda_pkg="$npm_prefix/node_modules/@kubernetes-models/keda/package.json"
if [ ! -e "$keda_pkg" ] || ! grep -q "\"version\": \"$KEDA_MODELS_VERSION\"" "$keda_pkg"; then
    echo "    installing @kubernetes-models/keda $KEDA_MODELS_VERSION into $npm_prefix"
    mkdir -p "$npm_prefix"
    npm install --silent --no-audit --no-fund --prefix "$npm_prefix" \
        "@kubernetes-models/keda@$KEDA_MODELS_VERSION" \
        || die "npm install @kubernetes-models/keda@$KEDA_MODELS_VERSION failed"
fi

# Render.
rendered="$CACHE/rendered"
rm -rf "$rendered"
mkdir -p "$rendered"
pairs=()
for o in "${OVERLAYS[@]}"; do
    out="$rendered/$o.yaml"
    kubectl kustomize "$HERE/overlays/$o" >"$out" || die "kubectl kustomize overlays/$o failed"
    pairs+=("$o=$out")
done

# Validate.
failed=0
echo "    Kubernetes $K8S_VERSION schemas (strict) and keywave's rules:"
"$venv/bin/python" "$HERE/validate.py" "$K8S_VERSION" "$rendered" "${pairs[@]}" || failed=1
echo "    KEDA ScaledObject schema (@kubernetes-models/keda $KEDA_MODELS_VERSION):"
node "$HERE/validate-keda.mjs" "$npm_prefix/node_modules" "$rendered/scaledobjects.json" || failed=1
[ "$failed" -eq 0 ] || die "the Kubernetes manifests are invalid (see above; rendered into $rendered)"
echo "    all overlays valid: ${OVERLAYS[*]}"
