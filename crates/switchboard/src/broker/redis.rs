//! The Redis broker: commands (PUBLISH, presence scripts) through lanes, each
//! keeping one connection (see [`super::lanes`] for why not a pool), and one
//! dedicated subscriber connection per instance.
//!
//! Presence scripts go by their SHA1 (`EVALSHA`); only when Redis answers
//! `NOSCRIPT` (after a restart or `SCRIPT FLUSH`) is the body sent (`EVAL`),
//! which also puts it back in Redis's script cache. redis-rs's `Script` does
//! the same, but only on a connection of its own: it can't hand its commands
//! to a lane's pipeline, so the broker does it here.
//!
//! The subscriber task owns the set of live channels with a count of local
//! sessions each. It SUBSCRIBEs on a channel's first session and UNSUBSCRIBEs
//! after its last, so `PUBSUB NUMSUB` falls back to 0. When the connection drops
//! it reconnects with backoff, subscribes every live channel again, and tells
//! the [`Inbox`] which channels are back: pub/sub is at-most-once, so anything
//! published meanwhile is gone (the sessions tell their clients `resync`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lanes::Lanes;
use super::{Broker, BrokerError, Inbox, RelayFailure, SessionId, Waiting};
use crate::pair::{PairId, UserId};

/// Connect and response timeout of a command lane's connection.
const LANE_TIMEOUT: Duration = Duration::from_secs(2);
/// Commands a lane may hold before senders wait for room.
const LANE_QUEUE: usize = 1024;
/// The subscriber's first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The subscriber's longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the Redis broker is set up.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`.
    pub url: String,
    /// Start of every channel and key name.
    pub prefix: String,
    /// Lifetime of a presence key; sessions refresh it well before.
    pub presence_ttl: Duration,
    /// Number of command lanes, each with one connection.
    pub pool_size: usize,
}

enum Command {
    Subscribe(Arc<str>, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Box<str>),
}

/// Publishes and subscribes through Redis.
pub struct RedisBroker {
    lanes: Lanes,
    commands: mpsc::UnboundedSender<Command>,
    ready: Arc<AtomicBool>,
    prefix: String,
    ttl_secs: u64,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// A Lua script and its SHA1, by which Redis knows it once it has run it.
struct Lua {
    body: &'static str,
    sha1: String,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        use sha1::{Digest, Sha1};
        Self { body, sha1: format!("{:x}", Sha1::digest(body.as_bytes())) }
    }
}

static CLAIM: LazyLock<Lua> = LazyLock::new(|| Lua::new(CLAIM_LUA));
static REFRESH_MANY: LazyLock<Lua> = LazyLock::new(|| Lua::new(REFRESH_MANY_LUA));
static RELEASE: LazyLock<Lua> = LazyLock::new(|| Lua::new(RELEASE_LUA));

/// Sets `KEYS[1]` to `ARGV[1]` for `ARGV[2]` seconds, publishes the join
/// envelope `ARGV[3]` on the channel `KEYS[3]`, and returns `KEYS[2]`. One
/// script, so Redis orders one user's claims and joins alike (see
/// [`Broker::claim_presence`]).
const CLAIM_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return redis.call('GET', KEYS[2])";

/// For each i: keeps `KEYS[2i-1]` as `ARGV[i+1]` for `ARGV[1]` seconds (unless
/// another session owns it) and returns `KEYS[2i]`, or `''` when it is gone.
const REFRESH_MANY_LUA: &str = r"
local out = {}
for i = 1, #KEYS / 2 do
  local me = ARGV[i + 1]
  local mine = redis.call('GET', KEYS[2 * i - 1])
  if mine == false or mine == me then
    redis.call('SET', KEYS[2 * i - 1], me, 'EX', ARGV[1])
  end
  out[i] = redis.call('GET', KEYS[2 * i]) or ''
end
return out";

/// Deletes `KEYS[1]` only while it still holds `ARGV[1]`.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

