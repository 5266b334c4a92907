#!/usr/bin/env bash
# A/B of two llmgate builds on one machine: alternating wrk rounds against each (the order
# flips every round, so that drift of a shared machine hits both alike), reporting each
# build's requests per round and the CPU time its process spent per request (from /proc).
# Both gateways run with auth and usage on, against one fixed-response nginx upstream.
#
#   bench/ab.sh BIN_A BIN_B [rounds, default 12] [seconds per round, default 4]
#   ENV_A="X=1" ENV_B="LLMGATE_WORKERS=1" bench/ab.sh ...   (environment of each gateway)
#
# Needs nginx and wrk (installed with apt-get when missing).
set -euo pipefail
A="$1"; B="$2"; ROUNDS="${3:-12}"; SECS="${4:-4}"
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")"; rm -rf "$WORK"' EXIT
# shellcheck source=bench/common.sh
source "$(dirname "$0")/common.sh"
fixed_upstream 18031
export LLMGATE_LOG=warn
start() { # binary, port, name, environment
  # shellcheck disable=SC2086
  env $4 LLMGATE_ADMIN_KEY="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)" \
    "$1" serve --upstream http://127.0.0.1:18031 --listen "127.0.0.1:$2" --data-dir "$WORK/$3" >/dev/null 2>&1 &
  echo $! > "$WORK/$3.pid"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/healthz" >/dev/null && break; sleep 0.1; done
  wrk_script "$WORK/$3.lua" "$(bench_key "$1" "$WORK/$3")"
}
start "$A" 18032 a "${ENV_A:-}"; start "$B" 18033 b "${ENV_B:-}"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
round() { # name, port: appends requests and CPU µs per request
  local pid before n
  pid="$(cat "$WORK/$1.pid")"; before="$(ticks "$pid")"
  n="$(wrk -t1 -c32 -d"${SECS}s" -s "$WORK/$1.lua" "http://127.0.0.1:$2/v1/chat/completions" |
    sed -nE 's/^[[:space:]]+([0-9]+) requests in.*/\1/p')"
  echo "$n" >> "$WORK/$1.requests"
  awk -v t=$(( $(ticks "$pid") - before )) -v us="$TICK_US" -v n="$n" 'BEGIN { printf "%.2f\n", t * us / n }' >> "$WORK/$1.cpu"
}
round a 18032; round b 18033; rm -f "$WORK"/*.requests "$WORK"/*.cpu  # warm-up
for i in $(seq "$ROUNDS"); do
  if (( i % 2 )); then round a 18032; round b 18033; else round b 18033; round a 18032; fi
done
median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
echo "A $A ${ENV_A:-}"; echo "B $B ${ENV_B:-}"
echo "requests per ${SECS} s round, median: A $(median "$WORK/a.requests")  B $(median "$WORK/b.requests")"
echo "CPU µs per request, median (min):  A $(median "$WORK/a.cpu") ($(sort -n "$WORK/a.cpu" | head -1))  B $(median "$WORK/b.cpu") ($(sort -n "$WORK/b.cpu" | head -1))"
# Round by round, B over A: each round runs both back to back, so its ratio is free of
# the drift between rounds that moves the medians above.
ratios() { paste "$WORK/b.$1" "$WORK/a.$1" | awk '{ printf "%.3f\n", $1 / $2 }' > "$WORK/ratio.$1"; }
ratios requests; ratios cpu
for x in requests cpu; do
  echo "B / A $x, round by round: $(tr '\n' ' ' < "$WORK/ratio.$x")(median $(median "$WORK/ratio.$x"), $(sort -n "$WORK/ratio.$x" | head -1)–$(sort -n "$WORK/ratio.$x" | tail -1))"
done
