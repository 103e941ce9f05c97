#!/usr/bin/env bash
# Measures what the supercluster costs a campaign: the same `keywave bench`
# campaign (3 regions x 1,000 simulated credentials by default, in-process
# workers and coordinator) on the local supercluster of start.sh (home state
# at R3 on the home cluster, each region's workers on their region's server,
# each secret store in its region) and on one nats-server, one after the
# other in the same run; prints both durations. Everything it starts (the
# supercluster, the single server, their stores) is stopped and removed at
# the end, also on Ctrl-C or failure.
#
#   deploy/multi-region/measure.sh                      # 3 x 1,000 credentials
#   deploy/multi-region/measure.sh --target-latency 5ms # extra flags go to both runs
#
# Environment:
#   KEYWAVE               the keywave CLI (default: keywave on PATH).
#   KEYWAVE_MR_BASE_PORT  the supercluster's first port, as start.sh (14222).
#   KEYWAVE_MEASURE_PER_REGION  credentials per region (default 1000).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
per_region="${KEYWAVE_MEASURE_PER_REGION:-1000}"
base="${KEYWAVE_MR_BASE_PORT:-14222}"
case "${1:-}" in -h|--help) sed -n '2,18p' "$0"; exit 0 ;; esac
case "$per_region" in ''|*[!0-9]*|0) echo "measure.sh: KEYWAVE_MEASURE_PER_REGION must be a positive number" >&2; exit 2 ;; esac
keywave="${KEYWAVE:-$(command -v keywave || true)}"
if [ -z "$keywave" ] || [ ! -x "$keywave" ]; then
  echo "measure.sh: keywave not found; build it (cargo build --release -p keywave-cli) and set KEYWAVE=target/release/keywave" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/keywave-measure.XXXXXX")"
export KEYWAVE_MR_DIR="$work/supercluster"
cleanup() {
  "$here/stop.sh" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

regions="eu,us,ap"
total=$((per_region * 3))
common=(--json bench --credentials "$total" --regions "$regions" --skip-baseline)

# One field of the report (the last stdout line with --json).
field() { sed -n "s/.*\"$1\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" | tr -d '"'; }

echo "starting the supercluster (ports from $base)..."
"$here/start.sh" --background >"$work/start.log" 2>&1 || { cat "$work/start.log" >&2; exit 1; }
home="nats://127.0.0.1:$base,nats://127.0.0.1:$((base + 1)),nats://127.0.0.1:$((base + 2))"

echo "supercluster: $total credentials over $regions..."
"$keywave" --nats "$home" "${common[@]}" \
  --replicas 3 --region-replicas 1 \
  --home-placement cluster=home \
  --placement eu=region:eu,us=region:us,ap=region:ap \
  --region-nats "eu=nats://127.0.0.1:$((base + 3))" \
  --region-nats "us=nats://127.0.0.1:$((base + 4))" \
  --region-nats "ap=nats://127.0.0.1:$((base + 5))" \
  "$@" >"$work/super.json" 2>"$work/super.err" || { cat "$work/super.err" >&2; exit 1; }
"$here/stop.sh" >/dev/null

# keywave bench starts its own nats-server (a temporary store, removed when
# it ends) when no --nats is given.
echo "single server: $total credentials over $regions..."
env -u KEYWAVE_NATS_URL "$keywave" "${common[@]}" "$@" \
  >"$work/single.json" 2>"$work/single.err" || { cat "$work/single.err" >&2; exit 1; }

report() {
  local line
  line="$(tail -n1 "$2")"
  printf '  %-42s %8ss  %6s credentials/s  (%s, %s succeeded, %s failed)\n' "$1" \
    "$(field elapsed_s <<<"$line" | xargs printf '%.2f')" \
    "$(field credentials_per_s <<<"$line" | xargs printf '%.0f')" \
    "$(field state <<<"$line")" "$(field succeeded <<<"$line")" "$(field failed <<<"$line")"
}
echo
echo "campaign of $total sim credentials ($regions x $per_region), start request to last decision:"
report "supercluster (home R3, workers in regions)" "$work/super.json"
report "single nats-server (R1)" "$work/single.json"
