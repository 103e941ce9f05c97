#!/usr/bin/env bash
# Starts keywave's local multi-region NATS supercluster: a home cluster of 3
# servers (campaign state at R3) and one server per region eu, us, ap, joined
# by gateways, every server tagged with where it is (see server.conf.tmpl and
# docs/multi-region.md).
#
#   deploy/multi-region/start.sh               # foreground; Ctrl-C stops all
#   deploy/multi-region/start.sh --background  # pid files; stop with stop.sh
#   deploy/multi-region/start.sh --secure      # with the least-privilege users
#
# --secure makes every server include deploy/nats-accounts.conf (account
# KEYWAVE, one user per role, as deploy/nats-secure.conf on one server).
# Each user's password is read from KEYWAVE_NATS_PASSWORD_<USER> (e.g.
# KEYWAVE_NATS_PASSWORD_WORKER_EU, a quoted value or bcrypt hash as in
# deploy/nats-secure.conf); a variable that is unset gets a random password,
# written for the clients to $KEYWAVE_MR_DIR/passwords/<user> (mode 0600).
#
# Environment:
#   KEYWAVE_MR_BASE_PORT  first client port (default 14222). Server i (0..5:
#                         home1 home2 home3 eu1 us1 ap1) listens for clients
#                         on BASE+i, routes on BASE+10+i, gateways on
#                         BASE+20+i and monitoring (http) on BASE+30+i.
#   KEYWAVE_MR_DIR        where configs, stores, logs and pid files go
#                         (default /tmp/keywave-multi-region).
#   KEYWAVE_MR_TIMEOUT    seconds to wait for the supercluster (default 60).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base="${KEYWAVE_MR_BASE_PORT:-14222}"
dir="${KEYWAVE_MR_DIR:-/tmp/keywave-multi-region}"
timeout="${KEYWAVE_MR_TIMEOUT:-60}"
background=0
secure=0
for arg in "$@"; do
  case "$arg" in
    --background) background=1 ;;
    --secure) secure=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument $arg (use --background and/or --secure)" >&2; exit 2 ;;
  esac
done

command -v nats-server >/dev/null || { echo "start.sh: nats-server not found on PATH" >&2; exit 1; }
case "$base" in ''|*[!0-9]*) echo "start.sh: KEYWAVE_MR_BASE_PORT must be a number" >&2; exit 2 ;; esac
if [ "$base" -lt 1024 ] || [ "$base" -gt 65400 ]; then
  echo "start.sh: KEYWAVE_MR_BASE_PORT must be between 1024 and 65400" >&2; exit 2
fi

# name cluster tag, in server order (index i gives the ports).
servers=(
  "home1 home role:home"
  "home2 home role:home"
  "home3 home role:home"
  "eu1 eu region:eu"
  "us1 us region:us"
  "ap1 ap region:ap"
)