impl RedisBroker {
    /// Starts the subscriber task and the lanes on `tracker`, and waits up to
    /// `first_connect` for the subscriber's first connection (it keeps
    /// retrying after that). Lanes connect when they first have work.
    pub async fn start(
        options: RedisOptions,
        inbox: Arc<dyn Inbox>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
        first_connect: Duration,
    ) -> Result<Self, BrokerError> {
        let client = redis::Client::open(options.url.as_str())?;
        let lanes_client = client.clone();

        let ready = Arc::new(AtomicBool::new(false));
        let (commands, rx) = mpsc::unbounded_channel();
        let (first_tx, first_rx) = oneshot::channel();
        let subscriber =
            Subscriber { client, inbox, ready: ready.clone(), counts: HashMap::new(), first: Some(first_tx) };
        tracker.spawn(subscriber.run(rx, shutdown.clone()));
        let _ = tokio::time::timeout(first_connect, first_rx).await;

        // A lane that can't connect, or hears nothing back, within 2 s gives
        // up on that connection: its commands fail and the next batch
        // connects anew. A connection found dead before use is replaced
        // before anything is written on it (see `lanes`).
        let lanes =
            Lanes::start(lanes_client, Some(LANE_TIMEOUT), options.pool_size, LANE_QUEUE, tracker, shutdown.clone());
        Ok(Self { lanes, commands, ready, prefix: options.prefix, ttl_secs: options.presence_ttl.as_secs().max(1) })
    }

    fn keys(&self, pair: &PairId, user: &UserId) -> (String, String) {
        (pair.presence_key(&self.prefix, user), pair.presence_key(&self.prefix, pair.other(user)))
    }

    /// Runs a Lua script on the lane of `pair`'s channel: by its SHA1, and
    /// with its body only if Redis no longer has it.
    async fn eval<K, A>(&self, pair: &PairId, script: &Lua, keys: &[K], args: &[A]) -> Result<redis::Value, BrokerError>
    where
        K: redis::ToRedisArgs + Sync,
        A: redis::ToRedisArgs + Sync,
    {
        let lane = pair.channel(&self.prefix);
        let command = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
            cmd
        };
        match self.lanes.call(&lane, command("EVALSHA", &script.sha1)).await {
            Err(BrokerError::Redis(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.lanes.call(&lane, command("EVAL", script.body)).await
            }
            reply => reply,
        }
    }
}

fn parse_session(value: redis::Value) -> Result<Option<SessionId>, BrokerError> {
    let value: Option<String> = redis::from_redis_value(value).map_err(redis::RedisError::from)?;
    Ok(value.and_then(|v| u64::from_str_radix(&v, 16).ok()).filter(|&s| s != 0))
}

