#!/usr/bin/env bash
# Quick start, command 1: run the daemon in dev mode.
#   ./softhsm-config/dev.sh [--state-dir DIR]
# Installs SoftHSM2 if missing, builds wrapd and runs `wrapd dev`: a SoftHSM token, PIN,
# SQLite store and config are created once in DIR (default ./.wrapd-dev), then it serves
# DIR/wrapd.sock and prints `wrapd ready socket=...`.
set -euo pipefail
cd "$(dirname "$0")/.."
./softhsm-config/install-deps.sh
# The daemon and wrapctl without the S3 client (`cargo build --release --bins` adds
# `wrapctl s3`): the AWS SDK is about 40 % of a first build.
cargo build --release --no-default-features --features server,cli --bins
exec ./target/release/wrapd dev "$@"
