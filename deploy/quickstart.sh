#!/usr/bin/env bash
# keywave in one command: makes sure nats-server is installed, builds the
# release binaries and runs `keywave dev`, which rotates a simulated fleet
# (10,000 credentials unless you pass your own flags) end to end and prints
# the report. Extra arguments go to `keywave dev`, e.g.
#   ./deploy/quickstart.sh --credentials 1000 --fail-rate 0.01 --json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if ! command -v nats-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> Installing nats-server (Debian/Ubuntu package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
    else
        echo "quickstart: nats-server is not installed. Install it with:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y nats-server" >&2
        echo "or put a release from https://github.com/nats-io/nats-server/releases on PATH." >&2
        exit 1
    fi
fi

echo "==> cargo build --release"
cargo build --release

if [ "$#" -eq 0 ]; then
    set -- --credentials 10000
fi
echo "==> keywave dev $*"
exec ./target/release/keywave dev "$@"
