//! Test harness: a real `redis-server` per test, in-process switchboard
//! instances on port 0, `switchboard` processes, and a real WebSocket client.
//!
//! Set `TEST_LOG=1` to see the servers' logs.

pub mod client;
pub mod process;
pub mod proxy;
pub mod redis_cluster;
pub mod redis_server;
pub mod resuming;
pub mod sentinel;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::config::Settings;
use tokio::net::TcpListener;

pub use client::Client;
pub use process::{switchboard_bin, Process};
pub use proxy::Proxy;
pub use redis_cluster::{ClusterSetup, RedisCluster};
pub use redis_server::{RedisServer, Setup};

/// How long any awaited event may take before a test fails. Generous, for a
/// loaded 2-core machine; tests never sleep for a fixed time.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A switchboard instance running in this process.
pub struct Instance {
    /// The address it listens on.
    pub addr: SocketAddr,
    max_message_bytes: usize,
    /// Shutdown requests, as SIGINT or SIGTERM would make them.
    requests: tokio::sync::mpsc::UnboundedSender<switchboard::app::StopRequest>,
    task: tokio::task::JoinHandle<Result<(), switchboard::app::RunError>>,
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        switchboard::telemetry::init(switchboard::config::LogFormat::Text);
    }
}

/// Settings for tests: port 0, and Redis when `redis_url` is given.
/// With Redis, resume tokens are keyed as `Settings::load` keys them with no
/// secret set: by a key the instances share through Redis.
pub fn settings(redis_url: Option<&str>) -> Settings {
    let mut settings = Settings::default();
    if redis_url.is_some() {
        settings.resume_key = Some(switchboard::auth::ResumeKey::shared());
    }
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_url: redis_url.map(switchboard::config::RedisUrl::new),
        ..settings
    }
}

impl Instance {
    /// Starts an instance with `settings` (its `listen` is ignored: port 0).
    pub async fn start(settings: Settings) -> Self {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, rx) = tokio::sync::mpsc::unbounded_channel();
        let requested = futures_util::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|r| (r, rx)) });
        let max_message_bytes = settings.max_message_bytes;
        let task = tokio::spawn(switchboard::app::run(listener, settings, requested));
        let instance = Self { addr, max_message_bytes, requests, task };
        instance.wait_ready().await;
        instance
    }

    /// An instance relaying in memory.
    pub async fn memory() -> Self {
        Self::start(settings(None)).await
    }

    /// An instance on `redis`.
    pub async fn on(redis: &RedisServer) -> Self {
        Self::start(settings(Some(&redis.url()))).await
    }

    /// `ws://` URL of `/ws` for `user` and `peer`.
    pub fn ws_url(&self, user: &str, peer: &str) -> String {
        format!("ws://{}/ws?userID={user}&peerID={peer}", self.addr)
    }

    /// The instance's message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Status code and body of `GET path`.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        eventually("instance ready", || async { self.get("/readyz").await.0 == 200 }).await;
    }

    /// Connects `user` to the pair with `peer` and reads the welcome.
    pub async fn join(&self, user: &str, peer: &str) -> (Client, serde_json::Value) {
        self.join_with(user, peer, "").await
    }

    /// [`Instance::join`] with `query` appended to the URL (`&resume=1`, say).
    pub async fn join_with(&self, user: &str, peer: &str, query: &str) -> (Client, serde_json::Value) {
        let mut client = Client::connect(&format!("{}{query}", self.ws_url(user, peer))).await.expect("upgrade");
        let welcome = client.recv_json().await;
        assert_eq!(welcome["type"], "welcome", "first frame must be the welcome: {welcome}");
        (client, welcome)
    }

    /// Asks the instance to shut down, as a SIGTERM would, without waiting.
    pub fn request_stop(&self) {
        let _ = self.requests.send(switchboard::app::StopRequest::Terminate);
    }

    /// Asks the instance to shut down, as a Ctrl-C would, without waiting.
    pub fn interrupt(&self) {
        let _ = self.requests.send(switchboard::app::StopRequest::Interrupt);
    }

    /// Shuts the instance down and waits for `run` to return.
    pub async fn stop(self) {
        self.request_stop();
        self.finished().await;
    }

    /// Waits for `run` to return, after a request to stop.
    pub async fn finished(self) {
        tokio::time::timeout(DEADLINE, self.task).await.expect("instance stops").unwrap().unwrap();
    }
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let text = http_get_raw(addr, path).await;
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The whole response to `GET path`: status line, headers and body.
pub async fn http_get_raw(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

/// The head of the response (status line and headers, lowercased) to a raw
/// `request`, which ends with its blank line. Reads only the head, so that an
/// upgraded connection doesn't keep it waiting.
pub async fn http_head_raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let read_head = async {
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            raw.push(byte[0]);
        }
    };
    tokio::time::timeout(DEADLINE, read_head).await.expect("a response head before the deadline");
    String::from_utf8_lossy(&raw).to_ascii_lowercase()
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Instances sharing one broker: one in-memory instance, or several on one Redis.
pub struct Cluster {
    /// The Redis server, for instances on one Redis.
    pub redis: Option<RedisServer>,
    /// The Redis Cluster, for instances in cluster mode.
    pub redis_cluster: Option<RedisCluster>,
    /// The instances.
    pub instances: Vec<Instance>,
}

