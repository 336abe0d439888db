#!/usr/bin/env python3
"""Where keyhole's keep-alive gap to nginx at 64 connections comes from.

Run through bench/run.sh, which sets up the same upstream and proxies as for
the main benchmark and then hands over to this script instead of measuring:

    BENCH_HOOK='python3 bench/concurrency.py' bash bench/run.sh [--quick]

For each layout below, each proxy (keyhole, nginx, HAProxy) in turn, at 16
and 64 keep-alive connections, `REPEATS` interleaved times, it records
requests/s, p50, the proxy's CPU per request and sleeps per request, how
busy each core was, the interrupts each core took per request (rescheduling
and function-call IPIs: a wake-up of a sleeping thread on the other core),
TCP segments per request (all sockets, ACKs included, /proc/net/snmp), and
the proxy's upstream connections before and after the run (ss).

Layouts (same treatment for every proxy):
  bench     as bench/run.sh: proxy on CPU 0, wrk and the upstream on CPU 1,
            3 s, wrk --latency, after the other proxies' runs (keyhole's
            pool keeps idle connections 30 s, nginx's 300 s)
  warm      the same, right after a 1 s run at the same concurrency (no
            upstream handshakes inside the measured run)
  long      warm, 10 s
  swapped   warm, proxy on CPU 1, wrk and the upstream on CPU 0
  quota     warm, the proxy limited to 40% of CPU 0 (cgroup CPU quota), so
            that the proxy, not CPU 1, is the bottleneck: capacity per CPU

LAYOUTS='warm quota' limits the run to those layouts. Prints one table per
layout and writes everything to results-concurrency.json in the bench temp
dir.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import driver  # noqa: E402  (bench/driver.py: wrk parsing, /proc readers)

REPEATS = 3
QUOTA = driver.CAP


def cpu_times():
    """Busy and total jiffies per CPU from /proc/stat."""
    out = {}
    for line in open("/proc/stat"):
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            idle = v[3] + v[4]
            out[int(m.group(1))] = (sum(v) - idle, sum(v))
    return out


def ipis():
    """Rescheduling + function-call interrupts per CPU (/proc/interrupts)."""
    lines = open("/proc/interrupts").read().splitlines()
    ncpu = len(lines[0].split())
    total = [0] * ncpu
    for line in lines[1:]:
        name = line.split(":")[0].strip()
        if name in ("RES", "CAL", "TLB"):
            parts = line.split()[1:1 + ncpu]
            for i, p in enumerate(parts):
                total[i] += int(p)
    return total


def tcp_out_segs():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    head, vals = lines[0], lines[1]
    return int(vals[head.index("OutSegs")])


def upstream_conns(pids, port):
    """Established connections from the proxy's processes to the upstream."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return sum(1 for l in out.splitlines() if any(f"pid={p}," in l for p in pids))


def pin(pids, cpu):
    for p in pids:
        subprocess.run(["taskset", "-a", "-pc", str(cpu), str(p)], check=True,
                       capture_output=True)


