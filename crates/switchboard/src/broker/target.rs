//! Where the Redis broker connects: one server (standalone), whichever
//! server the Sentinels name as the master right now, or a Redis Cluster
//! (seed nodes; see [`super::cluster`]).
//!
//! In Sentinel mode every connection (the subscriber's and each lane's) asks
//! the Sentinels for the master's address when it connects or reconnects,
//! and checks with `ROLE` that the server it reached is a master: during a
//! failover a Sentinel may still name the old one for a moment, and a
//! publication on a replica would reach only that replica's subscribers.
//! Sentinel demotes the old master by disconnecting its clients, so both
//! kinds of connection come back through here.
//!
//! The Sentinels and the data nodes (master and replicas) may want different
//! logins: the Sentinel URLs' `user:password@` is what the Sentinels get, and
//! a [`Login`] given to [`Target::sentinel`] is what the master gets. Without
//! one the master gets the login of the Sentinel URL that named it, as it
//! did before the two could differ. TLS is the same for both: a `rediss://`
//! Sentinel URL means a TLS master.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use super::pubsub::{self, Endpoint};
use super::tls::Tls;
use super::BrokerError;
use crate::config::Login;

/// Time allowed for a command connection's TCP, TLS and login, and for asking the Sentinels.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest wait between the subscriber's reconnects in Sentinel mode.
pub const SENTINEL_MAX_BACKOFF: Duration = Duration::from_millis(500);

/// A command connection, and whether it is known to be closed.
pub struct Connection {
    /// The connection; clones share it.
    pub conn: MultiplexedConnection,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// Whether the connection ended (Redis closed it, it was reset): a
    /// command sent on it now would fail without reaching Redis. A lane
    /// that idled through a restart, a failover or Redis's idle `timeout`
    /// connects anew instead of failing its next batch.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// How to reach the Redis that takes this instance's commands and subscriptions.
#[derive(Clone)]
pub struct Target {
    kind: Kind,
    tls: Option<Tls>,
    /// Bumped by the subscriber whenever a cluster's slot map changes
    /// (shared by clones): lanes then open new cluster connections, which
    /// read the new map, rather than keep sending to a master that froze
    /// until it wakes up and answers `MOVED`.
    topology: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Kind {
    Standalone(ConnectionInfo),
    Sentinel {
        /// The Sentinels, asked in turn.
        sentinels: Vec<ConnectionInfo>,
        /// The master set's name.
        master: String,
        /// How to log in to the master, if not as to the Sentinels.
        master_login: Option<RedisConnectionInfo>,
    },
    Cluster {
        /// Nodes to ask for the slot map.
        seeds: Vec<ConnectionInfo>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Standalone(info) => write!(f, "{}", describe(info)),
            Kind::Sentinel { sentinels, master, master_login } => {
                let list: Vec<String> = sentinels.iter().map(describe).collect();
                let login = if master_login.is_some() { " (master login of its own)" } else { "" };
                write!(f, "master {master:?}{login} of sentinels {}", list.join(","))
            }
            Kind::Cluster { seeds } => {
                let list: Vec<String> = seeds.iter().map(describe).collect();
                write!(f, "cluster seeds {}", list.join(","))
            }
        }
    }
}

/// An address without credentials, for logs and errors.
pub fn describe(info: &ConnectionInfo) -> String {
    match Endpoint::from_info(info) {
        Ok(endpoint) => endpoint.to_string(),
        Err(_) => "an unsupported address".into(),
    }
}

/// Parses one `redis://` or `rediss://` URL; the error never repeats the URL
/// (it may hold a password).
pub fn parse(url: &str) -> Result<ConnectionInfo, BrokerError> {
    url.trim().into_connection_info().map_err(|_| BrokerError::Connect("not a redis:// or rediss:// URL".into()))
}

impl Target {
    /// One server at `url`.
    pub fn standalone(url: &str, tls: Option<Tls>) -> Result<Self, BrokerError> {
        Ok(Self { kind: Kind::Standalone(parse(url)?), tls, topology: Arc::default() })
    }

    /// The master named `master` by the Sentinels at `urls` (comma-separated).
    /// The master is reached with the Sentinels' TLS, and with `master_login`
    /// if given, else with the login of the Sentinel URL that named it.
    pub fn sentinel(
        urls: &str,
        master: &str,
        master_login: Option<&Login>,
        tls: Option<Tls>,
    ) -> Result<Self, BrokerError> {
        let sentinels = urls.split(',').filter(|u| !u.trim().is_empty()).map(parse).collect::<Result<Vec<_>, _>>()?;
        if sentinels.is_empty() {
            return Err(BrokerError::Connect("no Sentinel URL".into()));
        }
        let master_login = master_login.map(|login| {
            let first = sentinels[0].redis_settings();
            let settings = RedisConnectionInfo::default()
                .set_db(first.db())
                .set_protocol(first.protocol())
                .set_password(login.password());
            match &login.username {
                Some(user) => settings.set_username(user),
                None => settings,
            }
        });
        Ok(Self {
            kind: Kind::Sentinel { sentinels, master: master.to_owned(), master_login },
            tls,
            topology: Arc::default(),
        })
    }

