"""deploy/nginx/nginx.conf: `nginx -t`, then real traffic through Debian's
nginx on loopback to small HTTP/upgrade upstreams that report what nginx sent.

These check the proxy config on its own; tests/e2e/topology.test.mjs runs the
same file in front of real switchboard replicas and Redis."""

import json
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time

import pytest

from nginxctl import NGINX_CONF, Nginx, command, free_port, make_prefix, render


def test_nginx_t_accepts_the_config():
    prefix = make_prefix()
    try:
        ports = [free_port() for _ in range(3)]
        (prefix / "nginx.conf").write_text(render(free_port(), [f"127.0.0.1:{p}" for p in ports]))
        out = subprocess.run(command(prefix, "-t"), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "test is successful" in out.stderr
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_render_changes_only_addresses_and_listen_port():
    original = NGINX_CONF.read_text().splitlines()
    rendered = render(18080, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]).splitlines()
    changed = [(a, b) for a, b in zip(original, rendered) if a != b]
    assert len(original) == len(rendered)
    assert len(changed) == 4
    for a, b in changed:
        assert re.sub(r"switchboard-\d:8080|127\.0\.0\.1:\d+|8080", "X", a) == \
            re.sub(r"127\.0\.0\.1:\d+", "X", b), (a, b)


def test_config_sets_websocket_essentials():
    text = NGINX_CONF.read_text()
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", text)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", text)
    assert re.search(r"proxy_http_version\s+1\.1;", text)
    ws = re.search(r"location = /ws \{(.*?)\}", text, re.S).group(1)
    assert re.search(r"proxy_read_timeout\s+1h;", ws)
    for directive in ("pid", "daemon", "user"):
        assert not re.search(rf"^\s*{directive}\s", text, re.M), f"{directive} belongs on the command line"


