#!/usr/bin/env bash
# Consumers and the agent, end to end, on this machine alone: a private
# `nats-server -js` and `redis-server` on free loopback ports in a temporary
# directory, a coordinator, a worker of region eu and the agent of consumer
# `orders-api`, which writes the Redis URL of ACL user `orders_app` to a file
# (0600) and health-checks it with redis-cli. One continuity campaign rotates
# the password: the agent writes the new one, attests, and only then is the
# old one revoked. Everything it started is stopped and removed on exit.
#
#   ./deploy/consumers-demo.sh
#
# Environment:
#   KEYWAVE_BIN_DIR        directory holding keywave, keywave-coordinator and
#                          keywave-worker (default: `cargo build` them, debug)
#   KEYWAVE_DEMO_PASSWORD  orders_app's initial password (default: random);
#                          alphanumeric, never printed
#
# Needs nats-server (2.9+ with JetStream), redis-server and redis-cli (6+),
# sha256sum. Prints no secret: fingerprints, modes and OK/refused only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'consumers-demo: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

for tool in nats-server redis-server redis-cli sha256sum; do
    have "$tool" || die "$tool is not installed (Debian: apt-get install nats-server redis-server coreutils)"
done

# ---------------------------------------------------------------------------
# Private directory, processes, clean-up
# ---------------------------------------------------------------------------

TMP="$(mktemp -d "${TMPDIR:-/tmp}/keywave-consumers-demo.XXXXXX")"
PIDS=()
FAILED_AT=""
INTERRUPTED=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$INTERRUPTED" ]; then
        printf 'consumers-demo: interrupted (%s); cleaning up\n' "$INTERRUPTED" >&2
    elif [ "$rc" -ne 0 ]; then
        [ -n "$FAILED_AT" ] && printf 'consumers-demo: failed at %s\n' "$FAILED_AT" >&2
        # The logs hold no secret (keywave never logs one); show their ends.
        local log
        for log in "$TMP"/logs/*.log; do
            [ -s "$log" ] || continue
            printf -- '--- last lines of %s\n' "${log##*/}" >&2
            tail -n 8 "$log" >&2 || true
        done
        printf 'consumers-demo: FAILED (exit %s)\n' "$rc" >&2
    fi
    local pid i
    # Newest first: agent, worker, coordinator, then the servers.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'INTERRUPTED=SIGINT; exit 130' INT
trap 'INTERRUPTED=SIGTERM; exit 143' TERM
trap 'FAILED_AT="line $LINENO: $BASH_COMMAND"' ERR

mkdir -p "$TMP/logs" "$TMP/app" "$TMP/nats"
chmod 700 "$TMP"

