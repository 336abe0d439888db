#!/usr/bin/env python3
"""Benchmark driver for keyhole (stdlib only; called by bench/run.sh).

Subcommands:
  ports N          print N free TCP ports on 127.0.0.1 (one line, space separated)
  upstream ...     a small HTTP/1.1 TLS server for what nginx cannot do simply:
                   /py/sse (events spaced in time, each carrying the upstream's
                   send timestamp) and /py/upload (a sink that really reads the
                   whole body, Content-Length or chunked, and says how much)
  measure ...      the interleaved benchmark itself; prints the table and, with
                   --write, puts it into BENCHMARKS.md

Why Python for these pieces: nginx can neither timestamp SSE events nor
guarantee it has read an upload body before it answers (`return 200` discards
the body in the background), and the figures must not depend on that.
"""

import argparse
import json
import os
import platform
import re
import select
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

KEY = "bench-secret"  # the credential every path must deliver upstream
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------

def cmd_ports(args):
    # Bind them all at once so we never hand out the same port twice.
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


# --------------------------------------------------------------------------
# upstream: Python TLS server for /py/sse and /py/upload
# --------------------------------------------------------------------------

def _read_head(rf):
    """Read one request head; returns (method, target, headers dict) or None at EOF."""
    line = rf.readline(65536)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
        line = rf.readline(65536)
        if not line:
            return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = {}
    while True:
        h = rf.readline(65536)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _query(target):
    q = {}
    if "?" in target:
        for part in target.split("?", 1)[1].split("&"):
            k, _, v = part.partition("=")
            q[k] = v
    return q


def _respond(sock, status, body, ctype="application/json", close=False):
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)


def _read_body(rf, headers, buf):
    """Read and discard the request body, returning its length in bytes."""
    mv = memoryview(buf)
    total = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = rf.readline(4096)
            if not size_line:
                raise ConnectionError("EOF in chunk size")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while rf.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return total
            left = size
            while left:
                n = rf.readinto(mv[:min(left, len(buf))])
                if not n:
                    raise ConnectionError("EOF in chunk data")
                left -= n
            total += size
            if rf.read(2) != b"\r\n":
                raise ConnectionError("bad chunk terminator")
    left = int(headers.get("content-length", "0"))
    while left:
        n = rf.readinto(mv[:min(left, len(buf))])
        if not n:
            raise ConnectionError("EOF in body")
        left -= n
        total += n
    return total


def _serve_conn(ctx, raw):
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError):
        raw.close()
        return
    rf = sock.makefile("rb", buffering=256 * 1024)
    buf = bytearray(MIB)
    try:
        while True:
            req = _read_head(rf)
            if req is None:
                return
            method, target, headers = req
            close = headers.get("connection", "").lower() == "close"
            path = target.split("?", 1)[0]
            q = _query(target)
            # Refuse anything that did not get the key injected: a proxy that
            # fails to inject shows up as errors, not as a fast figure.
            if headers.get("x-api-key") != KEY:
                if "expect" not in headers:
                    _read_body(rf, headers, buf)
                _respond(sock, "401 Unauthorized", b'{"error":"no key"}', close=True)
                return
            if method == "POST" and path == "/py/upload":
                if headers.get("expect", "").lower() == "100-continue":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                got = _read_body(rf, headers, buf)
                want = int(q.get("bytes", "-1"))
                ok = want < 0 or got == want
                _respond(sock, "200 OK" if ok else "400 Bad Request",
                         json.dumps({"received": got}).encode(), close=close)
            elif method == "GET" and path == "/py/sse":
                n = int(q.get("n", "20"))
                gap = int(q.get("ms", "10")) / 1000.0
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(n):
                    time.sleep(gap)
                    # CLOCK_MONOTONIC is system-wide, so the client can subtract.
                    ev = f"id: {i}\ndata: {time.monotonic_ns()}\n\n".encode()
                    sock.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
                sock.sendall(b"0\r\n\r\n")
            else:
                _read_body(rf, headers, buf)
                _respond(sock, "404 Not Found", b'{"error":"not found"}', close=close)
            if close:
                return
    except (OSError, ValueError, ConnectionError, ssl.SSLError):
        return
    finally:
        try:
            sock.close()
        except OSError:
            pass


