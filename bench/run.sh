#!/usr/bin/env bash
# bench/run.sh — keyhole against nginx and HAProxy doing the same job
# (inject `x-api-key`, TLS with keep-alive reuse to the upstream, no response
# buffering), plus the direct path (client straight to the upstream) as the
# reference. Everything runs on 127.0.0.1 on free ports, from a temp dir, and
# every process started here is stopped on exit.
#
#   bash bench/run.sh            full run (7 rounds, ~8 minutes), prints the table
#   bash bench/run.sh --quick    3 short rounds (~2 minutes), for a smoke test
#   add --write                  also put the table into BENCHMARKS.md (only the
#                                part between the bench markers is replaced)
#   --keep                       keep the temp dir (configs, logs, results.json)
#   --without-keyhole            skip keyhole (for working on the harness itself)
#   BENCH_HOOK='python3 bench/concurrency.py'
#                                run that on the set-up instead of measuring
#   KEYHOLE_EXTRA_ARGS='--max-tokens-per-hour 1000000000'
#                                extra keyhole options (e.g. a token budget on,
#                                so every response body is scanned for usage)
#
# Layout on a 2-core machine: every proxy is pinned to CPU 0; the upstream
# servers and the load generators (wrk, curl, the Python clients) to CPU 1.
# The deciding figures are the proxy's own CPU seconds (from /proc/PID/stat),
# since the client and the upstream's TLS saturate CPU 1 first.
set -euo pipefail

QUICK=0 WRITE=0 KEEP=0 WITH_KEYHOLE=1
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --write) WRITE=1 ;;
    --keep) KEEP=1 ;;
    --without-keyhole) WITH_KEYHOLE=0 ;;  # only for working on the harness itself
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (try --help)" >&2; exit 2 ;;
  esac
done
COMMAND="bash bench/run.sh${*:+ $*}"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRIVER="$REPO/bench/driver.py"
KEY=bench-secret   # the credential every proxy injects; the upstreams check it

if [[ $QUICK == 1 ]]; then
  ROUNDS=3 DURATION=1 TRANSFERS=1 SSE_EVENTS=20 SSE_GAP_MS=10
else
  ROUNDS=7 DURATION=3 TRANSFERS=3 SSE_EVENTS=50 SSE_GAP_MS=20
fi

log() { echo "[bench ${SECONDS}s] $*" >&2; }

# ---------------------------------------------------------------- packages
# Debian packages only; installed when a tool is missing.
source "$REPO/bench/packages.sh"
need_tools nginx:nginx haproxy:haproxy wrk:wrk curl:curl openssl:openssl \
           python3:python3 taskset:util-linux
if [[ $(nproc) -lt 2 ]]; then
  echo "needs at least 2 CPUs (proxy on CPU 0, load and upstream on CPU 1)" >&2; exit 1
fi

# ---------------------------------------------------------------- build
KEYHOLE="${CARGO_TARGET_DIR:-$REPO/target}/release/keyhole"
SYSTEMS="direct keyhole nginx haproxy"
if [[ $WITH_KEYHOLE == 1 ]]; then
  log "cargo build --release"
  (cd "$REPO" && cargo build --release --quiet)
else
  SYSTEMS="direct nginx haproxy"
fi