impl Cluster {
    /// One instance with the in-memory broker.
    pub async fn memory() -> Self {
        Self { redis: None, redis_cluster: None, instances: vec![Instance::memory().await] }
    }

    /// `n` instances on a fresh Redis.
    pub async fn redis(n: usize) -> Self {
        Self::redis_with(n, |_| {}).await
    }

    /// `n` instances on a fresh Redis, with settings adjusted by `tune`.
    pub async fn redis_with(n: usize, tune: impl Fn(&mut Settings)) -> Self {
        let redis = RedisServer::start().await;
        let mut instances = Vec::new();
        for _ in 0..n {
            let mut s = settings(Some(&redis.url()));
            tune(&mut s);
            instances.push(Instance::start(s).await);
        }
        Self { redis: Some(redis), redis_cluster: None, instances }
    }

    /// `n` instances in cluster mode on a fresh 3+3 Redis Cluster.
    pub async fn redis_cluster(n: usize) -> Self {
        Self::redis_cluster_with(n, |_| {}).await
    }

    /// `n` instances on a fresh 3+3 Redis Cluster, with settings adjusted by `tune`.
    pub async fn redis_cluster_with(n: usize, tune: impl Fn(&mut Settings)) -> Self {
        let cluster = RedisCluster::start().await;
        let mut instances = Vec::new();
        for _ in 0..n {
            let mut s = settings(Some(&cluster.urls()));
            s.redis_mode = switchboard::config::RedisMode::Cluster;
            tune(&mut s);
            instances.push(Instance::start(s).await);
        }
        Self { redis: None, redis_cluster: Some(cluster), instances }
    }

    /// One in-memory instance with settings adjusted by `tune`.
    pub async fn memory_with(tune: impl Fn(&mut Settings)) -> Self {
        let mut s = settings(None);
        tune(&mut s);
        Self { redis: None, redis_cluster: None, instances: vec![Instance::start(s).await] }
    }

    /// Instance `i`, wrapping around: every index is the one instance in memory mode.
    pub fn node(&self, i: usize) -> &Instance {
        &self.instances[i % self.instances.len()]
    }
}

/// Runs an `async fn(&Cluster)` test against the in-memory broker and against
/// three instances on one Redis, as two `#[tokio::test]`s in a module of its name.
#[macro_export]
macro_rules! both_brokers {
    ($($name:ident),+ $(,)?) => {$(
        $crate::broker_tests!($name: memory => memory(), redis => redis(3));
    )+};
}

/// As [`both_brokers!`], and a third test against three instances on a 3+3
/// Redis Cluster (sharded pub/sub, hash-tagged names).
#[macro_export]
macro_rules! every_broker {
    ($($name:ident),+ $(,)?) => {$(
        $crate::broker_tests!($name: memory => memory(), redis => redis(3), redis_cluster => redis_cluster(3));
    )+};
}

/// The module of [`both_brokers!`] and [`every_broker!`]: one test per
/// `Cluster` constructor.
#[doc(hidden)]
#[macro_export]
macro_rules! broker_tests {
    ($name:ident: $($test:ident => $make:ident($($arg:expr)?)),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$name(&$crate::Cluster::$make($($arg)?).await).await
                }
            )+
        }
    };
}

/// The value of `series` (name with its labels, as rendered) in Prometheus
/// text, or `None` when absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// An offer from `alice` and an answer from `bob`, each the next thing the
/// other hears (tagged with `tag`).
pub async fn relays_both_ways(alice: &mut Client, bob: &mut Client, tag: &str) {
    use serde_json::json;
    alice.send(json!({"type": "offer", "tag": tag}).to_string()).await;
    assert_eq!(bob.recv_json().await, json!({"type": "offer", "tag": tag}));
    bob.send(json!({"type": "answer", "tag": tag}).to_string()).await;
    assert_eq!(alice.recv_json().await, json!({"type": "answer", "tag": tag}));
}

impl Cluster {
    /// Alice on node 0 and Bob on node 1, after Alice has seen Bob join.
    pub async fn alice_and_bob(&self) -> (Client, Client) {
        let (mut alice, _) = self.node(0).join("alice", "bob").await;
        let (bob, _) = self.node(1).join("bob", "alice").await;
        assert_eq!(alice.recv_json().await["type"], "peer-joined");
        (alice, bob)
    }
}
