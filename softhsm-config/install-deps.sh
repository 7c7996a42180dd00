#!/usr/bin/env bash
# Installs what wrapd needs on a fresh Debian/Ubuntu machine, only when missing:
# SoftHSM2 (the development and test token) and the official AWS Encryption SDK for Python
# (interop tests). Safe to run again.
set -euo pipefail

have_softhsm() {
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib64/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -e "$p" ] && return 0
  done
  return 1
}

if ! have_softhsm; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing softhsm2..." >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 >/dev/null
fi

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

# The official AWS Encryption SDK (Python) and gRPC, for the interop tests and the example
# master-key provider in examples/python.
if ! python3 -c "import aws_encryption_sdk, grpc, grpc_tools" 2>/dev/null; then
  echo "installing aws-encryption-sdk, grpcio, grpcio-tools (Python)..." >&2
  python3 -m pip install --quiet --disable-pip-version-check \
    "aws-encryption-sdk>=4,<5" grpcio grpcio-tools >&2
fi
