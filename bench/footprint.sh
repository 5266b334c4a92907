#!/usr/bin/env bash
# Footprint: what `llmgate serve` holds in memory with its default settings, after start,
# under load and once the load is over, and what takes it (/proc/PID/smaps_rollup and the
# largest mappings of /proc/PID/smaps).
#
#   bench/footprint.sh [LLMGATE, default the release build] [seconds after the load, default 5]
#
# The load: wrk, 32 connections for 5 s, against a fixed-answer nginx upstream. Needs
# nginx and wrk (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMGATE="${1:-${CARGO_TARGET_DIR:-target}/release/llmgate}"
AFTER="${2:-5}"
LLMGATE="$(realpath "$LLMGATE")"
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")"; rm -rf "$WORK"' EXIT
# shellcheck source=bench/common.sh
source bench/common.sh
fixed_upstream 18041
cd "$WORK"  # the default data directory, ./llmgate-data, lands here (other settings: defaults but the port)
LLMGATE_LOG=warn "$LLMGATE" serve --upstream http://127.0.0.1:18041 --listen 127.0.0.1:18042 >/dev/null 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:18042/healthz >/dev/null && break; sleep 0.1; done
rss() { awk '/^VmRSS/ { print $2 " KiB" }' "/proc/$PID/status"; }
breakdown() {
  echo "  smaps_rollup:"
  grep -E '^(Rss|Pss_Anon|Pss_File|Anonymous|AnonHugePages|Private_Dirty|Shared_Clean):' "/proc/$PID/smaps_rollup" |
    sed 's/^/    /'
  echo "  largest mappings (Rss KiB, AnonHugePages KiB, what):"
  awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "") ? "[anon]" : $6 }
       /^Rss:/ { rss[name] += $2 }
       /^AnonHugePages:/ { huge[name] += $2 }
       END { for (n in rss) if (rss[n] > 0) printf "    %8d %8d  %s\n", rss[n], huge[n], n }' "/proc/$PID/smaps" |
    sort -rn | head -8
}
echo "# $(date -u +%FT%TZ) $LLMGATE; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; THP $(cat /sys/kernel/mm/transparent_hugepage/enabled); $(uptime | sed 's/.*load/load/')"
sleep 1
echo "after start: VmRSS $(rss)"
breakdown
wrk_script "$WORK/post.lua" "$(bench_key "$LLMGATE" "$WORK/llmgate-data")"
wrk -t1 -c32 -d5s -s "$WORK/post.lua" http://127.0.0.1:18042/v1/chat/completions |
  sed -nE 's/^[[:space:]]+([0-9]+) requests in.*/load: \1 requests in 5 s, 32 connections/p'
echo "at the end of the load: VmRSS $(rss)"
sleep "$AFTER"
echo "$AFTER s later: VmRSS $(rss)"
breakdown
