#!/usr/bin/env bash
# End-to-end check of keyhole with real third-party clients: the official
# `anthropic` Python SDK and curl, against a fake Anthropic upstream over TLS.
#
#   tests/e2e/run.sh
#
# Environment (all optional):
#   KEYHOLE_BIN       use this keyhole binary instead of `cargo build --release`
#   KEYHOLE_E2E_VENV  venv to create/reuse (default: ${XDG_CACHE_HOME:-$HOME/.cache}/keyhole-e2e-venv)
#   PYTHON            python3 used to create the venv and run the fake (default: python3)
#   KEYHOLE_E2E_KEEP=1  keep the temp dir (logs, certs) for inspection
#
# Needs: python3 (with venv), openssl, curl, cargo (unless KEYHOLE_BIN), and
# PyPI access the first time (pip install anthropic). All traffic is to 127.0.0.1.
# Prints PASS/FAIL per check and ends with `N passed, M failed`; exit 1 on failure.
#
# What it does: makes a throwaway CA and server certificate (openssl), starts
# fake_anthropic.py (TLS, stdlib only) and keyhole in front of it with
#   --route /=https://127.0.0.1:FAKE --header 'x-api-key=${ANTHROPIC_API_KEY}'
#   --route /down=https://127.0.0.1:<closed port>
# (the real key only in keyhole's environment), then checks:
#   5. sdk_check.py: the official SDK (sync, async, streaming, concurrent,
#      abandoned stream, Bearer auth) with a placeholder key; the fake must see
#      only the real key, and SSE must arrive incrementally;
#   6. curl: 404 passthrough and byte-exact path/query, 5 MiB uploads
#      (Expect: 100-continue, chunked) and downloads, Origin/Sec-Fetch-Site/
#      Host/TRACE/dot-segment/HTTP/1.0 refusals with nothing sent upstream,
#      502, SSE with -N and --raw (chunk sizes kept), keep-alive, HEAD/204/304,
#      a pooled upstream connection closed by the server, SIGTERM draining;
#   7. exit status, stdout and logs (no secrets);
#   8. a second keyhole with --client-key.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
VENV=${KEYHOLE_E2E_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keyhole-e2e-venv}
ANTHROPIC_SPEC='anthropic>=0.40,<1'
DELAY=0.3
UPSTREAM_IDLE=5 # the fake closes connections idle this long, as real servers do
PLACEHOLDER=placeholder-not-the-key
REAL_KEY="sk-ant-e2e-real-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-e2e.XXXXXX")
PIDS=()
PASSED=0
FAILED=0

# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        # Background pipelines are subshells: end their children (curl) too.
        if command -v pkill > /dev/null; then pkill -P "$pid" 2>/dev/null || true; fi
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEYHOLE_E2E_KEEP:-}" == 1 ]]; then
        echo "# kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

pass() { PASSED=$((PASSED + 1)); echo "PASS $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1${2:+: $2}"; }
check() { # check NAME CONDITION-EXIT-STATUS [WHY]
    if [[ "$2" == 0 ]]; then pass "$1"; else fail "$1" "${3:-}"; fi
}
summary() {
    echo "$PASSED passed, $FAILED failed"
    if [[ "$FAILED" -ne 0 ]]; then exit 1; fi
    exit 0
}
die() { # a setup step failed: no point going on
    fail "setup: $1" "${2:-}"
    summary
}

