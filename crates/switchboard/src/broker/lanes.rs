//! Command lanes: a few tasks, each keeping one Redis connection for as long
//! as it works and sending everything queued for it as one pipeline.
//!
//! A lane connects when it first has work, keeps that connection, and
//! connects again only after a command failed on it, or when the connection
//! ended while the lane idled (see [`super::target::Connection::is_closed`]). It batches: one write
//! and one round trip carry every command that queued up meanwhile. Commands
//! for one channel always use the same lane, and a lane sends in queue order
//! over one connection, so Redis sees each session's commands in the order it
//! sent them.
//!
//! Why a plain [`redis::aio::MultiplexedConnection`] per lane rather than a pool or
//! redis-rs's `ConnectionManager`:
//! - A lane holds one connection at a time, for as long as it works. A pool
//!   (deadpool-redis, before) only ever made connections for the lanes; its
//!   checkout, wait and recycle machinery had nothing to do.
//! - `ConnectionManager` reconnects by itself after a failure, but when a
//!   reconnect attempt fails it hands that stale error to the next command
//!   and only then tries again. Without retries, the first batch after Redis
//!   comes back would fail; with retries, commands would wait through them
//!   while Redis is down instead of failing at once, so senders would not
//!   hear of the outage. A lane that connects when it has work fails fast
//!   while Redis is down and succeeds with its first batch once Redis is back.
//!
//! A command either waits for its reply ([`Lanes::call`]: presence, joins) or
//! is sent and forgotten ([`Lanes::send`]: relayed messages). A forgotten
//! command that fails is reported to its origin, so the session reading the
//! socket never waits for Redis and wakes up once per message, not twice.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use redis::AsyncConnectionConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::target::{Connection, Target};
use super::{BrokerError, RelayFailure, Waiting};

/// Most commands sent as one pipeline.
const MAX_BATCH: usize = 256;

struct Job {
    cmd: redis::Cmd,
    reply: Reply,
}

/// Where a command's outcome goes.
enum Reply {
    /// Someone awaits the reply.
    Wait(oneshot::Sender<Result<redis::Value, BrokerError>>),
    /// A relayed message: only a failure is told, to the session that sent it.
    Tell { origin: Arc<dyn RelayFailure>, len: usize, queued_at: Instant },
}

impl Reply {
    fn finish(self, result: Result<redis::Value, BrokerError>) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            Reply::Tell { origin, len, queued_at } => match result {
                Ok(_) => crate::metrics::publish_latency(queued_at.elapsed()),
                Err(e) => origin.relay_failed(&e, len),
            },
        }
    }
}

/// The lanes of one instance.
pub struct Lanes {
    senders: Vec<mpsc::Sender<Job>>,
}

impl Lanes {
    /// Starts `count` lanes on `tracker`, each with a queue of `depth`
    /// commands and its own connection to `target`, made with `config`.
    pub fn start(
        target: Target,
        config: AsyncConnectionConfig,
        count: usize,
        depth: usize,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let senders = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(depth.max(1));
                tracker.spawn(run(target.clone(), config.clone(), rx, stop.clone()));
                tx
            })
            .collect();
        Self { senders }
    }

    fn lane(&self, key: &str) -> &mpsc::Sender<Job> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.senders[(hasher.finish() % self.senders.len() as u64) as usize]
    }

    /// Sends `cmd` on the lane of `key` and waits for its reply.
    pub async fn call(&self, key: &str, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.lane(key).send(Job { cmd, reply: Reply::Wait(reply) }).await.map_err(|_| BrokerError::Disconnected)?;
        answer.await.map_err(|_| BrokerError::Disconnected)?
    }

    /// Queues `cmd` (a relayed envelope of `len` bytes) on the lane of `key`
    /// without waiting for its reply. Only when the lane's queue is full is
    /// there something to wait for, returned for the caller to await. A
    /// failure is told to `origin`.
    pub fn send(&self, key: &str, cmd: redis::Cmd, len: usize, origin: Arc<dyn RelayFailure>) -> Option<Waiting> {
        let job = Job { cmd, reply: Reply::Tell { origin, len, queued_at: Instant::now() } };
        let lane = self.lane(key);
        match lane.try_send(job) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(job)) => {
                let lane = lane.clone();
                Some(Box::pin(async move {
                    if let Err(mpsc::error::SendError(job)) = lane.send(job).await {
                        job.reply.finish(Err(BrokerError::Disconnected));
                    }
                }))
            }
            Err(mpsc::error::TrySendError::Closed(job)) => {
                job.reply.finish(Err(BrokerError::Disconnected));
                None
            }
        }
    }
}

