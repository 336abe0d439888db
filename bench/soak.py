#!/usr/bin/env python3
"""Soak load generator for keyhole (stdlib only; called by bench/soak.sh).

Subcommands:
  ports N     print N free TCP ports on 127.0.0.1 (one line, space separated)
  load ...    hold about --conns keep-alive client connections against one
              proxy for --duration seconds, each doing exchanges back to back
              (small GET/POST, 1-8 MiB downloads, uploads with Content-Length
              and chunked, a slow streaming download, and faults: disconnects
              mid-request-body, mid-response and after half a head), spread
              over --workers asyncio processes; meanwhile sample the proxy's
              VmRSS/VmHWM from /proc every --interval seconds, before, during
              and after the load; run --event commands at given times (the
              upstream reload and restart); write one JSON result
  report ...  print the markdown table for one or more results; --json FILE
              writes them all into one file
  heaptrack-summary ...  keyhole's top allocation sites at its heap peak and
              its heap in use beside RSS (soak.sh --heaptrack runs it)

Every response is read to its end (Content-Length, chunked, or to close), so
the byte counts are real transfer. An exchange counts as completed when it
got a 200 with its whole body; anything else is an error, by kind.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

MIB = 1 << 20
KIB = 1 << 10

# What each exchange does, with its weight. Most are small; a few move MiBs;
# a few break off on purpose. Per connection the mean transfer is about
# 0.3 MiB per exchange, so the load generator is not the only thing measured.
MIX = [
    ("get_small", 50.0),      # GET /small, ~1 KiB JSON
    ("post_small", 15.0),     # POST 1-16 KiB, Content-Length
    ("get_1m", 6.0),          # GET /1m, 1 MiB, Content-Length
    ("get_1m_chunked", 3.0),  # GET /1mc, 1 MiB, chunked
    ("get_8m", 1.5),          # GET /8m, 8 MiB, Content-Length
    ("get_slow", 3.0),        # GET /slow, 256 KiB trickled at 128 KiB/s
    ("post_large", 4.0),      # POST 256 KiB-4 MiB, Content-Length
    ("post_chunked", 3.0),    # POST 64 KiB-2 MiB, chunked, 16-64 KiB chunks
    ("fault_body", 1.5),      # Content-Length 2 MiB, send part of it, disconnect
    ("fault_response", 1.5),  # GET /8m, read part of it, disconnect
    ("fault_head", 1.5),      # send half a request head, disconnect
]
FAULTS = {"fault_body", "fault_response", "fault_head"}

EXCHANGE_TIMEOUT = 60.0   # one exchange (8 MiB through a busy proxy fits easily)
CONNECT_TIMEOUT = 10.0


def cmd_ports(args):
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


# --------------------------------------------------------------------------
# memory sampling
# --------------------------------------------------------------------------

def _children(pid):
    try:
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        return out
    except OSError:
        return []


def _status_kib(pid):
    """(VmRSS, VmHWM) in KiB, or None if the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    return rss, hwm


def sample_memory(pid, with_children):
    """VmRSS and VmHWM of pid (plus its children, e.g. nginx's workers), KiB."""
    pids = [pid] + (_children(pid) if with_children else [])
    rss = hwm = 0
    alive = False
    for p in pids:
        v = _status_kib(p)
        if v is None:
            continue
        alive = True
        rss += v[0]
        hwm += v[1]
    return (rss, hwm) if alive else None


# --------------------------------------------------------------------------
# the HTTP/1.1 client
# --------------------------------------------------------------------------

def count_error(stats, key):
    """One failed exchange (or connect) of kind key, with the second of the
    run it happened in, so errors around the upstream restarts can be told
    from the rest."""
    stats["errors"][key] = stats["errors"].get(key, 0) + 1
    sec = str(int(time.monotonic() - stats["start_at"]))
    stats["error_secs"][sec] = stats["error_secs"].get(sec, 0) + 1


