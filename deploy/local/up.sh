#!/usr/bin/env bash
# Runs the whole platform on this machine on embedded defaults (`cellmail up`): router on
# 127.0.0.1:50051, control plane on 127.0.0.1:50052, two cells, state in ./.cellmail.
# Extra arguments go to `cellmail up` (e.g. --cells 3). Installs protoc if it is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/local/lib.sh
need_cargo
need_packages protoc:protobuf-compiler
exec cargo run --release --locked --bin cellmail -- up "$@"
