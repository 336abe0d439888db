#!/usr/bin/env python3
"""Copies of the injected key in a running keyhole's writable memory.

    sudo python3 bench/key_copies.py [--binary target/release/keyhole]
                                     [--requests 240] [--where]

For each mode (a plain-HTTP loopback upstream, then a TLS one), starts the
binary with a route injecting a random key read from the environment
(`x-api-key=${KEYHOLE_BENCH_KEY}`), counts the key's bytes in every writable
mapping of the process (/proc/PID/maps `rw` regions, read through
/proc/PID/mem), sends POSTs of 0 to 300 KiB (Content-Length and chunked,
keep-alive and a new connection each), waits a moment and counts again.
`--where` prints each copy: mapping, offset, and the bytes around it (the key
shown as <KEY>). Exit status: 0 if no count grew, 1 if one did, 2 if the
memory cannot be read (that needs ptrace rights over the child: root, or
the same user unless Yama's ptrace_scope is 2 or more).

Python standard library and the openssl command only; everything listens on
127.0.0.1, and every process and file it starts is gone when it exits.
"""

import argparse
import http.server
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unreadable(Exception):
    """The process's memory cannot be read."""


def writable_regions(pid):
    """(start, end, maps line) of every `rw` mapping of `pid`."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.read().splitlines()
    except OSError as err:
        raise Unreadable(str(err)) from err
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or not fields[1].startswith("rw"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        yield start, end, line


def find_copies(pid, needle):
    """Every (maps line, offset in mapping, context) where `needle` sits, and
    how many times its last 32 bytes occur: those also catch a copy whose
    first bytes the allocator overwrote when it freed the block (glibc puts
    its free-list pointers there), which a search for the whole key misses."""
    found = []
    tail = needle[-32:]
    tails = 0
    readable = False
    try:
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError as err:
        raise Unreadable(str(err)) from err
    with mem:
        for start, end, line in writable_regions(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue  # e.g. a guard page or [vvar]
            if not data:
                continue
            readable = True
            tails += data.count(tail)
            at = data.find(needle)
            while at >= 0:
                context = data[max(0, at - 48) : at + len(needle) + 48]
                found.append((line, at, context))
                at = data.find(needle, at + 1)
    if not readable:
        raise Unreadable("no writable mapping could be read")
    return found, tails


def show(found, needle):
    for line, offset, context in found:
        fields = line.split(None, 5)
        name = fields[5] if len(fields) > 5 else "(anonymous)"
        start = int(fields[0].split("-")[0], 16)
        text = context.replace(needle, b"<KEY>")
        print(f"    {name} {fields[0]} +0x{offset:x} (0x{start + offset:x}): {text!r}")


class Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request body (Content-Length or chunked) and answers 200."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                self.rfile.read(size + 2)
        else:
            self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.context = context
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def get_request(self):
        conn, addr = self.socket.accept()
        if self.context is not None:
            conn.settimeout(10)
            conn = self.context.wrap_socket(conn, server_side=True)
            conn.settimeout(None)
        return conn, addr

    def handle_error(self, request, client_address):
        pass  # a connection keyhole closed or a failed handshake

    def stop(self):
        self.shutdown()
        self.server_close()


def make_cert(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         # webpki refuses a CA certificate as the server's own.
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return cert, context


def start_keyhole(binary, url, key, ca_file):
    args = [binary, "--listen", "127.0.0.1:0", "--log-level", "warn",
            "--route", f"/={url}", "--header", "x-api-key=${KEYHOLE_BENCH_KEY}"]
    if ca_file:
        args += ["--ca-file", ca_file]
    env = dict(os.environ, KEYHOLE_BENCH_KEY=key)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on http://"):
        proc.kill()
        proc.wait()
        sys.exit(f"keyhole did not start: {line!r}")
    host, port = line.strip().removeprefix("listening on http://").rsplit(":", 1)
    return proc, (host, int(port))


def read_response(sock, buf):
    """Reads one response from `sock` (`buf` holds bytes already read);
    returns (status, the bytes after it)."""
    def fill():
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("keyhole closed the connection")
        return data

    while b"\r\n\r\n" not in buf:
        buf += fill()
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip()
              for k, v in (l.split(":", 1) for l in lines[1:])}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            while b"\r\n" not in rest:
                rest += fill()
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += fill()
            rest = rest[size + 2:]
            if size == 0:
                break
    else:
        length = int(fields.get("content-length", "0"))
        while len(rest) < length:
            rest += fill()
        rest = rest[length:]
    return status, rest


def request_bytes(i):
    size = (i * 7919) % (300 * 1024)
    body = (secrets.token_bytes(64) * (size // 64 + 1))[:size]
    if i % 3 == 0:
        head = b"POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = b""
        for at in range(0, size, 50000):
            part = body[at:at + 50000]
            chunks += b"%x\r\n%s\r\n" % (len(part), part)
        return head + chunks + b"0\r\n\r\n"
    head = (b"POST /v1/x HTTP/1.1\r\nHost: localhost\r\nx-api-key: sandbox\r\n"
            b"Content-Length: %d\r\n\r\n" % size)
    return head + body


def load(addr, requests):
    keep_alive = socket.create_connection(addr, timeout=10)
    pending = b""
    try:
        for i in range(requests):
            data = request_bytes(i)
            if i % 2 == 0:
                keep_alive.sendall(data)
                status, pending = read_response(keep_alive, pending)
            else:
                with socket.create_connection(addr, timeout=10) as once:
                    once.sendall(data)
                    status, _ = read_response(once, b"")
            if status != 200:
                sys.exit(f"request {i}: status {status}")
    finally:
        keep_alive.close()


def measure(mode, binary, url, ca_file, requests, where):
    key = ("sk-ant-api03-" + secrets.token_urlsafe(72))[:108]
    needle = key.encode()
    proc, addr = start_keyhole(binary, url, key, ca_file)
    try:
        before, tails_before = find_copies(proc.pid, needle)
        load(addr, requests)
        time.sleep(0.3)
        after, tails_after = find_copies(proc.pid, needle)
    finally:
        proc.kill()
        proc.wait()
    print(f"{mode}: {len(before)} copies of the key before {requests} requests, "
          f"{len(after)} after (its last 32 bytes: {tails_before} before, "
          f"{tails_after} after)")
    grew = len(after) > len(before) or tails_after > tails_before
    if where or grew:
        print("  before:")
        show(before, needle)
        print("  after:")
        show(after, needle)
    return not grew


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/keyhole"))
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--where", action="store_true",
                        help="print where each copy sits, also when the count did not grow")
    args = parser.parse_args()
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary}: not an executable (cargo build --release?)")
    # SIGTERM unwinds like ^C, through every `finally`.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    ok = True
    with tempfile.TemporaryDirectory(prefix="keyhole-copies-") as directory:
        cert, context = make_cert(directory)
        plain = Server()
        tls = Server(context)
        try:
            modes = [
                ("plain HTTP", f"http://127.0.0.1:{plain.server_port}", None),
                ("TLS", f"https://127.0.0.1:{tls.server_port}", cert),
            ]
            for mode, url, ca_file in modes:
                ok &= measure(mode, args.binary, url, ca_file, args.requests, args.where)
        except Unreadable as err:
            print(f"skipped: cannot read keyhole's memory ({err}); run as root")
            return 2
        finally:
            plain.stop()
            tls.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