# ---------------------------------------------------------------- temp dir and cleanup
TMP=$(mktemp -d /tmp/keyhole-bench.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  # TERM first (nginx's master then stops its workers), KILL what is left.
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 || $rc != 0 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 10,000 idle client connections need more descriptors than the usual 1024;
# children (nginx, HAProxy, keyhole, the Python clients) inherit this.
ulimit -Hn 65536 2>/dev/null || true   # works for root on most machines, not in every container
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
if ((NOFILE < 10500)); then
  log "warning: ulimit -n is $NOFILE; the 10,000-connection figures will be skipped"
fi
# HAProxy reserves two descriptors per maxconn (client and server side) and
# refuses to start if the limit is lower, so under a 20,000 hard limit it
# cannot be given room for 10,000 clients; its 10k figure is then left out.
HAPROXY_MAXCONN=$(( NOFILE >= 20600 ? 10200 : (NOFILE - 100) / 2 ))
# nginx starts closing idle keep-alive connections once fewer than 1/16 of its
# worker_connections are free, so 10,000 idle clients need about 12,000 slots.
NGINX_CONNS=$(( NOFILE >= 12000 ? 12000 : NOFILE ))

# ---------------------------------------------------------------- certificates
# A throwaway CA and a server certificate for 127.0.0.1 and localhost (P-256).
cd "$TMP"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=keyhole bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr 2>/dev/null
printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null

# ---------------------------------------------------------------- content
mkdir -p www temp
# ~1 KiB JSON, like a small API reply.
python3 -c 'import json; print(json.dumps({"id": "msg_bench", "type": "message",
  "content": [{"type": "text", "text": "x" * 900}], "usage": {"in": 12, "out": 34}}))' > www/small.json
head -c $((64 << 20)) /dev/urandom > www/big.bin   # download and upload body
: > www/empty.txt
BIG_BYTES=$(stat -c %s www/big.bin)

# ---------------------------------------------------------------- ports
read -r UP_NGINX UP_PY P_KEYHOLE P_NGINX P_HAPROXY < <(python3 "$DRIVER" ports 5)

# ---------------------------------------------------------------- upstream: nginx (CPU 1)
# /small, /big (Content-Length) and /bigc: the same file answered chunked —
# add_after_body (addition filter) drops Content-Length, so nginx streams it
# chunked without scanning the body.
cat > upstream-nginx.conf <<EOF
user $(id -un);   # workers must read the 0700 temp dir (ignored when not root)
worker_processes 1;
daemon off;
pid $TMP/upstream-nginx.pid;
error_log $TMP/upstream-nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/temp/ub; proxy_temp_path $TMP/temp/up;
  fastcgi_temp_path $TMP/temp/uf; uwsgi_temp_path $TMP/temp/uu; scgi_temp_path $TMP/temp/us;
  default_type application/octet-stream;
  # No per-connection request cap: the proxies' pooled connections stay up.
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP_NGINX ssl backlog=4096;
    ssl_certificate $TMP/server.pem;
    ssl_certificate_key $TMP/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    # A proxy that forgets to inject the key gets 401, which wrk and curl report.
    if (\$http_x_api_key != "$KEY") { return 401; }
    location = /small { default_type application/json; alias $TMP/www/small.json; }
    location = /big   { alias $TMP/www/big.bin; }
    location = /bigc  { alias $TMP/www/big.bin; addition_types *; add_after_body /empty; }
    location = /empty { alias $TMP/www/empty.txt; }
  }
}
EOF

# ---------------------------------------------------------------- proxy: nginx (CPU 0)
# Per location, because proxy_set_header at one level discards inherited ones.
# One access-log line per request, like keyhole's one log line per request.
nginx_location() {  # prefix upstream-name upstream-port
  cat <<EOF
    location $1 {
      proxy_pass https://$2;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$3;
      proxy_set_header x-api-key $KEY;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $TMP/ca.pem;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
    }
EOF
}
cat > proxy-nginx.conf <<EOF
user $(id -un);
worker_processes 1;
worker_rlimit_nofile $NGINX_CONNS;
daemon off;
pid $TMP/proxy-nginx.pid;
error_log $TMP/proxy-nginx.err warn;
# Both client and upstream sides count. Not more than needed: nginx touches a
# connection structure per slot at start, which would show up as idle RSS.
events { worker_connections $NGINX_CONNS; }
http {
  access_log $TMP/proxy-nginx.access.log;
  client_body_temp_path $TMP/temp/pb; proxy_temp_path $TMP/temp/pp;
  fastcgi_temp_path $TMP/temp/pf; uwsgi_temp_path $TMP/temp/pu; scgi_temp_path $TMP/temp/ps;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_max_body_size 0;
  upstream up_nginx { server 127.0.0.1:$UP_NGINX; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }
  upstream up_py    { server 127.0.0.1:$UP_PY;    keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:$P_NGINX backlog=4096;
$(nginx_location / up_nginx "$UP_NGINX")
$(nginx_location /py/ up_py "$UP_PY")
  }
}
EOF

