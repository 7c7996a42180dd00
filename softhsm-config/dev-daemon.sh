# Sourced by soak.sh and bench-client.sh (not run on its own): installs what is missing,
# builds the release binaries and starts a fresh `wrapd dev` in a temp dir, in the
# background. Sets `dir` (its state dir: wrapd.sock, wrapd.toml, audit.log, ...) and `pid`;
# on exit the daemon is stopped and the dir removed.
start_dev_daemon() {
  ./softhsm-config/install-deps.sh
  # As dev.sh builds them (no S3 client), so that the two share one build.
  cargo build --release --no-default-features --features server,cli --bins
  dir="$(mktemp -d)"
  trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
  ./target/release/wrapd dev --state-dir "$dir" > "$dir/ready" 2> "$dir/daemon.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "wrapd ready" "$dir/ready" 2>/dev/null && break; sleep 0.1; done
  grep -q "wrapd ready" "$dir/ready" || { cat "$dir/daemon.log"; exit 1; }
}
