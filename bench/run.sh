#!/usr/bin/env bash
# Reproducible benchmark: requests/s and latency for
#   1. the upstream directly,
#   2. a bare reverse proxy (nginx, keepalive to the upstream),
#   3. llmgate's Proxy service alone on hyper (no auth, no usage, no router),
#   4. llmgate with auth and usage recording on,
#   5. the same llmgate with a key whose rpm and tpm limits are counted but never reached
#      ("limited": what per-key limits cost),
# all against the same fixed-response upstream (nginx returning a chat completion with a
# usage object), in one run (wrk, fixed duration; ROUNDS alternating rounds, median kept,
# since on a small shared machine one run varies by ±20%). For each proxy it also reports
# the CPU time its process(es) spent per request, read from /proc: a figure that moves
# far less than requests/s when the machine is noisy; and the whole machine's CPU per
# request and idle share (/proc/stat): on a saturated machine requests/s follow the
# machine's CPU per request, load generator and upstream included. Then checks that
# llmgate's usage is exact under load: ab sends exactly N requests over 32 keep-alive
# connections and waits for every answer; llmgate must record exactly N requests and N × 16 tokens, and the
# upstream must have served exactly N.
#
#   bench/run.sh [seconds per run, default 10] [connections, default 32]   (ROUNDS=5)
#
# BIN_DIR=dir takes llmgate and bare_proxy from dir instead of building them.
# WORKERS=N runs nginx with N worker processes, llmgate with N serving threads and the
# bare proxy with N Tokio worker threads (both read TOKIO_WORKER_THREADS); default: one
# per core for all three.
#
# Needs nginx and wrk (installed with apt-get when missing). Writes bench/out/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
ROUNDS="${ROUNDS:-5}"
WORKERS="${WORKERS:-auto}"
[ "$WORKERS" != auto ] && export TOKIO_WORKER_THREADS="$WORKERS"
CONNECTIONS="${2:-32}"
OUT="bench/out"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; for p in "$WORK"/*.pid; do kill "$(cat "$p")" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || ! command -v ab >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk apache2-utils >/dev/null
fi
EXACT_N="${EXACT_N:-50000}"

# BIN_DIR=dir: binaries built elsewhere (an older commit, to compare on the same machine).
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p llmgate-server -p llmgate-examples
fi
LLMGATE="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}/llmgate"
BARE="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}/bare_proxy"

UPSTREAM_PORT=18001 PROXY_PORT=18002 GATEWAY_PORT=18003 BARE_PORT=18004
# shellcheck source=bench/common.sh
source bench/common.sh
mkdir -p "$WORK/logs"
# Two nginx instances: the upstream (one worker) and the reverse proxy (one worker per
# core, as llmgate runs one serving thread per core), so neither steals the other's worker.
fixed_upstream "$UPSTREAM_PORT" "$WORK/logs/upstream.log"
nginx_conf proxy "upstream model { server 127.0.0.1:$UPSTREAM_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$PROXY_PORT;
    location / {
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Authorization \"\";
    }
  }" "$WORKERS"

ADMIN="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
export LLMGATE_ADMIN_KEY="$ADMIN" LLMGATE_LOG=warn
"$LLMGATE" serve --upstream "http://127.0.0.1:$UPSTREAM_PORT" --listen "127.0.0.1:$GATEWAY_PORT" \
  --data-dir "$WORK/data" >"$WORK/llmgate.out" &
LLMGATE_PID=$!
"$BARE" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$UPSTREAM_PORT" >/dev/null &
BARE_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null && break; sleep 0.1; done
KEY="$(bench_key "$LLMGATE" "$WORK/data")"
KEY_ID="$("$LLMGATE" keys list --json --data-dir "$WORK/data" | grep -B1 '"name": "bench"' | sed -nE 's/.*"id": "([^"]+)".*/\1/p')"

wrk_script "$WORK/llmgate.lua" "$KEY"
# A second key of the same gateway with rpm and tpm limits far above what the run can
# reach: counted on every request (x-ratelimit-* headers on every answer), never refused.
# Its arm, "limited", runs in the same rounds as "llmgate": what limits cost.
LIMITED_KEY="$(KEY_FLAGS="--rpm 1000000000 --tpm 1000000000000" bench_key "$LLMGATE" "$WORK/data" bench-limited)"
wrk_script "$WORK/limited.lua" "$LIMITED_KEY"
curl -s -D - -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" -H "Authorization: Bearer $LIMITED_KEY" \
  -H 'Content-Type: application/json' -d "$REQUEST" | grep -qi '^x-ratelimit-remaining-tokens:' ||
  { echo "the limited key's answer carries no x-ratelimit headers" >&2; exit 1; }
