#!/usr/bin/env bash
# Runs every cellmail test: unit tests, the registry and queue suites (embedded and
# production implementations), and the end-to-end tests that boot the real binaries.
# Installs what is missing on a fresh Debian machine (protoc, etcd, the moto AWS emulator),
# starts etcd and moto on free loopback ports for the tests, and stops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/local/lib.sh
need_cargo
need_packages protoc:protobuf-compiler etcd:etcd-server
need_moto

services=$(mktemp -d)
stop_services() {
  local pids
  pids=$(jobs -p)
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$services"
}
trap stop_services EXIT
started=$SECONDS
start_test_services "$services"
echo "test services ready in $((SECONDS - started)) s" >&2

# The end-to-end tests start the binaries themselves; build them first.
cargo build --locked --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
