//! Command lanes: a few tasks, each keeping one Redis connection for as long
//! as it works and sending everything queued for it as one pipeline.
//!
//! A lane connects when it first has work and keeps that connection while
//! it works. A connection that died while the lane was idle (Redis restarted
//! or failed over, Redis's idle `timeout` closed it, a NAT forgot it) is
//! found before traffic needs it: redis-rs's connection task ends as soon as
//! the socket does, and the lane checks that before each batch, so the batch
//! goes on a fresh connection instead of failing on the dead one (nothing was
//! written, so nothing is sent twice). A lane idle for 10 s sends a PING,
//! which finds a connection that died without a word (and keeps Redis's idle
//! `timeout` from closing it); TCP keepalive finds one even while no PING is
//! due. Every connect and every reply has a 2 s limit. A batch that fails
//! after it was written is not sent again, since it may have run: its
//! commands fail and the next batch connects anew. It batches: one write
//! and one round trip carry every command that queued up meanwhile. Commands
//! for one channel always use the same lane, and a lane sends in queue order
//! over one connection, so Redis sees each session's commands in the order it
//! sent them.
//!
//! Lanes reach Redis through the broker's [`Target`]: in Sentinel mode each
//! new connection asks the Sentinels for the master (and checks its `ROLE`);
//! in a Redis Cluster a lane holds redis-rs's cluster connection, which
//! routes each command to its slot's master and follows `MOVED`/`ASK`.
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
//! socket never waits for Redis and wakes up once per message, not twice. So
//! is a `PUBLISH` that reached no subscriber (with resume off; with resume on,
//! the history keeps what no one heard): the sender's own instance is
//! subscribed to its pair's channel whenever its subscriber is healthy, so a
//! count of 0 means that subscription is down and the message reached nobody.
//!
//! With resume on, consecutive relays of one batch that append to the
//! history go as one script call for all of them (`APPEND_MANY`, see
//! `pack`), each still answered on its own.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::target::{Connection, Target};
use super::{BrokerError, RelayOrigin, Waiting};

/// Time allowed to find the server (Sentinel, cluster slots) for a lane with no limit of its own.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most commands sent as one pipeline.
const MAX_BATCH: usize = 256;
/// A lane with nothing to send for this long checks its connection with a
/// PING, so that a connection Redis or the network dropped is replaced
/// before traffic needs it (and Redis's idle `timeout`, if set above this,
/// never closes it).
const IDLE_PING: Duration = Duration::from_secs(10);

struct Job {
    cmd: redis::Cmd,
    reply: Reply,
    /// The cluster slot of the command's key (0 outside a cluster).
    slot: u16,
}

/// Where a command's outcome goes.
enum Reply {
    /// Someone awaits the reply.
    Wait(oneshot::Sender<Result<redis::Value, BrokerError>>),
    /// A relayed message: its outcome is told to the session that sent it.
    Tell { origin: Arc<dyn RelayOrigin>, len: usize, queued_at: Instant },
}

impl Reply {
    fn finish(self, result: Result<redis::Value, BrokerError>) {
        match self {
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            Reply::Tell { origin, len, queued_at } => match result {
                // `PUBLISH` reached no subscriber, not even this instance's
                // own: its subscription is down (refused, or lost and not
                // back yet), so nobody heard the message.
                Ok(redis::Value::Int(0)) => origin.relay_failed(&BrokerError::Disconnected, len),
                Ok(_) => {
                    crate::metrics::publish_latency(queued_at.elapsed());
                    origin.relay_done();
                }
                Err(e) => origin.relay_failed(&e, len),
            },
        }
    }
}

/// The lanes of one instance.
pub struct Lanes {
    senders: Vec<mpsc::Sender<Job>>,
    /// A Redis Cluster: jobs carry their key's slot.
    cluster: bool,
}