# Waits until FILE has a line matching REGEX (prints it) or PID died / timeout.
wait_line() {
    local file=$1 regex=$2 pid=$3 tries=${4:-300} line
    while ((tries-- > 0)); do
        if line=$(grep -m1 -E "$regex" "$file" 2>/dev/null); then
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

fake_records() { # number of requests the fake has seen
    if [[ -f "$WORK/fake.jsonl" ]]; then wc -l < "$WORK/fake.jsonl" | tr -d ' '; else echo 0; fi
}

# ---------------------------------------------------------------- 1. venv
if ! "$VENV/bin/python" -c 'import anthropic' 2>/dev/null; then
    echo "# creating venv $VENV and installing $ANTHROPIC_SPEC"
    "$PY" -m venv "$VENV" || die "python venv" "$PY -m venv $VENV failed"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$ANTHROPIC_SPEC" \
        || die "pip install" "pip install $ANTHROPIC_SPEC failed"
fi
VPY="$VENV/bin/python"

# ---------------------------------------------------------------- 2. certificates
(
    cd "$WORK"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj "/CN=keyhole e2e throwaway CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature,keyEncipherment' \
        'extendedKeyUsage=serverAuth' \
        'subjectAltName=IP:127.0.0.1,DNS:localhost' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile server.ext
    openssl verify -CAfile ca.pem server.pem
) > "$WORK/openssl.log" 2>&1 || die "openssl certificates" "see $WORK/openssl.log"

# ---------------------------------------------------------------- 3. fake upstream
FAKE_ANTHROPIC_KEY="$REAL_KEY" "$PY" "$HERE/fake_anthropic.py" \
    --cert "$WORK/server.pem" --keyfile "$WORK/server.key" \
    --forbid "$PLACEHOLDER" --log "$WORK/fake.jsonl" --delay "$DELAY" \
    --keepalive-timeout "$UPSTREAM_IDLE" \
    > "$WORK/fake.out" 2> "$WORK/fake.err" &
FAKE_PID=$!
PIDS+=("$FAKE_PID")
FAKE_PORT=$(wait_line "$WORK/fake.out" '^[0-9]+$' "$FAKE_PID") \
    || die "fake upstream start" "$(cat "$WORK/fake.err")"
echo "# fake Anthropic upstream on https://127.0.0.1:$FAKE_PORT"

# ---------------------------------------------------------------- 4. keyhole
if [[ -n "${KEYHOLE_BIN:-}" ]]; then
    KEYHOLE=$KEYHOLE_BIN
else
    echo "# cargo build --release"
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" \
        || die "cargo build --release"
    KEYHOLE="${CARGO_TARGET_DIR:-$ROOT/target}/release/keyhole"
fi
[[ -x "$KEYHOLE" ]] || die "keyhole binary" "$KEYHOLE is not executable"

# A port nothing listens on, for a second route whose upstream is down.
DEAD_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# The real key is in keyhole's environment only.
# shellcheck disable=SC2016 # ${ANTHROPIC_API_KEY} is for keyhole to expand
ANTHROPIC_API_KEY="$REAL_KEY" "$KEYHOLE" --listen 127.0.0.1:0 --ca-file "$WORK/ca.pem" \
    --route "/=https://127.0.0.1:$FAKE_PORT" --header 'x-api-key=${ANTHROPIC_API_KEY}' \
    --route "/down=https://127.0.0.1:$DEAD_PORT" --header 'x-api-key=${ANTHROPIC_API_KEY}' \
    > "$WORK/keyhole.out" 2> "$WORK/keyhole.err" &
KEYHOLE_PID=$!
PIDS+=("$KEYHOLE_PID")
LISTEN_LINE=$(wait_line "$WORK/keyhole.out" '^listening on http://' "$KEYHOLE_PID") \
    || die "keyhole start" "no 'listening on' line; stderr: $(tail -5 "$WORK/keyhole.err")"
KH=${LISTEN_LINE#listening on }
echo "# keyhole on $KH ($KEYHOLE)"
check "keyhole prints 'listening on http://127.0.0.1:PORT' with the bound port" \
    "$([[ "$LISTEN_LINE" =~ ^listening\ on\ http://127\.0\.0\.1:[1-9][0-9]*$ ]]; echo $?)" \
    "got '$LISTEN_LINE'"

# ---------------------------------------------------------------- 5. anthropic SDK
set +e
ANTHROPIC_BASE_URL="$KH" ANTHROPIC_API_KEY="$PLACEHOLDER" FAKE_LOG="$WORK/fake.jsonl" \
    FAKE_DELAY="$DELAY" EXPECT_HOST="127.0.0.1:$FAKE_PORT" \
    "$VPY" "$HERE/sdk_check.py" > "$WORK/sdk.out" 2>&1
SDK_RC=$?
set -e
cat "$WORK/sdk.out"
SDK_PASS=$(grep -c '^PASS ' "$WORK/sdk.out" || true)
SDK_FAIL=$(grep -c '^FAIL ' "$WORK/sdk.out" || true)
PASSED=$((PASSED + SDK_PASS))
FAILED=$((FAILED + SDK_FAIL))
if [[ "$SDK_RC" -ne 0 && "$SDK_FAIL" -eq 0 ]]; then
    fail "sdk: sdk_check.py exited $SDK_RC" "see output above"
fi

# ---------------------------------------------------------------- 6. curl
curl_() { curl -sS --max-time 30 "$@" 2>>"$WORK/curl.err"; }

# 6a. unknown path: the fake's own 404 comes back through keyhole
set +e
ODD_PATH='/no/such/path;p=1/%20~%7e%41?x=1&y=%2F%20&&z=a+b/../'
code=$(curl_ -D "$WORK/404.h" -o "$WORK/404.b" -w '%{http_code}' --path-as-is "$KH$ODD_PATH")
set -e
check "curl: unknown path gives the fake's 404 passed through" \
    "$([[ "$code" == 404 ]] && grep -q 'no route for GET /no/such/path' "$WORK/404.b" \
        && grep -qi '^x-fake-anthropic: 1' "$WORK/404.h"; echo $?)" \
    "status $code, body: $(head -c 200 "$WORK/404.b" 2>/dev/null)"
LAST=$(tail -1 "$WORK/fake.jsonl" 2>/dev/null || true)
check "curl: path and query reach the fake byte for byte" \
    "$("$PY" -c 'import json,sys; sys.exit(json.loads(sys.argv[1])["path"] != sys.argv[2])' \
        "$LAST" "$ODD_PATH" 2>/dev/null; echo $?)" \
    "fake saw $("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["path"])' "$LAST" 2>/dev/null), want $ODD_PATH"

# 6b. 5 MiB upload with Expect: 100-continue, placeholder credentials stripped
head -c $((5 * 1024 * 1024)) /dev/urandom > "$WORK/big.bin"
WANT_SHA=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$WORK/big.bin")
set +e
code=$(curl -sS --max-time 30 -v -o "$WORK/up.b" -w '%{http_code}' \
    -H 'Expect: 100-continue' -H 'Content-Type: application/octet-stream' \
    -H "x-api-key: $PLACEHOLDER" -H "Authorization: Bearer $PLACEHOLDER" \
    --data-binary @"$WORK/big.bin" "$KH/echo-sha256" 2> "$WORK/up.v")
set -e
GOT=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["sha256"], d["length"], d["framing"])' \
    "$WORK/up.b" 2>/dev/null || true)
