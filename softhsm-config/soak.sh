#!/usr/bin/env bash
# Soak test (not part of the default suite): a fresh `wrapd dev` in a temp dir, then
# `wrapd soak`: mixed GenerateDataKey/Unwrap/ReWrap from many concurrent clients while keys
# rotate. Prints per-operation latency percentiles, errors (expected: none) and the daemon's
# RSS at start and end. Exits non-zero on any error.
#   ./softhsm-config/soak.sh [SECONDS] [CLIENTS]      (default 180 s, 32 clients)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-180}"
clients="${2:-32}"
. softhsm-config/dev-daemon.sh
start_dev_daemon
./target/release/wrapd soak --config "$dir/wrapd.toml" --seconds "$secs" --concurrency "$clients"
kill -TERM "$pid"
wait "$pid"
echo "daemon exited cleanly; audit log: $(./target/release/wrapctl audit verify "$dir/audit.log" | tr '\n' ' ')"
