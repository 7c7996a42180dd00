#!/usr/bin/env bash
# Quick start, command 2: run the whole test suite.
#   ./softhsm-config/test.sh
# Installs SoftHSM2 if missing, then runs every test (unit, integration against real SoftHSM
# tokens in temp dirs over real sockets, doc tests). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./softhsm-config/install-deps.sh
cargo test --all-features "$@"