def wrk(url, conns, secs, latency, cpu):
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{conns}", f"-d{secs}s",
           "--timeout", "10s"] + (["--latency"] if latency else []) + [url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(out)
    res = {"wrk_cpu": usage.ru_utime + usage.ru_stime, "wrk_sleeps": usage.ru_nvcsw,
           "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
           "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    m = re.search(r"\s50%\s+(\S+)", out)
    res["p50"] = driver._ms(m.group(1)) if m else None
    if re.search(r"Non-2xx|Socket errors", out):
        raise RuntimeError(out)
    return res


PERF_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_epoll_wait",
               "syscalls:sys_enter_epoll_pwait", "context-switches", "irq:softirq_entry",
               "sched:sched_wakeup"]


def perf_start(path):
    """Counts, per CPU, system calls, epoll waits, context switches, softirqs
    and wake-ups while the run lasts (perf stat -a -A; None without perf)."""
    try:
        return subprocess.Popen(["perf", "stat", "-a", "-A", "-x,", "-o", path,
                                 "-e", ",".join(PERF_EVENTS)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def perf_stop(proc, path, n):
    if proc is None:
        return {}
    proc.send_signal(2)
    proc.wait()
    out = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 3 and f[0].startswith("CPU") and f[1].isdigit():
            name = f[3].split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "syscalls")
            if name in ("epoll_pwait",):
                name = "epoll_wait"
            key = f"{name}_per_req_{f[0].lower()}"
            out[key] = out.get(key, 0) + int(f[1]) / n
    return out


def measure(system, url, pids, up_port, conns, secs, latency, load_cpu, upstream):
    c0, s0 = driver.cpu_seconds(pids), driver.sleeps(pids)
    uc0, us0 = driver.cpu_seconds(upstream), driver.sleeps(upstream)
    t0, i0, g0 = cpu_times(), ipis(), tcp_out_segs()
    u0 = upstream_conns(pids, up_port)
    perf_out = f"/tmp/keyhole-bench-perf-{os.getpid()}.csv"
    perf = perf_start(perf_out)
    time.sleep(0.1)  # perf's counters armed before the load starts
    r = wrk(url, conns, secs, latency, load_cpu)
    c1, s1 = driver.cpu_seconds(pids), driver.sleeps(pids)
    uc1, us1 = driver.cpu_seconds(upstream), driver.sleeps(upstream)
    t1, i1, g1 = cpu_times(), ipis(), tcp_out_segs()
    n = r["requests"]
    counts = perf_stop(perf, perf_out, n)
    busy = {c: (t1[c][0] - t0[c][0]) / max(1, t1[c][1] - t0[c][1]) for c in t0}
    return {
        "rps": r["rps"], "p50": r["p50"],
        "cpu_us_per_req": (c1 - c0) / n * 1e6,
        "sleeps_per_req": (s1 - s0) / n,
        # The load core's other two processes: what the proxy's traffic costs them.
        "wrk_cpu_us_per_req": r["wrk_cpu"] / n * 1e6, "wrk_sleeps_per_req": r["wrk_sleeps"] / n,
        "upstream_cpu_us_per_req": (uc1 - uc0) / n * 1e6,
        "upstream_sleeps_per_req": (us1 - us0) / n,
        "busy_cpu0": busy[0], "busy_cpu1": busy[1],
        "ipi_per_req_cpu0": (i1[0] - i0[0]) / n, "ipi_per_req_cpu1": (i1[1] - i0[1]) / n,
        "segs_per_req": (g1 - g0) / n,
        "upstream_conns_before": u0, "upstream_conns_after": upstream_conns(pids, up_port),
        **counts,
    }


LAYOUTS = [
    # name, proxy cpu, load cpu, seconds, --latency, warm-up first, quota
    ("bench", 0, 1, 3, True, False, None),
    ("warm", 0, 1, 3, True, True, None),
    ("long", 0, 1, 10, True, True, None),
    ("swapped", 1, 0, 3, True, True, None),
    ("quota", 0, 1, 3, True, True, QUOTA),
]

METRICS = ["rps", "p50", "cpu_us_per_req", "sleeps_per_req", "wrk_cpu_us_per_req",
           "wrk_sleeps_per_req", "upstream_cpu_us_per_req", "upstream_sleeps_per_req",
           "busy_cpu0", "busy_cpu1",
           "ipi_per_req_cpu0", "ipi_per_req_cpu1", "segs_per_req",
           "upstream_conns_before", "upstream_conns_after"]


def main():
    cfg = json.load(open(sys.argv[1]))
    tmp = cfg["tmp"]
    systems = [s for s in ("keyhole", "nginx", "haproxy") if s in cfg["systems"]]
    port = {s: cfg["ports"][s] for s in systems}
    pids = {s: driver.proc_tree(cfg["pids"][s]) for s in systems}
    up = cfg["ports"]["up_nginx"]
    upstream_pids = driver.proc_tree(int(open(f"{tmp}/upstream-nginx.pid").read()))
    repeats = 1 if cfg["quick"] else REPEATS
    results = {}
    for s in systems:  # warm everything once
        wrk(f"http://127.0.0.1:{port[s]}/small", 64, 1, False, 1)
    only = os.environ.get("LAYOUTS", "").split()
    for name, proxy_cpu, load_cpu, secs, latency, warm, share in LAYOUTS:
        if only and name not in only:
            continue
        if cfg["quick"]:
            secs = min(secs, 2)
        print(f"layout {name}", file=sys.stderr, flush=True)
        # The upstream and the load go on the load core, the proxies on theirs.
        pin(upstream_pids, load_cpu)
        for s in systems:
            pin(pids[s], proxy_cpu)
            if share and not driver.cpu_cap(pids[s], share):
                raise SystemExit("no CPU quota on this machine (cgroup cpu)")
        for conns in (16, 64):
            for _ in range(repeats):
                for s in systems:
                    url = f"http://127.0.0.1:{port[s]}/small"
                    if warm:
                        wrk(url, conns, 1, False, load_cpu)
                    m = measure(s, url, pids[s], up, conns, secs, latency, load_cpu,
                                upstream_pids)
                    results.setdefault(name, {}).setdefault(conns, {}).setdefault(s, []).append(m)
        for s in systems:
            if share:
                driver.cpu_cap(pids[s], None)
            pin(pids[s], 0)
        pin(upstream_pids, 1)
    json.dump(results, open(f"{tmp}/results-concurrency.json", "w"), indent=1)
    for name, by_conns in results.items():
        print(f"\n### {name}\n")
        for conns, by_sys in by_conns.items():
            print(f"{conns} connections | " + " | ".join(systems))
            print("---|" + "|".join("--:" for _ in systems))
            perf_keys = sorted({k for m in by_sys[systems[0]] for k in m if "_per_req_cpu" in k
                                and not k.startswith("ipi")})
            for metric in METRICS + perf_keys:
                vals = []
                for s in systems:
                    xs = [m[metric] for m in by_sys[s] if m[metric] is not None]
                    vals.append(f"{statistics.median(xs):.3f}" if xs else "—")
                print(f"{metric} | " + " | ".join(vals))
            print()


if __name__ == "__main__":
    main()
