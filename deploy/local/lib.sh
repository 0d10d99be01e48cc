# Shared by the deploy/local scripts: install what a fresh Debian machine lacks.

# apt_install PACKAGE ...: installs Debian packages.
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing $* (Debian packages)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# need_packages CMD:PACKAGE ...: installs each Debian PACKAGE whose CMD is not on the PATH.
need_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo is missing: install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
  }
}

# The AWS API emulator used by the tests: moto server, pinned, in a virtualenv under .venv.
MOTO_VENV=.venv/moto
need_moto() {
  [ -x "$MOTO_VENV/bin/moto_server" ] && return 0
  need_packages python3:python3
  python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
  echo "installing moto[server] into $MOTO_VENV" >&2
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q 'moto[server]==5.2.5'
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL: polls until URL answers (at most 30 s).
wait_http() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1)
        break
    except Exception as err:
        if time.time() > deadline:
            sys.exit(f"{sys.argv[1]} did not answer within 30 s: {err}")
        time.sleep(0.1)
PY
}

# start_test_services DIR: starts etcd and moto on free loopback ports with their state and
# logs under DIR, and exports their addresses for the tests (CELLMAIL_TEST_ETCD,
# CELLMAIL_TEST_AWS_ENDPOINT) with dummy AWS credentials. The caller stops them.
start_test_services() {
  local dir=$1 client peer moto
  client=$(free_port) peer=$(free_port) moto=$(free_port)
  etcd --name cellmail-test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "cellmail-test=http://127.0.0.1:$peer" >"$dir/etcd.log" 2>&1 &
  "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$moto" >"$dir/moto.log" 2>&1 &
  wait_http "http://127.0.0.1:$client/health"
  wait_http "http://127.0.0.1:$moto/moto-api/"
  export CELLMAIL_TEST_ETCD="127.0.0.1:$client"
  export CELLMAIL_TEST_AWS_ENDPOINT="http://127.0.0.1:$moto"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  echo "test services: etcd $CELLMAIL_TEST_ETCD, AWS emulator $CELLMAIL_TEST_AWS_ENDPOINT" >&2
}

# running PID: whether the process runs (an exited one its parent has not reaped yet does not).
running() {
  [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# stop_pid FILE: stops the process whose pid FILE holds (TERM, then KILL after 15 s) and
# removes FILE.
stop_pid() {
  local pid
  pid=$(cat "$1")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 150); do
      running "$pid" || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}
