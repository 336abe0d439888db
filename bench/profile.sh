#!/usr/bin/env bash
# bench/profile.sh — where keyhole's time goes per proxied keep-alive request.
#
#   bash bench/profile.sh [CONNS]     (default 16 connections)
#
# Starts an nginx TLS upstream serving a 1 KiB JSON reply (CPU 1), keyhole in
# front of it (CPU 0), and reports, per request:
#   1. system calls on keyhole's serving thread (strace -c over a wrk run);
#   2. voluntary context switches of keyhole (times it slept in epoll_wait);
#   3. user-space instructions (valgrind --tool=callgrind, counted only after
#      a warm-up, so start-up and the upstream TLS handshakes are left out).
# Instruction counts repeat to within about 2% whatever else the machine is
# doing; the callgrind output file is kept for callgrind_annotate.
# Needs nginx, wrk, strace and valgrind (installed from Debian when missing).
set -euo pipefail

CONNS=${1:-16}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { echo "[profile] $*" >&2; }

source "$REPO/bench/packages.sh"
need_tools nginx:nginx wrk:wrk strace:strace valgrind:valgrind callgrind_annotate:valgrind \
           openssl:openssl taskset:util-linux

# A release build with symbols, in its own target dir (the normal build is stripped).
log "building keyhole with symbols"
(cd "$REPO" && CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 \
  CARGO_TARGET_DIR="$REPO/target/profile" cargo build --release --quiet)
KEYHOLE="$REPO/target/profile/release/keyhole"

TMP=$(mktemp -d /tmp/keyhole-profile.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
cd "$TMP"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=keyhole profile CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2 \
  -extfile server.ext -out server.pem 2>/dev/null
python3 -c 'import json; print(json.dumps({"id": "msg", "text": "x" * 980}))' > small.json
read -r UP PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

mkdir -p temp
cat > nginx.conf <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/temp/b; proxy_temp_path $TMP/temp/p;
  fastcgi_temp_path $TMP/temp/f; uwsgi_temp_path $TMP/temp/u; scgi_temp_path $TMP/temp/s;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP ssl;
    ssl_certificate $TMP/server.pem;
    ssl_certificate_key $TMP/server.key;
    location = /small { default_type application/json; alias $TMP/small.json; }
  }
}
EOF
taskset -c 1 nginx -e stderr -c "$TMP/nginx.conf" 2>nginx.log &
PIDS+=($!)

start_keyhole() {  # command prefix...
  BENCH_KEY=profile-secret taskset -c 0 "$@" "$KEYHOLE" --threads 1 --listen "127.0.0.1:$PORT" \
    --ca-file "$TMP/ca.pem" --route "/=https://127.0.0.1:$UP" --header 'x-api-key=${BENCH_KEY}' \
    >keyhole.out 2>keyhole.log &
  KPID=$!
  PIDS+=($KPID)
  for _ in $(seq 200); do grep -q '^listening on' keyhole.out 2>/dev/null && return; sleep 0.05; done
  echo "keyhole did not start:" >&2; cat keyhole.log >&2; exit 1
}
load() {  # seconds → number of requests
  taskset -c 1 wrk -t1 -c"$CONNS" -d"$1" "http://127.0.0.1:$PORT/small" | awk '/requests in/ {print $1}'
}
ctx_switches() {
  awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$KPID/task/$KPID/status"
}

# 1 and 2: system calls and sleeps per request, without valgrind.
start_keyhole
load 2 >/dev/null   # warm-up: upstream connections pooled
c0=$(ctx_switches)
strace -c -p "$KPID" -o strace.txt 2>/dev/null & SPID=$!
sleep 0.5
n=$(load 3)
sleep 0.3; kill -INT "$SPID"; wait "$SPID" 2>/dev/null || true
c1=$(ctx_switches)
calls=$(awk '$NF ~ /^(recvfrom|sendto|writev|write|read|epoll_wait|brk|futex)$/ && $1 ~ /^[0-9.]+$/ {s += $4} END {print s+0}' strace.txt)
n2=$(load 3); c2=$(ctx_switches)
kill -TERM "$KPID"; wait "$KPID" 2>/dev/null || true
echo "system calls per request on keyhole's thread (under strace): $(python3 -c "print(round($calls / $n, 2))")"
grep -E '^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+' strace.txt | awk -v n="$n" '{printf "    %-12s %.2f\n", $NF, $4 / n}' | head -8
echo "voluntary context switches per request (without strace): $(python3 -c "print(round(($c2 - $c1) / $n2, 2))")"

# 3: instructions per request under callgrind.
start_keyhole valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/callgrind.out"
load 8 >/dev/null   # warm-up under valgrind (slow): every upstream connection opened
callgrind_control -i on "$KPID" >/dev/null 2>&1
n=$(load 5)
kill -INT "$KPID"; wait "$KPID" 2>/dev/null || true
total=$(callgrind_annotate "$TMP/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "user-space instructions per request (callgrind, $CONNS connections): $((total / n))"
echo "callgrind output: $TMP/callgrind.out (callgrind_annotate --inclusive=yes $TMP/callgrind.out)"
trap - EXIT
cleanup
