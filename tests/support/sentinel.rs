//! A Sentinel-managed Redis: a master, a replica and three Sentinels, all
//! private processes on free ports, each Sentinel with its own config file
//! in a temporary directory. Every process is stopped by its PID on drop.
//! Optionally the data nodes and the Sentinels each require a login of
//! their own, and everything speaks TLS only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::redis_server::{free_port, RedisServer, Setup, TlsFiles};
use crate::{eventually, DEADLINE};

/// The master set's name.
pub const MASTER: &str = "switchboard-test";

/// The Sentinels' own user, with every right: they log in to each other
/// with it (`sentinel sentinel-user`), and so does the harness.
const SENTINEL_ADMIN: &str = "sentinel-admin";

/// How a Sentinel set is set up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct SentinelSetup {
    /// An ACL user (user, password) of the master and replica, with every
    /// right; their default user is off. The replica replicates as it
    /// (`masteruser`), the Sentinels watch the master as it (`sentinel
    /// auth-user`), and instances log in to the master as it.
    pub data_login: Option<(String, String)>,
    /// A login (user, password) that the Sentinels require; their default
    /// user is off. The user may only ask for the master's address
    /// (`+sentinel|get-master-addr-by-name`): [`Sentinels::urls`] carry it.
    pub sentinel_login: Option<(String, String)>,
    /// TLS only, for clients, replication and between Sentinels (plain ports off).
    pub tls: Option<TlsFiles>,
}

/// One Sentinel process.
struct Sentinel {
    port: u16,
    child: Child,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A master, its replica and three Sentinels watching them.
pub struct Sentinels {
    /// The master the Sentinels start with (`None` once killed).
    pub master: Option<RedisServer>,
    /// Its replica, the one the Sentinels promote when the master dies.
    pub replica: RedisServer,
    sentinels: Vec<Sentinel>,
    dir: tempfile::TempDir,
    setup: SentinelSetup,
}

/// A connection to `url` (trusting `ca` for `rediss://`) with no timeouts
/// (a loaded machine answers late).
async fn connect(url: &str, ca: Option<&Path>) -> Option<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None);
    let client = match ca {
        None => redis::Client::open(url).ok()?,
        Some(ca) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let root_cert = Some(std::fs::read(ca).expect("the CA file"));
            redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert }).ok()?
        }
    };
    client.get_multiplexed_async_connection_with_config(&config).await.ok()
}

impl Sentinels {
    /// Starts the master, the replica and the Sentinels (quorum 2, master
    /// down after 1 s, failover timeout 3 s), and waits until the replica is
    /// in sync and every Sentinel knows the replica and the other two.
    pub async fn start() -> Self {
        Self::start_with(SentinelSetup::default()).await
    }

