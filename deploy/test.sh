#!/usr/bin/env bash
# Runs every keywave check, as CI does (.ci/run calls this):
#   1. makes sure nats-server, redis-server, PostgreSQL and MariaDB are
#      installed (installing missing ones from the distribution when root),
#   2. makes sure the local Redis (6379), PostgreSQL (5432), MariaDB (3306) and
#      NATS (4222) answer, starting any that is installed but down,
#   3. the Kubernetes manifests (deploy/kubernetes/validate.sh: every overlay
#      rendered and validated offline against the Kubernetes and KEDA
#      schemas; needs kubectl, python3, node and npm),
#   4. cargo fmt --check, cargo clippy -D warnings, and the whole test suite.
# Works from any directory; exits non-zero on the first failure.
#
# Environment: KEYWAVE_TEST_TIMEOUT (default 30m) bounds the test run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Debian installs the daemons in sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'deploy/test.sh: error: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------
# 1. Server binaries
# ---------------------------------------------------------------------------

# The newest PostgreSQL's bin directory (initdb and pg_ctl live there).
pg_bindir() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$d" ] && printf '%s\n' "$d"
}

missing=()
have nats-server || missing+=(nats-server)
have redis-server || missing+=(redis-server)
{ have initdb || [ -n "$(pg_bindir)" ]; } || missing+=(postgresql)
have mariadbd || missing+=(mariadb-server)
# The region outage test puts regions in network namespaces (`ip netns`).
have ip || missing+=(iproute2)

step "Server binaries"
if [ "${#missing[@]}" -gt 0 ]; then
    if is_root && have apt-get; then
        note "installing missing packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        die "missing packages: ${missing[*]}. Install them with:
    sudo apt-get update && sudo apt-get install -y ${missing[*]}
(or run this script as root and it will)."
    fi
fi
for b in nats-server redis-server mariadbd; do
    have "$b" || die "$b is still not on PATH after installation"
done
note "nats-server: $(nats-server --version 2>&1)"
note "redis-server: $(redis-server --version | cut -d' ' -f1-3)"
note "postgres: $( { have postgres && postgres --version; } || "$(pg_bindir)/postgres" --version)"
note "mariadbd: $(mariadbd --version 2>/dev/null | head -n 1)"

# ---------------------------------------------------------------------------
# 2. Local services
# ---------------------------------------------------------------------------

port_open() { timeout 1 bash -c ">/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local name="$1" secs="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not come up within ${secs}s"
        sleep 0.2
    done
}

redis_up() { if have redis-cli; then redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; else port_open 6379; fi; }
postgres_up() { if have pg_isready; then pg_isready -q -h 127.0.0.1 -p 5432; else port_open 5432; fi; }
mariadb_up() { port_open 3306; }
nats_up() { port_open 4222; }

start_redis() {
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_postgres() {
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
}
# The pid files make start-stop-daemon look at this service only: without
# them, any other nats-server or mariadbd (a test's private one, say) would
# count as "already running".
start_mariadb() {
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --make-pidfile --pidfile /run/keywave-ci-mariadb.pid \
        --exec "$(command -v mariadbd)"
}
start_nats() {
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --make-pidfile --pidfile /run/keywave-ci-nats.pid \
        --exec "$(command -v nats-server)" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

# ensure NAME PORT: starts the service if it does not answer, then waits for it.
ensure() {
    local name="$1" port="$2"
    if "${name}_up"; then
        note "$name: up on $port"
        return
    fi
    is_root || die "$name is installed but not running on 127.0.0.1:$port, and only root can start it here"
    note "$name: down, starting it"
    "start_${name}"
    wait_for "$name" 60 "${name}_up"
    note "$name: up on $port"
}

step "Local services"
ensure redis 6379
ensure postgres 5432
ensure mariadb 3306
ensure nats 4222

# ---------------------------------------------------------------------------
# 3. Kubernetes manifests
# ---------------------------------------------------------------------------

# A few seconds once its tools are cached (the first run installs them from
# PyPI and npm into the target directory).
step "Kubernetes manifests (deploy/kubernetes/validate.sh)"
"$ROOT/deploy/kubernetes/validate.sh"

# ---------------------------------------------------------------------------
# 4. Checks
# ---------------------------------------------------------------------------

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Supply chain (deny.toml): licenses, banned crates (the unmaintained
# `backoff`, a second TLS stack) and sources. The
# advisory database needs the network (see deny.toml).
if cargo deny --version >/dev/null 2>&1; then
    step "cargo deny check bans licenses sources"
    cargo deny check bans licenses sources
else
    echo "cargo-deny not installed: supply-chain checks skipped (cargo install cargo-deny --locked)"
fi

# The bound covers running the tests, not compiling them (a cold build takes
# minutes on a small machine): the tests are built first.
timeout_="${KEYWAVE_TEST_TIMEOUT:-30m}"
if cargo nextest --version >/dev/null 2>&1; then
    step "Building the tests"
    cargo nextest run --workspace --no-run
    step "Tests with cargo-nextest ($(cargo nextest --version | head -n 1)), bounded by $timeout_"
    timeout --foreground "$timeout_" cargo nextest run --workspace --no-fail-fast
    step "Doc tests (cargo test --doc; nextest does not run them)"
    timeout --foreground "$timeout_" cargo test --workspace --doc
else
    step "Building the tests"
    cargo test --workspace --no-run
    step "Tests with cargo test (cargo-nextest not installed), bounded by $timeout_"
    timeout --foreground "$timeout_" cargo test --workspace --no-fail-fast
fi

step "All checks passed"
