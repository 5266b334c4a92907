#!/usr/bin/env bash
# Streams at scale: thousands of streaming chat completions open at once, each a chunk
# every 20–50 ms (bench/stream's stream-upstream), sent straight to the upstream, through
# nginx (proxy_buffering off) and through llmgate, in one run, by bench/stream's
# stream-load. For each number of streams, a fresh nginx and a fresh llmgate (release
# builds, default settings) and per arm: the proxy's CPU per event, its memory per open
# stream, added time to first byte, added inter-chunk delay, chunks and tokens received,
# and for llmgate the requests and tokens it recorded for the key.
#
#   bench/stream.sh [streams ...]         (default: 1000 5000)
#   CHUNKS=300 RAMP=3 BIN_DIR=dir bench/stream.sh 1000
#   BARE=1 bench/stream.sh 1000            (also llmgate's Proxy alone on hyper: bare_proxy)
#
# Each stream holds one connection to the proxy and the proxy one to the upstream: the
# open files limit (raised here to the hard limit) bounds the streams a proxy can hold.
# Needs nginx (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a COUNTS <<<"${*:-1000 5000}"
CHUNKS="${CHUNKS:-300}"
RAMP="${RAMP:-3}"
if ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p llmgate-server -p llmgate-bench-stream
  [ -n "${BARE:-}" ] && cargo build --release -q -p llmgate-examples --bin bare_proxy
