#!/usr/bin/env bash
# Fair queuing, measured: the integration tests of tests/fair_queue.rs, run RUNS times.
# One model serves one request at a time in 100 ms (the fake llama-server); key A keeps
# 32 requests waiting while key B sends one request at a time. Prints, for each policy,
# B's median wait in service times per run, and the median over the runs; then the share
# of two saturating keys of weights 3 and 1 (fair only).
#
#   bench/fair_queue.sh [runs, default 3]
#
# Each run takes about 25 s (the fifo half most of it). CARGO_TARGET_DIR and
# CARGO_PROFILE (e.g. release) are passed to cargo as usual.
set -euo pipefail
RUNS="${1:-3}"
cd "$(dirname "$0")/.."
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

profile=()
[ -n "${CARGO_PROFILE:-}" ] && profile=(--profile "$CARGO_PROFILE")
cargo test "${profile[@]}" -p llmgate-tests --test fair_queue --no-run >/dev/null 2>&1 \
  || cargo test "${profile[@]}" -p llmgate-tests --test fair_queue --no-run

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
for run in $(seq "$RUNS"); do
  cargo test "${profile[@]}" -p llmgate-tests --test fair_queue -- \
    --nocapture --test-threads 1 --include-ignored 2>&1 | tee "$WORK/run$run" \
    | grep -oE "(fair|fifo): B's median wait .*|weights 3 and 1.*" || true
  for policy in fair fifo; do
    sed -n "s/.*$policy: B's median wait \([0-9.]*\) .*/\1/p" "$WORK/run$run" >> "$WORK/$policy"
  done
done
for policy in fair fifo; do
  [ -s "$WORK/$policy" ] || continue
  echo "$policy: B's median wait, median of $(wc -l < "$WORK/$policy") runs: $(median < "$WORK/$policy") service times"
done