impl Lanes {
    /// Starts `count` lanes on `tracker`, each with a queue of `depth`
    /// commands and its own connection to `client`.
    /// Every connect and every reply must come within `timeout` (`None`: no
    /// limit, for tests only).
    pub fn start(
        target: Target,
        timeout: Option<Duration>,
        count: usize,
        depth: usize,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let config = AsyncConnectionConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
        let senders = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(depth.max(1));
                let connector = Connector { target: target.clone(), config: config.clone(), timeout };
                tracker.spawn(run(connector, rx, stop.clone()));
                tx
            })
            .collect();
        Self { senders, cluster: target.is_cluster() }
    }

    /// The slot of `key`, which in a cluster is the slot of the command's keys
    /// (a pair's channel and keys share their partition's hash tag).
    fn slot(&self, key: &str) -> u16 {
        if self.cluster {
            super::cluster::slot(key)
        } else {
            0
        }
    }

    fn lane(&self, key: &str) -> &mpsc::Sender<Job> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.senders[(hasher.finish() % self.senders.len() as u64) as usize]
    }

    /// Sends `cmd` on the lane of `key` and waits for its reply.
    pub async fn call(&self, key: &str, cmd: redis::Cmd) -> Result<redis::Value, BrokerError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { cmd, reply: Reply::Wait(reply), slot: self.slot(key) };
        self.lane(key).send(job).await.map_err(|_| BrokerError::Disconnected)?;
        answer.await.map_err(|_| BrokerError::Disconnected)?
    }

    /// Queues `cmd` (a relayed envelope of `len` bytes) on the lane of `key`
    /// without waiting for its reply. Only when the lane's queue is full is
    /// there something to wait for, returned for the caller to await. A
    /// failure is told to `origin`.
    pub fn send(&self, key: &str, cmd: redis::Cmd, len: usize, origin: Arc<dyn RelayOrigin>) -> Option<Waiting> {
        let job = Job { cmd, reply: Reply::Tell { origin, len, queued_at: Instant::now() }, slot: self.slot(key) };
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

/// A lane's connection and the redis-rs task that drives it.
struct Link {
    conn: Conn,
    /// The cluster topology this connection was opened under.
    topology: u64,
}

/// A lane's connection: to one server (with its closed flag), or redis-rs's
/// cluster connection, which checks and reconnects its nodes itself.
enum Conn {
    Single(Connection),
    Cluster(ClusterConnection),
}

impl Link {
    async fn open(
        target: &Target,
        config: &AsyncConnectionConfig,
        timeout: Option<Duration>,
    ) -> Result<Self, BrokerError> {
        let topology = target.topology();
        let connect = async {
            if target.is_cluster() {
                let client = target.cluster_client(timeout.unwrap_or(ASK_TIMEOUT))?;
                let conn =
                    client.get_async_connection().await.map_err(|e| BrokerError::Connect(format!("cluster: {e}")))?;
                return Ok(Self { conn: Conn::Cluster(conn), topology });
            }
            // Our own TCP (keepalive) and TLS; Sentinel's master, checked with ROLE.
            Ok(Self { conn: Conn::Single(target.command_connection(config).await?), topology })
        };
        // A cluster connection reaches every node, each within the limit; one
        // that stopped answering is given up on, and the rest still serve.
        let timeout = if target.is_cluster() { timeout.map(|t| t * 2 + Duration::from_secs(1)) } else { timeout };
        match timeout {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .unwrap_or_else(|_| Err(BrokerError::Connect(format!("no connection within {limit:?}")))),
            None => connect.await,
        }
    }

    /// Whether it is dead, or (cluster) opened before the slot map last changed.
    fn closed(&self, target: &Target) -> bool {
        match &self.conn {
            Conn::Single(c) => c.is_closed(),
            Conn::Cluster(_) => self.topology != target.topology(),
        }
    }
}

/// What a lane needs to connect.
struct Connector {
    target: Target,
    config: AsyncConnectionConfig,
    timeout: Option<Duration>,
}

async fn run(connector: Connector, mut queue: mpsc::Receiver<Job>, stop: CancellationToken) {
    let mut link: Option<Link> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut idle_until = tokio::time::Instant::now() + IDLE_PING;
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            n = queue.recv_many(&mut batch, MAX_BATCH) => n,
            () = tokio::time::sleep_until(idle_until), if link.is_some() => {
                check_idle(&connector.target, &mut link).await;
                idle_until = tokio::time::Instant::now() + IDLE_PING;
                continue;
            }
        };
        if received == 0 {
            return;
        }
        send(&connector, &mut link, &mut batch).await;
        idle_until = tokio::time::Instant::now() + IDLE_PING;
    }
}

/// Drops `link` if it is closed, or silent to a PING: the next batch then
/// goes on a fresh connection instead of failing on this one.
async fn check_idle(target: &Target, link: &mut Option<Link>) {
    let Some(current) = link.as_mut() else { return };
    let failure = if current.closed(target) {
        "closed".to_owned()
    } else {
        let Conn::Single(Connection { conn, .. }) = &mut current.conn else {
            // redis-rs's cluster connection checks and reconnects its nodes itself.
            return;
        };
        match redis::cmd("PING").query_async::<()>(conn).await {
            Ok(()) => return,
            Err(e) => e.to_string(),
        }
    };
    tracing::info!(error = %failure, "redis lane: idle connection is dead; the next command connects anew");
    crate::metrics::broker_dead_connection();
    *link = None;
}

