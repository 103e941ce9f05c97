#!/usr/bin/env bash
# Stops the supercluster started by `deploy/multi-region/start.sh --background`
# (the servers named by the pid files in KEYWAVE_MR_DIR, default
# /tmp/keywave-multi-region). Data stays; remove the directory to start over.
set -euo pipefail
dir="${KEYWAVE_MR_DIR:-/tmp/keywave-multi-region}"
found=0
for f in "$dir"/*.pid; do
  [ -e "$f" ] || continue
  found=1
  pid="$(cat "$f")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
done
[ "$found" = 1 ] || echo "stop.sh: nothing running (no pid files in $dir)"
