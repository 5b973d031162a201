"""deploy/nginx/tls.conf, the TLS front of README's "Try it from your phone":
Debian's nginx with a self-signed certificate made by `openssl` as the README
says, in front of a real switchboard, all on loopback. HTTPS serves the pages,
WSS carries a call's signaling both ways, plain HTTP is redirected, and the
server's same-origin check passes for the https:// origin (and only for it)."""

import asyncio
import collections
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
# The asyncio client, not websockets.sync: the sync client reads its socket on
# a thread of its own while the caller writes, and two threads in one
# OpenSSL connection at once is not allowed. Over TLS 1.3 the server's
# session tickets arrive just as the request is written, and now and then
# the request was lost (nginx: "client closed connection while waiting for
# request"; the client: no handshake response in 10 s).
from websockets.asyncio.client import connect

from conftest import REPO, add_diagnosis, switchboard_binary
from nginxctl import Nginx, command, make_prefix, render_tls, TLS_CONF

README = REPO / "README.md"


def readme_openssl_command(ip: str) -> list[str]:
    """The `openssl req` line of README's phone recipe, with $IP filled in."""
    text = README.read_text().replace("\\\n", " ")  # join continued lines
    m = re.search(r"^openssl req .*$", text, re.M)
    assert m, "README.md has an `openssl req` line"
    line = m.group(0).replace("$IP", ip).replace('"', "")
    args = line.split()
    assert args[:2] == ["openssl", "req"]
    return args


@pytest.fixture(scope="module")
def cert():
    """A self-signed certificate for IP 127.0.0.1, made with README's command."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed (apt-get install openssl)"
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-tls-"))
    try:
        args = readme_openssl_command("127.0.0.1")
        out = subprocess.run([openssl, *args[1:]], cwd=workdir, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        yield {"cert.pem": (workdir / "cert.pem").read_bytes(), "key.pem": (workdir / "key.pem").read_bytes(),
               "path": workdir / "cert.pem"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(request):
    """A real switchboard on a free loopback port (in-memory broker); a failed
    test's report shows the tail of its log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_LISTEN="127.0.0.1:0", SWITCHBOARD_LOG_FORMAT="json", SWITCHBOARD_DRAIN_SECS="0",
               RUST_LOG="info")
    proc = subprocess.Popen([switchboard_binary()], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        addr = None
        for line in proc.stdout:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "listening":
                addr = fields["addr"]
                break
        assert addr, f"switchboard exited {proc.wait()} without a listening line"
        # Keep reading its log: a pipe nobody drains fills up (64 KiB), and
        # the server then blocks on its next log line, mid-request.
        tail = collections.deque([line], maxlen=200)
        threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True).start()
        add_diagnosis(request, "switchboard log (last 200 lines)", lambda: "".join(tail))
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def front(request, cert, server):
    """nginx with tls.conf in front of `server`; a failed test's report shows
    its logs."""
    ngx = Nginx([server], tls=True, files={"cert.pem": cert["cert.pem"], "key.pem": cert["key.pem"]})
    add_diagnosis(request, "nginx stdout and stderr (access log, warnings)", ngx.output)
    add_diagnosis(request, "nginx error log down to info", ngx.info_log)
    try:
        yield ngx
    finally:
        ngx.stop()


def tls_context(cert) -> ssl.SSLContext:
    """Trusts only the test's certificate, and checks that it names 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(cert["path"]))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def get(url: str, ctx=None):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_nginx_t_accepts_the_tls_config(cert):
    prefix = make_prefix()
    try:
        (prefix / "nginx.conf").write_text(render_tls(18443, "127.0.0.1:18080"))
        (prefix / "cert.pem").write_bytes(cert["cert.pem"])
        (prefix / "key.pem").write_bytes(cert["key.pem"])
        out = subprocess.run(command(prefix, "-t"), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_render_tls_changes_only_the_listen_port_and_the_upstream():
    original = TLS_CONF.read_text().splitlines()
    rendered = render_tls(18443, "127.0.0.1:18080").splitlines()
    changed = [(a, b) for a, b in zip(original, rendered) if a != b]
    assert len(original) == len(rendered)
    assert [b.strip() for _, b in changed] == ["server 127.0.0.1:18080;", "listen 127.0.0.1:18443 ssl;"]


def test_https_serves_the_pages_with_the_self_signed_certificate(front, cert):
    ctx = tls_context(cert)
    base = f"https://127.0.0.1:{front.port}"
    for path, kind in [("/", "text/html"), ("/call?userID=alice&peerID=bob", "text/html"),
                       ("/switchboard.js", "javascript")]:
        status, headers, body = get(base + path, ctx)
        assert status == 200, path
        assert kind in headers["Content-Type"], (path, headers["Content-Type"])
        assert body
    assert get(base + "/metrics", ctx)[0] == 404
    # Without the certificate a browser (here: Python's default trust store) must refuse it:
    # that is the warning README tells people to accept.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(base + "/", ssl.create_default_context())


def test_plain_http_on_the_tls_port_is_redirected_to_https(front):
    status, headers, _ = get(f"http://127.0.0.1:{front.port}/call?userID=alice&peerID=bob")
    assert status == 301
    assert headers["Location"] == f"https://127.0.0.1:{front.port}/call?userID=alice&peerID=bob"


async def recv(ws, timeout: float = 10):
    return await asyncio.wait_for(ws.recv(), timeout)


def test_a_call_signals_over_wss_through_the_front(front, cert):
    ctx = tls_context(cert)
    origin = f"https://127.0.0.1:{front.port}"
    url = f"wss://127.0.0.1:{front.port}/ws"

    async def call():
        async with connect(f"{url}?userID=alice&peerID=bob", ssl=ctx, origin=origin, open_timeout=10) as alice:
            welcome = json.loads(await recv(alice))
            assert welcome["type"] == "welcome" and welcome["peerOnline"] is False
            async with connect(f"{url}?userID=bob&peerID=alice", ssl=ctx, origin=origin, open_timeout=10) as bob:
                assert json.loads(await recv(bob))["peerOnline"] is True
                assert json.loads(await recv(alice)) == {"type": "peer-joined", "peerID": "bob"}
                offer = '{"type":"offer","sdp":"v=0\\r\\n over TLS"}'
                answer = '{"type":"answer","sdp":"v=0\\r\\n back"}'
                await alice.send(offer)
                assert await recv(bob) == offer
                await bob.send(answer)
                assert await recv(alice) == answer
                await bob.send('{"type":"bye"}')
                assert await recv(alice) == '{"type":"bye"}'
            assert json.loads(await recv(alice)) == {"type": "peer-left", "peerID": "bob"}

    asyncio.run(call())


def test_the_origin_check_still_refuses_other_sites(front, cert):
    ctx = tls_context(cert)

    async def refused():
        async with connect(f"wss://127.0.0.1:{front.port}/ws?userID=alice&peerID=bob", ssl=ctx,
                           origin="https://evil.example", open_timeout=10):
            pass

    with pytest.raises(InvalidStatus) as refused_with:
        asyncio.run(refused())
    assert refused_with.value.response.status_code == 403


def test_the_access_log_never_holds_link_tokens(front, cert):
    status, _, _ = get(f"https://127.0.0.1:{front.port}/call?userID=alice&peerID=bob&token=s3cr3t-t0ken", tls_context(cert))
    assert status == 200
    # nginx writes the access line after it sent the response: wait for it.
    deadline = time.monotonic() + 10
    while "token=" not in (log := front.output()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "token=[redacted]" in log
    assert "s3cr3t-t0ken" not in log
