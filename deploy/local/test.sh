#!/usr/bin/env bash
# Runs every cellmail test: unit tests, the registry and queue suites, and the end-to-end
# tests that boot the real binaries. Installs what is missing on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/local/lib.sh
need_cargo
need_packages protoc:protobuf-compiler

export AWS_EC2_METADATA_DISABLED=true
# The end-to-end tests start the binaries themselves; build them first.
cargo build --locked --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