check "curl: 5 MiB POST (--data-binary, Expect: 100-continue) arrives intact" \
    "$([[ "$code" == 200 && "$GOT" == "$WANT_SHA 5242880 content-length" ]]; echo $?)" \
    "status $code, fake got '$GOT', want '$WANT_SHA 5242880 content-length'"
check "curl: keyhole answered 100 Continue to the 5 MiB upload" \
    "$(grep -q '^< HTTP/1.1 100' "$WORK/up.v"; echo $?)" \
    "curl -v shows no '100 Continue' (curl waited out its expect timeout)"
LAST=$(tail -1 "$WORK/fake.jsonl" 2>/dev/null || true)
check "curl: upload reached the fake with the real key, placeholder and Authorization stripped" \
    "$("$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r["path"]=="/echo-sha256" and r["saw_real_key"] and not r["placeholder_seen"] and not r["other_auth_headers"] else 1)' \
        "$LAST" 2>/dev/null; echo $?)" \
    "fake record: $LAST"

# 6c. same body, chunked request framing
set +e
code=$(curl_ -o "$WORK/upc.b" -w '%{http_code}' -H 'Transfer-Encoding: chunked' \
    --data-binary @"$WORK/big.bin" "$KH/echo-sha256")
set -e
GOT=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["sha256"], d["length"], d["framing"])' \
    "$WORK/upc.b" 2>/dev/null || true)
check "curl: 5 MiB chunked POST arrives intact and chunked" \
    "$([[ "$code" == 200 && "$GOT" == "$WANT_SHA 5242880 chunked" ]]; echo $?)" \
    "status $code, fake got '$GOT'"

