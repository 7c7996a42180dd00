#!/usr/bin/env bash
# Quick start, command 2: run the whole test suite.
#   ./softhsm-config/test.sh
# Installs SoftHSM2 if missing, then runs every test (unit, integration against real SoftHSM
# tokens in temp dirs over real sockets, doc tests), then the CloudHSM pass: the integration
# tests of the data path, key management and the front ends again, every daemon on the
# project's simulated CloudHSM cluster (cloudhsm-sim/, in front of SoftHSM) with
# profile = "cloudhsm". Extra arguments go to the first `cargo test` (and skip the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
./softhsm-config/install-deps.sh
# The PKCS#11 module the CloudHSM tests load (target/debug/libwrapd_cloudhsm_sim.so).
cargo build -p wrapd-cloudhsm-sim
cargo test --all-features "$@"
if [ "$#" -eq 0 ]; then
  cargo test -p wrapd-cloudhsm-sim
  WRAPD_TEST_HSM=cloudhsm-sim cargo test --all-features --test it -- \
    access_control:: audit_log:: aws_kms_api:: cancellation:: crash_safety:: \
    data_key_cache:: data_plane:: grpc_clients:: key_lifecycle:: keyrings:: kms_plugin:: \
    metrics:: rewrap:: s3_encryption:: version_usage:: wrapctl_cli:: wrapctl_files:: xks:: \
    --skip kms_plugin::healthz_is_not_ok_when_the_key_cannot_be_used
  # (That one moves SoftHSM's token directory away and back, which a CloudHSM cannot do.)
fi