class Broken(Exception):
    """The exchange failed; args[0] is the error kind."""


class Conn:
    def __init__(self, reader, writer):
        self.r = reader
        self.w = writer


async def read_head(conn):
    try:
        head = await conn.r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise Broken("eof_before_response" if not e.partial else "eof_in_response_head")
    except asyncio.LimitOverrunError:
        raise Broken("response_head_too_long")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise Broken("bad_status_line")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def drain(conn, n, stats):
    """Reads and drops exactly n body bytes."""
    r = conn.r
    while n > 0:
        chunk = await r.read(min(n, 256 * KIB))
        if not chunk:
            raise Broken("eof_in_response_body")
        n -= len(chunk)
        stats["bytes_down"] += len(chunk)


async def drain_chunked(conn, stats):
    r = conn.r
    while True:
        try:
            line = await r.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise Broken("eof_in_response_body")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                try:
                    t = await r.readuntil(b"\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    raise Broken("eof_in_response_body")
                if t == b"\r\n":
                    return
        await drain(conn, size, stats)
        try:
            crlf = await r.readexactly(2)
        except asyncio.IncompleteReadError:
            raise Broken("eof_in_response_body")
        if crlf != b"\r\n":
            raise Broken("bad_chunk_framing")


async def read_response(conn, stats, method="GET"):
    """Reads a whole response; returns (status, keep_alive)."""
    status, headers = await read_head(conn)
    while 100 <= status < 200:  # 100 Continue
        status, headers = await read_head(conn)
    keep = headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304):
        pass
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        await drain_chunked(conn, stats)
    elif "content-length" in headers:
        await drain(conn, int(headers["content-length"]), stats)
    else:  # delimited by close
        while True:
            chunk = await conn.r.read(256 * KIB)
            if not chunk:
                break
            stats["bytes_down"] += len(chunk)
        keep = False
    return status, keep


async def send_body(conn, payload, size, stats, piece=64 * KIB):
    """Writes size bytes of payload (wrapping around) with backpressure."""
    w = conn.w
    sent = 0
    while sent < size:
        n = min(piece, size - sent)
        off = sent % (len(payload) - piece)
        w.write(payload[off:off + n])
        await w.drain()
        sent += n
        stats["bytes_up"] += n


def request_head(method, path, host, extra=""):
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"user-agent: keyhole-soak\r\n{extra}\r\n").encode()


async def exchange(kind, conn, cfg, payload, stats, rng):
    """One exchange on conn. Returns True to keep the connection for the next
    one. Raises Broken for a failure (the caller closes the connection)."""
    host = cfg["host"]
    w = conn.w
    if kind in ("get_small", "get_1m", "get_1m_chunked", "get_8m", "get_slow"):
        path = {"get_small": "/small", "get_1m": "/1m", "get_1m_chunked": "/1mc",
                "get_8m": "/8m", "get_slow": "/slow"}[kind]
        w.write(request_head("GET", path, host))
        await w.drain()
        status, keep = await read_response(conn, stats)
    elif kind in ("post_small", "post_large"):
        size = rng.randint(1 * KIB, 16 * KIB) if kind == "post_small" \
            else rng.randint(256 * KIB, 4 * MIB)
        w.write(request_head("POST", "/upload", host,
                             f"content-type: application/octet-stream\r\ncontent-length: {size}\r\n"))
        await send_body(conn, payload, size, stats)
        status, keep = await read_response(conn, stats, "POST")
    elif kind == "post_chunked":
        size = rng.randint(64 * KIB, 2 * MIB)
        w.write(request_head("POST", "/upload", host,
                             "content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n"))
        sent = 0
        while sent < size:
            n = min(rng.randint(16 * KIB, 64 * KIB), size - sent)
            off = rng.randrange(0, len(payload) - n)
            w.write(b"%x\r\n" % n)
            w.write(payload[off:off + n])
            w.write(b"\r\n")
            await w.drain()
            sent += n
            stats["bytes_up"] += n
        w.write(b"0\r\n\r\n")
        await w.drain()
        status, keep = await read_response(conn, stats, "POST")
    elif kind == "fault_body":
        w.write(request_head("POST", "/upload", host, f"content-length: {2 * MIB}\r\n"))
        await send_body(conn, payload, rng.randint(1, 512 * KIB), stats, piece=16 * KIB)
        return False
    elif kind == "fault_response":
        w.write(request_head("GET", "/8m", host))
        await w.drain()
        status, headers = await read_head(conn)
        if status != 200:
            raise Broken(f"status_{status}")
        await drain(conn, rng.randint(1, 2 * MIB), stats)
        return False
    elif kind == "fault_head":
        head = request_head("GET", "/small", host)
        w.write(head[:rng.randint(1, len(head) - 4)])
        await w.drain()
        await asyncio.sleep(rng.uniform(0, 0.5))
        return False
    else:
        raise ValueError(kind)
    if status != 200:
        # Read whole, but the exchange failed (a 502 while the upstream
        # restarts, a 503 over the connection limit, a 401 if the key is
        # missing...).
        count_error(stats, f"status_{status}")
        stats["failed"] += 1
        stats["backoff"] = True
        return keep
    stats["ok"] += 1
    stats["ok_by_kind"][kind] = stats["ok_by_kind"].get(kind, 0) + 1
    return keep