mkdir -p "$dir"
for f in "$dir"/*.pid; do
  [ -e "$f" ] || continue
  if kill -0 "$(cat "$f")" 2>/dev/null; then
    echo "start.sh: already running (pid file $f); run deploy/multi-region/stop.sh first" >&2
    exit 1
  fi
  rm -f "$f"
done

# The route URLs of a cluster, and one gateway URL per cluster.
routes_of() {
  local want="$1" out="" i=0 s name cluster tag
  for s in "${servers[@]}"; do
    read -r name cluster tag <<<"$s"
    if [ "$cluster" = "$want" ]; then
      out="${out:+$out, }\"nats-route://127.0.0.1:$((base + 10 + i))\""
    fi
    i=$((i + 1))
  done
  echo "$out"
}
gateways=""
seen=" "
i=0
for s in "${servers[@]}"; do
  read -r name cluster tag <<<"$s"
  case "$seen" in *" $cluster "*) ;; *)
    gateways="${gateways:+$gateways, }{name: $cluster, urls: [\"nats://127.0.0.1:$((base + 20 + i))\"]}"
    seen="$seen$cluster "
  ;; esac
  i=$((i + 1))
done

# The users of deploy/nats-accounts.conf.
users=(coordinator worker-eu worker-us worker-ap agent-eu agent-us agent-ap detect-siem operator)
accounts=""
if [ "$secure" = 1 ]; then
  # Each server includes its own copy (nats-server resolves an include
  # relative to the including file).
  accounts='include "nats-accounts.conf"'
  mkdir -p "$dir/passwords"
  chmod 700 "$dir/passwords"
  for u in "${users[@]}"; do
    var="KEYWAVE_NATS_PASSWORD_$(printf '%s' "$u" | tr 'a-z-' 'A-Z_')"
    if [ -z "${!var:-}" ]; then
      pw="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 32)"
      (umask 077; printf '%s' "$pw" >"$dir/passwords/$u")
      export "$var=\"$pw\""
    fi
  done
fi

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$dir"/*.pid
}

i=0
for s in "${servers[@]}"; do
  read -r name cluster tag <<<"$s"
  mkdir -p "$dir/$name"
  [ "$secure" = 0 ] || cp "$here/../nats-accounts.conf" "$dir/$name/nats-accounts.conf"
  sed -e "s|@NAME@|$name|g" \
      -e "s|@HOST@|127.0.0.1|g" \
      -e "s|@CLUSTER@|$cluster|g" \
      -e "s|@TAGS@|\"$tag\"|g" \
      -e "s|@CLIENT_PORT@|$((base + i))|g" \
      -e "s|@ROUTE_PORT@|$((base + 10 + i))|g" \
      -e "s|@GATEWAY_PORT@|$((base + 20 + i))|g" \
      -e "s|@HTTP_PORT@|$((base + 30 + i))|g" \
      -e "s|@STORE_DIR@|$dir/$name/store|g" \
      -e "s|@MAX_MEMORY@|1GB|g" \
      -e "s|@MAX_FILE@|10GB|g" \
      -e "s|@ROUTES@|$(routes_of "$cluster")|g" \
      -e "s|@GATEWAYS@|$gateways|g" \
      -e "s|@ACCOUNTS@|$accounts|g" \
      "$here/server.conf.tmpl" >"$dir/$name/nats-server.conf"
  nats-server -c "$dir/$name/nats-server.conf" >"$dir/$name/nats-server.log" 2>&1 &
  pids+=("$!")
  echo "$!" >"$dir/$name.pid"
  i=$((i + 1))
done
[ "$background" = 1 ] || trap 'echo; echo "stopping"; stop_all; exit 0' INT TERM

# Ready means: every server answers and names the JetStream meta leader
# (so JetStream requests work through any of them), and the meta leader
# sees every other server of the supercluster, across the gateways, as a
# current peer (so placement can choose among all of them).
total=${#servers[@]}
deadline=$((SECONDS + timeout))
jsz() { curl -fsS "http://127.0.0.1:$((base + 30 + $1))/jsz" 2>/dev/null; }
leader_of() { printf '%s' "$1" | sed -n 's/.*"leader": *"\([^"]*\)".*/\1/p' | head -n1; }
give_up() {
  echo "start.sh: $1; last log lines of $2:" >&2
  tail -n 20 "$dir/$2/nats-server.log" >&2 || true
  stop_all
  exit 1
}
i=0
leader=""
for s in "${servers[@]}"; do
  read -r name cluster tag <<<"$s"
  until body="$(jsz "$i")" && leader="$(leader_of "$body")" && [ -n "$leader" ]; do
    kill -0 "${pids[$i]}" 2>/dev/null || give_up "$name exited" "$name"
    [ "$SECONDS" -lt "$deadline" ] || give_up "$name has no JetStream meta leader after ${timeout}s" "$name"
    sleep 0.5
  done
  i=$((i + 1))
done
until leader_index="" && {
        i=0
        for s in "${servers[@]}"; do
          read -r name cluster tag <<<"$s"
          [ "$name" = "$leader" ] && leader_index=$i
          i=$((i + 1))
        done
        [ -n "$leader_index" ]
      } && body="$(jsz "$leader_index")" \
      && [ "$(leader_of "$body")" = "$leader" ] \
      && [ "$(printf '%s' "$body" | grep -c '"current": *true')" -ge $((total - 1)) ]; do
  [ "$SECONDS" -lt "$deadline" ] || give_up "the meta leader $leader does not see all $total servers after ${timeout}s" "${leader:-home1}"
  sleep 0.5
  # The leader may have changed meanwhile: ask the first server again.
  body="$(jsz 0 || true)"
  new_leader="$(leader_of "$body")"
  [ -z "$new_leader" ] || leader="$new_leader"
done

# A server that could not bind its ports (another process has them) exits
# at once, while whatever holds the ports may still answer above.
i=0
for s in "${servers[@]}"; do
  read -r name cluster tag <<<"$s"
  kill -0 "${pids[$i]}" 2>/dev/null || give_up "$name exited (ports in use? set KEYWAVE_MR_BASE_PORT)" "$name"
  i=$((i + 1))
done

echo "keywave supercluster ready (JetStream meta leader: $leader); data, configs and logs in $dir"
if [ "$secure" = 1 ]; then
  echo "least-privilege users of deploy/nats-accounts.conf; generated passwords (if any) in $dir/passwords/<user>"
fi
echo "client URLs:"
for want in home eu us ap; do
  urls="" i=0
  for s in "${servers[@]}"; do
    read -r name cluster tag <<<"$s"
    [ "$cluster" = "$want" ] && urls="${urls:+$urls,}nats://127.0.0.1:$((base + i))"
    i=$((i + 1))
  done
  printf '  %-5s %s\n' "$want" "$urls"
done
echo "coordinator: keywave-coordinator --nats <home URLs> --replicas 3 --region-replicas 1 \\"
echo "               --regions eu,us,ap --home-placement cluster=home \\"
echo "               --placement eu=region:eu,us=region:us,ap=region:ap"

if [ "$background" = 1 ]; then
  echo "running in the background; stop with deploy/multi-region/stop.sh"
  exit 0
fi
echo "Ctrl-C stops every server"
wait