class Upstream(socketserver.ThreadingTCPServer):
    """Answers plain requests with JSON of what it received, and upgrades
    `/ws` (101) into an echo that prefixes its own name. In `draining` mode it
    refuses upgrades with 503, as a switchboard replica does while draining."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str):
        self.name = name
        self.draining = False
        self.upgraded = 0
        self.requests = []
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def read_head(f) -> tuple[str, dict] | None:
    line = f.readline()
    if not line:
        return None
    headers = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return line.decode().strip(), headers


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        srv: Upstream = self.server
        while True:  # nginx keeps upstream connections alive
            head = read_head(self.rfile)
            if head is None:
                return
            request, headers = head
            path = request.split()[1]
            srv.requests.append((request, headers))
            if int(headers.get("content-length", "0")):
                self.rfile.read(int(headers["content-length"]))
            if path.startswith("/ws"):
                if srv.draining:
                    self.respond(503, b"draining")
                    continue
                ok = headers.get("upgrade", "").lower() == "websocket" and \
                    "upgrade" in headers.get("connection", "").lower()
                if not ok:
                    self.respond(400, json.dumps(headers).encode())
                    continue
                srv.upgraded += 1
                self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nX-Upstream: " + srv.name.encode() + b"\r\n\r\n")
                self.wfile.flush()
                while True:
                    data = self.request.recv(4096)
                    if not data:
                        return
                    self.request.sendall(srv.name.encode() + b":" + data)
            body = json.dumps({"upstream": srv.name, "request": request, "headers": headers}).encode()
            self.respond(200, body)

    def respond(self, status: int, body: bytes):
        reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}[status]
        self.wfile.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
                         f"Content-Type: application/json\r\n\r\n".encode() + body)
        self.wfile.flush()


@pytest.fixture
def topo():
    ups = [Upstream(f"up{i}") for i in range(1, 4)]
    ngx = Nginx([f"127.0.0.1:{u.port}" for u in ups])
    yield ngx, ups
    ngx.stop()
    for u in ups:
        u.shutdown()
        u.server_close()


def http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        f = s.makefile("rb")
        status, headers = read_head(f)
        return int(status.split()[1]), headers, f.read()


def open_ws(port: int) -> tuple[socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /ws?userID=a&peerID=b HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, f"connection closed during handshake: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert rest == b""
    name = re.search(rb"X-Upstream: (\S+)", head).group(1).decode()
    return s, name


def echo(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    want = len(payload)
    got = b""
    while not got.endswith(payload) or len(got) < want:
        chunk = s.recv(4096)
        assert chunk, "socket closed"
        got += chunk
    return got


def test_websocket_upgrade_passes_and_relays_both_ways(topo):
    ngx, _ = topo
    s, name = open_ws(ngx.port)
    with s:
        for i in range(3):
            assert echo(s, f"frame-{i}".encode()) == f"{name}:frame-{i}".encode()


def test_plain_requests_get_forwarding_headers_and_no_upgrade(topo):
    ngx, _ = topo
    status, _, body = http_get(ngx.port, "/call?userID=a&peerID=b")
    assert status == 200
    seen = json.loads(body)
    assert seen["request"] == "GET /call?userID=a&peerID=b HTTP/1.1"
    h = seen["headers"]
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["host"] == "localhost"
    assert "upgrade" not in h
    assert h.get("connection", "") == ""  # upstream keepalive, not "close" or "upgrade"


def test_held_sockets_spread_over_all_replicas(topo):
    ngx, ups = topo
    socks = [open_ws(ngx.port) for _ in range(6)]
    try:
        names = [n for _, n in socks]
        # least_conn with a shared zone: each replica holds two of six sockets.
        assert sorted(names) == ["up1", "up1", "up2", "up2", "up3", "up3"], names
        assert [u.upgraded for u in ups] == [2, 2, 2]
    finally:
        for s, _ in socks:
            s.close()


def test_a_dead_replica_is_skipped(topo):
    ngx, ups = topo
    ups[1].shutdown()
    ups[1].server_close()
    names = set()
    for _ in range(6):
        status, _, body = http_get(ngx.port, "/healthz")
        assert status == 200
        names.add(json.loads(body)["upstream"])
    assert names == {"up1", "up3"}
    socks = [open_ws(ngx.port) for _ in range(4)]
    try:
        assert {n for _, n in socks} == {"up1", "up3"}
    finally:
        for s, _ in socks:
            s.close()


def test_a_draining_replica_503_moves_new_sockets_elsewhere(topo):
    ngx, ups = topo
    ups[0].draining = True
    socks = [open_ws(ngx.port) for _ in range(6)]
    try:
        assert ups[0].upgraded == 0
        assert {n for _, n in socks} == {"up2", "up3"}
    finally:
        for s, _ in socks:
            s.close()


def test_metrics_are_not_exposed_through_the_balancer(topo):
    ngx, ups = topo
    status, _, _ = http_get(ngx.port, "/metrics")
    assert status == 404
    assert not any(r.startswith("GET /metrics") for u in ups for r, _ in u.requests)


def test_nginx_stops_cleanly(topo):
    ngx, _ = topo
    ngx.proc.terminate()
    deadline = time.monotonic() + 10
    while ngx.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ngx.proc.returncode == 0, ngx.output()


def test_host_header_keeps_the_port_for_the_origin_check(topo):
    """switchboard compares a browser's Origin (host:port) with Host; nginx must pass the port on."""
    ngx, _ = topo
    with socket.create_connection(("127.0.0.1", ngx.port), timeout=10) as s:
        s.sendall(f"GET /call HTTP/1.1\r\nHost: 127.0.0.1:{ngx.port}\r\nConnection: close\r\n\r\n".encode())
        f = s.makefile("rb")
        status, _ = read_head(f)
        seen = json.loads(f.read())
    assert status.split()[1] == "200"
    assert seen["headers"]["host"] == f"127.0.0.1:{ngx.port}"


def test_access_log_never_holds_link_tokens(topo):
    """Signed links carry a bearer token in the query; the access log shows it redacted."""
    ngx, _ = topo
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2VjcmV0LXNpZ25hdHVyZQ"
    status, _, body = http_get(ngx.port, f"/call?userID=a&peerID=b&token={token}&debug=1")
    assert status == 200
    assert token in json.loads(body)["request"], "the replica still gets the token"
    status, _, _ = http_get(ngx.port, f"/call?token={token}")
    assert status == 200
    deadline = time.monotonic() + 20
    while ngx.output().count("[redacted]") < 2:
        assert time.monotonic() < deadline, f"no access log lines:\n{ngx.output()}"
        time.sleep(0.05)
    out = ngx.output()
    assert token not in out and "c2VjcmV0LXNpZ25hdHVyZQ" not in out, out
    assert "/call?userID=a&peerID=b&token=[redacted]&debug=1" in out, out
    assert "/call?token=[redacted] HTTP/1.1" in out, out
