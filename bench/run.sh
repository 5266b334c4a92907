#!/usr/bin/env bash
# Reproducible benchmark: requests/s and latency for
#   1. the upstream directly,
#   2. a bare reverse proxy (nginx, keepalive to the upstream),
#   3. llmgate with auth and usage recording on,
# all against the same fixed-response upstream (nginx returning a chat completion with a
# usage object), in one run (wrk, fixed duration). Then checks that llmgate's usage is
# exact under load: ab sends exactly N requests over 32 keep-alive connections and waits
# for every answer; llmgate must record exactly N requests and N × 16 tokens, and the
# upstream must have served exactly N.
#
#   bench/run.sh [seconds per run, default 15] [connections, default 32]
#
# Needs nginx and wrk (installed with apt-get when missing). Writes bench/out/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-15}"
CONNECTIONS="${2:-32}"
OUT="bench/out"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true; rm -rf "$WORK"' EXIT

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || ! command -v ab >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk apache2-utils >/dev/null
fi
EXACT_N="${EXACT_N:-50000}"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

cargo build --release -q -p llmgate-server
LLMGATE="${CARGO_TARGET_DIR:-target}/release/llmgate"

UPSTREAM_PORT=18001 PROXY_PORT=18002 GATEWAY_PORT=18003
BODY='{"id":"bench","object":"chat.completion","created":1,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}'
mkdir -p "$WORK/logs"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body; proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi; uwsgi_temp_path $WORK/uwsgi; scgi_temp_path $WORK/scgi;
  keepalive_requests 1000000;
  upstream model { server 127.0.0.1:$UPSTREAM_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    access_log $WORK/logs/upstream.log;
    location / { default_type application/json; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$PROXY_PORT;
    location / {
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
    }
  }
}
CONF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK"

ADMIN="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
export LLMGATE_ADMIN_KEY="$ADMIN" LLMGATE_LOG=warn
"$LLMGATE" serve --upstream "http://127.0.0.1:$UPSTREAM_PORT" --listen "127.0.0.1:$GATEWAY_PORT" \
  --data-dir "$WORK/data" >"$WORK/llmgate.out" &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null && break; sleep 0.1; done
KEY="$("$LLMGATE" keys create bench --json --data-dir "$WORK/data" | sed -E 's/.*"key":"([^"]+)".*/\1/')"
KEY_ID="$("$LLMGATE" keys list --json --data-dir "$WORK/data" | grep -B1 '"name": "bench"' | sed -nE 's/.*"id": "([^"]+)".*/\1/p')"

cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"Say something short."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

run() { # name url
  wrk -t1 -c"$CONNECTIONS" -d2s -s "$WORK/post.lua" "$2" >/dev/null   # warm-up
  local before after
  before=$(wc -l < "$WORK/logs/upstream.log")
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/post.lua" "$2" > "$WORK/$1.txt"
  after=$(wc -l < "$WORK/logs/upstream.log")
  echo $((after - before)) > "$WORK/$1.served"
}
run direct  "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions"
run nginx   "http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
run llmgate "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions"

# Exactness: a fixed number of requests, every one answered.
usage_of() {
  curl -sf "http://127.0.0.1:$GATEWAY_PORT/admin/usage/$KEY_ID" -H "Authorization: Bearer $ADMIN" |
    sed -nE "s/.*\"$1\":([0-9]+).*/\1/p"
}
printf '%s' '{"model":"bench","messages":[{"role":"user","content":"Say something short."}]}' > "$WORK/body.json"
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
    errors) grep -E 'Non-2xx|Socket errors' "$1" | tr '\n' ' ' ;;
  esac
}
DIRECT=$(field "$WORK/direct.txt" rps); NGINX_RPS=$(field "$WORK/nginx.txt" rps); GATE=$(field "$WORK/llmgate.txt" rps)
RATIO=$(awk -v g="$GATE" -v n="$NGINX_RPS" 'BEGIN { printf "%.2f", g / n }')
EXACT=no
[ "$COMPLETE" -eq "$EXACT_N" ] && [ "$FAILED" -eq 0 ] && [ "$SERVED" -eq "$EXACT_N" ] &&
  [ "$RECORDED" -eq "$EXACT_N" ] && [ "$TOKENS" -eq $((EXACT_N * 16)) ] && EXACT=yes
{
  echo "Run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, wrk -t1 -c$CONNECTIONS -d${DURATION}s, POST /v1/chat/completions"
  echo
  echo "| path | requests/s | p50 | p99 | errors |"
  echo "|---|---:|---:|---:|---|"
  for n in direct nginx llmgate; do
    echo "| $n | $(field "$WORK/$n.txt" rps) | $(field "$WORK/$n.txt" p50) | $(field "$WORK/$n.txt" p99) | $(field "$WORK/$n.txt" errors) |"
  done
  echo
  echo "llmgate / nginx requests/s: **$RATIO** (bar: ≥ 0.80)"
  echo
  echo "Usage exact under load: **$EXACT** — ab sent $EXACT_N requests over $CONNECTIONS connections"
  echo "($COMPLETE complete, $FAILED failed); the upstream served $SERVED; llmgate recorded"
  echo "$RECORDED requests and $TOKENS tokens (expected $((EXACT_N * 16)))."
} | tee "$OUT/results.md"
[ "$EXACT" = yes ]
