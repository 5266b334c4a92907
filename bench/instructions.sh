#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: runs of the same build agree
# within about 1 %, however busy the machine is (requests/s on a small shared machine
# moves by ±20 % from one run to the next). User-space instructions only; the kernel's
# share (socket reads and writes) is not counted.
#
#   bench/instructions.sh [requests, default 4000]
#   BIN_DIR=dir bench/instructions.sh   (binaries built elsewhere, e.g. an older commit)
#   KEEP=dir bench/instructions.sh      (keeps the callgrind profiles, for callgrind_annotate)
#   LLMGATE_LOG=info bench/instructions.sh  (llmgate's log level, default warn; at info
#                                           it writes an access log line per request)
#
# Runs llmgate (auth + usage to SQLite) and the bare proxy (llmgate's Proxy alone on
# hyper) under callgrind in front of one nginx upstream, warms both up, zeroes the
# counters, sends the requests with ab over 4 keep-alive connections, and divides.
# Needs valgrind, nginx and ab (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-4000}"
if ! command -v valgrind >/dev/null || ! command -v nginx >/dev/null || ! command -v ab >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind nginx-light apache2-utils >/dev/null
fi
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p llmgate-server -p llmgate-examples
fi
BIN="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT

# shellcheck source=bench/common.sh
source bench/common.sh
fixed_upstream 18021

export LLMGATE_ADMIN_KEY="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)" LLMGATE_LOG="${LLMGATE_LOG:-warn}"
valgrind -q --tool=callgrind --callgrind-out-file="$WORK/llmgate.%p" \
  "$BIN/llmgate" serve --upstream http://127.0.0.1:18021 --listen 127.0.0.1:18023 --data-dir "$WORK/data" >/dev/null 2>&1 &
valgrind -q --tool=callgrind --callgrind-out-file="$WORK/bare.%p" \
  "$BIN/bare_proxy" 127.0.0.1:18024 http://127.0.0.1:18021 >/dev/null 2>&1 &
for _ in $(seq 600); do curl -sf http://127.0.0.1:18023/healthz >/dev/null && curl -s -o /dev/null http://127.0.0.1:18024/ && break; sleep 0.2; done
KEY="$(bench_key "$BIN/llmgate" "$WORK/data")"
printf '%s' "$REQUEST" > "$WORK/body.json"
load() { # port, requests
  ab -q -k -n "$2" -c 4 -p "$WORK/body.json" -T application/json -H "Authorization: Bearer $KEY" \
    "http://127.0.0.1:$1/v1/chat/completions" | sed -nE 's/^(Complete|Failed) requests:[[:space:]]+([0-9]+)/\2/p' | tr '\n' ' '
}
echo "| target | instructions per request |"
echo "|---|---:|"
for target in bare:18024 llmgate:18023; do
  name="${target%%:*}"; port="${target##*:}"
  pid="$(pgrep -f "callgrind-out-file=$WORK/$name" | head -n 1)"
  load "$port" 500 >/dev/null
  sleep 1  # let llmgate's usage writer finish the warm-up batch
  callgrind_control -z "$pid" >/dev/null 2>&1
  read -r complete failed <<<"$(load "$port" "$N")"
  [ "$complete" = "$N" ] && [ "$failed" = 0 ] || { echo "$name: $complete of $N complete, $failed failed" >&2; exit 1; }
  sleep 1  # the usage of the last requests is written within the writer's 50 ms linger
  callgrind_control -d "$pid" >/dev/null 2>&1
  total=$(cat "$WORK/$name.$pid".* 2>/dev/null | sed -nE 's/^(summary|totals): ([0-9]+).*/\2/p' | sort -n | tail -n 1)
  echo "| $name | $((total / N)) |"
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$WORK/$name.$pid".* "$KEEP/"; fi
done