def close(conn, abort):
    try:
        if abort:
            conn.w.transport.abort()   # RST when unread bytes are pending
        else:
            conn.w.close()
    except Exception:
        pass


async def connection_loop(cfg, payload, stats, shared, wid, deadline, seed):
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    await asyncio.sleep(rng.uniform(0, cfg["ramp"]))
    conn = None
    while time.monotonic() < deadline:
        if conn is None:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(cfg["addr"], cfg["port"], limit=256 * KIB),
                    CONNECT_TIMEOUT)
                w.transport.set_write_buffer_limits(high=256 * KIB)
                conn = Conn(r, w)
                stats["connections"] += 1
            except (OSError, asyncio.TimeoutError) as e:
                count_error(stats, "connect_" + type(e).__name__)
                await asyncio.sleep(rng.uniform(0.1, 0.3))
                continue
        kind = rng.choices(kinds, weights)[0]
        shared["inflight"][wid] += 1
        keep = False
        try:
            keep = await asyncio.wait_for(
                exchange(kind, conn, cfg, payload, stats, rng), EXCHANGE_TIMEOUT)
            if kind in FAULTS:
                stats["faults"][kind] = stats["faults"].get(kind, 0) + 1
        except Broken as e:
            count_error(stats, f"{kind}:{e.args[0]}" if kind in FAULTS else e.args[0])
            stats["failed"] += 1
            stats["backoff"] = True
        except asyncio.TimeoutError:
            count_error(stats, "timeout")
            stats["failed"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            key = type(e).__name__
            count_error(stats, f"{kind}:{key}" if kind in FAULTS else key)
            stats["failed"] += 1
            stats["backoff"] = True
        finally:
            shared["inflight"][wid] -= 1
        shared["ok"][wid] = stats["ok"]
        shared["bytes"][wid] = stats["bytes_down"] + stats["bytes_up"]
        if not keep:
            close(conn, abort=kind in FAULTS and rng.random() < 0.5)
            conn = None
        if stats.pop("backoff", False):
            # A failed exchange (a 502 while the upstream restarts) is retried
            # after a pause, as a real client would, not in a tight loop.
            await asyncio.sleep(rng.uniform(0.1, 0.3))
    if conn is not None:
        close(conn, abort=False)


def worker_main(wid, cfg, conns, start_at, deadline, shared, pipe):
    # The parent handles Ctrl-C; a worker just stops with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stats = {"ok": 0, "failed": 0, "bytes_down": 0, "bytes_up": 0, "connections": 0,
             "errors": {}, "error_secs": {}, "faults": {}, "ok_by_kind": {}, "start_at": start_at}
    payload = memoryview(os.urandom(4 * MIB + 64 * KIB))

    async def run():
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks = [asyncio.create_task(connection_loop(cfg, payload, stats, shared, wid,
                                                     deadline, cfg["seed"] * 100003 + wid * 10007 + i))
                 for i in range(conns)]
        # Exchanges still running at the deadline get a grace period, then
        # are cancelled (and counted).
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + cfg["grace"])
        for t in pending:
            t.cancel()
        stats["cancelled_at_end"] = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                key = "crash:" + type(t.exception()).__name__
                stats["errors"][key] = stats["errors"].get(key, 0) + 1
        await asyncio.sleep(0.1)  # let the closes go out

    asyncio.run(run())
    pipe.send(stats)
    pipe.close()


