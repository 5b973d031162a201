//! The Redis broker: commands (PUBLISH, presence scripts) through lanes, each
//! keeping one connection (see [`super::lanes`] for why not a pool), and one
//! subscriber connection of switchboard's own per instance
//! ([`super::subscriber`]). Both reach Redis through a [`Target`]: one
//! server, or the master the Sentinels name.
//!
//! Presence scripts go by their SHA1 (`EVALSHA`); only when Redis answers
//! `NOSCRIPT` (after a restart or `SCRIPT FLUSH`) is the body sent (`EVAL`),
//! which also puts it back in Redis's script cache. redis-rs's `Script` does
//! the same, but only on a connection of its own: it can't hand its commands
//! to a lane's pipeline, so the broker does it here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::history::{Replay, Seq, HISTORY_LEN};
use super::lanes::Lanes;
use super::renewals::{Renewals, RENEW_EVERY};
use super::scripts::{Lua, APPEND, CLAIM, CLAIM_KEPT, REFRESH_MANY, RELEASE, REPLAY};
use super::subscriber::{Request, Subscriber};
use super::target::Target;
use super::{envelope, Broker, BrokerError, Claimed, Inbox, Numbered, RelayOrigin, SessionId, Waiting};
use crate::pair::{Names, PairId, UserId};

/// Connect and response timeout of a command lane's connection.
const LANE_TIMEOUT: Duration = Duration::from_secs(2);
/// Commands a lane may hold before senders wait for room.
const LANE_QUEUE: usize = 1024;

/// How the Redis broker is set up.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Where Redis is.
    pub target: Target,
    /// Start of every channel and key name.
    pub prefix: String,
    /// Lifetime of a presence key; sessions refresh it well before.
    pub presence_ttl: Duration,
    /// Number of command lanes, each with one connection.
    pub pool_size: usize,
}

/// Publishes and subscribes through Redis.
pub struct RedisBroker {
    lanes: Lanes,
    requests: mpsc::UnboundedSender<Request>,
    ready: Arc<AtomicBool>,
    degraded: Arc<AtomicBool>,
    prefix: String,
    /// A Redis Cluster: hash-tagged names and sharded pub/sub.
    cluster: bool,
    ttl_secs: u64,
    /// With history on: how long a pair's stream outlives its last entry.
    history: Option<Duration>,
    /// When this instance last renewed each stream's TTL.
    renewals: Renewals,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

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
        let ready = Arc::new(AtomicBool::new(false));
        let degraded = Arc::new(AtomicBool::new(false));
        let (requests, rx) = mpsc::unbounded_channel();
        let (first_tx, first_rx) = oneshot::channel();
        let (subscriber, events) = Subscriber::new(
            options.target.clone(),
            inbox,
            (ready.clone(), degraded.clone()),
            first_tx,
            tracker.clone(),
        );
        tracker.spawn(subscriber.run(rx, events, shutdown.clone()));
        let _ = tokio::time::timeout(first_connect, first_rx).await;