/// Sends `batch` as one pipeline and hands each job its reply. A connection
/// found closed is replaced first: nothing was written on it, so the batch
/// goes once, on the fresh one. A batch that fails after it was written is
/// not sent again (it may have run: a PUBLISH would be delivered twice).
async fn send(connector: &Connector, link: &mut Option<Link>, batch: &mut Vec<Job>) {
    if link.as_ref().is_some_and(|l| l.closed(&connector.target)) {
        tracing::info!("redis lane: connection closed, or the cluster's slot map changed; connecting anew");
        crate::metrics::broker_dead_connection();
        *link = None;
    }
    let current = match link {
        Some(current) => current,
        None => match Link::open(&connector.target, &connector.config, connector.timeout).await {
            Ok(fresh) => link.insert(fresh),
            Err(e) => {
                let why = match e {
                    BrokerError::Connect(why) => why,
                    e => e.to_string(),
                };
                for job in batch.drain(..) {
                    job.reply.finish(Err(BrokerError::Connect(why.clone())));
                }
                return;
            }
        },
    };
    // Each command gets its own reply: one failing command fails only its job.
    let conn = match &mut current.conn {
        Conn::Single(single) => &mut single.conn,
        Conn::Cluster(conn) => {
            if !run_on_cluster(conn, batch).await {
                // A master that stopped answering: redis-rs would keep its
                // slot map until the old master woke; a new connection
                // reads the map afresh (with the replica promoted).
                *link = None;
            }
            return;
        }
    };
    let (pipe, groups) = pack(batch);
    match pipe.query_async::<Vec<redis::Value>>(conn).await {
        Ok(values) => finish(conn, &pipe, &groups, batch, values).await,
        Err(e) => {
            if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout() {
                *link = None;
            }
            let why = e.to_string();
            for job in batch.drain(..) {
                job.reply.finish(Err(BrokerError::Command(why.clone())));
            }
        }
    }
}

/// The pipeline for `jobs`, their commands taken, and how many jobs each of
/// its commands answers, in order. Consecutive relays that append to the
/// history (with resume on) go as one [`super::scripts::APPEND_MANY`] call:
/// each script call costs Redis about as much as a `PUBLISH` before it does
/// anything, and under load a batch holds many. Order holds: a run is sent
/// where its first relay stood, and nothing else is moved across it.
fn pack(jobs: &mut [Job]) -> (redis::Pipeline, Vec<usize>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut groups = Vec::new();
    let mut run: Vec<redis::Cmd> = Vec::new();
    let flush = |run: &mut Vec<redis::Cmd>, pipe: &mut redis::Pipeline, groups: &mut Vec<usize>| {
        if let Some(many) = (run.len() > 1).then(|| append_many(run)).flatten() {
            pipe.add_command(many);
            groups.push(run.len());
            run.clear();
        }
        for cmd in run.drain(..) {
            pipe.add_command(cmd);
            groups.push(1);
        }
    };
    for job in jobs.iter_mut() {
        let cmd = std::mem::replace(&mut job.cmd, redis::Cmd::new());
        if matches!(job.reply, Reply::Tell { .. }) && is_append(&cmd) {
            run.push(cmd);
            continue;
        }
        flush(&mut run, &mut pipe, &mut groups);
        pipe.add_command(cmd);
        groups.push(1);
    }
    flush(&mut run, &mut pipe, &mut groups);
    (pipe, groups)
}

/// Whether `cmd` calls [`super::scripts::APPEND`] by its SHA1 (its first
/// two arguments only: the rest is read once, by [`append_many`]).
fn is_append(cmd: &redis::Cmd) -> bool {
    let mut args = cmd.args_iter();
    matches!(args.next(), Some(redis::Arg::Simple(verb)) if verb.eq_ignore_ascii_case(b"EVALSHA"))
        && matches!(args.next(), Some(redis::Arg::Simple(sha1)) if sha1 == super::scripts::APPEND.sha1.as_bytes())
}

/// The keys and the arguments of a script call.
type ScriptArgs<'a> = (Vec<&'a [u8]>, Vec<&'a [u8]>);

/// The keys and arguments of an [`super::scripts::APPEND`] call (by SHA1).
fn append_args(cmd: &redis::Cmd) -> Option<ScriptArgs<'_>> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    if !args.next()??.eq_ignore_ascii_case(b"EVALSHA") || args.next()?? != super::scripts::APPEND.sha1.as_bytes() {
        return None;
    }
    let count: usize = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
    let rest: Vec<&[u8]> = args.collect::<Option<_>>()?;
    let (keys, argv) = (rest.get(..count)?, rest.get(count..)?);
    // Header, body, TTL, verb, length kept, renew flag, and the number if numbered.
    matches!((keys.len(), argv.len()), (2, 6) | (3, 7)).then(|| (keys.to_vec(), argv.to_vec()))
}