    /// The Redis Cluster whose seed nodes are `urls` (comma-separated).
    /// Every node is reached with the seeds' credentials and TLS.
    pub fn cluster(urls: &str, tls: Option<Tls>) -> Result<Self, BrokerError> {
        let seeds = urls.split(',').filter(|u| !u.trim().is_empty()).map(parse).collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(BrokerError::Connect("no cluster seed URL".into()));
        }
        Ok(Self { kind: Kind::Cluster { seeds }, tls, topology: Arc::default() })
    }

    /// The cluster's slot map changed.
    pub fn topology_changed(&self) {
        self.topology.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the slot map changed.
    pub fn topology(&self) -> u64 {
        self.topology.load(Ordering::Relaxed)
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// Whether connections must check that their server is a master.
    pub fn checks_master(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// The nodes to ask for a cluster's slot map: `prefer` first, then the seeds.
    pub fn cluster_nodes(&self, prefer: &[(String, u16)]) -> Vec<ConnectionInfo> {
        let Kind::Cluster { seeds } = &self.kind else { return Vec::new() };
        let mut nodes: Vec<ConnectionInfo> =
            prefer.iter().map(|(host, port)| with_address(&seeds[0], host, *port)).collect();
        nodes.extend(seeds.iter().cloned());
        nodes
    }

    /// The subscriber endpoint of a cluster node at `host:port`, with the seeds' credentials.
    pub fn node_endpoint(&self, host: &str, port: u16) -> Result<Endpoint, BrokerError> {
        let Kind::Cluster { seeds } = &self.kind else {
            return Err(BrokerError::Connect("not a cluster".into()));
        };
        Endpoint::from_info(&with_address(&seeds[0], host, port))
    }

    /// A redis-rs cluster client for commands (MOVED and ASK handled by redis-rs).
    pub fn cluster_client(&self, timeout: Duration) -> Result<redis::cluster::ClusterClient, BrokerError> {
        let Kind::Cluster { seeds } = &self.kind else {
            return Err(BrokerError::Connect("not a cluster".into()));
        };
        // One retry: a command to a master that stopped answering fails
        // within seconds, and its lane reconnects (see `topology`).
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1);
        if let Some(pem) = self.tls.as_ref().and_then(Tls::ca_pem) {
            builder = builder.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) });
        }
        builder.build().map_err(|e| BrokerError::Connect(format!("cluster client: {e}")))
    }

    /// The longest the subscriber should wait between reconnects. In
    /// Sentinel mode a lost master is replaced within seconds of the
    /// Sentinels' `down-after-milliseconds`, and asking them is cheap: at
    /// most [`SENTINEL_MAX_BACKOFF`], so that the subscriber is back soon
    /// after the promotion rather than up to its usual longest backoff later.
    pub fn max_backoff(&self) -> Duration {
        match self.kind {
            Kind::Standalone(_) => Duration::MAX,
            Kind::Sentinel { .. } => SENTINEL_MAX_BACKOFF,
            Kind::Cluster { .. } => Duration::MAX,
        }
    }

    /// The TLS set-up, if any.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The server to use now: the standalone one, or the current master.
    pub async fn server(&self, timeout: Duration) -> Result<ConnectionInfo, BrokerError> {
        match &self.kind {
            Kind::Standalone(info) => Ok(info.clone()),
            Kind::Sentinel { sentinels, master, master_login } => {
                let server = self.ask_sentinels(sentinels, master, timeout).await?;
                Ok(match master_login {
                    Some(login) => server.set_redis_settings(login.clone()),
                    None => server,
                })
            }
            Kind::Cluster { seeds } => Ok(seeds[0].clone()),
        }
    }

    async fn ask_sentinels(
        &self,
        sentinels: &[ConnectionInfo],
        master: &str,
        timeout: Duration,
    ) -> Result<ConnectionInfo, BrokerError> {
        let mut last = BrokerError::Connect("no Sentinel answered".into());
        for sentinel in sentinels {
            let asked = async {
                let mut conn = self.connect_to(sentinel.clone(), &config(timeout)).await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master)
                    .query_async(&mut conn.conn)
                    .await
                    .map_err(|e| BrokerError::Connect(format!("sentinel {}: {e}", describe(sentinel))))?;
                addr.ok_or_else(|| {
                    BrokerError::Connect(format!("sentinel {} knows no master {master:?}", describe(sentinel)))
                })
            };
            match asked.await {
                Ok((host, port)) => return Ok(with_address(sentinel, &host, port)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A command connection to the current server, checked to be a master
    /// in Sentinel mode.
    pub async fn command_connection(&self, config: &AsyncConnectionConfig) -> Result<Connection, BrokerError> {
        let server = self.server(CONNECT_TIMEOUT).await?;
        let mut conn = self.connect_to(server.clone(), config).await?;
        if matches!(self.kind, Kind::Sentinel { .. }) {
            check_role(&server, &mut conn.conn).await?;
        }
        Ok(conn)
    }

    /// A command connection to `info`, over the same TCP and TLS code as the
    /// subscriber's; redis-rs authenticates it and drives it on a task of its own.
    pub async fn connect_to(
        &self,
        info: ConnectionInfo,
        config: &AsyncConnectionConfig,
    ) -> Result<Connection, BrokerError> {
        let endpoint = Endpoint::from_info(&info)?;
        let timeout = CONNECT_TIMEOUT;
        let connected = tokio::time::timeout(timeout, async {
            let stream = pubsub::connect(&endpoint, self.tls.as_ref()).await?;
            MultiplexedConnection::new_with_config(info.redis_settings(), stream, config.clone())
                .await
                .map_err(|e| BrokerError::Connect(format!("{endpoint}: {e}")))
        });
        let (conn, driver) = connected
            .await
            .unwrap_or_else(|_| Err(BrokerError::Connect(format!("{endpoint}: no answer within {timeout:?}"))))?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        // The driver reads every reply; it ends when the connection does
        // (closed by Redis, reset, or every handle dropped).
        tokio::spawn(async move {
            driver.await;
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Connection { conn, closed })
    }
}

/// Connect and response timeouts of `timeout`.
pub fn config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout))
}

