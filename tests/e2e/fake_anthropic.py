#!/usr/bin/env python3
"""A fake Anthropic Messages API upstream for keyhole's end-to-end test.

Python 3 standard library only.  Serves HTTPS (HTTP/1.1, keep-alive) on
127.0.0.1, prints the bound port on stdout (one line, flushed), and serves:

  POST /v1/messages   Messages API: a JSON message, or, when the request body
                      has "stream": true, a chunked SSE stream with the real
                      event names and shapes (message_start, content_block_*,
                      message_delta, message_stop), sleeping --delay seconds
                      between the text deltas.
  POST /echo-sha256   answers {"sha256": ..., "length": ..., "framing": ...} of the
                      body it received (Content-Length or chunked).
  GET /download?n=N[&chunked=1]
                      N deterministic bytes (Content-Length, or chunked with odd
                      chunk sizes); the X-Body-Sha256 header names their sha256.
  /status/NNN         that status (204 and 304 without a body).
  anything else       404 with an Anthropic-style error JSON.
HEAD gets the GET headers and no body.  Like real servers, connections idle
for --keepalive-timeout seconds are closed.  /v1/messages demands an
anthropic-version header, as the real API does.

Every request must carry `x-api-key: <the real key>` (--key, or the env var
FAKE_ANTHROPIC_KEY); otherwise 401 with an Anthropic-style error JSON.

For each request one JSON line is appended to --log: method, path, host,
whether the exact key was seen, which other auth headers were present,
whether --forbid (the placeholder the client used) appeared anywhere in the
head, and for streams the wall-clock times (time.time()) each delta was sent.
The line is written before the response is complete, so a client that has
read the whole response can rely on it being there.
"""

import argparse
import hashlib
import json
import os
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STREAM_DELTAS = ["Hello", " from", " the", " fake", " Anthropic", " stream", "!"]

ARGS = None
LOG_LOCK = threading.Lock()


