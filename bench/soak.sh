#!/usr/bin/env bash
# bench/soak.sh — memory under load: about 1,000 client connections, each
# keep-alive and doing exchanges back to back (mostly small GET/POSTs, some
# 1–8 MiB downloads and uploads up to 4 MiB with Content-Length and chunked,
# a slow streaming download, and faults: disconnects mid-request-body,
# mid-response and after half a head), with the TLS upstream reloaded and
# then killed and restarted during the run. The proxy's VmRSS and VmHWM are
# sampled every 0.5 s from /proc: before the load, at its peak, at its end,
# and 5 s and 15 s after the last client connection closed. keyhole and,
# for comparison, nginx configured for the same job run alone, in turn.
#
#   bash bench/soak.sh               60 s of load per proxy (~3 minutes in all)
#   bash bench/soak.sh --quick       15 s of load per proxy (~1.5 minutes)
#   options:
#     --duration SECS                length of the load (default 60; --quick 15)
#     --conns N                      client connections (default 1000)
#     --workers N                    load-generator processes (default 4)
#     --only NAME                    keyhole or nginx (default: both)
#     --after LIST                   seconds after the load to report RSS at
#                                    (default 5,15; keyhole's pool keeps idle
#                                    upstream connections 30 s, so 35 shows that)
#     --keyhole-env NAME=VALUE       set in keyhole's environment only, e.g.
#                                    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536
#                                    (repeatable; for allocator experiments)
#     --json FILE                    also write every figure and sample as JSON
#     --no-build                     use the existing release binary
#     --heaptrack                    run keyhole under heaptrack and print its
#                                    summary (RSS then includes heaptrack's own)
#     --keep                         keep the temp dir (configs, logs, results)
#
# Layout, as in bench/run.sh: the proxy alone on CPU 0; the nginx TLS
# upstream, the load generator and the sampler on CPU 1. CARGO_TARGET_DIR is
# respected (the binary is $CARGO_TARGET_DIR/release/keyhole).
set -euo pipefail

QUICK=0 BUILD=1 KEEP=0 HEAPTRACK=0 JSON_OUT= DURATION= CONNS=1000 WORKERS=4 ONLY= AFTER=5,15
KEYHOLE_ENV=()
ARGS=("$@")
while (($#)); do
  arg=$1; shift
  val=
  case "$arg" in
    --*=*) val=${arg#*=}; arg=${arg%%=*} ;;
  esac
  case "$arg" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --heaptrack) HEAPTRACK=1 ;;
    --duration|--conns|--workers|--only|--json|--after|--keyhole-env)
      if [[ -z $val ]]; then
        (($#)) || { echo "$arg needs a value" >&2; exit 2; }
        val=$1; shift
      fi
      case "$arg" in
        --duration) DURATION=$val ;;
        --conns) CONNS=$val ;;
        --workers) WORKERS=$val ;;
        --only) ONLY=$val ;;
        --after) AFTER=$val ;;
        --keyhole-env) KEYHOLE_ENV+=("$val") ;;
        --json) JSON_OUT=$(realpath -m "$val") ;;
      esac ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (try --help)" >&2; exit 2 ;;
  esac
done
COMMAND="bash bench/soak.sh${ARGS[*]:+ ${ARGS[*]}}"
[[ -n $DURATION ]] || DURATION=$((QUICK ? 15 : 60))
for n in "$DURATION" "$CONNS" "$WORKERS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "--duration, --conns and --workers take whole numbers" >&2; exit 2; }
done
PROXIES="keyhole nginx"
case "$ONLY" in
  "") ;;
  keyhole|nginx) PROXIES=$ONLY ;;
  *) echo "--only takes keyhole or nginx" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOAK="$REPO/bench/soak.py"
KEY=bench-secret   # the credential the proxies inject; the upstream checks it

log() { echo "[soak ${SECONDS}s] $*" >&2; }

# ---------------------------------------------------------------- packages
source "$REPO/bench/packages.sh"
need_tools nginx:nginx curl:curl openssl:openssl python3:python3 taskset:util-linux
((HEAPTRACK == 0)) || need_tools heaptrack:heaptrack
if [[ $(nproc) -lt 2 ]]; then
  echo "needs at least 2 CPUs (proxy on CPU 0, load and upstream on CPU 1)" >&2; exit 1
fi

# ---------------------------------------------------------------- build
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
KEYHOLE="$TARGET_DIR/release/keyhole"
if [[ $PROXIES == *keyhole* ]] && ((HEAPTRACK)); then
  # heaptrack needs symbols and line tables, which the release profile
  # strips: the same profile with them kept, in a target dir of its own.
  TARGET_DIR=$TARGET_DIR/soak-heaptrack
  KEYHOLE="$TARGET_DIR/release/keyhole"
  if ((BUILD)); then
    log "cargo build --release (with debug info, for heaptrack) into $TARGET_DIR"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR CARGO_PROFILE_RELEASE_STRIP=none \
      CARGO_PROFILE_RELEASE_DEBUG=limited cargo build --release --quiet)
  fi
