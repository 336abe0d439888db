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
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
VENV=${KEYHOLE_E2E_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keyhole-e2e-venv}
ANTHROPIC_SPEC='anthropic>=0.40,<1'
DELAY=0.3
PLACEHOLDER=placeholder-not-the-key
REAL_KEY="sk-ant-e2e-real-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-e2e.XXXXXX")
PIDS=()
PASSED=0
FAILED=0

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
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
    $([[ "$LISTEN_LINE" =~ ^listening\ on\ http://127\.0\.0\.1:[1-9][0-9]*$ ]]; echo $?) \
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
CURL=(curl_)

# 6a. unknown path: the fake's own 404 comes back through keyhole
set +e
code=$("${CURL[@]}" -D "$WORK/404.h" -o "$WORK/404.b" -w '%{http_code}' "$KH/no/such/path?x=1")
set -e
check "curl: unknown path gives the fake's 404 passed through" \
    $([[ "$code" == 404 ]] && grep -q 'no route for GET /no/such/path' "$WORK/404.b" \
        && grep -qi '^x-fake-anthropic: 1' "$WORK/404.h"; echo $?) \
    "status $code, body: $(head -c 200 "$WORK/404.b" 2>/dev/null)"

# 6b. 5 MiB upload with Expect: 100-continue, placeholder credentials stripped
head -c $((5 * 1024 * 1024)) /dev/urandom > "$WORK/big.bin"
WANT_SHA=$(sha256sum "$WORK/big.bin" | cut -d' ' -f1)
set +e
code=$(curl -sS --max-time 30 -v -o "$WORK/up.b" -w '%{http_code}' \
    -H 'Expect: 100-continue' -H 'Content-Type: application/octet-stream' \
    -H "x-api-key: $PLACEHOLDER" -H "Authorization: Bearer $PLACEHOLDER" \
    --data-binary @"$WORK/big.bin" "$KH/echo-sha256" 2> "$WORK/up.v")
set -e
GOT=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["sha256"], d["length"], d["framing"])' \
    "$WORK/up.b" 2>/dev/null || true)
check "curl: 5 MiB POST (--data-binary, Expect: 100-continue) arrives intact" \
    $([[ "$code" == 200 && "$GOT" == "$WANT_SHA 5242880 content-length" ]]; echo $?) \
    "status $code, fake got '$GOT', want '$WANT_SHA 5242880 content-length'"
check "curl: keyhole answered 100 Continue to the 5 MiB upload" \
    $(grep -q '^< HTTP/1.1 100' "$WORK/up.v"; echo $?) \
    "curl -v shows no '100 Continue' (curl waited out its expect timeout)"
LAST=$(tail -1 "$WORK/fake.jsonl" 2>/dev/null || true)
check "curl: upload reached the fake with the real key, placeholder and Authorization stripped" \
    $("$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r["path"]=="/echo-sha256" and r["saw_real_key"] and not r["placeholder_seen"] and not r["other_auth_headers"] else 1)' \
        "$LAST" 2>/dev/null; echo $?) \
    "fake record: $LAST"

# 6c. same body, chunked request framing
set +e
code=$("${CURL[@]}" -o "$WORK/upc.b" -w '%{http_code}' -H 'Transfer-Encoding: chunked' \
    --data-binary @"$WORK/big.bin" "$KH/echo-sha256")
set -e
GOT=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["sha256"], d["length"], d["framing"])' \
    "$WORK/upc.b" 2>/dev/null || true)
check "curl: 5 MiB chunked POST arrives intact and chunked" \
    $([[ "$code" == 200 && "$GOT" == "$WANT_SHA 5242880 chunked" ]]; echo $?) \
    "status $code, fake got '$GOT'"

# 6d. browser Origin refused, nothing goes upstream
before=$(fake_records)
set +e
code=$("${CURL[@]}" -o "$WORK/origin.b" -w '%{http_code}' -H 'Origin: http://evil.example' \
    -H 'Content-Type: application/json' -d '{}' "$KH/v1/messages")
set -e
after=$(fake_records)
check "curl: request with Origin: http://evil.example gets 403 from keyhole, nothing upstream" \
    $([[ "$code" == 403 && "$before" == "$after" ]]; echo $?) \
    "status $code, fake requests before/after: $before/$after"

# 6e. TRACE refused
before=$(fake_records)
set +e
code=$("${CURL[@]}" -o "$WORK/trace.b" -w '%{http_code}' -X TRACE "$KH/v1/messages")
set -e
after=$(fake_records)
check "curl: TRACE gets 405, nothing upstream" \
    $([[ "$code" == 405 && "$before" == "$after" ]]; echo $?) \
    "status $code, fake requests before/after: $before/$after"

# 6f. SSE with curl -N: events arrive, and incrementally
sse_curl() { # sse_curl OUT: stream one message through keyhole, timestamping each line
    curl_ -N -H "x-api-key: $PLACEHOLDER" -H 'Content-Type: application/json' \
        -d '{"model":"claude-e2e","max_tokens":32,"stream":true,"messages":[{"role":"user","content":"curl stream"}]}' \
        "$KH/v1/messages" \
        | "$PY" -u -c '
import sys, time
for line in sys.stdin.buffer:
    sys.stdout.write("%.6f %s\n" % (time.time(), line.decode("utf-8", "replace").rstrip("\r\n")))
' > "$1"
}
sse_verify() { # sse_verify OUT: prints why not, exit status 1 if not
    "$PY" - "$1" "$WORK/fake.jsonl" 2>&1 <<'EOF'
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
EOF
}
sse_curl "$WORK/sse.t" || true
SSE_WHY=$(sse_verify "$WORK/sse.t") && rc=0 || rc=$?
check "curl -N: SSE events arrive complete and incrementally through keyhole" "$rc" "$SSE_WHY"

# 6g. keep-alive: two requests, one connection
set +e
NC=$("${CURL[@]}" -o /dev/null -o /dev/null -w '%{http_code}:%{num_connects} ' \
    "$KH/no/such/a" "$KH/no/such/b")
set -e
check "curl: two requests reuse one keep-alive client connection" \
    $([[ "$NC" == "404:1 404:0 " ]]; echo $?) "got '$NC' (status:new-connections)"

# 6h. keyhole's own refusals: nothing may reach the upstream
refused() { # refused NAME WANT-STATUS CURL-ARGS...
    local name=$1 want=$2 before after code
    shift 2
    before=$(fake_records)
    set +e
    code=$(curl_ -o "$WORK/refused.b" -w '%{http_code}' "$@")
    set -e
    after=$(fake_records)
    check "$name" $([[ "$code" == "$want" && "$before" == "$after" ]]; echo $?) \
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
check "curl: Host: localhost is accepted (fake's 404 comes back)" $([[ "$code" == 404 ]]; echo $?) \
    "status $code"

# 6i. SIGTERM while a stream is in flight: the stream completes, then exit 0
sse_curl "$WORK/drain.t" &
DRAIN_CURL=$!
PIDS+=("$DRAIN_CURL")
sleep 0.8
kill -TERM "$KEYHOLE_PID" 2>/dev/null || true
set +e
wait "$DRAIN_CURL"
set -e
DRAIN_WHY=$(sse_verify "$WORK/drain.t") && rc=0 || rc=$?
check "SIGTERM during an SSE stream: the stream still completes" "$rc" "$DRAIN_WHY"
set +e
code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "$KH/no/such/after-term" 2>/dev/null)
set -e
check "after SIGTERM keyhole accepts no new requests" $([[ "$code" == 000 ]]; echo $?) \
    "a new request got status $code"

# ---------------------------------------------------------------- 7. shutdown and logs
KRC=timeout
for _ in $(seq 100); do
    if ! kill -0 "$KEYHOLE_PID" 2>/dev/null; then
        set +e; wait "$KEYHOLE_PID"; KRC=$?; set -e
        break
    fi
    sleep 0.1
done
check "keyhole exits 0 after SIGTERM" $([[ "$KRC" == 0 ]]; echo $?) "exit status $KRC"
check "keyhole stdout is exactly the one 'listening on' line" \
    $([[ "$(cat "$WORK/keyhole.out")" == "$LISTEN_LINE" ]]; echo $?) \
    "stdout: $(head -c 300 "$WORK/keyhole.out")"
check "keyhole logs never contain the real key" \
    $(! grep -qF -- "$REAL_KEY" "$WORK/keyhole.err" "$WORK/keyhole.out"; echo $?) \
    "the real key appears in keyhole's output"
check "keyhole logs one line per request on stderr" \
    $([[ $(grep -c . "$WORK/keyhole.err" || true) -ge 10 ]]; echo $?) \
    "only $(grep -c . "$WORK/keyhole.err" || true) stderr lines"
if [[ "$FAILED" -ne 0 ]]; then
    echo "# keyhole stderr (last 30 lines):"
    tail -30 "$WORK/keyhole.err" | sed 's/^/#   /'
    if [[ -s "$WORK/curl.err" ]]; then
        echo "# curl stderr:"
        sed 's/^/#   /' "$WORK/curl.err"
    fi
fi

summary
