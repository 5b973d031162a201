"""Runs deploy/nginx/nginx.conf (and tls.conf) on loopback, unprivileged, for the tests.

Only the `listen` port and the upstream `server` addresses are rewritten; pid,
temp paths and daemon mode come from the command line (-p / -g), never from
edits to the file.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
TLS_CONF = REPO / "deploy" / "nginx" / "tls.conf"
# nginx's error log at `info`, in the prefix (see command()).
INFO_LOG = "info.log"

UPSTREAM_RE = re.compile(r"^(\s*server\s+)(switchboard-\d+:8080)(\b.*)$", re.M)
LISTEN_RE = re.compile(r"^(\s*listen\s+)(8080)(\s*;.*)$", re.M)
TLS_UPSTREAM_RE = re.compile(r"^(\s*server\s+)(127\.0\.0\.1:8080)(\s*;.*)$", re.M)
TLS_LISTEN_RE = re.compile(r"^(\s*listen\s+)(8443)(\s+ssl\s*;.*)$", re.M)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(listen_port: int, upstreams: list[str], text: str | None = None) -> str:
    """The shipped config with only the listen port and upstream addresses replaced."""
    text = NGINX_CONF.read_text() if text is None else text
    found = UPSTREAM_RE.findall(text)
    if len(found) != len(upstreams):
        raise ValueError(f"config has {len(found)} upstream servers, got {len(upstreams)} addresses")
    it = iter(upstreams)
    text = UPSTREAM_RE.sub(lambda m: m.group(1) + next(it) + m.group(3), text)
    text, n = LISTEN_RE.subn(lambda m: m.group(1) + f"127.0.0.1:{listen_port}" + m.group(3), text)
    if n != 1:
        raise ValueError(f"expected one `listen 8080;` line, found {n}")
    return text


def render_tls(listen_port: int, upstream: str) -> str:
    """tls.conf with only its listen port and its one upstream address replaced."""
    text = TLS_CONF.read_text()
    text, n = TLS_UPSTREAM_RE.subn(lambda m: m.group(1) + upstream + m.group(3), text)
    if n != 1:
        raise ValueError(f"expected one `server 127.0.0.1:8080;` line, found {n}")
    text, n = TLS_LISTEN_RE.subn(lambda m: m.group(1) + f"127.0.0.1:{listen_port}" + m.group(3), text)
    if n != 1:
        raise ValueError(f"expected one `listen 8443 ssl;` line, found {n}")
    return text


def make_prefix() -> Path:
    prefix = Path(tempfile.mkdtemp(prefix="switchboard-nginx-"))
    # Workers may run as an unprivileged user when the test runs as root.
    prefix.chmod(0o755)
    return prefix


def command(prefix: Path, *extra: str) -> list[str]:
    return [
        nginx_binary(),
        "-p", f"{prefix}/",
        "-e", "stderr",
        "-c", str(prefix / "nginx.conf"),
        # A second error log at `info`, for diagnosing a failed test: client
        # connections closed early and TLS errors are logged at that level only.
        "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/{INFO_LOG} info;",
        *extra,
    ]


class Nginx:
    """nginx with the rendered config, in the foreground, stopped by stop()."""

    def __init__(self, upstreams: list[str], *, tls: bool = False, files: dict[str, bytes] | None = None):
        """`tls`: run tls.conf in front of `upstreams[0]`; `files` are written
        into the prefix first (e.g. the certificate and key)."""
        self.port = free_port()
        self.prefix = make_prefix()
        for name, data in (files or {}).items():
            (self.prefix / name).write_bytes(data)
        text = render_tls(self.port, upstreams[0]) if tls else render(self.port, upstreams)
        (self.prefix / "nginx.conf").write_text(text)
        self.log = open(self.prefix / "nginx.out", "w+b")
        self.proc = subprocess.Popen(command(self.prefix), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen: {self.output()}")
                time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return (self.prefix / "nginx.out").read_text(errors="replace")

    def info_log(self) -> str:
        """nginx's error log down to `info` (may hold query strings: never
        for the access-log checks)."""
        path = self.prefix / INFO_LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.prefix, ignore_errors=True)
