//! A Sentinel-managed Redis: a master, a replica and three Sentinels, all
//! private processes on free ports, each Sentinel with its own config file
//! in a temporary directory. Every process is stopped by its PID on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::redis_server::{free_port, RedisServer, Setup};
use crate::{eventually, DEADLINE};

/// The master set's name.
pub const MASTER: &str = "switchboard-test";

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
}

/// A connection to `url` with no timeouts (a loaded machine answers late).
async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None);
    redis::Client::open(url).ok()?.get_multiplexed_async_connection_with_config(&config).await.ok()
}

impl Sentinels {
    /// Starts the master, the replica and the Sentinels (quorum 2, master
    /// down after 1 s, failover timeout 3 s), and waits until the replica is
    /// in sync and every Sentinel knows the replica and the other two.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // The replica writes the RDB it receives into its working directory.
        let at_dir = |name: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            vec!["--dir".to_owned(), path.display().to_string()]
        };
        let master = RedisServer::start_with(Setup { args: at_dir("master"), ..Setup::default() }).await;
        let mut args = at_dir("replica");
        args.extend(["--replicaof".into(), "127.0.0.1".into(), master.port().to_string()]);
        let replica = RedisServer::start_with(Setup { args, ..Setup::default() }).await;
        let mut set = Self { master: Some(master), replica, sentinels: Vec::new(), dir };
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
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel-{i}.log\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n",
                dir = self.dir.path().display(),
            );
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
                if let Some(mut conn) = connect(&sentinel.url()).await {
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
                let Some(mut conn) = connect(&sentinel.url()).await else { return false };
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

    /// The Sentinels' URLs, comma-separated, as `SWITCHBOARD_REDIS_URL` takes them.
    pub fn urls(&self) -> String {
        self.sentinels.iter().map(Sentinel::url).collect::<Vec<_>>().join(",")
    }

    /// The master's port as the first Sentinel names it now.
    pub async fn master_port(&self) -> Option<u16> {
        let mut conn = connect(&self.sentinels[0].url()).await?;
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

impl Sentinel {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