def log_record(rec):
    if not ARGS.log:
        return
    line = json.dumps(rec, sort_keys=True) + "\n"
    with LOG_LOCK:
        with open(ARGS.log, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def error_body(err_type, message):
    return {"type": "error", "error": {"type": err_type, "message": message}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms Nagle/delayed-ACK stalls
    def version_string(self):
        return "fake-anthropic/1"

    def log_message(self, fmt, *args):  # quiet unless asked
        if ARGS.verbose:
            sys.stderr.write("fake_anthropic: " + (fmt % args) + "\n")

    def setup(self):
        # Like a real API server, close keep-alive connections idle this long.
        self.request.settimeout(ARGS.keepalive_timeout)
        self.request.do_handshake()
        super().setup()

    # ---- helpers -------------------------------------------------------

    def read_body(self):
        te = self.headers.get("Transfer-Encoding")
        cl = self.headers.get("Content-Length")
        if te is not None:
            if te.strip().lower() != "chunked":
                raise ValueError("unsupported transfer-encoding %r" % te)
            if cl is not None:
                raise ValueError("both Content-Length and Transfer-Encoding")
            return self.read_chunked(), "chunked"
        if cl is None:
            return b"", "none"
        n = int(cl)
        data = b""
        while len(data) < n:
            part = self.rfile.read(min(n - len(data), 1 << 16))
            if not part:
                raise ValueError("body cut short at %d of %d" % (len(data), n))
            data += part
        return data, "content-length"

    def read_chunked(self):
        out = []
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\r\n"):
                raise ValueError("bad chunk size line %r" % line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers
                    t = self.rfile.readline(8192)
                    if t in (b"\r\n", b""):
                        break
                return b"".join(out)
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                raise ValueError("bad chunk data")
            out.append(chunk)

    def send_json(self, status, obj, extra=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("request-id", "req_fake_" + uuid.uuid4().hex[:16])
        self.send_header("X-Fake-Anthropic", "1")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        self.chunk_sizes.append(len(data))

    def sse(self, event, data):
        self.write_chunk(("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode())

    def auth_info(self):
        keys = self.headers.get_all("x-api-key") or []
        placeholder_seen = False
        if ARGS.forbid:
            for _, v in self.headers.items():
                if ARGS.forbid in v:
                    placeholder_seen = True
        return {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "anthropic_version": self.headers.get("anthropic-version"),
            "x_api_key_count": len(keys),
            "saw_real_key": keys == [ARGS.key],
            "other_auth_headers": sorted(
                {k.lower() for k in self.headers.keys()}
                & {"authorization", "proxy-authorization"}
            ),
            "placeholder_seen": placeholder_seen,
            "time": time.time(),
        }

    # ---- dispatch --------------------------------------------------------

    def handle_any(self):
        self.chunk_sizes = []
        rec = self.auth_info()
        try:
            body, framing = self.read_body()
        except (ValueError, OSError) as e:
            rec["error"] = str(e)
            log_record(rec)
            self.close_connection = True
            self.send_json(400, error_body("invalid_request_error", "fake: " + str(e)),
                           {"Connection": "close"})
            return
        rec["body_framing"] = framing
        rec["body_length"] = len(body)

        if not rec["saw_real_key"]:
            log_record(rec)
            self.send_json(401, error_body("authentication_error", "invalid x-api-key"))
            return

        path = self.path.split("?", 1)[0]
        if self.command == "POST" and path == "/v1/messages":
            self.messages(rec, body)
        elif path.startswith("/status/"):
            # /status/NNN: that status; 204 and 304 have no body (nor does HEAD).
            code = int(path[len("/status/"):])
            log_record(rec)
            self.send_response(code)
            self.send_header("X-Fake-Anthropic", "1")
            if code in (204, 304):
                self.end_headers()
            else:
                body = b"status %d\n" % code
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            self.wfile.flush()
        elif self.command in ("GET", "HEAD") and path == "/download":
            # /download?n=BYTES[&chunked=1]: deterministic bytes; X-Body-Sha256 names them.
            q = dict(kv.split("=", 1) for kv in self.path.partition("?")[2].split("&") if "=" in kv)
            n = int(q.get("n", "0"))
            chunked = q.get("chunked") == "1"
            block = hashlib.sha256(b"keyhole-e2e").digest() * 2048  # 64 KiB
            data = (block * (n // len(block) + 1))[:n]
            log_record(rec)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("X-Body-Sha256", hashlib.sha256(data).hexdigest())
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                if chunked:
                    # odd chunk sizes on purpose
                    i, sizes = 0, [1, 7, 4093, 65536, 100003]
                    while i < n:
                        size = sizes[len(self.chunk_sizes) % len(sizes)]
                        self.write_chunk(data[i:i + size])
                        i += size
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(data)
            self.wfile.flush()
        elif self.command == "POST" and path == "/echo-sha256":
            digest = hashlib.sha256(body).hexdigest()
            rec["sha256"] = digest
            log_record(rec)
            self.send_json(200, {"sha256": digest, "length": len(body),
                                 "framing": framing, "saw_real_key": True})
        else:
            log_record(rec)
            self.send_json(404, error_body("not_found_error",
                                           "fake_anthropic: no route for %s %s"
                                           % (self.command, path)))

    def messages(self, rec, body):
        if not self.headers.get("anthropic-version"):  # the real API demands it too
            log_record(rec)
            self.send_json(400, error_body("invalid_request_error",
                                           "anthropic-version: header is required"))
            return
        try:
            req = json.loads(body)
            model = req["model"]
            max_tokens = req["max_tokens"]
            messages = req["messages"]
        except (ValueError, KeyError, TypeError) as e:
            log_record(rec)
            self.send_json(400, error_body("invalid_request_error", "fake: bad body: %s" % e))
            return
        if not isinstance(max_tokens, int) or not isinstance(messages, list):
            log_record(rec)
            self.send_json(400, error_body("invalid_request_error",
                                           "fake: bad max_tokens/messages"))
            return
        prompt = ""
        if messages:
            c = messages[-1].get("content")
            if isinstance(c, str):
                prompt = c
            elif isinstance(c, list):
                prompt = "".join(b.get("text", "") for b in c if isinstance(b, dict))
        msg_id = "msg_fake_" + uuid.uuid4().hex[:20]
        rec["msg_id"] = msg_id
        rec["stream"] = bool(req.get("stream"))
        in_tokens = max(1, len(prompt.split()))

        if not req.get("stream"):
            text = "pong: " + prompt
            log_record(rec)
            self.send_json(200, {
                "id": msg_id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": in_tokens, "output_tokens": len(text.split())},
            })
            return

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", "req_fake_" + uuid.uuid4().hex[:16])
        self.send_header("X-Fake-Anthropic", "1")
        self.end_headers()
        self.wfile.flush()
        self.sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": 1}}})
        self.sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})
        self.sse("ping", {"type": "ping"})
        sent = []
        for i, piece in enumerate(STREAM_DELTAS):
            if i:
                time.sleep(ARGS.delay)
            self.sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": piece}})
            sent.append(time.time())
        rec["delta_sent_times"] = sent
        rec["stream_text"] = "".join(STREAM_DELTAS)
        self.sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        self.sse("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": len(STREAM_DELTAS)}})
        self.sse("message_stop", {"type": "message_stop"})
        rec["chunk_sizes"] = self.chunk_sizes
        log_record(rec)  # before the terminating chunk: the client sees it once done
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any


class TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, ctx):
        self.ctx = ctx
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        # Handshake lazily in the handler thread, not in the accept loop.
        return self.ctx.wrap_socket(sock, server_side=True,
                                    do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        if ARGS.verbose:
            super().handle_error(request, client_address)


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    p.add_argument("--keyfile", required=True, help="server private key (PEM)")
    p.add_argument("--key", default=os.environ.get("FAKE_ANTHROPIC_KEY"),
                   help="the real API key to demand (default: $FAKE_ANTHROPIC_KEY)")
    p.add_argument("--forbid", default=None,
                   help="string that must never reach us (the placeholder key)")
    p.add_argument("--log", default=None, help="append one JSON line per request here")
    p.add_argument("--delay", type=float, default=0.3, help="seconds between stream deltas")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--keepalive-timeout", type=float, default=60,
                   help="close a connection idle this many seconds")
    p.add_argument("--verbose", action="store_true")
    ARGS = p.parse_args()
    if not ARGS.key:
        p.error("--key or FAKE_ANTHROPIC_KEY is required")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ARGS.cert, ARGS.keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    srv = TLSServer(("127.0.0.1", ARGS.port), ctx)
    print(srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
