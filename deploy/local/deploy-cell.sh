#!/usr/bin/env bash
# The rollout deployer of a platform run by deploy/local/cluster.sh: restarts cell CELL on
# release VERSION, the binary at $CELLMAIL_LOCAL_DIR/releases/VERSION/cellmail-cell, on the
# cell's own data dir. Run by the control plane (`--deployer command`) as
#   deploy-cell.sh CELL VERSION   (or with CELLMAIL_DEPLOY_CELL / CELLMAIL_DEPLOY_VERSION)
# It returns once the new process is started; the rollout waits until it serves VERSION.
# Every deploy is appended to $CELLMAIL_LOCAL_DIR/deploys.log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/deploy/local/lib.sh"
DIR=${CELLMAIL_LOCAL_DIR:?CELLMAIL_LOCAL_DIR must name the dir of deploy/local/cluster.sh}
CELL=${1:-${CELLMAIL_DEPLOY_CELL:?usage: deploy-cell.sh CELL VERSION}}
VERSION=${2:-${CELLMAIL_DEPLOY_VERSION:?usage: deploy-cell.sh CELL VERSION}}
BINARY=$DIR/releases/$VERSION/cellmail-cell
[ -x "$BINARY" ] || { echo "release $VERSION is not installed: no $BINARY" >&2; exit 2; }
. "$DIR/env"

cell_dir=$DIR/cells/$CELL
mkdir -p "$cell_dir" "$DIR/tls"
[ ! -f "$cell_dir/pid" ] || stop_pid "$cell_dir/pid"
# The cell's certificate, from the cluster's CA, issued on its first deploy. Its settings are
# exported over any the caller has (a control plane running this has its own).
tls=$DIR/tls/$CELL.env
[ -s "$tls" ] || "$CELLMAIL_LOCAL_BIN/cellmail" certs issue --dir "$DIR/tls" --role cell --cell-id "$CELL" >"$tls"
set -a
. "$tls"
set +a
CELLMAIL_CELL_ID=$CELL CELLMAIL_DATA_DIR=$cell_dir/data CELLMAIL_RELEASE=$VERSION \
  setsid "$BINARY" </dev/null >>"$cell_dir/log" 2>&1 &
echo $! >"$cell_dir/pid"
echo "$(date +%s.%N) $CELL $VERSION" >>"$DIR/deploys.log"
echo "cell $CELL: release $VERSION started (pid $!)"