script_of() { case "$1" in limited) echo "$WORK/limited.lua" ;; *) echo "$WORK/llmgate.lua" ;; esac; }

url_of() {
  case "$1" in
    direct) echo "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions" ;;
    nginx) echo "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" ;;
    bare) echo "http://127.0.0.1:$BARE_PORT/v1/chat/completions" ;;
    llmgate|limited) echo "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" ;;
  esac
}
# The processes of each proxy, and the CPU time (user + system, in clock ticks) they have used.
pids_of() {
  case "$1" in
    nginx) pgrep -P "$(cat "$WORK/proxy.pid")" | tr '\n' ' ' ;;
    bare) echo "$BARE_PID" ;;
    llmgate|limited) echo "$LLMGATE_PID" ;;
  esac
}
cpu_ticks() { local sum=0; for p in $1; do sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$sum"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# The whole machine's busy and idle time (all CPUs, in clock ticks), from /proc/stat.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
# nginx and llmgate run back to back in each round, and so do llmgate and its limited
# key, so that the round's ratios compare them under the same conditions (the load on a
# shared machine drifts within seconds). Every other round runs in reverse order, so
# that neither of a pair always comes second (after the other's load: the gateway's
# writer still flushing, the machine's caches and clocks warmed by it).
TARGETS="direct bare nginx llmgate limited"
REVERSED="limited llmgate nginx bare direct"
for t in $TARGETS; do wrk -t1 -c"$CONNECTIONS" -d2s -s "$(script_of "$t")" "$(url_of "$t")" >/dev/null; done  # warm-up
for round in $(seq "$ROUNDS"); do
  order="$TARGETS"; (( round % 2 )) || order="$REVERSED"
  for t in $order; do
    pids="$(pids_of "$t")"; before=$(cpu_ticks "$pids"); read -r busy0 idle0 <<<"$(machine_ticks)"
    wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$(script_of "$t")" "$(url_of "$t")" > "$WORK/$t.$round.txt"
    requests=$(sed -nE 's/^[[:space:]]+([0-9]+) requests in.*/\1/p' "$WORK/$t.$round.txt")
    # The machine's CPU per request (load generator and upstream included) and its idle
    # share: with the machine saturated, requests/s follow the first.
    read -r busy1 idle1 <<<"$(machine_ticks)"
    awk -v b=$((busy1 - busy0)) -v i=$((idle1 - idle0)) -v us="$TICK_US" -v n="$requests" \
      'BEGIN { printf "%.1f %.0f\n", b * us / n, 100 * i / (b + i) }' > "$WORK/$t.$round.machine"
    if [ -n "$pids" ]; then
      awk -v t=$(( $(cpu_ticks "$pids") - before )) -v us="$TICK_US" -v n="$requests" \
        'BEGIN { printf "%.1f\n", t * us / n }' > "$WORK/$t.$round.cpu"
    fi
  done
done
# The round with the median requests/s stands for each target.
for t in $TARGETS; do
  for round in $(seq "$ROUNDS"); do
    echo "$(sed -nE 's/^Requests\/sec:[[:space:]]+([0-9.]+).*/\1/p' "$WORK/$t.$round.txt") $round"
  done | sort -n | awk -v m=$(( (ROUNDS + 1) / 2 )) 'NR == m { print $2 }' > "$WORK/$t.median"
  cp "$WORK/$t.$(cat "$WORK/$t.median").txt" "$WORK/$t.txt"
done

# Exactness: a fixed number of requests, every one answered.
usage_of() {
  curl -sf "http://127.0.0.1:$GATEWAY_PORT/admin/usage/$KEY_ID" -H "Authorization: Bearer $ADMIN" |
    sed -nE "s/.*\"$1\":([0-9]+).*/\1/p"
}
printf '%s' "$REQUEST" > "$WORK/body.json"
REQ_BEFORE=$(usage_of requests); TOK_BEFORE=$(usage_of total_tokens)
UP_BEFORE=$(wc -l < "$WORK/logs/upstream.log")
ab -q -k -n "$EXACT_N" -c "$CONNECTIONS" -p "$WORK/body.json" -T application/json \
   -H "Authorization: Bearer $KEY" "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" > "$WORK/ab.txt"
COMPLETE=$(sed -nE 's/^Complete requests:[[:space:]]+([0-9]+).*/\1/p' "$WORK/ab.txt")
FAILED=$(sed -nE 's/^Failed requests:[[:space:]]+([0-9]+).*/\1/p' "$WORK/ab.txt")
SERVED=$(( $(wc -l < "$WORK/logs/upstream.log") - UP_BEFORE ))
RECORDED=$(( $(usage_of requests) - REQ_BEFORE )); TOKENS=$(( $(usage_of total_tokens) - TOK_BEFORE ))

field() { # file pattern
  case "$2" in
    rps) sed -nE 's/^Requests\/sec:[[:space:]]+([0-9.]+).*/\1/p' "$1" ;;
    p50) sed -nE 's/^[[:space:]]+50%[[:space:]]+([0-9.]+[a-z]+).*/\1/p' "$1" ;;
    p99) sed -nE 's/^[[:space:]]+99%[[:space:]]+([0-9.]+[a-z]+).*/\1/p' "$1" ;;
    p999) sed -nE 's/^Latency p99\.9: ([0-9.]+ms).*/\1/p' "$1" ;;
    errors) grep -E 'Non-2xx|Socket errors' "$1" | tr '\n' ' ' ;;
  esac
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
NGINX_RPS=$(field "$WORK/nginx.txt" rps); GATE=$(field "$WORK/llmgate.txt" rps)
RATIO=$(awk -v g="$GATE" -v n="$NGINX_RPS" 'BEGIN { printf "%.2f", g / n }')
# Per-round ratios, each from one nginx run and the llmgate run next to it.
RATIOS=$(for r in $(seq "$ROUNDS"); do
  awk -v g="$(field "$WORK/llmgate.$r.txt" rps)" -v n="$(field "$WORK/nginx.$r.txt" rps)" 'BEGIN { printf "%.2f ", g / n }'
done)
PAIRED=$(echo "$RATIOS" | tr ' ' '\n' | grep . | median)
# The same for the limited key against the unlimited one (back to back in each round).
LIMITED_RATIO=$(awk -v l="$(field "$WORK/limited.txt" rps)" -v g="$GATE" 'BEGIN { printf "%.3f", l / g }')
LIMITED_RATIOS=$(for r in $(seq "$ROUNDS"); do
  awk -v l="$(field "$WORK/limited.$r.txt" rps)" -v g="$(field "$WORK/llmgate.$r.txt" rps)" 'BEGIN { printf "%.3f ", l / g }'
done)
LIMITED_PAIRED=$(echo "$LIMITED_RATIOS" | tr ' ' '\n' | grep . | median)
CPU_MEDIAN() { for r in $(seq "$ROUNDS"); do cat "$WORK/$1.$r.cpu"; done | median; }
MACHINE_MEDIAN() { for r in $(seq "$ROUNDS"); do cut -d' ' -f"$2" "$WORK/$1.$r.machine"; done | median; }
EXACT=no
[ "$COMPLETE" -eq "$EXACT_N" ] && [ "$FAILED" -eq 0 ] && [ "$SERVED" -eq "$EXACT_N" ] &&
  [ "$RECORDED" -eq "$EXACT_N" ] && [ "$TOKENS" -eq $((EXACT_N * 16)) ] && EXACT=yes
{
  echo "Run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, workers: $WORKERS, wrk -t1 -c$CONNECTIONS -d${DURATION}s, POST /v1/chat/completions,"
  echo "median of $ROUNDS alternating rounds (all rounds, requests/s: $(for t in $TARGETS; do echo -n "$t "; for r in $(seq "$ROUNDS"); do echo -n "$(field "$WORK/$t.$r.txt" rps) "; done; done))"
  echo
  echo "| path | requests/s | p50 | p99 | p99.9 | proxy CPU per request | machine CPU per request | machine idle | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  for n in $TARGETS; do
    c="-"; [ "$n" != direct ] && c="$(CPU_MEDIAN "$n") µs"
    echo "| $n | $(field "$WORK/$n.txt" rps) | $(field "$WORK/$n.txt" p50) | $(field "$WORK/$n.txt" p99) | $(field "$WORK/$n.txt" p999) | $c | $(MACHINE_MEDIAN "$n" 1) µs | $(MACHINE_MEDIAN "$n" 2) % | $(field "$WORK/$n.txt" errors) |"
  done
  echo
  echo "llmgate / nginx requests/s: **$RATIO** (medians; bar: ≥ 0.80); round by round: $RATIOS(median **$PAIRED**)"
  echo
  echo "limited key / unlimited key requests/s: **$LIMITED_RATIO** (medians; bar: ≥ 0.95); round by round: $LIMITED_RATIOS(median **$LIMITED_PAIRED**)"
  echo
  echo "Usage exact under load: **$EXACT** — ab sent $EXACT_N requests over $CONNECTIONS connections"
  echo "($COMPLETE complete, $FAILED failed); the upstream served $SERVED; llmgate recorded"
  echo "$RECORDED requests and $TOKENS tokens (expected $((EXACT_N * 16)))."
} | tee "$OUT/results.md"
[ "$EXACT" = yes ]