elif [[ $PROXIES == *keyhole* ]] && ((BUILD)); then
  log "cargo build --release"
  (cd "$REPO" && cargo build --release --quiet)
fi
if [[ $PROXIES == *keyhole* ]]; then
  [[ -x $KEYHOLE ]] || { echo "no keyhole binary at $KEYHOLE (drop --no-build)" >&2; exit 1; }
fi

# ---------------------------------------------------------------- temp dir and cleanup
TMP=$(mktemp -d /tmp/keyhole-soak.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  [[ -x $TMP/upstream.sh ]] && "$TMP/upstream.sh" stop 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 || $rc != 0 || $HEAPTRACK == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ~1,000 client connections plus as many upstream ones, per proxy.
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
if ((NOFILE < 2 * CONNS + 500)); then
  echo "ulimit -n is $NOFILE; $CONNS connections need about $((2 * CONNS + 500))" >&2; exit 1
fi
MAX_CONNS=$((CONNS + CONNS / 2 + 100))   # keyhole's --max-connections, with room

# ---------------------------------------------------------------- certificates
cd "$TMP"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=keyhole soak CA" \
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
python3 -c 'import json; print(json.dumps({"id": "msg_soak", "type": "message",
  "content": [{"type": "text", "text": "x" * 900}], "usage": {"in": 12, "out": 34}}))' > www/small.json
head -c $((1 << 20)) /dev/urandom > www/1m.bin
head -c $((8 << 20)) /dev/urandom > www/8m.bin
head -c $((256 << 10)) /dev/urandom > www/slow.bin
: > www/empty.txt

# ---------------------------------------------------------------- ports
read -r UP SINK P_KEYHOLE P_NGINX < <(python3 "$SOAK" ports 4)

# ---------------------------------------------------------------- upstream: nginx over TLS (CPU 1)
# /small (1 KiB), /1m and /8m (Content-Length), /1mc (1 MiB chunked: the
# addition filter drops Content-Length), /slow (256 KiB at 128 KiB/s), and
# /upload, which reads the whole request body (proxy_request_buffering on)
# before handing it to a plain-HTTP sink that answers 200 — so the answer
# comes only after every body byte arrived. Every request without the
# injected key gets 401, which the load generator counts as an error.
cat > upstream-nginx.conf <<EOF
user $(id -un);
worker_processes 1;
worker_rlimit_nofile 16384;
pid $TMP/upstream-nginx.pid;
error_log $TMP/upstream-nginx.err warn;
# multi_accept: without it the one busy worker accepts about one connection
# per event-loop pass, so after a restart 1,000 new upstream connections wait
# in the accept queue for seconds and keyhole's 10 s handshake timeout fires.
events { worker_connections 8192; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $TMP/temp/ub; proxy_temp_path $TMP/temp/up;
  fastcgi_temp_path $TMP/temp/uf; uwsgi_temp_path $TMP/temp/uu; scgi_temp_path $TMP/temp/us;
  default_type application/octet-stream;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_max_body_size 0;
  upstream sink { server 127.0.0.1:$SINK; keepalive 64; }
  server {
    listen 127.0.0.1:$UP ssl backlog=4096;
    ssl_certificate $TMP/server.pem;
    ssl_certificate_key $TMP/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    if (\$http_x_api_key != "$KEY") { return 401; }
    location = /small { default_type application/json; alias $TMP/www/small.json; }
    location = /1m    { alias $TMP/www/1m.bin; }
    location = /8m    { alias $TMP/www/8m.bin; }
    location = /1mc   { alias $TMP/www/1m.bin; addition_types *; add_after_body /empty; }
    location = /empty { alias $TMP/www/empty.txt; }
    location = /slow  { alias $TMP/www/slow.bin; limit_rate 128k; }
    location = /upload {
      client_body_buffer_size 512k;
      proxy_request_buffering on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://sink/sink;
    }
  }
  server {
    listen 127.0.0.1:$SINK backlog=4096;
    location = /sink { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF

# Started as a daemon (its master writes the pid file), so that the load
# generator can reload it and kill and restart it in the middle of a run.
cat > upstream.sh <<EOF
#!/usr/bin/env bash
# upstream.sh start|reload|restart|stop — the soak's upstream nginx
set -u
pidf=$TMP/upstream-nginx.pid
stop() {
  local pid
  pid=\$(cat "\$pidf" 2>/dev/null) || return 0
  kill -TERM "\$pid" 2>/dev/null || return 0
  for _ in \$(seq 100); do kill -0 "\$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -KILL "\$pid" 2>/dev/null
  pkill -KILL -P "\$pid" 2>/dev/null   # its workers, by parent id
  rm -f "\$pidf"
}
start() {
  taskset -c 1 nginx -e $TMP/upstream-nginx.err -c $TMP/upstream-nginx.conf || return 1
  for _ in \$(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$UP) 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
case "\$1" in
  start) start ;;
  reload) kill -HUP "\$(cat "\$pidf")" ;;
  restart) stop; start ;;
  stop) stop ;;