# ---------------------------------------------------------------- proxy: HAProxy (CPU 0)
cat > proxy-haproxy.cfg <<EOF
global
  nbthread 1
  maxconn $HAPROXY_MAXCONN
  log stdout format raw local0
defaults
  mode http
  log global
  option httplog
  # Without this HAProxy sends with MSG_MORE while it expects more of a body, so
  # an SSE event can sit in the kernel for up to 200 ms; streaming needs it off.
  option http-no-delay
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  timeout http-request 30s
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  http-request set-header x-api-key $KEY
  use_backend py if { path_beg /py/ }
  default_backend ng
backend ng
  http-request set-header Host 127.0.0.1:$UP_NGINX
  server s1 127.0.0.1:$UP_NGINX ssl verify required ca-file $TMP/ca.pem verifyhost localhost
backend py
  http-request set-header Host 127.0.0.1:$UP_PY
  server s1 127.0.0.1:$UP_PY ssl verify required ca-file $TMP/ca.pem verifyhost localhost
EOF

# ---------------------------------------------------------------- start everything
start() {  # name cpu command...: run pinned in the background, output to name.log
  local name=$1 cpu=$2; shift 2
  taskset -c "$cpu" "$@" >>"$TMP/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
}
wait_port() {  # port name
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$2 did not start listening on port $1; its log:" >&2; cat "$TMP/$2.log" >&2; exit 1
}

log "starting upstreams and proxies in $TMP"
start upstream-nginx 1 nginx -e stderr -c "$TMP/upstream-nginx.conf"
start upstream-py 1 python3 "$DRIVER" upstream --port "$UP_PY" --cert server.pem --key server.key
start proxy-nginx 0 nginx -e stderr -c "$TMP/proxy-nginx.conf"
start proxy-haproxy 0 haproxy -db -f "$TMP/proxy-haproxy.cfg"
KEYHOLE_CMD=("$KEYHOLE" --listen "127.0.0.1:$P_KEYHOLE" --ca-file "$TMP/ca.pem"
  --route "/=https://127.0.0.1:$UP_NGINX" --header 'x-api-key=${BENCH_KEY}'
  --route "/py=https://127.0.0.1:$UP_PY/py" --header 'x-api-key=${BENCH_KEY}')
# shellcheck disable=SC2206 # split on purpose: a list of options
KEYHOLE_CMD+=(${KEYHOLE_EXTRA_ARGS:-})
# keyhole: stdout carries the `listening on` line, stderr one log line per request.
if [[ $WITH_KEYHOLE == 1 ]]; then
  BENCH_KEY=$KEY taskset -c 0 "${KEYHOLE_CMD[@]}" >"$TMP/keyhole.out" 2>>"$TMP/keyhole.log" &
  PIDS+=($!); PID_keyhole=$!
fi

wait_port "$UP_NGINX" upstream-nginx
wait_port "$UP_PY" upstream-py
wait_port "$P_NGINX" proxy-nginx
wait_port "$P_HAPROXY" proxy-haproxy
for _ in $(seq 100); do
  [[ $WITH_KEYHOLE == 1 ]] || break
  grep -q '^listening on ' "$TMP/keyhole.out" && break
  kill -0 "$PID_keyhole" 2>/dev/null || { echo "keyhole exited:" >&2; cat "$TMP/keyhole.log" >&2; exit 1; }
  sleep 0.05
done
[[ $WITH_KEYHOLE == 0 ]] || grep -qx "listening on http://127.0.0.1:$P_KEYHOLE" "$TMP/keyhole.out" || {
  echo "keyhole did not print 'listening on http://127.0.0.1:$P_KEYHOLE':" >&2
  cat "$TMP/keyhole.out" "$TMP/keyhole.log" >&2; exit 1; }

