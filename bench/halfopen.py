#!/usr/bin/env python3
"""Server RSS under half-open HTTP connections, and after they go away.

Starts the switchboard binary (in-memory broker, port 0 on loopback), opens N connections that
each send a partial request head and hold, then closes them all and waits. Prints RSS before,
at the peak (all N held) and after the settle time, as one JSON line on stdout and a readable
line on stderr.

Usage: bench/halfopen.py [--server target/release/switchboard] [--conns 19000]
                         [--settle 10] [--env KEY=VALUE ...]

By default the server runs with SWITCHBOARD_MAX_HTTP_CONNECTIONS at its upper bound and a long
handshake timeout, so that every connection is really held (the peak is what the allocator must
give back); pass --env SWITCHBOARD_MAX_HTTP_CONNECTIONS=1024 to see the cap instead. Each
connection is a file descriptor in this process and in the server: the open-file limit of both
must exceed --conns (ulimit -n). All traffic stays on 127.0.0.1.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: halfopen\r\n"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(server, env):
    full = dict(os.environ)
    full.update({"SWITCHBOARD_LISTEN": "127.0.0.1:0", "SWITCHBOARD_LOG_FORMAT": "json", "RUST_LOG": "warn,switchboard=info",
                 "SWITCHBOARD_MAX_HTTP_CONNECTIONS": "65536", "SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS": "300"})
    full.pop("SWITCHBOARD_REDIS_URL", None)
    full.update(env)
    proc = subprocess.Popen([server], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    for line in proc.stdout:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("fields", {}).get("message") == "listening":
            port = int(record["fields"]["addr"].rsplit(":", 1)[1])
            return proc, port
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not log its listening line")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=str(ROOT / "target" / "release" / "switchboard"))
    parser.add_argument("--conns", type=int, default=19000)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after closing them all")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.conns + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.conns + 256), hard))

    proc, port = start(args.server, env)
    try:
        time.sleep(1.0)
        before = rss_kib(proc.pid)
        held, refused, failed = [], 0, 0
        for _ in range(args.conns):
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(HALF_HEAD)
                held.append(s)
            except OSError:
                failed += 1
                s.close()
        # Let the server read every head it was sent.
        time.sleep(2.0)
        peak = rss_kib(proc.pid)
        # Connections the server answered (503 past the cap) or closed.
        for s in held:
            s.setblocking(False)
            try:
                if s.recv(64) is not None:
                    refused += 1
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                refused += 1
        for s in held:
            s.close()
        time.sleep(args.settle)
        after = rss_kib(proc.pid)
        result = {"label": args.label, "server": args.server, "conns": args.conns, "answered_or_closed": refused,
                  "connect_failed": failed, "rss_kib_before": before, "rss_kib_peak": peak, "rss_kib_after": after,
                  "settle_secs": args.settle, "env": env}
        print(f"{args.label or args.server}: {args.conns} half-open ({refused} answered or closed by the server, "
              f"{failed} failed): RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
              f"after {args.settle:g} s {after / 1024:.1f} MiB", file=sys.stderr)
        print(json.dumps(result))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