# --------------------------------------------------------------------------
# load: workers, sampling, events
# --------------------------------------------------------------------------

def cmd_load(args):
    # SIGTERM (soak.sh's cleanup) exits through SystemExit, so that
    # multiprocessing stops the workers too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    after = sorted(float(x) for x in args.after.split(","))
    events = []
    for ev in args.event or []:
        at, _, cmd = ev.partition("=")
        events.append([float(at), cmd, None])
    events.sort()
    cfg = {"addr": "127.0.0.1", "port": args.port, "host": f"127.0.0.1:{args.port}",
           "ramp": args.ramp, "grace": args.grace, "seed": args.seed}

    samples = []
    t_zero = time.monotonic()
    t_zero_wall = time.time()

    def sample(tag=None):
        m = sample_memory(args.pid, args.children)
        now = time.monotonic() - t_zero
        s = {"t": round(now, 3),
             "rss_kib": m[0] if m else None, "hwm_kib": m[1] if m else None,
             "inflight": sum(shared["inflight"]) if shared else 0,
             "ok": sum(shared["ok"]) if shared else 0,
             "bytes": sum(shared["bytes"]) if shared else 0}
        if tag:
            s["tag"] = tag
        samples.append(s)
        return s

    shared = None
    # Baseline before any load.
    end_base = t_zero + args.baseline
    while time.monotonic() < end_base:
        sample()
        time.sleep(args.interval)
    start_sample = sample("start")
    if start_sample["rss_kib"] is None:
        sys.exit(f"process {args.pid} is not running")

    nw = max(1, min(args.workers, args.conns))
    per = [args.conns // nw + (1 if i < args.conns % nw else 0) for i in range(nw)]
    shared = {"inflight": mp.Array("l", nw, lock=False), "ok": mp.Array("l", nw, lock=False),
              "bytes": mp.Array("q", nw, lock=False)}
    start_at = time.monotonic() + 0.5   # every worker starts together
    deadline = start_at + args.duration
    procs, pipes = [], []
    ctx = mp.get_context("fork")
    for i in range(nw):
        a, b = ctx.Pipe(duplex=False)
        # Daemons: if this process is stopped, they are stopped with it.
        p = ctx.Process(target=worker_main, args=(i, cfg, per[i], start_at, deadline, shared, b),
                        daemon=True)
        p.start()
        b.close()
        procs.append(p)
        pipes.append(a)
    load_start = start_at - t_zero
    print(f"[soak] {args.name}: {args.conns} connections in {nw} workers for {args.duration:g} s",
          file=sys.stderr, flush=True)

    # Sample while the load runs; fire events at their times.
    end_sample = None
    next_t = time.monotonic()
    event_log = []
    progress_at = time.monotonic() + 10
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        for ev in events:
            if ev[2] is None and now >= start_at + ev[0]:
                t0 = time.monotonic()
                rc = subprocess.run(ev[1], shell=True).returncode
                ev[2] = rc
                event_log.append({"at": round(t0 - t_zero, 2), "took": round(time.monotonic() - t0, 2),
                                  "command": ev[1], "rc": rc})
        if end_sample is None and now >= deadline:
            end_sample = sample("end_of_load")
        elif now >= next_t:
            s = sample()
            if now >= progress_at:
                progress_at = now + 10
                print(f"[soak] {args.name}: t={now - start_at:5.1f}s rss={s['rss_kib'] / 1024:6.1f} MiB"
                      f" inflight={s['inflight']:5d} ok={s['ok']}", file=sys.stderr, flush=True)
            next_t += args.interval
            if next_t < now:
                next_t = now + args.interval
        time.sleep(min(0.05, max(0.0, next_t - time.monotonic())))
    if end_sample is None:
        end_sample = sample("end_of_load")
    stats = []
    for a in pipes:
        try:
            stats.append(a.recv())
        except EOFError:
            stats.append(None)
    for p in procs:
        p.join()
    load_end = time.monotonic()
    ended = sample("load_ended")

    # After the load: every client connection is closed.
    after_samples = {}
    i = 0
    while i < len(after):
        now = time.monotonic()
        if now >= load_end + after[i]:
            after_samples[after[i]] = sample(f"after_{after[i]:g}s")
            i += 1
            continue
        if now >= next_t:
            sample()
            next_t = now + args.interval
        time.sleep(min(0.05, max(0.0, min(next_t, load_end + after[i]) - time.monotonic())))

    total = {"ok": 0, "failed": 0, "bytes_down": 0, "bytes_up": 0, "connections": 0,
             "cancelled_at_end": 0, "errors": {}, "error_secs": {}, "faults": {}, "ok_by_kind": {}}
    lost = 0
    for s in stats:
        if s is None:
            lost += 1
            continue
        for k in ("ok", "failed", "bytes_down", "bytes_up", "connections", "cancelled_at_end"):
            total[k] += s.get(k, 0)
        for k in ("errors", "error_secs", "faults", "ok_by_kind"):
            for kk, v in s[k].items():
                total[k][kk] = total[k].get(kk, 0) + v
    if lost:
        total["errors"]["worker_lost"] = lost

    # Errors within a window around each upstream reload/restart (from 1 s
    # before it to 3 s after it finished) are expected; the rest are not.
    windows = [(e["at"] - load_start - 1, e["at"] - load_start + e["took"] + 3) for e in event_log]
    outside = sum(v for sec, v in total["error_secs"].items()
                  if not any(a <= int(sec) + 1 and int(sec) <= b for a, b in windows))

    def mib(kib):
        return None if kib is None else round(kib / 1024, 1)

    during = [s for s in samples if load_start <= s["t"] <= end_sample["t"]]
    rss_vals = [s["rss_kib"] for s in samples if s["rss_kib"] is not None]
    hwm_vals = [s["hwm_kib"] for s in samples if s["hwm_kib"] is not None]
    infl = [s["inflight"] for s in during]
    result = {
        "name": args.name,
        "pid": args.pid,
        "conns": args.conns,
        "workers": nw,
        "duration_s": args.duration,
        "interval_s": args.interval,
        "rss_mib": {
            "start": mib(start_sample["rss_kib"]),
            "peak": mib(max(rss_vals)),
            "hwm": mib(max(hwm_vals)),
            "end_of_load": mib(end_sample["rss_kib"]),
            "load_ended": mib(ended["rss_kib"]),
            **{f"after_{k:g}s": mib(v["rss_kib"]) for k, v in after_samples.items()},
        },
        "inflight_max": max(infl) if infl else 0,
        "inflight_mean": round(sum(infl) / len(infl), 1) if infl else 0,
        "exchanges_ok": total["ok"],
        "exchanges_failed": total["failed"],
        "errors_outside_upstream_events": outside,
        "error_seconds": dict(sorted(total["error_secs"].items(), key=lambda kv: int(kv[0]))),
        "faults_injected": total["faults"],
        "ok_by_kind": total["ok_by_kind"],
        "errors": dict(sorted(total["errors"].items(), key=lambda kv: -kv[1])),
        "cancelled_at_end": total["cancelled_at_end"],
        "client_connections_opened": total["connections"],
        "bytes_down": total["bytes_down"],
        "bytes_up": total["bytes_up"],
        "load_wall_s": round(load_end - start_at, 1),
        "t0_wall": t_zero_wall,
        "events": event_log,
        "samples": samples,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[soak] {args.name}: done, {total['ok']} exchanges, "
          f"{(total['bytes_down'] + total['bytes_up']) / MIB:.0f} MiB, peak RSS {result['rss_mib']['peak']} MiB",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def table(results, after):
    cols = ["proxy", "start RSS", "peak RSS", "peak VmHWM", "RSS end of load"] + \
           [f"RSS +{a:g} s after" for a in after] + \
           ["exchanges ok", "MiB moved", "errors (not near upstream restarts)", "in flight (max / mean)"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|"]
    for r in results:
        m = r["rss_mib"]
        row = [r["name"], m["start"], m["peak"], m["hwm"], m["end_of_load"]] + \
              [m.get(f"after_{a:g}s") for a in after] + \
              [r["exchanges_ok"], round((r["bytes_down"] + r["bytes_up"]) / MIB),
               f"{r['exchanges_failed']} ({r['errors_outside_upstream_events']})",
               f"{r['inflight_max']} / {r['inflight_mean']:g}"]
        out.append("| " + " | ".join("—" if v is None else str(v) for v in row) + " |")
    out.append("")
    out.append("RSS in MiB (VmRSS; nginx: master + worker). Faults injected on purpose are not errors;"
               " errors are exchanges that did not get a whole 200 (by kind below), in brackets those"
               " not within 1 s before to 3 s after an upstream reload or restart.")
    for r in results:
        errs = ", ".join(f"{k} {v}" for k, v in list(r["errors"].items())[:8]) or "none"
        faults = sum(r["faults_injected"].values())
        out.append(f"- {r['name']}: {faults} faults injected; errors: {errs}")
    return "\n".join(out)


def cmd_report(args):
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    after = sorted(float(x) for x in args.after.split(","))
    print(table(results, after))
    if args.json:
        meta = json.loads(args.meta) if args.meta else {}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)


# --------------------------------------------------------------------------
# heaptrack summary
# --------------------------------------------------------------------------

def _demangle(frame):
    frame = re.sub(r"::h[0-9a-f]{16}", "", frame.split(" (")[0])
    for a, b in (("_$u7b$$u7b$closure$u7d$$u7d$", "{closure}"), ("$LT$", "<"), ("$GT$", ">"),
                 ("$u20$", " "), ("$RF$", "&"), ("$C$", ","), ("$LP$", "("), ("$RP$", ")"), ("..", "::")):
        frame = frame.replace(a, b)
    return frame


GENERIC = {"main", "run", "conn::serve", "server::accept_loop", "conn::Handler<S>::handle_request",
           "conn::Handler<S>::exchange", "relay::within", "relay::timeout_in_steps", "relay::take_buffer"}
DEP = re.compile(r"^<?(rustls|tokio_rustls|tokio|ring|webpki|httparse|tracing\w*)::")


def cmd_heaptrack_summary(args):
    """Top allocation sites at the heap's peak (from `heaptrack_print -F FILE
    --flamegraph-cost-type peak`) and the heap in use over time (from
    `heaptrack_print -M FILE`) beside the sampled RSS."""
    total = 0
    sites = {}
    for line in open(args.stacks):
        stack, _, cost = line.rstrip("\n").rpartition(" ")
        if not cost.isdigit():
            continue
        cost = int(cost)
        total += cost
        frames = [_demangle(f) for f in stack.split(";")][::-1]   # leaf first
        ours = [f for f in frames if f.startswith("keyhole::")]
        dep = next((i for i, f in enumerate(frames) if DEP.match(f)), None)
        mine = next((i for i, f in enumerate(frames) if f.startswith("keyhole::")), None)
        site = frames[dep] if dep is not None and (mine is None or dep < mine) else (ours[0] if ours else frames[0])
        site = re.sub(r"(::\{closure\})+$", "", site)
        # The keyhole functions on the way, minus those every request passes
        # through, so that the callers of one allocation site are told apart.
        # (heaptrack lists inlined frames in its own order: a set, not a path.)
        via = []
        for f in reversed(ours):
            name = re.sub(r"(::\{closure\})+$", "", f).replace("keyhole::", "")
            if name in GENERIC or name == site.replace("keyhole::", "") or name in via:
                continue
            via.append(name)
        key = (site, ", ".join(via[:4]))
        sites[key] = sites.get(key, 0) + cost
    print(f"heap in use at its peak: {total / MIB:.1f} MiB; the largest sites then:")
    print()
    print("| MiB | share | allocated in | with these keyhole functions on the stack |")
    print("|--:|--:|---|---|")
    for (site, via), cost in sorted(sites.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {cost / MIB:.1f} | {100 * cost / total:.0f}% | `{site}` | {'`' + via + '`' if via else ''} |")
    if args.massif and args.result:
        heap = []   # (seconds since keyhole started, bytes)
        t = None
        for line in open(args.massif):
            if line.startswith("time="):
                t = float(line[5:])
            elif line.startswith("mem_heap_B=") and t is not None:
                heap.append((t, int(line[11:])))
        with open(args.result) as f:
            r = json.load(f)
        offset = r["t0_wall"] - args.started   # sampler clock -> keyhole's
        print()
        print("| moment | RSS (MiB) | heap in use (MiB) |")
        print("|---|--:|--:|")
        peak_heap = max(heap, key=lambda x: x[1]) if heap else None
        for s in r["samples"]:
            if "tag" not in s:
                continue
            at = s["t"] + offset
            h = [b for tt, b in heap if tt <= at]
            print(f"| {s['tag']} | {s['rss_kib'] / 1024:.1f} | {h[-1] / MIB if h else 0:.1f} |")
        if peak_heap:
            print(f"| heap peak (at {peak_heap[0] - offset:.0f} s of the sampler's clock) | — | {peak_heap[1] / MIB:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p = sub.add_parser("load")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True, help="the proxy's port on 127.0.0.1")
    p.add_argument("--pid", type=int, required=True, help="the process whose memory is sampled")
    p.add_argument("--children", action="store_true", help="add the children's memory (nginx workers)")
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--ramp", type=float, default=2.0, help="connections start spread over this many seconds")
    p.add_argument("--grace", type=float, default=10.0, help="for exchanges still running at the end")
    p.add_argument("--baseline", type=float, default=2.0, help="seconds sampled before the load")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--after", default="5,15", help="seconds after the load ended to report RSS at")
    p.add_argument("--event", action="append", help="SECONDS=COMMAND: run COMMAND SECONDS after the load started")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("--after", default="5,15")
    p.add_argument("--json")
    p.add_argument("--meta", help="a JSON object merged into the --json file")
    p = sub.add_parser("heaptrack-summary")
    p.add_argument("--stacks", required=True, help="heaptrack_print -F output, --flamegraph-cost-type peak")
    p.add_argument("--massif", help="heaptrack_print -M output")
    p.add_argument("--result", help="the load's result JSON (for RSS at the same moments)")
    p.add_argument("--started", type=float, help="wall-clock time keyhole was started")
    p.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    {"ports": cmd_ports, "load": cmd_load, "report": cmd_report,
     "heaptrack-summary": cmd_heaptrack_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
