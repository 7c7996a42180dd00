#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each), keeping the corpus in
# fuzz/corpus/TARGET. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags it needs.
#   ./fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(blob context config policy audit_verify message authority aws_request xks_request s3_envelope)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E "^(#|Done|==|stat::number_of_executed_units|stat::new_units_added)|ERROR|panicked" | tail -5
done