# start NAME COMMAND...: runs COMMAND in the background, logging to logs/NAME.log.
start() {
    local name="$1"
    shift
    "$@" >"$TMP/logs/$name.log" 2>&1 &
    PIDS+=("$!")
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    local secs="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# An alphanumeric secret of length $1 (default 40), from /dev/urandom.
random_secret() {
    local s
    s="$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')"
    printf '%s' "${s:0:${1:-40}}"
}

# Short fingerprint of a file: never its content.
fingerprint() {
    local h
    h="$(sha256sum "$1")"
    printf 'sha256:%s...' "${h:0:12}"
}

# ---------------------------------------------------------------------------
# 1. Binaries
# ---------------------------------------------------------------------------

if [ -n "${KEYWAVE_BIN_DIR:-}" ]; then
    [ -d "$KEYWAVE_BIN_DIR" ] || die "KEYWAVE_BIN_DIR=$KEYWAVE_BIN_DIR is not a directory"
    BIN="$(cd "$KEYWAVE_BIN_DIR" && pwd)"
    step "Using the binaries in $BIN"
else
    step "cargo build (debug) -p keywave-coordinator -p keywave-cli -p keywave-worker"
    cargo build --quiet -p keywave-coordinator -p keywave-cli -p keywave-worker
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
fi
for b in keywave keywave-coordinator keywave-worker; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (build with: cargo build -p keywave-coordinator -p keywave-cli -p keywave-worker)"
done
KEYWAVE="$BIN/keywave"
WORKER="$BIN/keywave-worker"

# ---------------------------------------------------------------------------
# 2. Private NATS and Redis
# ---------------------------------------------------------------------------

step "Starting a private nats-server -js and redis-server in $TMP"
# nats-server picks a free port itself (-p -1) and writes it to a ports file.
start nats nats-server -a 127.0.0.1 -p -1 -js -sd "$TMP/nats" --ports_file_dir "$TMP"
NATS_PID="${PIDS[-1]}"
wait_for 10 "nats-server's ports file" test -s "$TMP/nats-server_$NATS_PID.ports"
NATS_PORT="$(grep -o 'nats://127\.0\.0\.1:[0-9]*' "$TMP/nats-server_$NATS_PID.ports" | head -n 1)"
NATS_PORT="${NATS_PORT##*:}"
[ -n "$NATS_PORT" ] || die "cannot read nats-server's port from its ports file"
export KEYWAVE_NATS_URL="nats://127.0.0.1:$NATS_PORT"
wait_for 10 "nats-server on port $NATS_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT"
note "nats-server  $KEYWAVE_NATS_URL (JetStream in $TMP/nats)"

# Redis takes no "any free port": try random ones until one binds.
redis_up() { # PORT PID: true once it answers, false if it died or is silent for 5 s
    for _ in $(seq 50); do
        [ "$(redis-cli -p "$1" PING 2>/dev/null)" = PONG ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
REDIS_PORT=""
for _ in $(seq 20); do
    p=$((20000 + RANDOM % 40000))
    port_free "$p" || continue
    start redis redis-server --bind 127.0.0.1 --port "$p" --save '' --appendonly no --dir "$TMP"
    if redis_up "$p" "${PIDS[-1]}"; then
        REDIS_PORT="$p"
        break
    fi
    kill "${PIDS[-1]}" 2>/dev/null || true
    wait "${PIDS[-1]}" 2>/dev/null || true
    unset 'PIDS[-1]'
done
[ -n "$REDIS_PORT" ] || die "could not start redis-server on a free port"
note "redis-server redis://127.0.0.1:$REDIS_PORT (nothing kept on disk)"

# The admin (keywave's) and the application's ACL users. Passwords go to
# redis-cli on stdin or in REDISCLI_AUTH, never on a command line (ps).
ADMIN_PASSWORD_FILE="$TMP/redis-admin.password"
(umask 077 && random_secret >"$ADMIN_PASSWORD_FILE")
INITIAL_PASSWORD="${KEYWAVE_DEMO_PASSWORD:-$(random_secret)}"
[[ "$INITIAL_PASSWORD" =~ ^[A-Za-z0-9]{16,}$ ]] || die "KEYWAVE_DEMO_PASSWORD must be 16 or more letters and digits"
printf 'ACL SETUSER keywave_admin on >%s ~* &* +@all\nACL SETUSER orders_app on >%s ~orders:* +@read +@write +ping\nACL SETUSER default off\n' \
    "$(cat "$ADMIN_PASSWORD_FILE")" "$INITIAL_PASSWORD" | redis-cli -p "$REDIS_PORT" >"$TMP/logs/redis-acl.out"
[ "$(grep -c '^OK$' "$TMP/logs/redis-acl.out")" -eq 3 ] || die "ACL SETUSER failed (its reply is not shown: it may quote a password)"
note "ACL users: keywave_admin (rotates), orders_app (the application's; initial password set)"

# redis_auth USER PASSWORD: OK when PASSWORD logs USER in, refused otherwise.
redis_auth() {
    local out
    out="$(REDISCLI_AUTH="$2" redis-cli -p "$REDIS_PORT" --user "$1" PING 2>&1 || true)"
    if [ "$out" = PONG ]; then echo OK; else echo refused; fi
}
[ "$(redis_auth orders_app "$INITIAL_PASSWORD")" = OK ] || die "orders_app cannot log in with its initial password"

# ---------------------------------------------------------------------------
# 3. Configuration: region key, worker, inventory, agent
# ---------------------------------------------------------------------------

step "Writing the region key, the task-signing key, worker.toml, inventory.json and agent.toml"
(umask 077 && "$WORKER" keygen >"$TMP/eu.key")
note "region key   $TMP/eu.key (mode $(stat -c %#a "$TMP/eu.key"))"
# Tasks are signed: the coordinator holds the private key, every worker lists
# its public key.
COORDINATOR_PUBLIC_KEY="$("$BIN/keywave-coordinator" keygen --out "$TMP/coordinator.key" 2>/dev/null)"
note "signing key  $TMP/coordinator.key (mode $(stat -c %#a "$TMP/coordinator.key"))"

cat >"$TMP/worker.toml" <<EOF
region = "eu"
worker_id = "eu-worker-1"
concurrency = 4
nats_url = "$KEYWAVE_NATS_URL"
region_key_file = "$TMP/eu.key"
coordinator_public_keys = ["$COORDINATOR_PUBLIC_KEY"]
shutdown_grace_secs = 2

[[endpoint]]
name = "redis-main"
kind = "redis"
url = "redis://127.0.0.1:$REDIS_PORT"
admin_user = "keywave_admin"
admin_password_file = "$ADMIN_PASSWORD_FILE"
EOF

cat >"$TMP/inventory.json" <<EOF
[
  {"id": "cache-orders", "region": "eu", "endpoint": "redis-main", "kind": "redis",
   "principal": "orders_app", "tags": ["env=demo"], "owner": "team-orders",
   "consumers": [{"id": "orders-api", "kind": "app", "verify": "attest", "timeout_ms": 20000}]}
]
EOF

# The application's health check: log in the way the application would, from
# the file the agent wrote; the password goes in REDISCLI_AUTH, not argv.
cat >"$TMP/app/healthcheck.sh" <<'EOF'
#!/bin/sh
set -eu
url="$(sed -n 's/^REDIS_URL=//p' "$KEYWAVE_SECRET_FILE")"
rest="${url#redis://}"
userinfo="${rest%%@*}"
hostport="${rest#*@}"
hostport="${hostport%%/*}"
REDISCLI_AUTH="${userinfo#*:}"
export REDISCLI_AUTH
[ "$(redis-cli -h "${hostport%:*}" -p "${hostport##*:}" --user "${userinfo%%:*}" PING)" = PONG ]
EOF
chmod 700 "$TMP/app/healthcheck.sh"

cat >"$TMP/agent.toml" <<EOF
consumer = "orders-api"
region = "eu"
nats_url = "$KEYWAVE_NATS_URL"
region_key_file = "$TMP/eu.key"
reload_command = "date +%s >> '$TMP/app/reloads'"
reload_timeout_secs = 5
health_command = "'$TMP/app/healthcheck.sh'"
health_timeout_secs = 5
health_retry_secs = 1

[[credential]]
id = "cache-orders"
path = "$TMP/app/redis.env"
template = "REDIS_URL=redis://{{login}}:{{secret}}@127.0.0.1:$REDIS_PORT/0\n"
principal = "orders_app"
mode = "0600"
EOF
note "agent writes $TMP/app/redis.env:"
note "  REDIS_URL=redis://{{login}}:{{secret}}@127.0.0.1:$REDIS_PORT/0"

# ---------------------------------------------------------------------------
# 4. Coordinator, inventory, worker, enrolment, agent
# ---------------------------------------------------------------------------

step "Starting keywave-coordinator and importing the inventory"
# The daemons log at info to logs/*.log (never a secret); the CLI stays quiet.
DAEMON_LOG="${RUST_LOG:-info}"
unset RUST_LOG
export NO_COLOR=1
RUST_LOG="$DAEMON_LOG" start coordinator "$BIN/keywave-coordinator" --regions eu --preflight-timeout 2s \
    --signing-key-file "$TMP/coordinator.key"
wait_for 20 "the coordinator's API" "$KEYWAVE" campaign list
"$KEYWAVE" inventory import "$TMP/inventory.json"
"$KEYWAVE" inventory deps cache-orders

step "Starting keywave-worker (region eu) and enrolling today's secret"
RUST_LOG="$DAEMON_LOG" start worker "$WORKER" --config "$TMP/worker.toml"
# The secret goes on stdin (a builtin's output: not on any command line).
printf '%s\n' "$INITIAL_PASSWORD" |
    "$WORKER" --config "$TMP/worker.toml" enroll --credential cache-orders \
        --endpoint redis-main --principal orders_app 2>>"$TMP/logs/enroll.log"

step "Starting the agent of orders-api"
RUST_LOG="$DAEMON_LOG" start agent "$WORKER" agent --config "$TMP/agent.toml"
APP_FILE="$TMP/app/redis.env"
wait_for 20 "the agent to write $APP_FILE" test -s "$APP_FILE"
[ "$(cat "$APP_FILE")" = "REDIS_URL=redis://orders_app:$INITIAL_PASSWORD@127.0.0.1:$REDIS_PORT/0" ] ||
    die "$APP_FILE does not hold the enrolled secret"
BEFORE="$(fingerprint "$APP_FILE")"
note "$APP_FILE  mode $(stat -c %#a "$APP_FILE")  $BEFORE  (today's secret)"

# ---------------------------------------------------------------------------
# 5. A continuity campaign
# ---------------------------------------------------------------------------

step "keywave campaign start --selector id=cache-orders --strategy continuity --waves 1 --wait"
if ! OUT="$("$KEYWAVE" campaign start --selector 'id=cache-orders' --strategy continuity \
    --waves 1 --failure-budget 0 --task-timeout 30s --name consumers-demo \
    --reason 'README consumers demo' --wait --wait-timeout 45s 2>&1)"; then
    printf '%s\n' "$OUT"
    die "the campaign did not complete"
fi
printf '%s\n' "$OUT"
CAMPAIGN="$(printf '%s\n' "$OUT" | grep -o 'c-[0-9a-f]\{6,\}' | head -n 1)"
[ -n "$CAMPAIGN" ] || die "no campaign id in the output of campaign start"

step "keywave campaign status $CAMPAIGN"
"$KEYWAVE" campaign status "$CAMPAIGN"

step "keywave campaign report $CAMPAIGN --format markdown | head -n 20"
"$KEYWAVE" campaign report "$CAMPAIGN" --format markdown >"$TMP/report.md"
head -n 20 "$TMP/report.md"
note "..."
awk '/^## Credentials/ { on = 1; next } /^## / { on = 0 } on && /^\|/ && n++ < 3' "$TMP/report.md"

# ---------------------------------------------------------------------------
# 6. Proof
# ---------------------------------------------------------------------------

step "What the application sees"
AFTER="$(fingerprint "$APP_FILE")"
note "$APP_FILE  mode $(stat -c %#a "$APP_FILE")  $AFTER  (was $BEFORE)"
[ "$AFTER" != "$BEFORE" ] || die "the agent did not write the new secret"
NEW_URL="$(sed -n 's/^REDIS_URL=//p' "$APP_FILE")"
NEW_PASSWORD="${NEW_URL#redis://orders_app:}"
NEW_PASSWORD="${NEW_PASSWORD%%@*}"
[ -n "$NEW_PASSWORD" ] && [ "$NEW_PASSWORD" != "$INITIAL_PASSWORD" ] || die "$APP_FILE holds no new password"
note "reloads run by the agent: $(wc -l <"$TMP/app/reloads")"

step "Redis AUTH as orders_app"
NEW_AUTH="$(redis_auth orders_app "$NEW_PASSWORD")"
OLD_AUTH="$(redis_auth orders_app "$INITIAL_PASSWORD")"
note "new password (from the agent's file): $NEW_AUTH"
note "old password (enrolled):              $OLD_AUTH"
[ "$NEW_AUTH" = OK ] || die "the new password does not log in"
[ "$OLD_AUTH" = refused ] || die "the old password still logs in"

step "Done: orders-api moved to the new secret before the old one was revoked"
