#!/usr/bin/env bash
# Runs the platform as separate processes on this machine, as it is deployed: etcd, cells
# (cell-1 .. cell-N), a router and two control planes (one leads, one stands by), with their
# state, logs and pid files under $CELLMAIL_LOCAL_DIR (default ./.cellmail-local). They call
# each other over mutual TLS, with certificates from a CA of the cluster's own in $DIR/tls.
#
#   deploy/local/cluster.sh start    start everything, print the addresses, then `ready`
#   deploy/local/cluster.sh stop     stop every process started under the dir
#
# Rollouts deploy with deploy/local/deploy-cell.sh: release V is the cellmail-cell binary (or
# a script that runs one) at $DIR/releases/V/cellmail-cell; `start` makes the first release,
# $CELLMAIL_LOCAL_RELEASE (default `initial`), from the built binaries. Settings (env):
#   CELLMAIL_LOCAL_CELLS    cells to start (3)
#   CELLMAIL_LOCAL_ETCD     host:port of an etcd to use instead of starting one
#   CELLMAIL_REGISTRY_PREFIX  key prefix in etcd (/cellmail/)
#   CELLMAIL_BIN_DIR        where the built binaries are (default: build target/release)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/deploy/local/lib.sh"
DIR=$(mkdir -p "${CELLMAIL_LOCAL_DIR:-.cellmail-local}" && cd "${CELLMAIL_LOCAL_DIR:-.cellmail-local}" && pwd)
CELLS=${CELLMAIL_LOCAL_CELLS:-3}
BIN=${CELLMAIL_BIN_DIR:-$ROOT/target/release}
RELEASE=${CELLMAIL_LOCAL_RELEASE:-initial}
PREFIX=${CELLMAIL_REGISTRY_PREFIX:-/cellmail/}

# daemon NAME CMD...: starts CMD in its own session, logging to $DIR/NAME.log.
daemon() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

# certs NAME ARGS...: issues the certificate of one process (`cellmail certs issue ARGS`)
# from the cluster's CA in $DIR/tls; prints the settings file that gives it to the process.
certs() {
  local name=$1
  shift
  mkdir -p "$DIR/tls"
  "$BIN/cellmail" certs issue --dir "$DIR/tls" "$@" >"$DIR/tls/$name.env"
  echo "$DIR/tls/$name.env"
}

# wait_tcp HOST:PORT: waits (30 s at most) until something listens there.
wait_tcp() {
  local deadline=$((SECONDS + 30))
  until (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "$1 did not accept connections within 30 s" >&2; return 1; }
    sleep 0.1
  done
}

start() {
  need_packages python3:python3
  if [ -z "${CELLMAIL_BIN_DIR:-}" ]; then
    need_cargo
    need_packages protoc:protobuf-compiler
    (cd "$ROOT" && cargo build --release --locked -p cellmail -p cellmail-cell -p cellmail-router -p cellmail-control)
  fi
  [ -x "$BIN/cellmail-control" ] || { echo "no cellmail binaries in $BIN" >&2; exit 1; }
  mkdir -p "$DIR/releases/$RELEASE" "$DIR/cells"
  [ -e "$DIR/releases/$RELEASE/cellmail-cell" ] || ln -s "$BIN/cellmail-cell" "$DIR/releases/$RELEASE/cellmail-cell"

  local etcd=${CELLMAIL_LOCAL_ETCD:-}
  if [ -z "$etcd" ]; then
    need_packages etcd:etcd-server
    local client peer
    client=$(free_port) peer=$(free_port)
    daemon etcd etcd --name cellmail-local --data-dir "$DIR/etcd" \
      --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "cellmail-local=http://127.0.0.1:$peer"
    etcd=127.0.0.1:$client
    wait_http "http://$etcd/health"
  fi
  [ -s "$DIR/admin-token" ] || python3 -c 'import secrets; print(secrets.token_hex(16))' >"$DIR/admin-token"
  # The key that seals domains' DKIM keys: the control planes seal, the cells open.
  [ -s "$DIR/dkim-keys" ] || (umask 077 && python3 -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())' >"$DIR/dkim-keys")
  # What every process (and deploy-cell.sh) shares.
  local tracking=127.0.0.1:$(free_port)
  cat >"$DIR/env" <<ENV
export CELLMAIL_REGISTRY=etcd://$etcd
export CELLMAIL_TRACKING_BASE_URL=http://$tracking
export CELLMAIL_REGISTRY_PREFIX=$PREFIX
export CELLMAIL_ADMIN_TOKEN=$(cat "$DIR/admin-token")
export CELLMAIL_DKIM_KEY_FILE=$DIR/dkim-keys
export CELLMAIL_LOCAL_DIR=$DIR
export CELLMAIL_LOCAL_BIN=$BIN
ENV
  . "$DIR/env"

  for n in $(seq 1 "$CELLS"); do
    "$ROOT/deploy/local/deploy-cell.sh" "cell-$n" "$RELEASE"
  done
  local controls=()
  for n in 1 2; do
    local addr=127.0.0.1:$(free_port)
    daemon "control-$n" "$BIN/cellmail-control" --config "$(certs "control-$n" --role control)" \
      --control-addr "$addr" --trust-new-domains \
      --data-dir "$DIR/control-$n" --deployer command --deploy-command "$ROOT/deploy/local/deploy-cell.sh"
    controls+=("$addr")
  done
  local router=127.0.0.1:$(free_port) metrics=127.0.0.1:$(free_port)
  daemon router "$BIN/cellmail-router" --config "$(certs router --role router)" --router-addr "$router" --metrics-addr "$metrics" --tracking-addr "$tracking" --data-dir "$DIR/router"
  for addr in "${controls[@]}" "$router"; do wait_tcp "$addr"; done
  cat >>"$DIR/env" <<ENV
export CELLMAIL_CONTROL=${controls[0]}
export CELLMAIL_CONTROL_STANDBY=${controls[1]}
export CELLMAIL_ROUTER=$router
ENV
  echo "etcd: $etcd"
  echo "router: $router"
  echo "tracking: $tracking"
  echo "control: ${controls[*]}"
  echo "env: . $DIR/env   (then e.g. cellmail cell list)"
  echo "ready"
}

stop() {
  local pidfile
  for pidfile in "$DIR"/*.pid "$DIR"/cells/*/pid; do
    [ -f "$pidfile" ] || continue
    stop_pid "$pidfile"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