# ---------------------------------------------------------------- sanity check
# Every path must answer 200 with the right bytes before anything is timed.
check() {  # name url [curl args...]
  local name=$1 url=$2; shift 2
  local code
  code=$(curl -sS -o "$TMP/check.out" -w '%{http_code}' --cacert "$TMP/ca.pem" "$@" "$url") || code="curl-failed"
  if [[ $code != 200 ]]; then
    echo "sanity check failed: $name $url -> $code" >&2; cat "$TMP/check.out" >&2 2>/dev/null; exit 1
  fi
}
for sys in $SYSTEMS; do
  case $sys in
    direct)  B="https://127.0.0.1:$UP_NGINX" P="https://127.0.0.1:$UP_PY" H=(-H "x-api-key: $KEY") ;;
    keyhole) B="http://127.0.0.1:$P_KEYHOLE" P=$B H=() ;;
    nginx)   B="http://127.0.0.1:$P_NGINX"   P=$B H=() ;;
    haproxy) B="http://127.0.0.1:$P_HAPROXY" P=$B H=() ;;
  esac
  check "$sys" "$B/small" "${H[@]}"
  cmp -s "$TMP/check.out" www/small.json || { echo "$sys: /small body differs" >&2; exit 1; }
  check "$sys" "$B/bigc" "${H[@]}"
  cmp -s "$TMP/check.out" www/big.bin || { echo "$sys: /bigc body differs" >&2; exit 1; }
  check "$sys" "$P/py/upload?bytes=$BIG_BYTES" "${H[@]}" -H 'Transfer-Encoding: chunked' --data-binary @www/big.bin
  check "$sys" "$P/py/sse?n=2&ms=1" "${H[@]}"
done
log "sanity checks passed"

# ---------------------------------------------------------------- measure
versions="$(nginx -v 2>&1 | sed 's/^nginx version: //'), HAProxy $(haproxy -v | head -1 | awk '{print $3}'), $(wrk --version 2>&1 | head -1 | awk '{print "wrk", $2}'), $(openssl version | awk '{print $1, $2}')"
python3 - "$TMP/config.json" "${KEYHOLE_CMD[@]}" <<EOF
import json, sys
json.dump({
  "tmp": "$TMP", "quick": $QUICK == 1, "write": $WRITE == 1,
  "rounds": $ROUNDS, "duration": $DURATION, "transfers": $TRANSFERS,
  "sse_events": $SSE_EVENTS, "sse_gap_ms": $SSE_GAP_MS, "big_bytes": $BIG_BYTES,
  "ports": {"up_nginx": $UP_NGINX, "up_py": $UP_PY, "keyhole": $P_KEYHOLE,
            "nginx": $P_NGINX, "haproxy": $P_HAPROXY},
  "pids": {"keyhole": ${PID_keyhole:-0}, "nginx": $PID_proxy_nginx, "haproxy": $PID_proxy_haproxy},
  "ca": "$TMP/ca.pem", "upload_file": "$TMP/www/big.bin",
  "logs": ["$TMP/keyhole.log", "$TMP/proxy-nginx.access.log", "$TMP/proxy-haproxy.log"],
  "systems": "$SYSTEMS".split(),
  "max_idle_conns": {"keyhole": $NOFILE - 200, "nginx": $NGINX_CONNS - 200, "haproxy": $HAPROXY_MAXCONN - 100},
  "keyhole_bin": "$KEYHOLE", "keyhole_cmd": sys.argv[2:],
  "command": "$COMMAND", "versions": "$versions",
  "benchmarks_md": "$REPO/BENCHMARKS.md",
}, open(sys.argv[1], "w"), indent=1)
EOF
if [[ -n ${BENCH_HOOK:-} ]]; then
  # Another measurement on the same set-up (e.g. bench/concurrency.py).
  log "running $BENCH_HOOK"
  (cd "$REPO" && $BENCH_HOOK "$TMP/config.json")
  exit 0
fi
log "measuring ($ROUNDS rounds)"
python3 "$DRIVER" measure --config "$TMP/config.json"
log "done"