def cmd_upstream(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", args.port))
    ls.listen(1024)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_conn, args=(ctx, conn), daemon=True).start()


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def proc_tree(pid):
    """pid plus its descendants (nginx: master + workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    """utime+stime (all threads) summed over pids, from /proc/PID/stat."""
    total = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def sleeps(pids):
    """Voluntary context switches (all threads) summed over pids: how often
    the proxy blocked waiting for work."""
    total = 0
    for p in pids:
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def rss_kib(pids):
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def pin_to(cpu):
    os.sched_setaffinity(0, {cpu})


CAP = 0.40  # share of one core each proxy gets in the capacity rows


def cpu_cap(pids, fraction):
    """Puts the proxy's processes in a cgroup limited to `fraction` of a core
    (cgroup v1 `cpu` or v2 `cpu.max`), or with `fraction` None back in the
    root group. False if this machine does not allow it."""
    v1, v2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"
    try:
        if os.path.isdir(v1):
            root = v1
            group = os.path.join(v1, "keyhole-bench")
            os.makedirs(group, exist_ok=True)
            with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
                f.write("100000")
            with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(int(fraction * 100000)) if fraction else "-1")
        else:
            root = v2
            group = os.path.join(v2, "keyhole-bench")
            with open(os.path.join(v2, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")
            os.makedirs(group, exist_ok=True)
            with open(os.path.join(group, "cpu.max"), "w") as f:
                f.write(f"{int(fraction * 100000)} 100000" if fraction else "max 100000")
        for p in pids:
            with open(os.path.join(group if fraction else root, "cgroup.procs"), "w") as f:
                f.write(str(p))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# load generators
# --------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", v)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url, conns, duration, headers):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s",
           "--latency", "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
    }
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if bad or (errs and any(int(x) for x in errs.groups())):
        raise RuntimeError(f"wrk reported errors for {url}:\n{out}")
    return res


def run_curl(urls, upload_file=None, chunked=False, headers=(), cacert=None):
    """One curl process, one kept-alive connection, len(urls) transfers."""
    fmt = "%{http_code} %{size_download} %{size_upload} %{time_total}\\n"
    cmd = ["taskset", "-c", "1", "curl", "-sS", "-w", fmt]
    if cacert:
        cmd += ["--cacert", cacert]
    for h in headers:
        cmd += ["-H", h]
    if upload_file:
        # `Expect:` off: measure the relay, not curl's 1 s wait for 100-continue.
        cmd += ["--data-binary", "@" + upload_file, "-H", "Expect:",
                "-H", "Content-Type: application/octet-stream"]
        if chunked:
            cmd += ["-H", "Transfer-Encoding: chunked"]
    for u in urls:
        cmd += ["-o", "/dev/null", u]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    total_bytes, total_time = 0, 0.0
    for line in out.strip().splitlines():
        code, down, up, t = line.split()
        if code != "200":
            raise RuntimeError(f"curl got HTTP {code} from {urls[0]}")
        total_bytes += int(float(up if upload_file else down))
        total_time += float(t)
    return total_bytes, total_time


class ChunkedDecoder:
    """Incremental decoder for a chunked body (proxies may re-chunk)."""

    def __init__(self):
        self.buf = b""
        self.left = 0          # data bytes left in the current chunk
        self.need_crlf = False  # the CRLF after a chunk's data is still due
        self.done = False

    def feed(self, data):
        self.buf += data
        out = []
        while not self.done:
            if self.left:
                if not self.buf:
                    break
                take = self.buf[:self.left]
                self.buf = self.buf[len(take):]
                self.left -= len(take)
                out.append(take)
                self.need_crlf = self.left == 0
            elif self.need_crlf:
                if len(self.buf) < 2:
                    break
                self.buf = self.buf[2:]
                self.need_crlf = False
            else:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(self.buf[:i].split(b";")[0], 16)
                self.buf = self.buf[i + 2:]
                self.done = size == 0
                self.left = size
        return b"".join(out)


def run_sse(host, port, path, n, gap_ms, tls_ctx=None, headers=()):
    """Per-event delay (ms) from the upstream's send timestamp to arrival here."""
    raw = socket.create_connection((host, port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = tls_ctx.wrap_socket(raw, server_hostname="localhost") if tls_ctx else raw
    req = f"GET {path}?n={n}&ms={gap_ms} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
    for h in headers:
        req += h + "\r\n"
    sock.sendall((req + "\r\n").encode())
    head, dec, text, delays = b"", ChunkedDecoder(), b"", []
    try:
        while not dec.done:
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                break
            if not head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in head:
                head += data
                if b"\r\n\r\n" not in head:
                    continue
                head, data = head.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"SSE via {port}: {head[:80]!r}")
                if b"chunked" not in head.lower():
                    raise RuntimeError(f"SSE via {port} not chunked: {head!r}")
            text += dec.feed(data)
            while b"\n\n" in text:
                ev, text = text.split(b"\n\n", 1)
                m = re.search(rb"data: (\d+)", ev)
                delays.append((now - int(m.group(1))) / 1e6)
    finally:
        sock.close()
    if len(delays) != n:
        raise RuntimeError(f"SSE via {port}: got {len(delays)} of {n} events")
    return delays


def _open_idle_connections(port, n, batch=64):
    """Open n client connections, each sends one request and reads the reply,
    then stays open and idle. Plain blocking sockets in batches of 64: asyncio
    costs ~0.5 ms per connection here, too slow for 10,000 in a quick run."""
    req = f"GET /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    socks = []
    for i in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - i)):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(req)
            group.append(s)
        for s in group:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("idle-conn request: connection closed")
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"idle-conn request: {head[:60]!r}")
            want = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(body) < want:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("idle-conn request: body cut short")
                body += chunk
        socks.extend(group)
    return socks


