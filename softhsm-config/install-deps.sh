#!/usr/bin/env bash
# Installs what wrapd needs on a fresh Debian/Ubuntu machine, only when missing:
# SoftHSM2 (the development and test token), and the real clients the interop tests drive:
# the distribution's AWS CLI (/usr/bin/aws) and PostgreSQL server, curl and the tools of AWS's
# XKS proxy test client, boto3, the official AWS Encryption SDK for
# Python and its CLI, grpcio. Safe to run again.
set -euo pipefail

have_softhsm() {
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib64/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -e "$p" ] && return 0
  done
  return 1
}

packages=()
have_softhsm || packages+=(softhsm2)
# The AWS CLI as the distribution ships it (Debian 12: 2.9), at /usr/bin/aws; a pip-installed
# `aws` elsewhere on PATH is not what the tests mean to drive.
[ -x /usr/bin/aws ] || packages+=(awscli)
# A real PostgreSQL server for the fleet tests (they run initdb and postgres themselves).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || packages+=(postgresql)
# The S3 Encryption Client as the distribution ships it (Ruby), for the S3 interop tests;
# OpenSSL's headers and pkg-config for the `openssl` crate (streaming AES-GCM, feature s3).
[ -d /usr/lib/ruby/vendor_ruby/aws-sdk-s3/encryptionV2 ] || packages+=(ruby-aws-sdk-s3)
[ -d /usr/lib/ruby/vendor_ruby/aws-sdk-kms ] || packages+=(ruby-aws-sdk-kms)
dpkg -s libssl-dev >/dev/null 2>&1 || packages+=(libssl-dev)
command -v pkg-config >/dev/null || packages+=(pkg-config)
# AWS's XKS proxy test client (vendored in tests/xks-test-client) is bash over Debian's curl
# (--aws-sigv4), jq, uuidgen and xxd.
command -v curl >/dev/null || packages+=(curl)
command -v jq >/dev/null || packages+=(jq)
command -v uuidgen >/dev/null || packages+=(uuid-runtime)
command -v xxd >/dev/null || packages+=(xxd)
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${packages[*]}..." >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

# The official AWS Encryption SDK (Python) and gRPC, for the interop tests and the example
# master-key provider in examples/python.
# boto3 and the Encryption SDK's CLI for the AWS KMS API tests (the CLI 4.x needs the SDK 3.x).
# kubernetes-validate checks the manifests in packaging/kubernetes against the Kubernetes
# schemas it ships.
# moto's server mode is the local S3 the S3 tests write to (5.0: 5.2 answers
# CompleteMultipartUpload with a wrong XML root element, which the AWS SDKs refuse).
# The official S3 Encryption Client for Python (4.x: V2 and V3 objects) for the S3 interop tests.
if ! python3 -c "import aws_encryption_sdk, aws_encryption_sdk_cli, boto3, grpc, grpc_tools, kubernetes_validate, yaml, moto.server, s3_encryption" 2>/dev/null; then
  echo "installing aws-encryption-sdk, aws-encryption-sdk-cli, boto3, grpcio, grpcio-tools, kubernetes-validate, moto, amazon-s3-encryption-client-python (Python)..." >&2
  python3 -m pip install --quiet --disable-pip-version-check \
    "aws-encryption-sdk>=3.1,<4" "aws-encryption-sdk-cli>=4,<5" "boto3>=1.34" grpcio grpcio-tools \
    kubernetes-validate pyyaml "moto[server]==5.0.28" "amazon-s3-encryption-client-python>=4,<5" >&2
fi