/// One [`super::scripts::APPEND_MANY`] call for the append calls of `run`, in
/// order; `None` if one of them is not an append call after all.
fn append_many(run: &[redis::Cmd]) -> Option<redis::Cmd> {
    let parts: Vec<ScriptArgs<'_>> = run.iter().map(append_args).collect::<Option<_>>()?;
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(&super::scripts::APPEND_MANY.sha1).arg(parts.len() * 3);
    for (keys, _) in &parts {
        // Stream, channel, and the counter (or the stream again: unused).
        cmd.arg(keys[0]).arg(keys[1]).arg(keys.get(2).copied().unwrap_or(keys[0]));
    }
    let (_, first) = &parts[0];
    cmd.arg(first[2]).arg(first[3]).arg(first[4]);
    for (_, argv) in &parts {
        cmd.arg(argv[0]).arg(argv[1]).arg(argv[5]).arg(argv.get(6).copied().unwrap_or(b""));
    }
    Some(cmd)
}

/// Hands each job its reply: `groups` says how many jobs each command of
/// `pipe` answers (see [`pack`]); a command for several answers with an
/// array, one reply each. A relayed message whose script Redis did not know
/// (`NOSCRIPT`: a restarted or newly promoted server, or a `SCRIPT FLUSH`)
/// did not run: it goes once more, with the script's body (`EVAL`), before
/// the lane takes its next batch, so its channel's order holds and nothing
/// runs twice. A second failure is the job's reply.
async fn finish(
    conn: &mut impl redis::aio::ConnectionLike,
    pipe: &redis::Pipeline,
    groups: &[usize],
    jobs: &mut Vec<Job>,
    values: Vec<redis::Value>,
) {
    let mut again: Vec<Vec<Job>> = Vec::new();
    let mut retry = redis::pipe();
    retry.ignore_errors();
    let mut jobs = jobs.drain(..);
    for ((&size, value), cmd) in groups.iter().zip(values).zip(pipe.cmd_iter()) {
        let group: Vec<Job> = jobs.by_ref().take(size).collect();
        if let redis::Value::ServerError(e) = &value {
            let unknown = e.kind() == Some(redis::ServerErrorKind::NoScript);
            let relays = group.iter().all(|job| matches!(job.reply, Reply::Tell { .. }));
            if let (true, true, Some(eval)) = (unknown, relays, with_body(cmd)) {
                retry.add_command(eval);
                again.push(group);
                continue;
            }
        }
        answer(group, value);
    }
    if again.is_empty() {
        return;
    }
    tracing::info!(count = again.len(), "redis lane: the relay script was unknown to Redis; sent again with its body");
    match retry.query_async::<Vec<redis::Value>>(conn).await {
        Ok(values) => {
            for (group, value) in again.into_iter().zip(values) {
                answer(group, value);
            }
        }
        Err(e) => {
            let why = e.to_string();
            for job in again.into_iter().flatten() {
                job.reply.finish(Err(BrokerError::Command(why.clone())));
            }
        }
    }
}

/// Hands `value`, a command's reply, to the jobs it answers: to one as it
/// is, to several one element each (an error to each of them).
fn answer(mut group: Vec<Job>, value: redis::Value) {
    let result: Result<redis::Value, redis::RedisError> = match value {
        redis::Value::ServerError(e) => Err(e.into()),
        value => Ok(value),
    };
    if group.len() == 1 {
        if let Some(job) = group.pop() {
            job.reply.finish(result.map_err(BrokerError::Redis));
        }
        return;
    }
    match result {
        Ok(redis::Value::Array(values)) if values.len() == group.len() => {
            for (job, value) in group.into_iter().zip(values) {
                job.reply.finish(Ok(value));
            }
        }
        Ok(other) => {
            let why = format!("unexpected reply to {} relays: {other:?}", group.len());
            for job in group {
                job.reply.finish(Err(BrokerError::Command(why.clone())));
            }
        }
        Err(e) => {
            for job in group {
                job.reply.finish(Err(BrokerError::Redis(e.clone())));
            }
        }
    }
}

