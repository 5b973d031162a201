//! The Redis broker: commands (PUBLISH, presence scripts) through lanes over a
//! deadpool-redis pool (see [`super::lanes`]), and one dedicated subscriber
//! connection per instance.
//!
//! The subscriber task owns the set of live channels with a count of local
//! sessions each. It SUBSCRIBEs on a channel's first session and UNSUBSCRIBEs
//! after its last, so `PUBSUB NUMSUB` falls back to 0. When the connection drops
//! it reconnects with backoff, subscribes every live channel again, and tells
//! the [`Inbox`] which channels are back: pub/sub is at-most-once, so anything
//! published meanwhile is gone (the sessions tell their clients `resync`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::Runtime;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lanes::Lanes;
use super::{Broker, BrokerError, Inbox, RelayFailure, SessionId, Waiting};
use crate::pair::{PairId, UserId};

/// How the Redis broker is set up.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`.
    pub url: String,
    /// Start of every channel and key name.
    pub prefix: String,
    /// Lifetime of a presence key; sessions refresh it well before.
    pub presence_ttl: Duration,
    /// Largest number of pooled publish connections.
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

/// Sets `KEYS[1]` to `ARGV[1]` for `ARGV[2]` seconds and returns `KEYS[2]`.
const CLAIM_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
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
    /// Builds the pool, starts the subscriber task on `tracker`, and waits up to
    /// `first_connect` for its first connection (it keeps retrying after that).
    pub async fn start(
        options: RedisOptions,
        inbox: Arc<dyn Inbox>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
        first_connect: Duration,
    ) -> Result<Self, BrokerError> {
        let client = redis::Client::open(options.url.as_str())?;
        let mut config = deadpool_redis::Config::from_url(options.url.as_str());
        let mut pool_config = deadpool_redis::PoolConfig::new(options.pool_size.max(1));
        pool_config.timeouts.wait = Some(Duration::from_secs(2));
        pool_config.timeouts.create = Some(Duration::from_secs(2));
        pool_config.timeouts.recycle = Some(Duration::from_secs(2));
        config.pool = Some(pool_config);
        let pool = config.create_pool(Some(Runtime::Tokio1)).map_err(|e| BrokerError::Pool(e.to_string()))?;

        let ready = Arc::new(AtomicBool::new(false));
        let (commands, rx) = mpsc::unbounded_channel();
        let (first_tx, first_rx) = oneshot::channel();
        let subscriber =
            Subscriber { client, inbox, ready: ready.clone(), counts: HashMap::new(), first: Some(first_tx) };
        tracker.spawn(subscriber.run(rx, shutdown.clone()));
        let _ = tokio::time::timeout(first_connect, first_rx).await;

        let lanes = Lanes::start(pool, options.pool_size, 1024, tracker, shutdown.clone());
        Ok(Self { lanes, commands, ready, prefix: options.prefix, ttl_secs: options.presence_ttl.as_secs().max(1) })
    }

    fn keys(&self, pair: &PairId, user: &UserId) -> (String, String) {
        (pair.presence_key(&self.prefix, user), pair.presence_key(&self.prefix, pair.other(user)))
    }

    /// Runs a presence script on (my key, the peer's key) with (session, TTL)
    /// and returns the peer's live session.
    async fn presence(
        &self,
        script: &str,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
    ) -> Result<Option<SessionId>, BrokerError> {
        let (mine, peer) = self.keys(pair, user);
        let (session, ttl) = (format!("{session:x}"), self.ttl_secs.to_string());
        parse_session(self.eval(pair, script, &[&mine, &peer], &[&session, &ttl]).await?)
    }

    /// Runs a Lua script on the lane of `pair`'s channel.
    async fn eval(
        &self,
        pair: &PairId,
        script: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<redis::Value, BrokerError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
        self.lanes.call(&pair.channel(&self.prefix), cmd).await
    }
}

fn parse_session(value: redis::Value) -> Result<Option<SessionId>, BrokerError> {
    let value: Option<String> = redis::from_redis_value(&value)?;
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
    ) -> Result<Option<SessionId>, BrokerError> {
        self.presence(CLAIM_LUA, pair, user, session).await
    }

    async fn refresh_presences(
        &self,
        sessions: &[(&PairId, &UserId, SessionId)],
    ) -> Result<Vec<Option<SessionId>>, BrokerError> {
        let Some((first_pair, ..)) = sessions.first() else { return Ok(Vec::new()) };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REFRESH_MANY_LUA).arg(sessions.len() * 2);
        for (pair, user, _) in sessions {
            let (mine, peer) = self.keys(pair, user);
            cmd.arg(mine).arg(peer);
        }
        cmd.arg(self.ttl_secs);
        for (_, _, session) in sessions {
            cmd.arg(format!("{session:x}"));
        }
        let peers: Vec<String> =
            redis::from_redis_value(&self.lanes.call(&first_pair.channel(&self.prefix), cmd).await?)?;
        Ok(peers.iter().map(|p| u64::from_str_radix(p, 16).ok().filter(|&s| s != 0)).collect())
    }

    async fn release_presence(&self, pair: &PairId, user: &UserId, session: SessionId) -> Result<(), BrokerError> {
        let key = pair.presence_key(&self.prefix, user);
        self.eval(pair, RELEASE_LUA, &[&key], &[&format!("{session:x}")]).await.map(drop)
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
        let mut backoff = Duration::from_millis(100);
        let mut connected_before = false;
        loop {
            let connect = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.client.get_async_pubsub() => c,
            };
            let ended = match connect {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(100);
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
            backoff = (backoff * 2).min(Duration::from_secs(5));
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