# 6d. browser Origin refused, nothing goes upstream
before=$(fake_records)
set +e
code=$(curl_ -o "$WORK/origin.b" -w '%{http_code}' -H 'Origin: http://evil.example' \
    -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' -d '{}' "$KH/v1/messages")
set -e
after=$(fake_records)
check "curl: request with Origin: http://evil.example gets 403 from keyhole, nothing upstream" \
    "$([[ "$code" == 403 && "$before" == "$after" ]]; echo $?)" \
    "status $code, fake requests before/after: $before/$after"

# 6e. TRACE refused
before=$(fake_records)
set +e
code=$(curl_ -o "$WORK/trace.b" -w '%{http_code}' -X TRACE "$KH/v1/messages")
set -e
after=$(fake_records)
check "curl: TRACE gets 405, nothing upstream" \
    "$([[ "$code" == 405 && "$before" == "$after" ]]; echo $?)" \
    "status $code, fake requests before/after: $before/$after"

# 6f. SSE with curl -N: events arrive, and incrementally
sse_curl() { # sse_curl OUT: stream one message through keyhole, timestamping each line
    curl_ -N -H "x-api-key: $PLACEHOLDER" -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' \
        -d '{"model":"claude-e2e","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"curl stream"}]}' \
        "$KH/v1/messages" \
        | "$PY" -u -c '
import sys, time
for line in sys.stdin.buffer:
    sys.stdout.write("%.6f %s\n" % (time.time(), line.decode("utf-8", "replace").rstrip("\r\n")))
' > "$1"
}
sse_verify() { # sse_verify OUT [T]: prints why not, exit status 1 if not
    # With T (a time.time()), the last delta must have arrived after T.
    "$PY" - "$1" "$WORK/fake.jsonl" "${2:-0}" 2>&1 <<'EOF'
import json, sys
lines = [l.rstrip("\n").split(" ", 1) for l in open(sys.argv[1])]
events = [l[1][len("event: "):] for l in lines if len(l) == 2 and l[1].startswith("event: ")]
want = ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 7 + \
       ["content_block_stop", "message_delta", "message_stop"]
if events != want:
    sys.exit("events %s" % events)
deltas = [float(l[0]) for l in lines if len(l) == 2 and '"text_delta"' in l[1]]
text = "".join(json.loads(l[1][len("data: "):])["delta"]["text"]
               for l in lines if len(l) == 2 and '"text_delta"' in l[1])
if text != "Hello from the fake Anthropic stream!":
    sys.exit("text %r" % text)
recs = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
rec = [r for r in recs if r.get("delta_sent_times")][-1]
if deltas[0] >= rec["delta_sent_times"][-1]:
    sys.exit("first delta arrived after the last was sent: buffered")
if not rec["saw_real_key"] or rec["placeholder_seen"]:
    sys.exit("fake record %s" % rec)
if deltas[-1] <= float(sys.argv[3]):
    sys.exit("the stream was over %.3fs before SIGTERM" % (float(sys.argv[3]) - deltas[-1]))
EOF
}
sse_curl "$WORK/sse.t" || true
SSE_WHY=$(sse_verify "$WORK/sse.t") && rc=0 || rc=$?
check "curl -N: SSE events arrive complete and incrementally through keyhole" "$rc" "$SSE_WHY"

# 6g. keep-alive: two requests, one connection
set +e
NC=$(curl_ -o /dev/null -o /dev/null -w '%{http_code}:%{num_connects} ' \
    "$KH/no/such/a" "$KH/no/such/b")
set -e
check "curl: two requests reuse one keep-alive client connection" \
    "$([[ "$NC" == "404:1 404:0 " ]]; echo $?)" "got '$NC' (status:new-connections)"

set +e
NC=$(curl_ -H 'Connection: close' -o /dev/null -o /dev/null -w '%{http_code}:%{num_connects} ' \
    "$KH/no/such/c" "$KH/no/such/d")
set -e
check "curl: Connection: close from the client is honoured (fake's 404s, new connection each)" \
    "$([[ "$NC" == "404:1 404:1 " ]]; echo $?)" "got '$NC' (status:new-connections)"

# 6h. bodiless responses: HEAD, 204, 304, each followed by another request on the connection
bodiless() { # bodiless NAME METHOD PATH WANT-STATUS
    local got
    set +e
    got=$(curl_ -X "$2" -o /dev/null -o /dev/null -w '%{http_code}:%{num_connects} ' \
        --max-time 10 "$KH$3" "$KH/no/such/after-bodiless")
    set -e
    check "$1" "$([[ "$got" == "$4:1 404:0 " ]]; echo $?)" \
        "got '$got' (status:new-connections), want '$4:1 404:0 '"
}
# (curl -X HEAD would wait for a body; -I is the HEAD that knows there is none)
set +e
got=$(curl_ -I -o /dev/null -o /dev/null -w '%{http_code}:%{num_connects} ' --max-time 10 \
    "$KH/no/such/head" "$KH/no/such/after-head")
set -e
check "curl -I: HEAD response (with Content-Length, no body), then another request on the connection" \
    "$([[ "$got" == "404:1 404:0 " ]]; echo $?)" "got '$got' (status:new-connections)"
bodiless "curl: 204 response, then another request on the connection" GET /status/204 204
bodiless "curl: 304 response, then another request on the connection" GET /status/304 304

# 6i. 5 MiB downloads, Content-Length and chunked (odd chunk sizes)
for framing in 0 1; do
    set +e
    code=$(curl_ -D "$WORK/dl.h" -o "$WORK/dl.b" -w '%{http_code}' \
        "$KH/download?n=5242880&chunked=$framing")
    set -e
    want=$(tr -d '\r' < "$WORK/dl.h" | awk 'tolower($1) == "x-body-sha256:" {print $2}')
    got=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$WORK/dl.b" 2>/dev/null || true)
    check "curl: 5 MiB download ($([[ $framing == 1 ]] && echo chunked || echo Content-Length)) arrives intact" \
        "$([[ "$code" == 200 && -n "$want" && "$got" == "$want" ]]; echo $?)" \
        "status $code, sha256 $got, want '$want'"
done

# 6j. chunk sizes of the SSE stream are kept (curl --raw shows the chunk framing)
set +e
curl_ --raw -N -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' -o "$WORK/raw.b" \
    -d '{"model":"claude-e2e","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"raw"}]}' \
    "$KH/v1/messages"
set -e
RAW_WHY=$("$PY" - "$WORK/raw.b" "$WORK/fake.jsonl" 2>&1 <<'EOF'
import json, sys
raw = open(sys.argv[1], "rb").read()
if not raw.startswith(b"11"):
    sys.exit("not the chunked SSE stream: %r" % raw[:200])
sizes, i = [], 0
while True:
    j = raw.index(b"\r\n", i)
    line = raw[i:j]
    if line != b"%x" % int(line, 16):
        sys.exit("non-canonical chunk size line %r" % line)
    n = int(line, 16)
    if n == 0:
        if raw[j:] != b"\r\n\r\n":
            sys.exit("bad last chunk / trailer section %r" % raw[j:])
        break
    sizes.append(n)
    if raw[j + 2 + n:j + 4 + n] != b"\r\n":
        sys.exit("bad chunk data framing")
    i = j + 4 + n
rec = [json.loads(l) for l in open(sys.argv[2]) if l.strip() and "chunk_sizes" in l][-1]
if sizes != rec["chunk_sizes"]:
    sys.exit("chunk sizes %s, the fake sent %s" % (sizes, rec["chunk_sizes"]))
EOF
) && rc=0 || rc=$?
check "curl --raw: SSE chunk sizes arrive unchanged, canonical framing" "$rc" "$RAW_WHY"

# 6k. the upstream closed an idle pooled connection: the next request must still work
sleep $((UPSTREAM_IDLE + 1))
set +e
code=$(curl_ -o "$WORK/stale.b" -w '%{http_code}' "$KH/no/such/after-upstream-idle-close")
set -e
check "curl: request after the upstream closed its idle pooled connection gets the fake's 404" \
    "$([[ "$code" == 404 ]] && grep -q 'no route' "$WORK/stale.b"; echo $?)" \
    "status $code, body: $(head -c 200 "$WORK/stale.b" 2>/dev/null)"
set +e
code=$(curl_ -o "$WORK/stale2.b" -w '%{http_code}' -H 'Content-Type: application/json' -H 'anthropic-version: 2023-06-01' \
    -d '{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"after idle"}]}' \
    "$KH/v1/messages")
set -e
check "curl: POST /v1/messages right after that works too" \
    "$([[ "$code" == 200 ]] && grep -q 'pong: after idle' "$WORK/stale2.b"; echo $?)" \
    "status $code, body: $(head -c 200 "$WORK/stale2.b" 2>/dev/null)"

# 6l. keyhole's own refusals: nothing may reach the upstream
refused() { # refused NAME WANT-STATUS CURL-ARGS...
    local name=$1 want=$2 before after code
    shift 2
    before=$(fake_records)
    set +e
    code=$(curl_ -o "$WORK/refused.b" -w '%{http_code}' "$@")
    set -e
    after=$(fake_records)
    check "$name" "$([[ "$code" == "$want" && "$before" == "$after" ]]; echo $?)" \
        "status $code (want $want), fake requests before/after: $before/$after, body: $(head -c 120 "$WORK/refused.b" 2>/dev/null)"
}
refused "curl: foreign Host (DNS rebinding) gets 403, nothing upstream" 403 \
    -H 'Host: evil.example' "$KH/v1/models"
refused "curl: Sec-Fetch-Site: cross-site gets 403, nothing upstream" 403 \
    -H 'Sec-Fetch-Site: cross-site' "$KH/v1/models"
refused "curl --path-as-is: /v1/../echo-sha256 gets 400, nothing upstream" 400 \
    --path-as-is "$KH/v1/../echo-sha256"
refused "curl --path-as-is: /v1/%2e%2e/echo-sha256 gets 400, nothing upstream" 400 \
    --path-as-is "$KH/v1/%2e%2e/echo-sha256"
refused "curl --http1.0 gets 505, nothing upstream" 505 --http1.0 "$KH/v1/models"
refused "curl: route to a closed upstream port gets 502" 502 "$KH/down/v1/models"
set +e
code=$(curl_ -o /dev/null -w '%{http_code}' -H 'Host: localhost' "$KH/localhost-host")
set -e
check "curl: Host: localhost is accepted (fake's 404 comes back)" "$([[ "$code" == 404 ]]; echo $?)" \
    "status $code"

# 6m. SIGTERM while a stream is in flight: the stream completes, then exit 0
sse_curl "$WORK/drain.t" &
DRAIN_CURL=$!
PIDS+=("$DRAIN_CURL")
sleep 0.8
TERM_AT=$("$PY" -c 'import time; print(time.time())')
kill -TERM "$KEYHOLE_PID" 2>/dev/null || true
sleep 0.2
set +e
code=$(curl -sS --max-time 1 -o /dev/null -w '%{http_code}' "$KH/no/such/after-term" 2>/dev/null)
wait "$DRAIN_CURL"
set -e
check "while draining after SIGTERM keyhole answers no new connection" \
    "$([[ "$code" == 000 ]]; echo $?)" "a new request got status $code"
DRAIN_WHY=$(sse_verify "$WORK/drain.t" "$TERM_AT") && rc=0 || rc=$?
check "SIGTERM during an SSE stream: the stream still completes" "$rc" "$DRAIN_WHY"

# ---------------------------------------------------------------- 7. shutdown and logs
KRC=timeout
for _ in $(seq 100); do
    if ! kill -0 "$KEYHOLE_PID" 2>/dev/null; then
        set +e; wait "$KEYHOLE_PID"; KRC=$?; set -e
        break
    fi
    sleep 0.1
done
check "keyhole exits 0 after SIGTERM" "$([[ "$KRC" == 0 ]]; echo $?)" "exit status $KRC"
check "keyhole stdout is exactly the one 'listening on' line" \
    "$([[ "$(cat "$WORK/keyhole.out")" == "$LISTEN_LINE" ]]; echo $?)" \
    "stdout: $(head -c 300 "$WORK/keyhole.out")"
check "keyhole logs never contain the real key nor the client's placeholder key" \
    "$(! grep -qF -e "$REAL_KEY" -e "$PLACEHOLDER" "$WORK/keyhole.err" "$WORK/keyhole.out"; echo $?)" \
    "a key appears in keyhole's output"
# At least 26 requests reached keyhole's request handling.
LOG_LINES=$(grep -c . "$WORK/keyhole.err" || true)
check "keyhole logs a line per request on stderr, paths without the query" \
    "$([[ "$LOG_LINES" -ge 26 ]] && grep -q '/no/such/path' "$WORK/keyhole.err" \
        && ! grep -qF '?x=1' "$WORK/keyhole.err"; echo $?)" \
    "$LOG_LINES stderr lines (want >= 26), line for /no/such/path?x=1: $(grep -F '/no/such/path' "$WORK/keyhole.err" || true)"
# ---------------------------------------------------------------- 8. --client-key
# The realistic sandbox set-up: the sandbox holds a keyhole client key (which
# contains the placeholder string, so the fake flags it if it ever arrives).
CLIENT_KEY="$PLACEHOLDER-client-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
# shellcheck disable=SC2016 # ${...} is for keyhole to expand
KEYHOLE_CLIENT_KEY="$CLIENT_KEY" ANTHROPIC_API_KEY="$REAL_KEY" "$KEYHOLE" \
    --listen 127.0.0.1:0 --ca-file "$WORK/ca.pem" --client-key '${KEYHOLE_CLIENT_KEY}' \
    --route "/=https://127.0.0.1:$FAKE_PORT" --header 'x-api-key=${ANTHROPIC_API_KEY}' \
    > "$WORK/keyhole2.out" 2> "$WORK/keyhole2.err" &
KEYHOLE2_PID=$!
PIDS+=("$KEYHOLE2_PID")
if LISTEN2=$(wait_line "$WORK/keyhole2.out" '^listening on http://' "$KEYHOLE2_PID"); then
    KH2=${LISTEN2#listening on }
    set +e
    ANTHROPIC_BASE_URL="$KH2" CLIENT_KEY="$CLIENT_KEY" FAKE_LOG="$WORK/fake.jsonl" \
        "$VPY" - > "$WORK/sdk2.out" 2>&1 <<'EOF'
import json, os, anthropic
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["CLIENT_KEY"]
def rec(msg_id):
    return [json.loads(l) for l in open(os.environ["FAKE_LOG"]) if msg_id in l][0]
for label, kw in (("x-api-key", {"api_key": key}),
                  ("Authorization: Bearer", {"api_key": None, "auth_token": key})):
    c = anthropic.Anthropic(base_url=base, max_retries=0, timeout=30, **kw)
    m = c.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "ck"}])
    r = rec(m.id)
    ok = m.content[0].text == "pong: ck" and r["saw_real_key"] and not r["placeholder_seen"] \
        and not r["other_auth_headers"]
    print("%s sdk: --client-key sent as %s is accepted, stripped, real key injected%s"
          % ("PASS" if ok else "FAIL", label, "" if ok else ": fake record %s" % r))
try:
    anthropic.Anthropic(base_url=base, api_key=key + "x", max_retries=0, timeout=30) \
        .messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    print("FAIL sdk: wrong client key is refused with 401: it was accepted")
except anthropic.AuthenticationError as e:
    print("PASS sdk: wrong client key is refused with 401 (AuthenticationError)")
except Exception as e:
    print("FAIL sdk: wrong client key is refused with 401: %r" % e)
EOF
    SDK2_RC=$?
    set -e
    cat "$WORK/sdk2.out"
    PASSED=$((PASSED + $(grep -c '^PASS ' "$WORK/sdk2.out" || true)))
    FAILED=$((FAILED + $(grep -c '^FAIL ' "$WORK/sdk2.out" || true)))
    if [[ "$SDK2_RC" -ne 0 ]]; then fail "sdk: --client-key script exited $SDK2_RC" "see output above"; fi
    refused "curl: --client-key: no key gets 401, nothing upstream" 401 "$KH2/v1/messages"
    refused "curl: --client-key: unknown path without key gets 401 (key checked before routing)" \
        401 "$KH2/no/such/path"
    refused "curl: --client-key: the real upstream key is not a client key (401)" 401 \
        -H "x-api-key: $REAL_KEY" "$KH2/v1/messages"
    check "keyhole --client-key logs contain neither key" \
        "$(! grep -qF -e "$REAL_KEY" -e "$PLACEHOLDER" "$WORK/keyhole2.err" "$WORK/keyhole2.out"; echo $?)" \
        "a key appears in keyhole's output"
else
    fail "keyhole --client-key start" "$(tail -5 "$WORK/keyhole2.err")"
fi

if [[ "$FAILED" -ne 0 ]]; then
    echo "# keyhole stderr (last 30 lines):"
    tail -30 "$WORK/keyhole.err" | sed 's/^/#   /'
    if [[ -s "$WORK/curl.err" ]]; then
        echo "# curl stderr:"
        sed 's/^/#   /' "$WORK/curl.err"
    fi
fi

summary