        // A lane that can't connect, or hears nothing back, within 2 s gives
        // up on that connection: its commands fail and the next batch
        // connects anew. A connection found dead before use is replaced
        // before anything is written on it (see `lanes`).
        let lanes = Lanes::start(
            options.target.clone(),
            Some(LANE_TIMEOUT),
            options.pool_size,
            LANE_QUEUE,
            tracker,
            shutdown.clone(),
        );
        let cluster = options.target.is_cluster();
        let ttl_secs = options.presence_ttl.as_secs().max(1);
        Ok(Self {
            lanes,
            requests,
            ready,
            degraded,
            prefix: options.prefix,
            cluster,
            ttl_secs,
            history: None,
            renewals: Renewals::default(),
        })
    }

    /// Keeps each pair's last envelopes in a stream for `window` after its
    /// last one (see [`super::history`]); a zero window keeps none.
    pub fn with_history(mut self, window: Duration) -> Self {
        self.history = (!window.is_zero()).then_some(window);
        self
    }

    /// The TTL a pair's stream (and a sender's counter) gets: the resume
    /// window plus the renewal period (see [`super::renewals`]), whole
    /// seconds; `0` without history.
    fn kept_secs(&self) -> u64 {
        self.history.map_or(0, |window| window.as_secs().max(1) + RENEW_EVERY.as_secs())
    }

    fn publish_verb(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The `EVALSHA` of [`APPEND_LUA`] for `envelope` on `channel`.
    fn append_cmd(&self, channel: &str, envelope: &[u8], numbered: Option<Numbered>) -> redis::Cmd {
        let newline = envelope.iter().position(|&b| b == b'\n').unwrap_or(envelope.len());
        let body = envelope.get(newline + 1..).unwrap_or_default();
        let stream = crate::pair::history_key(channel);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&APPEND.sha1);
        match numbered {
            Some(numbered) => {
                cmd.arg(3).arg(&stream).arg(channel).arg(crate::pair::sent_key(&stream, numbered.lineage))
            }
            None => cmd.arg(2).arg(&stream).arg(channel),
        };
        cmd.arg(&envelope[..newline]).arg(body).arg(self.kept_secs()).arg(self.publish_verb()).arg(HISTORY_LEN);
        cmd.arg(if self.renewals.due(channel) { "1" } else { "0" });
        if let Some(numbered) = numbered {
            cmd.arg(numbered.n);
        }
        cmd
    }

    fn keys(&self, pair: &PairId, user: &UserId) -> (String, String) {
        let names = self.names();
        (names.presence_key(pair, user), names.presence_key(pair, pair.other(user)))
    }

    fn names(&self) -> Names<'_> {
        Names::new(&self.prefix, self.cluster)
    }

    /// `PUBLISH`, or in a cluster `SPUBLISH` (sent only to the channel's shard).
    fn publish_cmd(&self, channel: &str, envelope: &[u8]) -> redis::Cmd {
        let mut cmd = redis::cmd(self.publish_verb());
        cmd.arg(channel).arg(envelope);
        cmd
    }

    /// Runs a Lua script on the lane of `pair`'s channel: by its SHA1, and
    /// with its body only if Redis no longer has it.
    async fn eval<K, A>(&self, pair: &PairId, script: &Lua, keys: &[K], args: &[A]) -> Result<redis::Value, BrokerError>
    where
        K: redis::ToRedisArgs + Sync,
        A: redis::ToRedisArgs + Sync,
    {
        let lane = self.names().channel(pair);
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
        self.requests.send(Request::Subscribe(channel.clone(), tx)).map_err(|_| BrokerError::Disconnected)?;
        rx.await.map_err(|_| BrokerError::Disconnected)?
    }

    fn unsubscribe(&self, channel: &str) {
        let _ = self.requests.send(Request::Unsubscribe(channel.into()));
    }

    async fn publish(&self, channel: &str, envelope: Bytes) -> Result<(), BrokerError> {
        self.lanes.call(channel, self.publish_cmd(channel, &envelope)).await.map(drop)
    }

    fn relay(
        &self,
        channel: &str,
        envelope: Bytes,
        origin: Arc<dyn RelayOrigin>,
        numbered: Option<Numbered>,
    ) -> Option<Waiting> {
        let cmd = match self.history {
            Some(_) => self.append_cmd(channel, &envelope, numbered),
            None => self.publish_cmd(channel, &envelope),
        };
        self.lanes.send(channel, cmd, envelope.len(), origin)
    }

    async fn claim(
        &self,
        pair: &PairId,
        user: &UserId,
        session: SessionId,
        channel: &str,
        join: Bytes,
    ) -> Result<Claimed, BrokerError> {
        let (mine, peer) = self.keys(pair, user);
        let (session, ttl) = (format!("{session:x}").into_bytes(), self.ttl_secs.to_string().into_bytes());
        let verb = self.publish_verb().as_bytes();
        if self.history.is_none() {
            let keys = [mine.as_str(), peer.as_str(), channel];
            let peer =
                parse_session(self.eval(pair, &CLAIM, &keys, &[&session[..], &ttl[..], &join[..], verb]).await?)?;
            return Ok(Claimed { peer, seq: None });
        }
        let stream = crate::pair::history_key(channel);
        let keys = [mine.as_str(), peer.as_str(), channel, stream.as_str()];
        // The join envelope has no body: its header is all of it but the newline.
        let header = join.strip_suffix(b"\n").unwrap_or(&join);
        let (secs, len) = (self.kept_secs().to_string().into_bytes(), HISTORY_LEN.to_string().into_bytes());
        let args = [&session[..], &ttl[..], header, verb, &secs[..], &len[..]];
        let (peer, id): (redis::Value, String) =
            redis::from_redis_value(self.eval(pair, &CLAIM_KEPT, &keys, &args).await?)
                .map_err(redis::RedisError::from)?;
        let seq = Seq::parse(&id).ok_or_else(|| BrokerError::Command(format!("XADD gave {id:?}, not a stream ID")))?;
        Ok(Claimed { peer: parse_session(peer)?, seq: Some(seq) })
    }

    fn history(&self) -> Option<Duration> {
        self.history
    }

    async fn replay(&self, channel: &str, after: Seq) -> Result<Replay, BrokerError> {
        if self.history.is_none() {
            return Ok(Replay::Gap { last: None });
        }
        let pair = PairId::from_channel(&self.prefix, channel)
            .ok_or_else(|| BrokerError::Command(format!("{channel} names no pair")))?;
        let stream = crate::pair::history_key(channel);
        let reply = self.eval(&pair, &REPLAY, &[stream.as_str()], &[after.to_string().as_str()]).await?;
        if reply == redis::Value::Nil {
            return Ok(Replay::Gap { last: None });
        }
        type Entry = (String, Vec<Vec<u8>>);
        fn parse<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, BrokerError> {
            redis::from_redis_value(value).map_err(|e| BrokerError::Redis(redis::RedisError::from(e)))
        }
        let mut reply: Vec<redis::Value> = parse(reply)?;
        let entries: Option<Vec<Entry>> =
            if reply.len() == 2 { reply.pop().map(parse::<Vec<Entry>>).transpose()? } else { None };
        let last: String = parse(reply.pop().unwrap_or(redis::Value::Nil))?;
        let bad = |what: &str| BrokerError::Command(format!("unexpected history entry: {what}"));
        let last = Seq::parse(&last).ok_or_else(|| bad(&last))?;
        let Some(entries) = entries else { return Ok(Replay::Gap { last: Some(last) }) };
        let mut envelopes = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let seq = Seq::parse(&id).ok_or_else(|| bad(&id))?;
            // Fields as written: `h`, the header, `b`, the body.
            let [_, header, _, body] = <[Vec<u8>; 4]>::try_from(fields).map_err(|_| bad(&id))?;
            let mut raw = Vec::with_capacity(header.len() + 1 + body.len());
            raw.extend_from_slice(&header);
            raw.push(b'\n');
            raw.extend_from_slice(&body);
            envelopes.push(envelope::stamp(&raw, seq));
        }
        Ok(Replay::Covered { envelopes, last })
    }

    async fn refresh_presences(
        &self,
        sessions: &[(&PairId, &UserId, SessionId)],
    ) -> Result<Vec<Option<SessionId>>, BrokerError> {
        if !self.cluster {
            return self.refresh_group(sessions).await;
        }
        // One script call may touch one slot only: one call per partition.
        let mut groups: std::collections::HashMap<u16, Vec<usize>> = std::collections::HashMap::new();
        for (i, (pair, ..)) in sessions.iter().enumerate() {
            groups.entry(pair.partition()).or_default().push(i);
        }
        let calls = groups.values().map(|members| {
            let group: Vec<(&PairId, &UserId, SessionId)> = members.iter().map(|&i| sessions[i]).collect();
            async move { self.refresh_group(&group).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut peers = vec![None; sessions.len()];
        for (members, answer) in groups.values().zip(answers) {
            for (&i, peer) in members.iter().zip(answer?) {
                peers[i] = peer;
            }
        }
        Ok(peers)
    }

    async fn release_presence(&self, pair: &PairId, user: &UserId, session: SessionId) -> Result<(), BrokerError> {
        let key = self.names().presence_key(pair, user);
        self.eval(pair, &RELEASE, &[&key], &[&format!("{session:x}")]).await.map(drop)
    }

    async fn shared_secret(&self, name: &str, proposed: &str) -> Result<String, BrokerError> {
        let key = format!("{}:secret:{name}", self.prefix);
        // Redis 7.0+: sets the key only if it is missing, and answers what it held.
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(proposed).arg("NX").arg("GET");
        let held: Option<String> =
            redis::from_redis_value(self.lanes.call(&key, cmd).await?).map_err(redis::RedisError::from)?;
        Ok(held.unwrap_or_else(|| proposed.to_owned()))
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

impl RedisBroker {
    /// One `REFRESH_MANY` call for `sessions`, whose keys share a slot in a cluster.
    async fn refresh_group(
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
}
