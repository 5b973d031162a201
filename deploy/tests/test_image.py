"""deploy/Dockerfile and .dockerignore, without a Docker engine: the file is
parsed with BuildKit's own parser, the build context is computed from
.dockerignore and the Cargo workspace is loaded from that context alone, and
the HEALTHCHECK command is run against a live HTTP server."""

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time

import dockerfile
import pytest

from conftest import REPO
from nginxctl import free_port

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def stages() -> list[list]:
    out: list[list] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def only(cmds, name):
    found = [c for c in cmds if c.cmd == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_multi_stage_release_build():
    builder, runtime = stages()
    assert builder[0].value[-2:] == ("AS", "builder")
    assert builder[0].value[0].startswith("rust:")
    run = " ".join(c.value[0] for c in builder if c.cmd == "RUN")
    assert re.search(r"cargo build --release -p switchboard\b", run)
    assert re.match(r"debian:.*-slim$", runtime[0].value[0])
    copy = only(runtime, "COPY")
    assert "--from=builder" in copy.flags
    assert only(runtime, "ENTRYPOINT").value == ("/usr/local/bin/switchboard",)


def test_build_resolves_like_ci_and_records_the_versions():
    # No Cargo.lock in the repository: the crates we depend on are pinned, and
    # both CI and the image build print what was resolved.
    import tomllib
    deps = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["dependencies"]
    for name in ("fastwebsockets", "hyper"):
        assert deps[name]["version"].startswith("="), f"{name} is not pinned: {deps[name]}"
    tree = "cargo tree -p switchboard --depth 1 -e normal"
    builder, _ = stages()
    run = " ".join(c.value[0] for c in builder if c.cmd == "RUN")
    assert tree in run
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index(tree) < ci.index("cargo test --workspace")
    assert "Cargo.lock" in (REPO / ".gitignore").read_text().split()


def test_runtime_is_non_root_and_listens_on_8080():
    _, runtime = stages()
    user = only(runtime, "USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    setup = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert f"--uid {uid}" in setup
    env = only(runtime, "ENV").value
    env = dict(zip(env[::2], env[1::2]))
    assert env["SWITCHBOARD_LISTEN"] == "0.0.0.0:8080"
    assert only(runtime, "EXPOSE").value == ("8080",)
    # The HEALTHCHECK uses curl, so the runtime stage must install it.
    assert re.search(r"apt-get install .*\bcurl\b", setup)


def healthcheck_shell() -> str:
    _, runtime = stages()
    hc = only(runtime, "HEALTHCHECK")
    assert hc.value[0] == "CMD"
    assert "/healthz" in hc.value[1]
    return hc.value[1]


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_healthcheck(listen: str) -> int:
    # HEALTHCHECK CMD <string> runs as `/bin/sh -c <string>` in the image.
    env = {"PATH": os.environ["PATH"], "SWITCHBOARD_LISTEN": listen}
    return subprocess.run(["/bin/sh", "-c", healthcheck_shell()], env=env, timeout=30,
                          capture_output=True).returncode


def test_healthcheck_follows_the_listen_port():
    if not shutil.which("curl"):
        pytest.fail("curl is needed to run the image's HEALTHCHECK command")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert run_healthcheck(f"0.0.0.0:{srv.server_address[1]}") == 0
        assert run_healthcheck(f"0.0.0.0:{free_port()}") != 0  # nothing listens there
    finally:
        srv.shutdown()
        srv.server_close()


def test_healthcheck_against_the_real_server():
    binary = next((p for p in (REPO / "target" / "release" / "switchboard",
                               REPO / "target" / "debug" / "switchboard") if p.is_file()), None)
    if binary is None:
        pytest.skip("switchboard is not built (cargo build -p switchboard)")
    port = free_port()
    env = {**os.environ, "SWITCHBOARD_LISTEN": f"127.0.0.1:{port}"}
    env.pop("SWITCHBOARD_REDIS_URL", None)
    proc = subprocess.Popen([str(binary)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while run_healthcheck(f"0.0.0.0:{port}") != 0:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- build context ---------------------------------------------------------

def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                rx += ".*"
                i += 2
            elif line[i] == "*":
                rx += "[^/]*"
                i += 1
            elif line[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(line[i])
                i += 1
        pats.append((negate, re.compile(rx + "$")))
    return pats


def ignored(path: str, pats) -> bool:
    # As Docker does: a pattern that matches a parent directory excludes the file.
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, rx in pats:
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


def context_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    pats = ignore_patterns()
    return [p for p in out.stdout.splitlines() if (REPO / p).is_file() and not ignored(p, pats)]


def test_dockerignore_keeps_sources_and_drops_the_rest():
    files = context_files()
    assert "Cargo.toml" in files
    assert any(f.startswith("crates/switchboard/src/") for f in files)
    pats = ignore_patterns()
    for probe in [".git/HEAD", "target/release/switchboard", "crates/switchboard/target/x",
                  "node_modules/a/index.js", "tests/e2e/node_modules/x", "tests/e2e/call.test.mjs",
                  "deploy/Dockerfile", "Cargo.lock"]:
        assert ignored(probe, pats), probe
    # Page files embedded at compile time must reach the builder.
    static = [f for f in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                                        text=True, check=True).stdout.splitlines()
              if "static/" in f and not f.startswith(("tests/", "deploy/", "docs/", "deny/"))]
    assert set(static) <= set(files)


def test_workspace_loads_from_the_build_context_alone(tmp_path):
    for f in context_files():
        dst = tmp_path / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst)
    out = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    (pkg,) = [p for p in meta["packages"] if p["name"] == "switchboard"]
    assert any(t["name"] == "switchboard" and "bin" in t["kind"] for t in pkg["targets"])
