#!/usr/bin/env bash
# What a cold start adds over the model server's own load time: SmolLM2 135M Instruct
# (the default model) on llama-cpp-python, loaded alone (spawn → /v1/models answers,
# polled every 2 ms) and loaded by a request through llmgate (request → answer, less the
# same request once the model is warm). Prints each run and the medians.
#
#   bench/cold_start.sh LLMGATE [runs, default 5]
#
# Needs the llama-cpp-python environment and the default model in llmgate's cache
# (`llmgate up` once, or the real-model tests, make both).
set -euo pipefail
BIN="$1"; RUNS="${2:-5}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llmgate"
ENVS="${LLMGATE_BENCH_ENVS:-$CACHE/test-envs}"
PY="$ENVS/llama-cpp-python-cpu/bin/python"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -x "$PY" ] && [ -f "$MODEL" ] || { echo "needs $PY and $MODEL" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
now_ms() { date +%s%3N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "== the model server alone"
for i in $(seq "$RUNS"); do
  start=$(now_ms)
  "$PY" -m llama_cpp.server --model "$MODEL" --model_alias smol --host 127.0.0.1 --port 18071 \
    --interrupt_requests false --chat_format chatml >/dev/null 2>&1 &
  pid=$!
  until curl -sf http://127.0.0.1:18071/v1/models >/dev/null; do sleep 0.002; done
  echo $(( $(now_ms) - start )) | tee -a "$WORK/alone"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo "== through llmgate (cold request − warm request)"
ADMIN="sk-lg-$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
cat > "$WORK/llmgate.toml" <<TOML
[[models]]
name = "smol"
source = "$MODEL"
chat_format = "chatml"
TOML
LLMGATE_ADMIN_KEY="$ADMIN" LLMGATE_LOG=warn "$BIN" serve --config "$WORK/llmgate.toml" \
  --listen 127.0.0.1:18072 --data-dir "$WORK/data" --python-env-dir "$ENVS" >/dev/null 2>&1 &
for _ in $(seq 100); do curl -sf http://127.0.0.1:18072/healthz >/dev/null && break; sleep 0.1; done
ask() {
  curl -sf -o /dev/null -w '%{time_total}\n' http://127.0.0.1:18072/v1/chat/completions \
    -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d '{"model":"smol","max_tokens":1,"temperature":0,"messages":[{"role":"user","content":"Hi"}]}' |
    awk '{ printf "%d\n", $1 * 1000 }'
}
for i in $(seq "$RUNS"); do
  curl -sf -X POST http://127.0.0.1:18072/admin/models/smol/unload -H "Authorization: Bearer $ADMIN" >/dev/null
  cold=$(ask); warm=$(ask)
  echo "cold $cold ms, warm $warm ms" >&2
  echo $(( cold - warm )) | tee -a "$WORK/through"
done
alone=$(median < "$WORK/alone"); through=$(median < "$WORK/through")
echo "median: alone ${alone} ms, through llmgate ${through} ms, added $(( through - alone )) ms (CPU: $(lscpu | sed -nE 's/^Model name:[[:space:]]+//p'))"