/// The host name of `info`'s address.
pub fn host_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    }
}

/// `info` (credentials, TLS) at another address.
pub fn with_address(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

/// Asks `conn` (to `server`) for its `ROLE`; fails unless it is a master.
pub async fn check_role(server: &ConnectionInfo, conn: &mut MultiplexedConnection) -> Result<(), BrokerError> {
    let role: redis::Value = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(|e| BrokerError::Connect(format!("{}: ROLE: {e}", describe(server))))?;
    check_master(server, &role)
}

/// Fails unless `role` (a `ROLE` reply) says master.
fn check_master(server: &ConnectionInfo, role: &redis::Value) -> Result<(), BrokerError> {
    let first = match role {
        redis::Value::Array(parts) => parts.first(),
        _ => None,
    };
    match first {
        Some(redis::Value::BulkString(kind)) if kind == b"master" => Ok(()),
        _ => Err(BrokerError::Connect(format!("{} is not a master (yet)", describe(server)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_mode_reconnects_sooner() {
        let sentinel = Target::sentinel("redis://127.0.0.1:26000,redis://127.0.0.1:26001", "m", None, None).unwrap();
        assert_eq!(sentinel.max_backoff(), SENTINEL_MAX_BACKOFF);
        let standalone = Target::standalone("redis://127.0.0.1:7000", None).unwrap();
        assert_eq!(standalone.max_backoff(), Duration::MAX);
    }

    #[test]
    fn without_a_master_login_the_master_gets_the_sentinels_credentials_and_tls() {
        let sentinel = parse("rediss://user:pw@127.0.0.1:26000").unwrap();
        let master = Endpoint::from_info(&with_address(&sentinel, "10.0.0.5", 6380)).unwrap();
        assert_eq!((master.host.as_str(), master.port, master.tls), ("10.0.0.5", 6380, true));
        assert_eq!((master.username.as_deref(), master.password.as_deref()), (Some("user"), Some("pw")));
        assert_eq!(
            format!("{:?}", Target::sentinel("redis://u:secret@h:1", "m", None, None).unwrap()),
            "master \"m\" of sentinels redis://h:1"
        );
    }

    /// The master login replaces the Sentinel URL's whole login (a password
    /// alone logs in as the default user), and is shown nowhere.
    #[test]
    fn a_master_login_replaces_the_sentinels_and_is_never_shown() {
        let Kind::Sentinel { master_login, .. } = Target::sentinel(
            "rediss://watcher:sentinel-pw@127.0.0.1:26000/2",
            "m",
            Some(&Login::new(None, "master-pw".into())),
            None,
        )
        .unwrap()
        .kind
        else {
            unreachable!()
        };
        let sentinel = parse("rediss://watcher:sentinel-pw@127.0.0.1:26000/2").unwrap();
        let info = with_address(&sentinel, "10.0.0.5", 6380).set_redis_settings(master_login.unwrap());
        let master = Endpoint::from_info(&info).unwrap();
        assert_eq!((master.host.as_str(), master.port, master.tls), ("10.0.0.5", 6380, true));
        assert_eq!((master.username.as_deref(), master.password.as_deref()), (None, Some("master-pw")));
        assert_eq!(info.redis_settings().db(), 2);

        let login = Login::new(Some("switchboard".into()), "master-secret".into());
        let target = Target::sentinel("redis://u:sentinel-secret@h:1", "m", Some(&login), None).unwrap();
        for shown in [format!("{target:?}"), format!("{login:?}"), format!("{:?}", Endpoint::from_info(&info).unwrap())]
        {
            assert!(!shown.contains("secret") && !shown.contains("master-pw"), "{shown}");
        }
        assert_eq!(format!("{target:?}"), "master \"m\" (master login of its own) of sentinels redis://h:1");
    }
}