fi
BIN="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
LLMGATE="$BIN/llmgate"
ulimit -n "$(ulimit -Hn)"
FILES="$(ulimit -n)"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; for p in "$WORK"/*.pid; do kill "$(cat "$p")" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
# shellcheck source=bench/common.sh
source bench/common.sh
UPSTREAM_PORT=18101 NGINX_PORT=18102 GATEWAY_PORT=18103 BARE_PORT=18104
export LLMGATE_LOG=warn LLMGATE_ADMIN_KEY="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"

"$BIN/stream-upstream" --listen "127.0.0.1:$UPSTREAM_PORT" >/dev/null &
UPSTREAM_PID=$!
echo "$UPSTREAM_PID" > "$WORK/stream-upstream.pid"
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$UPSTREAM_PORT/healthz" >/dev/null && break; sleep 0.1; done

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; open files $FILES; $CHUNKS chunks a stream, opened over $RAMP s"
SUMMARIES="$WORK/summaries"
: > "$SUMMARIES"
# Connections the kernel refused because a listen queue was full (the client's SYN is
# retried a second later, which shows as a TTFB over 1 s).
listen_overflows() {
  awk '/^TcpExt:/ { if (!n) { for (i = 1; i <= NF; i++) f[$i] = i; n = 1 } else print $f["ListenOverflows"] }' /proc/net/netstat
}
arm() { # label, url, key, proxy pids...
  local label="$1" url="$2" key="$3"; shift 3
  local pids=() overflows
  for p in "$@"; do pids+=(--proxy-pid "$p"); done
  echo "-- $label, $(uptime | sed 's/.*load/load/')"
  overflows="$(listen_overflows)"
  "$BIN/stream-load" --url "$url" --key "$key" --streams "$N" --chunks "$CHUNKS" --ramp-secs "$RAMP" \
    --upstream-pid "$UPSTREAM_PID" --label "$label" "${pids[@]}" | tee "$WORK/$label.$N.out"
  echo "listen queue overflows during the arm: $(( $(listen_overflows) - overflows ))"
  grep '^summary ' "$WORK/$label.$N.out" >> "$SUMMARIES" || true
  sleep 2  # connections closed before the next arm
}

for N in "${COUNTS[@]}"; do
  # Two descriptors a stream in the proxy, and a few of its own.
  if (( 2 * N + 64 > FILES )); then
    echo "== $N streams: not reachable here: a proxy holds two files a stream and the open files hard limit is $FILES (raise it, e.g. LimitNOFILE, to run it)"
    continue
  fi
  echo "== $N streams"
  NGINX_CONNECTIONS=$(( 2 * N + 64 )) nginx_conf "nginx$N" "server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://127.0.0.1:$UPSTREAM_PORT;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }
  }" auto
  "$LLMGATE" serve --upstream "http://127.0.0.1:$UPSTREAM_PORT" --listen "127.0.0.1:$GATEWAY_PORT" \
    --data-dir "$WORK/data$N" >"$WORK/llmgate$N.out" 2>&1 &
  GATEWAY_PID=$!
  echo "$GATEWAY_PID" > "$WORK/llmgate$N.pid"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null && break; sleep 0.1; done
  KEY="$(bench_key "$LLMGATE" "$WORK/data$N")"
  sleep 1
  URL=/v1/chat/completions
  arm direct "http://127.0.0.1:$UPSTREAM_PORT$URL" "" "$UPSTREAM_PID"
  # shellcheck disable=SC2046
  arm nginx "http://127.0.0.1:$NGINX_PORT$URL" "" $(pgrep -P "$(cat "$WORK/nginx$N.pid")")
  if [ -n "${BARE:-}" ]; then
    "$BIN/bare_proxy" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$UPSTREAM_PORT" >/dev/null &
    BARE_PID=$!
    echo "$BARE_PID" > "$WORK/bare$N.pid"
    sleep 1
    arm bare "http://127.0.0.1:$BARE_PORT$URL" "" "$BARE_PID"
    kill "$BARE_PID"; rm -f "$WORK/bare$N.pid"
  fi
  arm llmgate "http://127.0.0.1:$GATEWAY_PORT$URL" "$KEY" "$GATEWAY_PID"
  # What llmgate recorded, once a graceful stop has written every record.
  kill -TERM "$GATEWAY_PID"; wait "$GATEWAY_PID" || true; rm -f "$WORK/llmgate$N.pid"
  kill "$(cat "$WORK/nginx$N.pid")"; rm -f "$WORK/nginx$N.pid"
  read -r requests prompt completion total < <("$LLMGATE" usage --data-dir "$WORK/data$N" |
    awk '$1 == "bench" { print $3, $4, $5, $6 }')
  sent="$(sed -nE "s/^summary label=llmgate streams=$N complete=([0-9]+) .* prompt_tokens=([0-9]+) completion_tokens=([0-9]+) total_tokens=([0-9]+) .*/\1 \2 \3 \4/p" "$SUMMARIES" | tail -1)"
  verdict=$([ "$requests $prompt $completion $total" = "$sent" ] && echo exact || echo "NOT EXACT")
  echo "llmgate recorded for the key: $requests requests, $prompt + $completion = $total tokens; streamed: $sent (requests prompt completion total): $verdict"
  echo "usage N=$N $verdict" >> "$SUMMARIES"
done

echo
echo "## Summary ($(uptime | sed 's/.*load/load/'))"
printf '%-8s %7s %9s %9s %9s %10s %10s %9s %9s %9s %8s %8s %6s\n' arm streams complete "cpu µs/ev" "KiB/strm" "ttfb p50" "ttfb p99" "gap p50" "gap p99" "trans p99" "ups cpu" "load cpu" busy
awk '/^summary / {
  for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  printf "%-8s %7s %9s %9s %9s %9sms %9sms %7sms %7sms %7sms %7s%% %7s%% %5s%%\n", v["label"], v["streams"], v["complete"], v["cpu_us_per_event"], v["kib_per_stream"], v["ttfb_p50_ms"], v["ttfb_p99_ms"], v["gap_p50_ms"], v["gap_p99_ms"], v["transit_p99_ms"], v["upstream_cpu_pct"], v["load_cpu_pct"], v["machine_busy_pct"]
}
/^usage / { print "llmgate usage, " $2 ": " $3 " " $4 }' "$SUMMARIES"