/// `EVALSHA sha1 …` as `EVAL body …`, for a script this broker knows.
fn with_body(cmd: &redis::Cmd) -> Option<redis::Cmd> {
    let args: Option<Vec<&[u8]>> = cmd
        .args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let mut args = args?.into_iter();
    if !args.next()?.eq_ignore_ascii_case(b"EVALSHA") {
        return None;
    }
    let body = super::scripts::body_of(args.next()?)?;
    let mut eval = redis::cmd("EVAL");
    eval.arg(body);
    for arg in args {
        eval.arg(arg);
    }
    Some(eval)
}

/// Sends a batch on a cluster connection. A pipeline may only name one slot
/// there, so the batch goes as one pipeline per slot, all at once: each
/// channel's commands stay in queue order (one slot, one pipeline, one
/// connection), and different slots go to their masters side by side.
/// Returns false when a pipeline timed out.
async fn run_on_cluster(conn: &ClusterConnection, batch: &mut Vec<Job>) -> bool {
    let mut by_slot: std::collections::HashMap<u16, Vec<Job>> = std::collections::HashMap::new();
    for job in batch.drain(..) {
        by_slot.entry(job.slot).or_default().push(job);
    }
    let calls = by_slot.into_values().map(|mut jobs| {
        let mut conn = conn.clone();
        async move {
            let (pipe, groups) = pack(&mut jobs);
            match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
                Ok(values) => {
                    finish(&mut conn, &pipe, &groups, &mut jobs, values).await;
                    Ok(())
                }
                Err(e) => Err((jobs, e)),
            }
        }
    });
    let mut answered = true;
    for outcome in futures_util::future::join_all(calls).await {
        match outcome {
            Ok(()) => {}
            Err((jobs, e)) => {
                answered &= !e.is_timeout();
                let why = e.to_string();
                for job in jobs {
                    job.reply.finish(Err(BrokerError::Command(why.clone())));
                }
            }
        }
    }
    answered
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Failures(AtomicUsize);

    impl RelayOrigin for Failures {
        fn relay_failed(&self, _error: &BrokerError, _len: usize) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn publish() -> redis::Cmd {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg("c").arg("m");
        cmd
    }

    /// An append call as the Redis broker makes it (see `RedisBroker::append_cmd`).
    fn append(n: Option<&str>) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&crate::broker::scripts::APPEND.sha1).arg(if n.is_some() { 3 } else { 2 });
        cmd.arg("p:history:a:b").arg("p:pair:a:b");
        if n.is_some() {
            cmd.arg("p:history:a:b:sent:1");
        }
        cmd.arg("hdr").arg("body").arg(35).arg("PUBLISH").arg(64).arg("0");
        if let Some(n) = n {
            cmd.arg(n);
        }
        cmd
    }

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<not simple>".into(),
            })
            .collect()
    }

    /// Consecutive relays that append go as one `APPEND_MANY` call, where
    /// the first of them stood; anything else keeps its place and its call.
    #[test]
    fn consecutive_appends_go_as_one_call_in_place() {
        let origin: Arc<dyn RelayOrigin> = Arc::new(Failures::default());
        let tell = |cmd| Job {
            cmd,
            reply: Reply::Tell { origin: origin.clone(), len: 1, queued_at: Instant::now() },
            slot: 0,
        };
        let (waiting, _) = oneshot::channel();
        let mut jobs = vec![
            tell(append(None)),
            tell(append(Some("7"))),
            Job { cmd: publish(), reply: Reply::Wait(waiting), slot: 0 },
            tell(append(None)),
            tell(publish()),
        ];
        let (pipe, groups) = pack(&mut jobs);
        assert_eq!(groups, [2, 1, 1, 1]);
        let cmds: Vec<Vec<String>> = pipe.cmd_iter().map(args).collect();
        let many = &crate::broker::scripts::APPEND_MANY.sha1;
        let counter = "p:history:a:b:sent:1";
        let expected_first: Vec<&str> = vec![
            "EVALSHA",
            many,
            "6",
            "p:history:a:b",
            "p:pair:a:b",
            "p:history:a:b",
            "p:history:a:b",
            "p:pair:a:b",
            counter,
            "35",
            "PUBLISH",
            "64",
            "hdr",
            "body",
            "0",
            "",
            "hdr",
            "body",
            "0",
            "7",
        ];
        assert_eq!(cmds[0], expected_first);
        assert_eq!(cmds[1], args(&publish()));
        assert_eq!(cmds[2], args(&append(None)), "a lone append stays as it is");
        assert_eq!(cmds[3], args(&publish()));
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
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let lanes = Lanes::start(target, None, 1, 1, &tracker, stop.clone());
        let failures = Arc::new(Failures::default());
        let origin: Arc<dyn RelayOrigin> = failures.clone();

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