esac
EOF
chmod +x upstream.sh

# ---------------------------------------------------------------- proxy: nginx (CPU 0)
# The same job as keyhole: inject the key, TLS with verification and a
# keep-alive pool to the upstream (256 idle, 30 s, as keyhole's pool), no
# buffering either way, one access-log line per request.
cat > proxy-nginx.conf <<EOF
user $(id -un);
worker_processes 1;
worker_rlimit_nofile $((4 * CONNS + 1000));
daemon off;
pid $TMP/proxy-nginx.pid;
error_log $TMP/proxy-nginx.err warn;
events { worker_connections $((3 * CONNS + 500)); }
http {
  access_log $TMP/proxy-nginx.access.log;
  client_body_temp_path $TMP/temp/pb; proxy_temp_path $TMP/temp/pp;
  fastcgi_temp_path $TMP/temp/pf; uwsgi_temp_path $TMP/temp/pu; scgi_temp_path $TMP/temp/ps;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_max_body_size 0;
  upstream up { server 127.0.0.1:$UP; keepalive 256; keepalive_requests 1000000; keepalive_timeout 30s; }
  server {
    listen 127.0.0.1:$P_NGINX backlog=4096;
    location / {
      proxy_pass https://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$UP;
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
  }
}
EOF

# ---------------------------------------------------------------- helpers
wait_port() {  # port name log
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$2 did not start listening on port $1; its log:" >&2; cat "$3" >&2; exit 1
}
check() {  # name url [curl args...]
  local name=$1 url=$2; shift 2
  local code
  code=$(curl -sS -o "$TMP/check.out" -w '%{http_code}' "$@" "$url") || code="curl-failed"
  if [[ $code != 200 ]]; then
    echo "sanity check failed: $name $url -> $code" >&2; cat "$TMP/check.out" >&2 2>/dev/null; exit 1
  fi
}
sanity() {  # name port
  local b="http://127.0.0.1:$2"
  check "$1" "$b/small"; cmp -s check.out www/small.json || { echo "$1: /small differs" >&2; exit 1; }
  check "$1" "$b/1mc";   cmp -s check.out www/1m.bin || { echo "$1: /1mc differs" >&2; exit 1; }
  check "$1" "$b/8m";    cmp -s check.out www/8m.bin || { echo "$1: /8m differs" >&2; exit 1; }
  check "$1" "$b/upload" -H 'Transfer-Encoding: chunked' -H 'Expect:' --data-binary @www/1m.bin
  [[ $(cat check.out) == ok ]] || { echo "$1: /upload did not answer ok" >&2; exit 1; }
}
stop_pid() {  # pid [wrapper-pid]: TERM, wait up to 40 s (keyhole drains), KILL
  local pid=$1 wrapper=${2:-$1}
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 400); do kill -0 "$wrapper" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" "$wrapper" 2>/dev/null || true
  wait "$wrapper" 2>/dev/null || true
}

log "starting the upstream in $TMP"
./upstream.sh start || { echo "upstream nginx did not start:" >&2; cat upstream-nginx.err >&2; exit 1; }
curl -sS -o /dev/null -w '' --cacert ca.pem -H "x-api-key: $KEY" "https://127.0.0.1:$UP/small"

# ---------------------------------------------------------------- the soak, one proxy at a time
EVENTS=(--event "$((DURATION / 3))=$TMP/upstream.sh reload"
        --event "$((2 * DURATION / 3))=$TMP/upstream.sh restart")
