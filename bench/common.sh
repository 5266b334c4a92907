# Sourced by the bench scripts (after nginx is installed and WORK is made): what they all
# need alike, so that every script measures the same upstream with the same request.

# The upstream's answer: a chat completion with a usage object (16 tokens).
ANSWER='{"id":"bench","object":"chat.completion","created":1,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}'
# The request every script sends to it, through the proxy under test.
REQUEST='{"model":"bench","messages":[{"role":"user","content":"Say something short."}]}'
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# nginx_conf NAME SERVER_BLOCKS WORKERS: starts an nginx with these server (and upstream)
# blocks, its files in $WORK (its pid in $WORK/NAME.pid). NGINX_CONNECTIONS sets each
# worker's connections (default 4096) and the files it may open.
nginx_conf() {
  cat > "$WORK/$1.conf" <<CONF
worker_processes $3;
${NGINX_CONNECTIONS:+worker_rlimit_nofile $NGINX_CONNECTIONS;}
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections ${NGINX_CONNECTIONS:-4096}; }
http {
  access_log off;
  client_body_temp_path $WORK/$1-body; proxy_temp_path $WORK/$1-proxy;
  fastcgi_temp_path $WORK/$1-fcgi; uwsgi_temp_path $WORK/$1-uwsgi; scgi_temp_path $WORK/$1-scgi;
  keepalive_requests 1000000;
  $2
}
CONF
  "$NGINX" -c "$WORK/$1.conf" -p "$WORK"
}

# fixed_upstream PORT [ACCESS_LOG]: an nginx with one worker that answers every request
# with ANSWER (and logs each one to ACCESS_LOG when given); its pid in $WORK/upstream.pid.
fixed_upstream() {
  nginx_conf upstream "server {
    listen 127.0.0.1:$1;
    ${2:+access_log $2;}
    location / { default_type application/json; return 200 '$ANSWER'; }
  }" 1
}

# bench_key LLMGATE DATA_DIR [NAME]: creates a key named NAME (default bench) and prints
# its secret. KEY_FLAGS adds `keys create` flags, e.g. KEY_FLAGS="--rpm 1000000000 --tpm
# 1000000000000" for a key whose limits are counted on every request but never reached.
bench_key() {
  # shellcheck disable=SC2086
  "$1" keys create "${3:-bench}" --json --data-dir "$2" ${KEY_FLAGS:-} | sed -E 's/.*"key":"([^"]+)".*/\1/'
}

# wrk_script FILE KEY: a wrk script that POSTs REQUEST with the key, and prints the
# 99.9th percentile of the latency (which wrk's --latency leaves out) as
# "Latency p99.9: N.NNms".
wrk_script() {
  cat > "$1" <<LUA
wrk.method = "POST"
wrk.body = '$REQUEST'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
function done(summary, latency, requests)
  io.write(string.format("Latency p99.9: %.2fms\\n", latency:percentile(99.9) / 1000))
end
LUA
}