async fn run(target: Target, config: AsyncConnectionConfig, mut queue: mpsc::Receiver<Job>, stop: CancellationToken) {
    let mut conn: Option<Connection> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            n = queue.recv_many(&mut batch, MAX_BATCH) => n,
        };
        if received == 0 {
            return;
        }
        if conn.as_ref().is_some_and(Connection::is_closed) {
            // It died while the lane idled (a restart, a failover, Redis's
            // idle timeout): nothing was sent on it, so connect anew now.
            conn = None;
        }
        let connection = match conn.as_mut() {
            Some(c) => &mut c.conn,
            None => match target.command_connection(&config).await {
                Ok(c) => &mut conn.insert(c).conn,
                Err(e) => {
                    let why = match e {
                        BrokerError::Connect(why) => why,
                        e => e.to_string(),
                    };
                    for job in batch.drain(..) {
                        job.reply.finish(Err(BrokerError::Connect(why.clone())));
                    }
                    continue;
                }
            },
        };
        // Each command gets its own reply: one failing command fails only its job.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in &mut batch {
            pipe.add_command(std::mem::replace(&mut job.cmd, redis::Cmd::new()));
        }
        match pipe.query_async::<Vec<redis::Value>>(connection).await {
            Ok(values) => {
                for (job, value) in batch.drain(..).zip(values) {
                    let reply = match value {
                        redis::Value::ServerError(e) => Err(BrokerError::Redis(e.into())),
                        value => Ok(value),
                    };
                    job.reply.finish(reply);
                }
            }
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout() {
                    conn = None;
                }
                let why = e.to_string();
                for job in batch.drain(..) {
                    job.reply.finish(Err(BrokerError::Command(why.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Failures(AtomicUsize);

    impl RelayFailure for Failures {
        fn relay_failed(&self, _error: &BrokerError, _len: usize) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn publish() -> redis::Cmd {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg("c").arg("m");
        cmd
    }

    /// A relayed message is queued without waiting while its lane has room;
    /// only a full queue hands back a wait, and that wait ends once the lane
    /// makes room again.
    #[tokio::test]
    async fn a_relay_waits_only_for_a_full_queue() {
        // A "Redis" that accepts the connection and never answers: the lane
        // takes the first message and hangs on its reply.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("redis://{}", silent.local_addr().expect("addr"));
        let target = Target::standalone(&url, None).expect("target");
        // No timeouts: the lane hangs on the silent server for as long as the test needs.
        let config = AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let lanes = Lanes::start(target, config, 1, 1, &tracker, stop.clone());
        let failures = Arc::new(Failures::default());
        let origin: Arc<dyn RelayFailure> = failures.clone();

        assert!(lanes.send("c", publish(), 1, origin.clone()).is_none(), "an empty queue takes it");
        let (conn, _) = silent.accept().await.expect("the lane connects");
        // The lane now waits on the silent connection with the first message;
        // the second fills the one-slot queue.
        while let Some(wait) = lanes.send("c", publish(), 1, origin.clone()) {
            // The lane had not taken the first one yet: wait for room, then queue another.
            wait.await;
        }
        let mut third = lanes.send("c", publish(), 1, origin.clone()).expect("a full queue hands back a wait");
        assert!(futures_util::poll!(third.as_mut()).is_pending(), "no room while the lane is stuck");

        // The connection breaks: the lane fails what it holds and takes the rest.
        drop(conn);
        third.await;
        assert!(failures.0.load(Ordering::SeqCst) >= 1, "the stuck message was reported");
        // The lane may be connecting again, to a listener that never answers:
        // it is left to the runtime's end, not waited for.
        stop.cancel();
    }
}