def rss_with_idle_connections(port, pids, n, quick):
    socks = _open_idle_connections(port, n)
    try:
        time.sleep(0.3 if quick else 1.0)  # let the proxy settle after the burst
        rss = rss_kib(pids)
        # Still all open? A proxy that dropped idle connections must not look
        # small: a closed one would poll readable (EOF).
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        dropped = len(poller.poll(0))
        if dropped:
            raise RuntimeError(f"{dropped} of {n} idle connections were closed by the proxy")
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3 if quick else 1.0)  # let the proxy see the closes before the next figure
    return rss


def keyhole_startup_ms(cmd, env, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            line = p.stdout.readline().decode()
            t1 = time.perf_counter()
            if not line.startswith("listening on http://"):
                raise RuntimeError(f"keyhole start-up printed {line!r}")
            times.append((t1 - t0) * 1000)
        finally:
            p.kill()
            p.wait()
    return statistics.median(times)


# --------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------

SYSTEMS = ["direct", "keyhole", "nginx", "haproxy"]
PROXIES = SYSTEMS[1:]


def cmd_measure(a):
    cfg = json.load(open(a.config))
    tmp = cfg["tmp"]
    pin_to(1)  # our own clients (SSE, idle connections) belong to the load core
    quick = cfg["quick"]
    rounds, dur = cfg["rounds"], cfg["duration"]
    xfers = cfg["transfers"]  # 64 MiB transfers per measurement (CPU needs volume)
    sse_n, sse_ms = cfg["sse_events"], cfg["sse_gap_ms"]
    big = cfg["big_bytes"]
    up_ng, up_py = cfg["ports"]["up_nginx"], cfg["ports"]["up_py"]
    port = {"keyhole": cfg["ports"]["keyhole"], "nginx": cfg["ports"]["nginx"],
            "haproxy": cfg["ports"]["haproxy"]}
    global SYSTEMS, PROXIES
    SYSTEMS = cfg["systems"]
    PROXIES = SYSTEMS[1:]
    pids = {s: proc_tree(cfg["pids"][s]) for s in PROXIES}
    ca = cfg["ca"]
    ctx = ssl.create_default_context(cafile=ca)
    key_hdr = [f"x-api-key: {KEY}"]

    def base(system, py=False):
        if system == "direct":
            return f"https://127.0.0.1:{up_py if py else up_ng}"
        return f"http://127.0.0.1:{port[system]}"

    R = {}  # metric -> system -> [value per round]

    def rec(metric, system, value):
        R.setdefault(metric, {}).setdefault(system, []).append(value)

    slept = {}  # system -> voluntary context switches in its last measured run

    def measured(system, fn):
        """Run fn, returning (result, proxy CPU seconds used meanwhile)."""
        if system == "direct":
            return fn(), None
        c0, s0 = cpu_seconds(pids[system]), sleeps(pids[system])
        r = fn()
        slept[system] = sleeps(pids[system]) - s0
        return r, cpu_seconds(pids[system]) - c0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def truncate_logs():
        # All three proxies log one line per request (keyhole always does, so the
        # others do too); keep the temp dir from growing during long runs.
        for f in cfg["logs"]:
            if os.path.exists(f):
                os.truncate(f, 0)

    # --- idle RSS first, before any load ---
    for s in PROXIES:
        rec("rss_idle", s, rss_kib(pids[s]) / 1024)

    # --- warm-up: pools, page cache, allocators ---
    t_start = time.time()
    log("warm-up")
    for s in SYSTEMS:
        hdr = key_hdr if s == "direct" else []
        run_wrk(base(s) + "/small", 16, 1, hdr)
        run_curl([base(s) + "/big"], headers=hdr, cacert=ca)

    tests = [
        ("ka1", 1), ("ka16", 16), ("ka64", 64), ("kaq16", 16), ("kaq64", 64), ("close", 16),
        ("dl_cl", None), ("dl_chunked", None), ("ul_cl", None), ("ul_chunked", None),
        ("sse", None),
    ]
    for rnd in range(rounds):
        log(f"round {rnd + 1}/{rounds} ({time.time() - t_start:.0f}s)")
        for test, conns in tests:
            for s in SYSTEMS:  # interleaved: A B C D for each test, every round
                hdr = key_hdr if s == "direct" else []
                if test.startswith("kaq"):
                    # Capacity: each proxy held to the same share of a core,
                    # so that the proxy, not the load core, is the bottleneck.
                    if s == "direct" or not cpu_cap(pids[s], CAP):
                        continue
                    try:
                        r = run_wrk(base(s) + "/small", conns, dur, [])
                    finally:
                        cpu_cap(pids[s], None)
                    rec(f"rps_{test}", s, r["rps"])
                elif test.startswith("ka") or test == "close":
                    h = hdr + (["Connection: close"] if test == "close" else [])
                    r, cpu = measured(s, lambda: run_wrk(base(s) + "/small", conns, dur, h))
                    rec(f"rps_{test}", s, r["rps"])
                    if test != "close":
                        rec(f"p50_{test}", s, r["p50"])
                        rec(f"p99_{test}", s, r["p99"])
                    if cpu is not None:
                        rec(f"cpu_{test}", s, cpu / r["requests"] * 10000)
                        rec(f"sleeps_{test}", s, slept[s] / r["requests"])
                elif test in ("dl_cl", "dl_chunked"):
                    path = "/big" if test == "dl_cl" else "/bigc"
                    (nbytes, secs), cpu = measured(s, lambda: run_curl(
                        [base(s) + path] * xfers, headers=hdr, cacert=ca))
                    if nbytes != big * xfers:
                        raise RuntimeError(f"{s} {test}: {nbytes} bytes")
                    rec(f"mbps_{test}", s, nbytes / secs / 1e6)
                    if cpu is not None:
                        rec(f"cpug_{test}", s, cpu / (nbytes / 1e9))
                elif test in ("ul_cl", "ul_chunked"):
                    url = base(s, py=True) + f"/py/upload?bytes={big}"
                    (nbytes, secs), cpu = measured(s, lambda: run_curl(
                        [url] * xfers, upload_file=cfg["upload_file"],
                        chunked=test == "ul_chunked", headers=hdr, cacert=ca))
                    rec(f"mbps_{test}", s, nbytes / secs / 1e6)
                    if cpu is not None:
                        rec(f"cpug_{test}", s, cpu / (nbytes / 1e9))
                elif test == "sse":
                    p = up_py if s == "direct" else port[s]
                    d = run_sse("127.0.0.1", p, "/py/sse", sse_n, sse_ms,
                                tls_ctx=ctx if s == "direct" else None, headers=hdr)
                    rec("sse_first", s, d[0])
                    rec("sse_median", s, statistics.median(d))
                    rec("sse_max", s, max(d))
        truncate_logs()
        # Keep what we have so far: a failure later must not lose the rounds.
        json.dump(R, open(os.path.join(tmp, "rounds.json"), "w"), indent=1)

    # --- memory with idle keep-alive client connections ---
    log(f"idle connections ({time.time() - t_start:.0f}s)")
    notes = []
    top = {}  # the largest count each proxy is measured at (10,000 unless fds forbid)
    for s in PROXIES:
        top[s] = min(10000, cfg["max_idle_conns"][s] // 1000 * 1000)
        if top[s] < 10000:
            notes.append(f"{s}: 10,000 idle connections not measured: the descriptor limit "
                         f"here allows about {cfg['max_idle_conns'][s]:,}, so KiB per "
                         f"connection comes from 1,000 → {top[s]:,}")
    for s in PROXIES:
        rec("rss_1k", s, rss_with_idle_connections(port[s], pids[s], 1000, quick) / 1024)
    for s in PROXIES:
        if top[s] <= 1000:
            continue
        rss = rss_with_idle_connections(port[s], pids[s], top[s], quick) / 1024
        if top[s] == 10000:
            rec("rss_10k", s, rss)
        # Growth from 1,000 to the top count: the per-connection cost once the
        # allocator's and the proxy's fixed start-up costs are out of the picture.
        rec("kib_per_conn", s, (rss - R["rss_1k"][s][0]) * 1024 / (top[s] - 1000))
    cfg["notes"] = notes

    # --- keyhole start-up and size ---
    if "keyhole" in SYSTEMS:
        keyhole_figures(cfg, R, quick)

    med = {m: {s: statistics.median(v) for s, v in d.items()} for m, d in R.items()}
    # What the proxy adds on top of the direct path (same upstream, same client).
    med["sse_added"] = {s: med["sse_median"][s] - med["sse_median"]["direct"] for s in PROXIES}
    report = render(med, cfg, rounds, time.time() - t_start)
    print(report)
    json.dump({"medians": med, "raw": R}, open(os.path.join(tmp, "results.json"), "w"), indent=1)
    if cfg["write"]:
        write_benchmarks_md(cfg["benchmarks_md"], report)
        log(f"wrote {cfg['benchmarks_md']}")


def keyhole_figures(cfg, R, quick):
    print("start-up", file=sys.stderr, flush=True)
    env = dict(os.environ, BENCH_KEY=KEY)
    kcmd = list(cfg["keyhole_cmd"])
    kcmd[kcmd.index("--listen") + 1] = "127.0.0.1:0"  # no clash with the running one
    R["startup_ms"] = {"keyhole": [keyhole_startup_ms(kcmd, env, 10 if quick else 30)]}
    R["binary_mb"] = {"keyhole": [os.path.getsize(cfg["keyhole_bin"]) / 1e6]}



# (key, label, format, better, target): target is (kind, value) where kind is
# "nginx" (ratio keyhole/nginx must satisfy better-direction vs value) or
# "abs" (keyhole's own figure must be below value).
ROWS = [
    ("rps_ka1", "keep-alive 1 conn: requests/s", "{:.0f}", "higher", ("nginx", 0.95)),
    ("p50_ka1", "keep-alive 1 conn: p50 latency (ms)", "{:.3f}", "lower", None),
    ("p99_ka1", "keep-alive 1 conn: p99 latency (ms)", "{:.3f}", "lower", None),
    ("rps_ka16", "keep-alive 16 conns: requests/s", "{:.0f}", "higher", ("nginx", 0.95)),
    ("p50_ka16", "keep-alive 16 conns: p50 latency (ms)", "{:.3f}", "lower", None),
    ("p99_ka16", "keep-alive 16 conns: p99 latency (ms)", "{:.3f}", "lower", None),
    ("rps_ka64", "keep-alive 64 conns: requests/s", "{:.0f}", "higher", ("nginx", 0.95)),
    ("p50_ka64", "keep-alive 64 conns: p50 latency (ms)", "{:.3f}", "lower", None),
    ("p99_ka64", "keep-alive 64 conns: p99 latency (ms)", "{:.3f}", "lower", None),
    ("rps_kaq16", f"keep-alive 16 conns, proxy held to {CAP:.0%} of a core: requests/s", "{:.0f}", "higher", None),
    ("rps_kaq64", f"keep-alive 64 conns, proxy held to {CAP:.0%} of a core: requests/s", "{:.0f}", "higher", None),
    ("rps_close", "new connection per request (16 conns): requests/s", "{:.0f}", "higher", None),
    ("mbps_dl_cl", "64 MiB download, Content-Length: MB/s", "{:.0f}", "higher", ("nginx", 1.0)),
    ("mbps_dl_chunked", "64 MiB download, chunked: MB/s", "{:.0f}", "higher", ("nginx", 1.0)),
    ("mbps_ul_cl", "64 MiB upload, Content-Length: MB/s", "{:.0f}", "higher", ("nginx", 1.0)),
    ("mbps_ul_chunked", "64 MiB upload, chunked: MB/s", "{:.0f}", "higher", ("nginx", 1.0)),
    ("sse_first", "SSE: first event delay (ms)", "{:.3f}", "lower", None),
    ("sse_median", "SSE: median per-event delay (ms)", "{:.3f}", "lower", ("nginx", 1.0)),
    ("sse_added", "SSE: added per-event delay vs direct (ms)", "{:.3f}", "lower", None),
    ("sse_max", "SSE: worst per-event delay (ms)", "{:.3f}", "lower", None),
    ("cpu_ka1", "proxy CPU s / 10k req, keep-alive 1 conn", "{:.3f}", "lower", None),
    ("cpu_ka16", "proxy CPU s / 10k req, keep-alive 16 conns", "{:.3f}", "lower", ("nginx", 0.8)),
    ("cpu_ka64", "proxy CPU s / 10k req, keep-alive 64 conns", "{:.3f}", "lower", ("nginx", 0.8)),
    ("cpu_close", "proxy CPU s / 10k new connections", "{:.3f}", "lower", ("nginx", 1.0)),
    ("sleeps_ka16", "proxy sleeps (voluntary context switches) per request, 16 conns", "{:.2f}", "lower", None),
    ("sleeps_ka64", "proxy sleeps (voluntary context switches) per request, 64 conns", "{:.2f}", "lower", None),
    ("cpug_dl_cl", "proxy CPU s / GB, download Content-Length", "{:.3f}", "lower", ("nginx", 0.8)),
    ("cpug_dl_chunked", "proxy CPU s / GB, download chunked", "{:.3f}", "lower", ("nginx", 0.8)),
    ("cpug_ul_cl", "proxy CPU s / GB, upload Content-Length", "{:.3f}", "lower", ("nginx", 0.8)),
    ("cpug_ul_chunked", "proxy CPU s / GB, upload chunked", "{:.3f}", "lower", ("nginx", 0.8)),
    ("rss_idle", "proxy RSS idle (MiB)", "{:.1f}", "lower", ("abs", 10)),
    ("rss_1k", "proxy RSS, 1,000 idle keep-alive conns (MiB)", "{:.1f}", "lower", None),
    ("rss_10k", "proxy RSS, 10,000 idle keep-alive conns (MiB)", "{:.1f}", "lower", ("abs", 64)),
    ("kib_per_conn", "KiB per idle conn (RSS growth 1,000 → 10,000)", "{:.2f}", "lower", None),
    ("startup_ms", "start-up to `listening on` (ms)", "{:.1f}", "lower", ("abs", 50)),
    ("binary_mb", "release binary size (MB)", "{:.2f}", "lower", ("abs", 5)),
]


def _fmt(fmt, v):
    return "—" if v is None else fmt.format(v)


def render(med, cfg, rounds, secs):
    lines = []
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    lines.append(f"Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
                 f"{cfg['versions']}")
    lines.append(f"Command: `{cfg['command']}` — {rounds} interleaved rounds, "
                 f"wrk {cfg['duration']} s per run, {cfg['transfers']}×64 MiB per transfer run, "
                 f"{cfg['sse_events']} SSE events {cfg['sse_gap_ms']} ms apart; "
                 f"medians; measuring took {secs:.0f} s.")
    lines.append("")
    lines.append("| metric | direct | keyhole | nginx | HAProxy | keyhole÷nginx | keyhole÷HAProxy | target | met |")
    lines.append("|---|--:|--:|--:|--:|--:|--:|---|:-:|")
    for key, label, fmt, better, target in ROWS:
        vals = med.get(key, {})
        k, n, h = vals.get("keyhole"), vals.get("nginx"), vals.get("haproxy")
        rn = k / n if k is not None and n else None
        rh = k / h if k is not None and h else None
        tgt, met = "", ""
        if target:
            kind, v = target
            if kind == "nginx":
                tgt = f"{'≥' if better == 'higher' else '≤'} {v}× nginx"
                if rn is not None:
                    met = "✓" if (rn >= v if better == "higher" else rn <= v) else "✗"
            else:
                tgt = f"< {v}"
                if k is not None:
                    met = "✓" if k < v else "✗"
        arrow = "↑" if better == "higher" else "↓"
        lines.append(f"| {label} {arrow} | {_fmt(fmt, vals.get('direct'))} | {_fmt(fmt, k)} | "
                     f"{_fmt(fmt, n)} | {_fmt(fmt, h)} | {_fmt('{:.2f}', rn)} | "
                     f"{_fmt('{:.2f}', rh)} | {tgt} | {met} |")
    lines.append("")
    lines.append("↑ higher is better, ↓ lower is better. `direct` is the client talking TLS "
                 "straight to the upstream (no proxy). MB = 10^6 bytes, GB = 10^9 bytes.")
    for n in cfg.get("notes", []):
        lines.append(f"Note: {n}.")
    return "\n".join(lines)


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_benchmarks_md(path, report):
    """Replace only the generated section, keeping hand-written notes around it."""
    block = f"{BEGIN}\n{report}\n{END}"
    if os.path.exists(path):
        text = open(path).read()
        # Markers count only on lines of their own, so prose may name them.
        b, e = f"\n{BEGIN}\n", f"\n{END}"
        if b in text and e in text.split(b, 1)[1]:
            pre, rest = text.split(b, 1)
            post = rest.split(e, 1)[1]
            text = pre + "\n" + block + post
        else:
            text = text.rstrip("\n") + "\n\n## Latest run\n\n" + block + "\n"
    else:
        text = ("# Benchmarks\n\nGenerated by `bash bench/run.sh --write` (see bench/run.sh "
                "for the set-up). Everything between the bench markers is rewritten on "
                "each `--write` run; notes outside them are kept.\n\n## Latest run\n\n"
                + block + "\n")
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p = sub.add_parser("upstream")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p = sub.add_parser("measure")
    p.add_argument("--config", required=True)
    args = ap.parse_args()
    {"ports": cmd_ports, "upstream": cmd_upstream, "measure": cmd_measure}[args.cmd](args)


if __name__ == "__main__":
    main()
