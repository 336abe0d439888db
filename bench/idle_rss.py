#!/usr/bin/env python3
"""RSS of keyhole binaries with 1,000 and 9,000 idle client connections.

    python3 bench/idle_rss.py target/release/keyhole [OTHER_BINARY...]

Each binary is started with one route (nothing is proxied), pinned to CPU 0;
the connections are opened and left idle; VmRSS is read after a second.
Used to compare builds (e.g. two commits) for per-connection memory."""
import resource
import socket
import subprocess
import sys
import time

h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
for binary in sys.argv[1:]:
    p = subprocess.Popen(["taskset", "-c", "0", binary, "--listen", "127.0.0.1:0", "--route", "/=https://127.0.0.1:9", "--header", "x-api-key=k"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline().decode()
    port = int(line.rsplit(":", 1)[1])
    time.sleep(0.2)
    out = [binary.split("/")[-1], f"idle {rss(p.pid):.1f}"]
    socks = []
    for n in (1000, 9000):
        while len(socks) < n:
            s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
        time.sleep(1.0)
        out.append(f"{n}: {rss(p.pid):.1f}")
    print(" ".join(out), flush=True)
    for s in socks: s.close()
    p.terminate(); p.wait()
