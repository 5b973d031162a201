//! A private `redis-server` process on a free port, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `redis-server` owned by one test.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    setup: Setup,
}

/// What a test's `redis-server` is told besides its port, and how the test's
/// own connections reach it.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// More command-line arguments (`--replicaof …`, `--user …`).
    pub args: Vec<String>,
    /// The user and password of the test's own connections, if the default
    /// user is not theirs.
    pub login: Option<(String, String)>,
    /// TLS only: the plain port is off, and the server listens for TLS.
    pub tls: Option<TlsFiles>,
}

/// The files of a TLS-only server.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signed it (PEM).
    pub ca: PathBuf,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `program` as a Redis server on `port`, set up as `setup` says, or
/// fails the test with what to install.
fn spawn_with(program: &str, port: u16, setup: &Setup) -> Child {
    let mut command = Command::new(program);
    match &setup.tls {
        None => command.args(["--port", &port.to_string()]),
        Some(files) => command
            .args(["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&files.cert)
            .arg("--tls-key-file")
            .arg(&files.key)
            .arg("--tls-ca-cert-file")
            .arg(&files.ca),
    };
    let spawned = command
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--loglevel", "warning"])
        .args(&setup.args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} not found on PATH: apt-get install redis-server")
        }
        Err(e) => panic!("cannot start {program}: {e}"),
    }
}

/// No connect or response timeouts: on a loaded machine an assertion waits
/// for its answer rather than fail on redis-rs's defaults (1 s, 500 ms).
fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None)
}

impl RedisServer {
    /// A Redis broker on this server (two lanes, 30 s presence, its own
    /// empty registry), as an instance starts it; cancel the token to stop it.
    pub async fn broker(
        &self,
        prefix: &str,
    ) -> (switchboard::broker::redis::RedisBroker, tokio_util::sync::CancellationToken) {
        use switchboard::broker::redis::{RedisBroker, RedisOptions};
        let stop = tokio_util::sync::CancellationToken::new();
        let options = RedisOptions {
            target: switchboard::broker::target::Target::standalone(&self.url(), None).expect("target"),
            prefix: prefix.into(),
            presence_ttl: Duration::from_secs(30),
            pool_size: 2,
        };
        let registry = std::sync::Arc::new(switchboard::session::registry::Registry::new());
        let tracker = tokio_util::task::TaskTracker::new();
        let started = RedisBroker::start(options, registry, stop.clone(), &tracker, Duration::from_secs(5)).await;
        (started.expect("broker"), stop)
    }

    /// Starts `redis-server` on a free port and waits until it answers PING.
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    /// Starts `redis-server` set up as `setup` says on a free port, and waits
    /// until it answers PING.
    pub async fn start_with(setup: Setup) -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Self::start_on(port, setup.clone()).await {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed?)");
    }

    /// Starts `redis-server` on `port`; `None` if it did not come up.
    pub async fn start_on(port: u16, setup: Setup) -> Option<Self> {
        let child = spawn_with("redis-server", port, &setup);
        let mut server = Self { port, child: Some(child), setup };
        let deadline = tokio::time::Instant::now() + crate::DEADLINE;
        while tokio::time::Instant::now() < deadline {
            if server.child.as_mut().unwrap().try_wait().ok().flatten().is_some() {
                return None; // exited: port taken
            }
            if server.ping().await {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the test's own connections: `redis://127.0.0.1:{port}`,
    /// `rediss://` for a TLS server, with the login of its [`Setup`].
    pub fn url(&self) -> String {
        let scheme = if self.setup.tls.is_some() { "rediss" } else { "redis" };
        let login = match &self.setup.login {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        format!("{scheme}://{login}127.0.0.1:{}", self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.setup.tls {
            None => redis::Client::open(self.url()),
            Some(files) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let root_cert = Some(std::fs::read(&files.ca).expect("the CA file"));
                redis::Client::build_with_tls(self.url(), redis::TlsCertificates { client_tls: None, root_cert })
            }
        }
    }

    async fn ping(&self) -> bool {
        let Ok(client) = self.client() else { return false };
        let Ok(mut conn) = client.get_multiplexed_async_connection_with_config(&patient()).await else { return false };
        redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
    }

    /// A fresh connection for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client().unwrap().get_multiplexed_async_connection_with_config(&patient()).await.unwrap()
    }

    /// `PUBSUB NUMSUB channel`.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut self.conn().await).await.unwrap();
        n
    }

    /// Number of pub/sub client connections.
    pub async fn pubsub_clients(&self) -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        list.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port after [`RedisServer::kill`].
    pub async fn restart(&mut self) {
        self.kill();
        let again = Self::start_on(self.port, self.setup.clone()).await.expect("redis-server restarts on its port");
        self.child = Some(again.into_child());
    }

    fn into_child(mut self) -> Child {
        self.child.take().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "no-such-redis-server not found on PATH: apt-get install redis-server")]
    fn a_missing_redis_server_says_what_to_install() {
        let mut child = super::spawn_with("no-such-redis-server", 1, &super::Setup::default());
        let _ = child.kill();
        let _ = child.wait();
    }
}