#[async_trait]
impl Broker for RedisBroker {
    async fn subscribe(&self, channel: &Arc<str>) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Subscribe(channel.clone(), tx)).map_err(|_| BrokerError::Disconnected)?;
        rx.await.map_err(|_| BrokerError::Disconnected)?
    }

    fn unsubscribe(&self, channel: &str) {
        let _ = self.commands.send(Command::Unsubscribe(channel.into()));
    }

    async fn publish(&self, channel: &str, envelope: Bytes) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(&envelope[..]);
        self.lanes.call(channel, cmd).await.map(drop)
    }

    fn relay(&self, channel: &str, envelope: Bytes, origin: Arc<dyn RelayFailure>) -> Option<Waiting> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(&envelope[..]);
        self.lanes.send(channel, cmd, envelope.len(), origin)
    }

    async fn claim_presence(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Option<SessionId>, BrokerError> {
        let (mine, peer) = self.keys(pair, user);
        let (session, ttl) = (format!("{session:x}").into_bytes(), self.ttl_secs.to_string().into_bytes());
        let keys = [mine.as_str(), peer.as_str(), channel];
        parse_session(self.eval(pair, &CLAIM, &keys, &[&session[..], &ttl[..], &join[..]]).await?)
    }

    async fn refresh_presences(
        &self,
        sessions: &[(&PairId, &UserId, SessionId)],
    ) -> Result<Vec<Option<SessionId>>, BrokerError> {
        let Some((first_pair, ..)) = sessions.first() else { return Ok(Vec::new()) };
        let mut keys = Vec::with_capacity(sessions.len() * 2);
        for (pair, user, _) in sessions {
            let (mine, peer) = self.keys(pair, user);
            keys.push(mine);
            keys.push(peer);
        }
        let mut args = Vec::with_capacity(sessions.len() + 1);
        args.push(self.ttl_secs.to_string());
        args.extend(sessions.iter().map(|(_, _, session)| format!("{session:x}")));
        let peers: Vec<String> = redis::from_redis_value(self.eval(first_pair, &REFRESH_MANY, &keys, &args).await?)
            .map_err(redis::RedisError::from)?;
        Ok(peers.iter().map(|p| u64::from_str_radix(p, 16).ok().filter(|&s| s != 0)).collect())
    }

    async fn release_presence(&self, pair: &PairId, user: &UserId, session: SessionId) -> Result<(), BrokerError> {
        let key = pair.presence_key(&self.prefix, user);
        self.eval(pair, &RELEASE, &[&key], &[&format!("{session:x}")]).await.map(drop)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The one subscriber connection of this instance.
struct Subscriber {
    client: redis::Client,
    inbox: Arc<dyn Inbox>,
    ready: Arc<AtomicBool>,
    /// Local sessions per subscribed channel.
    counts: HashMap<Arc<str>, usize>,
    first: Option<oneshot::Sender<()>>,
}

/// Why a connected spell of the subscriber ended.
enum Ended {
    Shutdown,
    Dropped,
}

impl Subscriber {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, shutdown: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        let mut connected_before = false;
        loop {
            let connect = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.client.get_async_pubsub() => c,
            };
            let ended = match connect {
                Ok(pubsub) => {
                    backoff = FIRST_BACKOFF;
                    let ended = self.connected(pubsub, &mut commands, &shutdown, connected_before).await;
                    connected_before = true;
                    ended
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis subscriber: connect failed");
                    Ended::Dropped
                }
            };
            self.ready.store(false, Ordering::Relaxed);
            // Whatever was published and not yet read is lost with the connection.
            self.inbox.connection_lost();
            if matches!(ended, Ended::Shutdown) {
                return;
            }
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            // Wait out the backoff while still answering commands.
            let until = tokio::time::Instant::now() + backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = commands.recv() => match cmd {
                        None => return,
                        Some(cmd) => self.offline(cmd),
                    },
                }
            }
        }
    }

    /// While disconnected: a new subscriber is refused, a leaving one is uncounted.
    fn offline(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(_, ack) => {
                let _ = ack.send(Err(BrokerError::Disconnected));
            }
            Command::Unsubscribe(channel) => {
                self.uncount(&channel);
            }
        }
    }

    /// Drops one count; true when it was the channel's last.
    fn uncount(&mut self, channel: &str) -> bool {
        match self.counts.get_mut(channel) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(channel);
                true
            }
            None => false,
        }
    }

    async fn connected(
        &mut self,
        pubsub: redis::aio::PubSub,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
        reconnected: bool,
    ) -> Ended {
        let (mut sink, mut stream) = pubsub.split();
        if !self.counts.is_empty() {
            let channels: Vec<&str> = self.counts.keys().map(|c| &**c).collect();
            if let Err(e) = sink.subscribe(&channels).await {
                tracing::warn!(error = %e, "redis subscriber: resubscribe failed");
                return Ended::Dropped;
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
        if reconnected {
            tracing::info!(channels = self.counts.len(), "redis subscriber: reconnected");
            crate::metrics::broker_reconnect();
            self.inbox.resubscribed(&mut self.counts.keys().map(|c| &**c));
        } else {
            tracing::info!("redis subscriber: connected");
        }
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Shutdown,
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        tracing::warn!("redis subscriber: connection lost");
                        return Ended::Dropped;
                    };
                    let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                    self.inbox.envelope(msg.get_channel_name(), &payload);
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return Ended::Shutdown };
                    if let Err(e) = self.command(&mut sink, cmd).await {
                        tracing::warn!(error = %e, "redis subscriber: command failed");
                        return Ended::Dropped;
                    }
                }
            }
        }
    }

    async fn command(&mut self, sink: &mut redis::aio::PubSubSink, cmd: Command) -> Result<(), redis::RedisError> {
        match cmd {
            Command::Subscribe(channel, ack) => {
                let count = self.counts.entry(channel.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    if let Err(e) = sink.subscribe(&*channel).await {
                        self.uncount(&channel);
                        let _ = ack.send(Err(BrokerError::Disconnected));
                        return Err(e);
                    }
                }
                let _ = ack.send(Ok(()));
            }
            Command::Unsubscribe(channel) => {
                if self.uncount(&channel) {
                    sink.unsubscribe(&*channel).await?;
                }
            }
        }
        Ok(())
    }
}