    /// As [`Sentinels::start`], with logins or TLS.
    pub async fn start_with(setup: SentinelSetup) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // The replica writes the RDB it receives into its working directory.
        let at_dir = |name: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            vec!["--dir".to_owned(), path.display().to_string()]
        };
        let mut common = Vec::new();
        if let Some((user, password)) = &setup.data_login {
            common.extend(["--user", user, "on", &format!(">{password}"), "~*", "&*", "+@all"].map(String::from));
            common
                .extend(["--user", "default", "off", "--masteruser", user, "--masterauth", password].map(String::from));
        }
        if setup.tls.is_some() {
            common.extend(["--tls-replication".into(), "yes".into()]);
        }
        let node = |args: Vec<String>| Setup {
            args: [common.clone(), args].concat(),
            login: setup.data_login.clone(),
            tls: setup.tls.clone(),
        };
        let master = RedisServer::start_with(node(at_dir("master"))).await;
        let mut args = at_dir("replica");
        args.extend(["--replicaof".into(), "127.0.0.1".into(), master.port().to_string()]);
        let replica = RedisServer::start_with(node(args)).await;
        let mut set = Self { master: Some(master), replica, sentinels: Vec::new(), dir, setup };
        for i in 0..3 {
            let sentinel = set.start_sentinel(i).await;
            set.sentinels.push(sentinel);
        }
        set.wait_settled().await;
        set
    }

    async fn start_sentinel(&self, i: usize) -> Sentinel {
        let master_port = self.master.as_ref().unwrap().port();
        for _ in 0..5 {
            let port = free_port();
            let conf = self.dir.path().join(format!("sentinel-{i}.conf"));
            // Sentinel rewrites its file as it learns: it must be its own and writable.
            let mut text = match &self.setup.tls {
                None => format!("port {port}\n"),
                Some(tls) => format!(
                    "port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients no\n\
                     tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n",
                    tls.cert.display(),
                    tls.key.display(),
                    tls.ca.display()
                ),
            };
            text += &format!(
                "bind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel-{i}.log\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n",
                dir = self.dir.path().display(),
            );
            if let Some((user, password)) = &self.setup.data_login {
                text += &format!("sentinel auth-user {MASTER} {user}\nsentinel auth-pass {MASTER} {password}\n");
            }
            if let Some((user, password)) = &self.setup.sentinel_login {
                let admin = admin_password(password);
                text += &format!(
                    "user {SENTINEL_ADMIN} on >{admin} ~* &* +@all\n\
                     user {user} on >{password} +sentinel|get-master-addr-by-name\n\
                     user default off\n\
                     sentinel sentinel-user {SENTINEL_ADMIN}\nsentinel sentinel-pass {admin}\n"
                );
            }
            std::fs::write(&conf, text).unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            let mut sentinel = Sentinel { port, child };
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while tokio::time::Instant::now() < deadline {
                if sentinel.child.try_wait().ok().flatten().is_some() {
                    break; // exited: port taken
                }
                if let Some(mut conn) = self.admin(&sentinel).await {
                    if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                        return sentinel;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = sentinel.child.kill();
        }
        panic!("could not start a Sentinel");
    }

    /// Waits until the replica is in sync with the master, and every
    /// Sentinel knows the replica and the two other Sentinels (so that a
    /// failover can be authorised).
    async fn wait_settled(&self) {
        eventually("the replica in sync", || async {
            let info: String =
                redis::cmd("INFO").arg("replication").query_async(&mut self.replica.conn().await).await.unwrap();
            info.contains("master_link_status:up")
        })
        .await;
        for sentinel in &self.sentinels {
            eventually("each Sentinel knows the replica and the other Sentinels", || async {
                let Some(mut conn) = self.admin(sentinel).await else { return false };
                let replicas: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER).query_async(&mut conn).await.unwrap();
                let others: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER).query_async(&mut conn).await.unwrap();
                let quorum = redis::cmd("SENTINEL").arg("CKQUORUM").arg(MASTER).query_async::<String>(&mut conn).await;
                replicas.len() == 1 && others.len() == 2 && quorum.is_ok()
            })
            .await;
        }
    }

    /// The Sentinels' URLs, comma-separated, as `SWITCHBOARD_REDIS_URL` takes
    /// them: `rediss://` with TLS, and with the [`SentinelSetup::sentinel_login`].
    pub fn urls(&self) -> String {
        let login = self.setup.sentinel_login.as_ref().map(|(user, password)| (user.as_str(), password.as_str()));
        self.sentinels.iter().map(|s| self.url(s, login)).collect::<Vec<_>>().join(",")
    }

    /// The Sentinels' URLs with another login (user, password), or none.
    pub fn urls_as(&self, login: Option<(&str, &str)>) -> String {
        self.sentinels.iter().map(|s| self.url(s, login)).collect::<Vec<_>>().join(",")
    }

    /// The Sentinels' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    fn url(&self, sentinel: &Sentinel, login: Option<(&str, &str)>) -> String {
        let scheme = if self.setup.tls.is_some() { "rediss" } else { "redis" };
        let login = login.map(|(user, password)| format!("{user}:{password}@")).unwrap_or_default();
        format!("{scheme}://{login}127.0.0.1:{}", sentinel.port)
    }

    /// The CA file, with TLS.
    pub fn ca(&self) -> Option<PathBuf> {
        self.setup.tls.as_ref().map(|t| t.ca.clone())
    }

    /// A connection to `sentinel` as its admin user (or none).
    async fn admin(&self, sentinel: &Sentinel) -> Option<redis::aio::MultiplexedConnection> {
        let password = self.setup.sentinel_login.as_ref().map(|(_, password)| admin_password(password));
        let url = self.url(sentinel, password.as_deref().map(|p| (SENTINEL_ADMIN, p)));
        connect(&url, self.ca().as_deref()).await
    }

    /// The master's port as the first Sentinel names it now.
    pub async fn master_port(&self) -> Option<u16> {
        let mut conn = self.admin(&self.sentinels[0]).await?;
        let addr: Option<(String, u16)> =
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER).query_async(&mut conn).await.ok()?;
        addr.map(|(_, port)| port)
    }

    /// Kills the master (SIGKILL).
    pub fn kill_master(&mut self) {
        if let Some(mut master) = self.master.take() {
            master.kill();
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        // A failed test shows what the Sentinels did.
        if std::thread::panicking() {
            for i in 0..self.sentinels.len() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("sentinel-{i}.log")));
                eprintln!("--- sentinel {i} ---\n{}", log.unwrap_or_default());
            }
        }
    }
}

/// The Sentinels' admin password, made from the password of their login.
fn admin_password(password: &str) -> String {
    format!("{password}-admin")
}
