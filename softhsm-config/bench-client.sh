#!/usr/bin/env bash
# Thin-client benchmark (not part of the default suite): a fresh `wrapd dev` in a temp dir,
# then `wrapctl bench`: `openssl speed -evp aes-256-gcm` (16 KiB) as the baseline, the
# library encrypting/decrypting SIZE MiB in memory, `wrapctl encrypt/decrypt` on a SIZE MiB
# file next to a plain file copy, and 1 KiB messages/s through the daemon with and without
# the data key cache. Extra arguments go to `wrapctl bench` (e.g. --json).
#   ./softhsm-config/bench-client.sh [SIZE_MIB] [wrapctl bench options...]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
mib="${1:-1024}"
shift || true
command -v openssl >/dev/null || apt-get install -y openssl
. softhsm-config/dev-daemon.sh
start_dev_daemon
./target/release/wrapctl --socket "$dir/wrapd.sock" bench --mib "$mib" --dir "$dir" "$@"
