//! A private Redis Cluster: three masters and three replicas, each a
//! `redis-server --cluster-enabled yes` on free ports, joined by
//! `redis-cli --cluster create`, and stopped by PID on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{eventually, DEADLINE};

/// The cluster bus listens on the client port + 10000.
const BUS_OFFSET: u16 = 10000;
/// How long a master may be silent before its replica takes over.
pub const NODE_TIMEOUT_MS: u64 = 2000;

struct Node {
    port: u16,
    child: Option<Child>,
}

/// How a cluster is set up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct ClusterSetup {
    /// An ACL user (user, password) that clients and replicas must log in as;
    /// the default user is off.
    pub login: Option<(String, String)>,
    /// TLS only, cluster bus and replication included (plain ports off).
    pub tls: Option<crate::redis_server::TlsFiles>,
}

/// A running 3+3 cluster owned by one test.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    setup: ClusterSetup,
}

/// A port that is free, with its bus port (+10000) free too.
fn free_pair() -> u16 {
    loop {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else { continue };
        let port = listener.local_addr().unwrap().port();
        if !(1024..=65535 - BUS_OFFSET).contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)).is_ok() {
            return port;
        }
    }
}

fn spawn(port: u16, dir: &std::path::Path, setup: &ClusterSetup) -> Child {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).unwrap();
    let mut cmd = Command::new("redis-server");
    match &setup.tls {
        None => cmd.args(["--port", &port.to_string()]),
        Some(tls) => cmd
            .args(["--port", "0", "--tls-port", &port.to_string(), "--tls-cluster", "yes", "--tls-replication", "yes"])
            .args(["--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca),
    };
    if let Some((user, password)) = &setup.login {
        cmd.args(["--user", user, "on", &format!(">{password}"), "~*", "&*", "+@all", "--user", "default", "off"])
            .args(["--masteruser", user, "--masterauth", password]);
    }
    cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .args(["--enable-debug-command", "local", "--loglevel", "warning"])
        .arg("--dir")
        .arg(&node_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (apt-get install redis-server)")
}

/// Runs `redis-cli` with `args`; panics with its output when it fails.
fn redis_cli(args: &[String]) -> String {
    let out = Command::new("redis-cli").args(args).output().expect("redis-cli on PATH (apt-get install redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-cli {args:?}: {text}");
    text
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster with one replica per master.
    pub async fn start() -> Self {
        Self::start_with(ClusterSetup::default()).await
    }

    /// As [`RedisCluster::start`], with a login or TLS.
    /// At most two clusters of one test binary start at once: six
    /// `redis-server`s each, on a 2-core machine.
    pub async fn start_with(setup: ClusterSetup) -> Self {
        static STARTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
        let _turn = STARTING.acquire().await.expect("never closed");
        let dir = std::env::temp_dir().join(format!("switchboard-cluster-{}-{}", std::process::id(), free_pair()));
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_pair();
            nodes.push(Node { port, child: Some(spawn(port, &dir, &setup)) });
        }
        let cluster = Self { nodes, dir, setup };
        for node in &cluster.nodes {
            let url = cluster.node_url(node.port);
            let ca = cluster.ca();
            eventually("cluster node answers", || async { ping(&url, ca.as_deref()).await }).await;
        }
        let mut args: Vec<String> = cluster.cli_login();
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas".into(), "1".into(), "--cluster-yes".into()]);
        tokio::task::spawn_blocking(move || redis_cli(&args)).await.unwrap();
        cluster.wait_healthy().await;
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on three masters.
    pub async fn wait_healthy(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = self.node_url(node.port);
            let ca = self.ca();
            eventually("cluster_state:ok", || async {
                let Ok(mut conn) = connect(&url, ca.as_deref()).await else { return false };
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await.unwrap_or_default();
                info.contains("cluster_state:ok")
            })
            .await;
        }
        eventually("three masters, each with its slots and a replica", || async {
            let slots = self.slots().await;
            self.masters().await.len() == 3 && slots.iter().all(|(.., replicas)| !replicas.is_empty())
        })
        .await;
    }

    /// The seed URLs, comma-separated (all six nodes), with the login and TLS.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| self.node_url(n.port)).collect::<Vec<_>>().join(",")
    }

    /// The URL of the node on `port`, with the login and TLS.
    pub fn node_url(&self, port: u16) -> String {
        let scheme = if self.setup.tls.is_some() { "rediss" } else { "redis" };
        let login = match &self.setup.login {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        format!("{scheme}://{login}127.0.0.1:{port}")
    }

    /// The CA file, with TLS.
    pub fn ca(&self) -> Option<PathBuf> {
        self.setup.tls.as_ref().map(|t| t.ca.clone())
    }

    /// `redis-cli` arguments for the login and TLS.
    fn cli_login(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some((user, password)) = &self.setup.login {
            args.extend(["--user".into(), user.clone(), "--pass".into(), password.clone(), "--no-auth-warning".into()]);
        }
        if let Some(tls) = &self.setup.tls {
            args.extend(["--tls".into(), "--cacert".into(), tls.ca.display().to_string()]);
        }
        args
    }

    /// A live node's URL.
    fn any_url(&self) -> String {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a live node");
        self.node_url(node.port)
    }

    /// `CLUSTER SLOTS` from a live node: `(first, last, master port, replica ports)`.
    pub async fn slots(&self) -> Vec<(u16, u16, u16, Vec<u16>)> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = self.node_url(node.port);
            let Ok(mut conn) = connect(&url, self.ca().as_deref()).await else { continue };
            let Ok(reply) = redis::cmd("CLUSTER").arg("SLOTS").query_async::<redis::Value>(&mut conn).await else {
                continue;
            };
            let redis::Value::Array(ranges) = reply else { continue };
            let mut out = Vec::new();
            for range in ranges {
                let redis::Value::Array(parts) = range else { continue };
                let int = |v: &redis::Value| match v {
                    redis::Value::Int(i) => *i as u16,
                    _ => 0,
                };
                let port = |v: &redis::Value| match v {
                    redis::Value::Array(node) => int(&node[1]),
                    _ => 0,
                };
                out.push((int(&parts[0]), int(&parts[1]), port(&parts[2]), parts[3..].iter().map(port).collect()));
            }
            return out;
        }
        Vec::new()
    }

    /// The master ports, as the cluster reports them.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self.slots().await.into_iter().map(|(_, _, m, _)| m).collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// The port of the master serving `slot`.
    pub async fn master_of(&self, slot: u16) -> u16 {
        let slots = self.slots().await;
        slots.iter().find(|(first, last, ..)| *first <= slot && slot <= *last).expect("slot covered").2
    }

    /// A replica port of the master at `master`.
    pub async fn replica_of(&self, master: u16) -> u16 {
        let slots = self.slots().await;
        let (.., replicas) = slots.iter().find(|(_, _, m, _)| *m == master).expect("a master");
        *replicas.first().expect("a replica")
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A command connection to the node on `port`.
    pub async fn node_conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        connect(&self.node_url(port), self.ca().as_deref()).await.expect("node connection")
    }

    /// The node ID of the node on `port`.
    pub async fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER").arg("MYID").query_async(&mut self.node_conn(port).await).await.unwrap()
    }

    /// Moves `slot` (and its keys) from the master on `from` to the one on `to`.
    pub async fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let mut src = self.node_conn(from).await;
        let mut dst = self.node_conn(to).await;
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .query_async(&mut dst)
            .await
            .unwrap();
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .query_async(&mut src)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> =
                redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100).query_async(&mut src).await.unwrap();
            if keys.is_empty() {
                break;
            }
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for port in self.masters().await {
            let mut conn = self.node_conn(port).await;
            let () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        eventually("the slot's new master is known", || async { self.master_of(slot).await == to }).await;
    }

    /// `PUBSUB SHARDNUMSUB channel` on the node on `port`.
    pub async fn shard_numsub(&self, port: u16, channel: &str) -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut self.node_conn(port).await)
            .await
            .unwrap();
        n
    }

    /// Runs `f` on a connection to any live node (for assertions).
    pub async fn any_conn(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.any_url(), self.ca().as_deref()).await.expect("a node")
    }
}

async fn connect(url: &str, ca: Option<&std::path::Path>) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(DEADLINE));
    let client = match ca {
        Some(ca) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(std::fs::read(ca).expect("the CA file")) },
            )?
        }
        None => redis::Client::open(url)?,
    };
    client.get_multiplexed_async_connection_with_config(&config).await
}

async fn ping(url: &str, ca: Option<&std::path::Path>) -> bool {
    let Ok(mut conn) = connect(url, ca).await else { return false };
    redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