RESULTS=()
for proxy in $PROXIES; do
  case $proxy in
    keyhole)
      port=$P_KEYHOLE
      cmd=("$KEYHOLE" --listen "127.0.0.1:$port" --ca-file "$TMP/ca.pem"
           --max-connections "$MAX_CONNS"
           --route "/=https://127.0.0.1:$UP" --header 'x-api-key=${BENCH_KEY}')
      if ((HEAPTRACK)); then cmd=(heaptrack -o "$TMP/heaptrack.keyhole" "${cmd[@]}"); fi
      KEYHOLE_STARTED=$(date +%s.%N)
      env BENCH_KEY=$KEY "${KEYHOLE_ENV[@]}" taskset -c 0 "${cmd[@]}" >"$TMP/keyhole.out" 2>"$TMP/keyhole.log" &
      wrapper=$!; PIDS+=("$wrapper"); pid=$wrapper
      for _ in $(seq 200); do
        grep -q '^listening on ' keyhole.out && break
        kill -0 "$wrapper" 2>/dev/null || { echo "keyhole exited:" >&2; cat keyhole.out keyhole.log >&2; exit 1; }
        sleep 0.05
      done
      grep -qx "listening on http://127.0.0.1:$port" keyhole.out || {
        echo "keyhole did not print 'listening on http://127.0.0.1:$port':" >&2
        cat keyhole.out keyhole.log >&2; exit 1; }
      if ((HEAPTRACK)); then   # the process to sample is keyhole itself, heaptrack's child
        pid=$(pgrep -P "$wrapper" -x keyhole | head -1)
        [[ -n $pid ]] || { echo "keyhole's pid not found under heaptrack" >&2; exit 1; }
        PIDS+=("$pid")
      fi
      children=() ;;
    nginx)
      port=$P_NGINX
      taskset -c 0 nginx -e "$TMP/proxy-nginx.err" -c "$TMP/proxy-nginx.conf" >"$TMP/proxy-nginx.log" 2>&1 &
      wrapper=$!; PIDS+=("$wrapper"); pid=$wrapper
      wait_port "$port" proxy-nginx "$TMP/proxy-nginx.err"
      children=(--children) ;;
  esac
  sanity "$proxy" "$port"
  log "$proxy (pid $pid): sanity checks passed; ${DURATION} s of load, $CONNS connections"
  # In the background and waited for, so that Ctrl-C or a TERM reaches the
  # trap at once (which then stops the load generator too).
  taskset -c 1 python3 "$SOAK" load --name "$proxy" --port "$port" --pid "$pid" "${children[@]}" \
    --conns "$CONNS" --workers "$WORKERS" --duration "$DURATION" --after "$AFTER" \
    "${EVENTS[@]}" --out "$TMP/result-$proxy.json" &
  load_pid=$!; PIDS+=("$load_pid")
  wait "$load_pid"
  RESULTS+=("$TMP/result-$proxy.json")
  stop_pid "$pid" "$wrapper"
  if [[ $proxy == keyhole ]] && ((HEAPTRACK)); then
    ht=$(ls "$TMP"/heaptrack.keyhole* 2>/dev/null | head -1)
    if [[ -n $ht ]]; then
      heaptrack_print -f "$ht" > "$TMP/heaptrack.txt" 2>/dev/null || true
      heaptrack_print -f "$ht" --print-peaks=0 --print-allocators=0 --print-temporary=0 \
        -F "$TMP/heaptrack.peak.stacks" --flamegraph-cost-type peak -M "$TMP/heaptrack.massif" \
        --massif-detailed-freq 0 >/dev/null 2>&1 || true
      python3 "$SOAK" heaptrack-summary --stacks "$TMP/heaptrack.peak.stacks" --massif "$TMP/heaptrack.massif" \
        --result "$TMP/result-keyhole.json" --started "$KEYHOLE_STARTED" > "$TMP/heaptrack.summary.md" || true
      log "heaptrack data: $ht; heaptrack_print: $TMP/heaptrack.txt; summary: $TMP/heaptrack.summary.md"
    else
      log "heaptrack wrote no data file"
    fi
  fi
  sleep 1
done

# ---------------------------------------------------------------- report
MACHINE="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
MACHINE+=", Linux $(uname -r), $(nginx -v 2>&1 | sed 's/^nginx version: //')"
echo
echo "Machine: $MACHINE"
echo "Command: \`$COMMAND\` — $CONNS connections, $DURATION s of load per proxy, upstream reloaded at $((DURATION / 3)) s and restarted at $((2 * DURATION / 3)) s"
echo
META=$(python3 -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "machine": sys.argv[2],
  "conns": int(sys.argv[3]), "duration_s": float(sys.argv[4]), "heaptrack": sys.argv[5] == "1",
  "keyhole_env": sys.argv[6:]}))' \
  "$COMMAND" "$MACHINE" "$CONNS" "$DURATION" "$HEAPTRACK" "${KEYHOLE_ENV[@]}")
python3 "$SOAK" report "${RESULTS[@]}" --after "$AFTER" ${JSON_OUT:+--json "$JSON_OUT"} --meta "$META"
if ((HEAPTRACK)) && [[ -s $TMP/heaptrack.summary.md ]]; then
  echo
  echo "keyhole under heaptrack (its RSS above includes heaptrack's own; full output in $TMP/heaptrack.txt):"
  echo
  cat "$TMP/heaptrack.summary.md"
fi
log "done"
