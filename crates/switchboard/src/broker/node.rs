//! One subscriber connection to one Redis server, run by its own task: the
//! standalone server (or Sentinel's master), or one cluster master.
//!
//! The [`super::subscriber`] decides which channels live on which node and
//! counts sessions; a node only subscribes, confirms and delivers:
//! - requests that queue up together go out as one `SUBSCRIBE` (in a
//!   cluster, one `SSUBSCRIBE` per slot), written while messages keep being
//!   read, so delivery never waits for Redis;
//! - confirmations are matched as they arrive, in the order Redis answers;
//!   a session's request resolves when its channel's confirmation arrives,
//!   so it is subscribed before its welcome;
//! - every reply is checked: an error reply to a subscribe (an ACL that
//!   denies the channel, `NOAUTH` after a password change, `-BUSY`, …) fails
//!   the sessions that waited for it, and unless Redis refused only those
//!   channels, the connection ends; a `MOVED` hands the channels back to be
//!   placed again; an unsubscribe nobody asked for (a cluster failover or
//!   slot migration) hands those channels back too;
//! - a `PING` goes out every [`PROBE_EVERY`]; a server that neither answers
//!   it nor sends anything else for [`PROBE_TIMEOUT`] is taken as lost (a
//!   frozen or unreachable server sends nothing at all).
//!
//! A node never reconnects by itself: when its connection ends, the
//! subscriber learns it ([`NodeEvent::Lost`]) and decides where its channels
//! go next. Resubscribed channels are told to the [`Inbox`] as each batch is
//! confirmed: whatever was published while they were away is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pubsub::{self, Endpoint, Event, Reader, Writer};
use super::tls::Tls;
use super::{BrokerError, Inbox};

/// Time allowed for connecting and authenticating.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the connection is probed with `PING`.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Silence, with a `PING` unanswered, after which the connection is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How a probe failure reads.
const SILENT: &str = "no answer to PING";
/// Most channels named in one `SUBSCRIBE` or `UNSUBSCRIBE`.
const MAX_CHANNELS_PER_COMMAND: usize = 1024;
/// Most commands taken from the queue at once.
const MAX_COMMANDS: usize = 1024;

/// A session waiting for its channel to be live.
pub type Ack = oneshot::Sender<Result<(), BrokerError>>;

/// Which node, as the subscriber numbers them.
pub type NodeId = u16;

/// What the subscriber asks of a node.
pub enum NodeCmd {
    /// A session joins `channel`; `first` when no other local session has
    /// it, so it must be subscribed.
    Subscribe {
        /// The channel.
        channel: Arc<str>,
        /// Told once the channel is live.
        ack: Ack,
        /// No other local session has it.
        first: bool,
    },
    /// The channel's last local session left.
    Unsubscribe(Arc<str>),
    /// These channels were live elsewhere (a lost or demoted node): subscribe
    /// them here, and tell their sessions `resync` as each is back.
    Resubscribe(Vec<Arc<str>>),
}

/// What a node tells the subscriber.
pub enum NodeEvent {
    /// Every channel it was given to resubscribe is subscribed again; with
    /// how many [`NodeCmd::Resubscribe`] it has had.
    Up(NodeId, u32),
    /// Redis refused these channels' first subscription; their sessions
    /// were told, and each channel loses that many counts.
    Refused(NodeId, Vec<(Arc<str>, usize)>),
    /// These channels are not (or no longer) served here: a `MOVED` reply,
    /// or Redis dropped their subscriptions by itself. Their waiting
    /// sessions come along, to be placed again.
    Misplaced(NodeId, Vec<(Arc<str>, Vec<Ack>)>),
    /// The connection ended; every channel placed here is lost. The counts
    /// of joins it could not serve come back, as for [`NodeEvent::Refused`].
    Lost {
        /// The node.
        node: NodeId,
        /// Why, for the log.
        why: String,
        /// Joins it failed, by channel.
        failed: Vec<(Arc<str>, usize)>,
        /// It stopped answering (rather than closing or refusing): trying it
        /// again at once would cost another probe timeout.
        silent: bool,
    },
}

/// How a node names its commands: classic pub/sub, or sharded (one slot per command).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verbs {
    /// `SUBSCRIBE` / `UNSUBSCRIBE`.
    Classic,
    /// `SSUBSCRIBE` / `SUNSUBSCRIBE`, one slot per command.
    Sharded,
}

/// Where and how a node connects.
pub struct NodeSpec {
    /// Its number.
    pub id: NodeId,
    /// Its address and credentials.
    pub endpoint: Endpoint,
    /// TLS, if the endpoint asks for it.
    pub tls: Option<Tls>,
    /// Its verbs.
    pub verbs: Verbs,
    /// Whether to check with `ROLE` that it is a master (Sentinel).
    pub check_master: bool,
}

/// A command written and not yet fully answered.
enum InFlight {
    /// `(S)SUBSCRIBE`: the channels not confirmed yet, and whether they are
    /// being resubscribed (their sessions hear `resync` once they are back).
    Subscribe { channels: VecDeque<Arc<str>>, resubscribe: bool },
    /// `(S)UNSUBSCRIBE`: the confirmations still due.
    Unsubscribe(usize),
    /// `PING`, sent at this time.
    Ping(Instant),
}

/// One connection's state.
struct Node {
    id: NodeId,
    verbs: Verbs,
    inbox: Arc<dyn Inbox>,
    events: mpsc::UnboundedSender<NodeEvent>,
    reader: Reader,
    writer: Writer,
    in_flight: VecDeque<InFlight>,
    /// Sessions waiting for a channel's first confirmation.
    waiting: HashMap<Arc<str>, Vec<Ack>>,
    /// Resubscribe commands not yet confirmed.
    resubscribing: usize,
    /// [`NodeCmd::Resubscribe`]s received.
    asked: u32,
    last_heard: Instant,
}

/// Runs a node until its connection ends or `stop`: connects, says
/// [`NodeEvent::Up`], then serves `commands` (channels to resubscribe come as
/// [`NodeCmd::Resubscribe`]). Always ends with [`NodeEvent::Lost`] unless stopped.
pub async fn run(
    spec: NodeSpec,
    inbox: Arc<dyn Inbox>,
    mut commands: mpsc::UnboundedReceiver<NodeCmd>,
    events: mpsc::UnboundedSender<NodeEvent>,
    stop: CancellationToken,
) {
    let opened = tokio::select! {
        _ = stop.cancelled() => return,
        opened = open(&spec) => opened,
    };
    let mut node = match opened {
        Ok((reader, writer)) => Node {
            id: spec.id,
            verbs: spec.verbs,
            inbox,
            events: events.clone(),
            reader,
            writer,
            in_flight: VecDeque::new(),
            waiting: HashMap::new(),
            resubscribing: 0,
            asked: 0,
            last_heard: Instant::now(),
        },
        Err(e) => {
            let failed = fail_queued(&mut commands, &e);
            let silent = e.to_string().contains("no answer");
            let _ = events.send(NodeEvent::Lost { node: spec.id, why: e.to_string(), failed, silent });
            return;
        }
    };
    let why = tokio::select! {
        _ = stop.cancelled() => return,
        why = node.serve(&mut commands) => why,
    };
    let mut failed = node.fail_waiting(&why);
    failed.extend(fail_queued(&mut commands, &BrokerError::Disconnected));
    let silent = why.starts_with(SILENT);
    let _ = events.send(NodeEvent::Lost { node: spec.id, why, failed, silent });
}

async fn open(spec: &NodeSpec) -> Result<(Reader, Writer), BrokerError> {
    let (mut reader, mut writer) = pubsub::open(&spec.endpoint, spec.tls.as_ref(), CONNECT_TIMEOUT).await?;
    if spec.check_master {
        pubsub::check_role(&spec.endpoint, &mut reader, &mut writer, CONNECT_TIMEOUT).await?;
    }
    Ok((reader, writer))
}

/// Fails the joins still queued for a node that is gone; returns the counts they held.
fn fail_queued(commands: &mut mpsc::UnboundedReceiver<NodeCmd>, error: &BrokerError) -> Vec<(Arc<str>, usize)> {
    commands.close();
    let mut failed = Vec::new();
    while let Ok(cmd) = commands.try_recv() {
        if let NodeCmd::Subscribe { channel, ack, .. } = cmd {
            let _ = ack.send(Err(copy(error)));
            failed.push((channel, 1));
        }
    }
    failed
}

fn copy(error: &BrokerError) -> BrokerError {
    match error {
        BrokerError::Refused(why) => BrokerError::Refused(why.clone()),
        _ => BrokerError::Disconnected,
    }
}

impl Node {
    /// Serves until the connection ends; returns why.
    async fn serve(&mut self, commands: &mut mpsc::UnboundedReceiver<NodeCmd>) -> String {
        // Connected, with nothing yet: channels come as commands.
        let _ = self.events.send(NodeEvent::Up(self.id, 0));
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(64);
        loop {
            tokio::select! {
                biased;
                event = self.reader.next() => {
                    self.last_heard = Instant::now();
                    let event = match event {
                        None => return "closed by Redis".into(),
                        Some(Err(e)) => return e.to_string(),
                        Some(Ok(event)) => event,
                    };
                    if let Err(why) = self.heard(event) {
                        return why;
                    }
                }
                written = self.writer.write_some(), if self.writer.pending() => {
                    if let Err(e) = written {
                        return format!("write failed: {e}");
                    }
                }
                n = commands.recv_many(&mut batch, MAX_COMMANDS) => {
                    if n == 0 {
                        return "stopped".into();
                    }
                    self.take(&mut batch);
                }
                _ = probe.tick() => {
                    if let Some(why) = self.probe() {
                        crate::metrics::broker_probe_failed();
                        return why;
                    }
                }
            }
        }
    }

    /// Writes what a batch of commands needs: one subscribe for the channels
    /// that are new here, one unsubscribe for those that lost their last session.
    fn take(&mut self, batch: &mut Vec<NodeCmd>) {
        let mut joining: Vec<Arc<str>> = Vec::new();
        let mut leaving: Vec<Arc<str>> = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                NodeCmd::Subscribe { channel, ack, first } => {
                    if let Some(at) = leaving.iter().position(|c| *c == channel) {
                        // Its last session left in this same batch: it never stopped being subscribed.
                        leaving.swap_remove(at);
                        let _ = ack.send(Ok(()));
                    } else if let Some(acks) = self.waiting.get_mut(&channel) {
                        // Its confirmation is still due.
                        acks.push(ack);
                    } else if first {
                        self.waiting.insert(channel.clone(), vec![ack]);
                        joining.push(channel);
                    } else {
                        let _ = ack.send(Ok(()));
                    }
                }
                NodeCmd::Unsubscribe(channel) => leaving.push(channel),
                NodeCmd::Resubscribe(channels) => {
                    self.asked += 1;
                    if channels.is_empty() {
                        let _ = self.events.send(NodeEvent::Up(self.id, self.asked));
                    } else {
                        self.subscribe(channels, true);
                    }
                }
            }
        }
        if !joining.is_empty() {
            self.subscribe(joining, false);
        }
        if !leaving.is_empty() {
            self.unsubscribe(leaving);
        }
    }

    /// Queues the subscribe commands for `channels`: one per slot when sharded.
    fn subscribe(&mut self, channels: Vec<Arc<str>>, resubscribe: bool) {
        for group in self.groups(channels) {
            let mut cmd = redis::cmd(match self.verbs {
                Verbs::Classic => "SUBSCRIBE",
                Verbs::Sharded => "SSUBSCRIBE",
            });
            for channel in &group {
                cmd.arg(&**channel);
                if resubscribe {
                    // A session that arrives meanwhile waits for it, as for a new channel.
                    self.waiting.entry(channel.clone()).or_default();
                }
            }
            self.writer.queue(&cmd);
            if resubscribe {
                self.resubscribing += 1;
            }
            self.in_flight.push_back(InFlight::Subscribe { channels: group.into(), resubscribe });
        }
    }

    fn unsubscribe(&mut self, channels: Vec<Arc<str>>) {
        for group in self.groups(channels) {
            let mut cmd = redis::cmd(match self.verbs {
                Verbs::Classic => "UNSUBSCRIBE",
                Verbs::Sharded => "SUNSUBSCRIBE",
            });
            for channel in &group {
                cmd.arg(&**channel);
            }
            self.writer.queue(&cmd);
            self.in_flight.push_back(InFlight::Unsubscribe(group.len()));
        }
    }

    /// Splits `channels` into commands: at most [`MAX_CHANNELS_PER_COMMAND`]
    /// each, and of one slot each when sharded.
    fn groups(&self, channels: Vec<Arc<str>>) -> Vec<Vec<Arc<str>>> {
        let mut groups: Vec<Vec<Arc<str>>> = Vec::new();
        match self.verbs {
            Verbs::Classic => {
                for chunk in channels.chunks(MAX_CHANNELS_PER_COMMAND) {
                    groups.push(chunk.to_vec());
                }
            }
            Verbs::Sharded => {
                let mut by_slot: HashMap<u16, Vec<Arc<str>>> = HashMap::new();
                for channel in channels {
                    by_slot.entry(super::cluster::slot(&channel)).or_default().push(channel);
                }
                for (_, group) in by_slot {
                    for chunk in group.chunks(MAX_CHANNELS_PER_COMMAND) {
                        groups.push(chunk.to_vec());
                    }
                }
            }
        }
        groups
    }

    /// Handles one thing Redis said. An `Err` ends the connection.
    fn heard(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Message { channel, payload } => {
                if let Ok(channel) = std::str::from_utf8(&channel) {
                    // A copy: a message held in a slow session's queue keeps only its own bytes alive.
                    self.inbox.envelope(channel, &Bytes::copy_from_slice(&payload));
                }
            }
            Event::Subscribed(name) => {
                let Some(InFlight::Subscribe { channels, resubscribe }) = self.in_flight.front_mut() else {
                    return Err("a subscribe confirmation nobody asked for".into());
                };
                let resubscribe = *resubscribe;
                let Some(channel) = channels.pop_front() else { return Err("an unexpected reply".into()) };
                if *channel.as_bytes() != name[..] {
                    let heard = String::from_utf8_lossy(&name);
                    return Err(format!("confirmation for {heard:?} while {channel:?} was due"));
                }
                for ack in self.waiting.remove(&channel).into_iter().flatten() {
                    let _ = ack.send(Ok(()));
                }
                let done = channels.is_empty();
                if done {
                    self.in_flight.pop_front();
                }
                if resubscribe {
                    // Whatever was published on it while it was away is gone.
                    self.inbox.resubscribed(&mut std::iter::once(&*channel));
                    if done {
                        self.resubscribing -= 1;
                        if self.resubscribing == 0 {
                            let _ = self.events.send(NodeEvent::Up(self.id, self.asked));
                        }
                    }
                }
            }
            Event::Unsubscribed(name) => match self.in_flight.front_mut() {
                Some(InFlight::Unsubscribe(due)) => {
                    *due -= 1;
                    if *due == 0 {
                        self.in_flight.pop_front();
                    }
                }
                _ => {
                    // Redis dropped a subscription by itself: in a cluster, a
                    // failover or a slot migration. The channel goes elsewhere.
                    let Ok(name) = std::str::from_utf8(&name) else { return Err("an unreadable channel name".into()) };
                    if self.verbs == Verbs::Classic {
                        return Err(format!("Redis dropped the subscription of {name:?}"));
                    }
                    let _ = self.events.send(NodeEvent::Misplaced(self.id, vec![(Arc::from(name), Vec::new())]));
                }
            },
            Event::Pong => match self.in_flight.front() {
                Some(InFlight::Ping(_)) => {
                    self.in_flight.pop_front();
                }
                _ => return Err("a PONG nobody asked for".into()),
            },
            Event::Error(e) => return self.refused(e),
            Event::Other => return Err("an unexpected reply".into()),
        }
        Ok(())
    }

    /// Redis answered the oldest command with an error.
    fn refused(&mut self, error: String) -> Result<(), String> {
        let Some(InFlight::Subscribe { channels, resubscribe }) = self.in_flight.pop_front() else {
            return Err(format!("Redis answered with an error: {error}"));
        };
        if error.starts_with("MOVED") || error.starts_with("ASK") {
            // Not this node's slot (any more): placed again elsewhere, sessions and all.
            let moved =
                channels.into_iter().map(|c| (c.clone(), self.waiting.remove(&c).unwrap_or_default())).collect();
            let _ = self.events.send(NodeEvent::Misplaced(self.id, moved));
            return Ok(());
        }
        tracing::warn!(error = %error, channels = channels.len(), "redis subscriber: SUBSCRIBE refused");
        crate::metrics::broker_subscribe_refused();
        let mut refused = Vec::new();
        for channel in channels {
            let acks = self.waiting.remove(&channel).unwrap_or_default();
            if !acks.is_empty() {
                refused.push((channel, acks.len()));
            }
            for ack in acks {
                let _ = ack.send(Err(BrokerError::Refused(error.clone())));
            }
        }
        let _ = self.events.send(NodeEvent::Refused(self.id, refused));
        // Only a refusal of these channels themselves leaves the connection
        // good for the others; anything else (NOAUTH, BUSY, …) ends it.
        if resubscribe || !error.starts_with("NOPERM") {
            return Err(format!("SUBSCRIBE refused: {error}"));
        }
        Ok(())
    }

    /// Fails every session still waiting for a confirmation; returns their counts.
    fn fail_waiting(&mut self, why: &str) -> Vec<(Arc<str>, usize)> {
        let mut failed = Vec::new();
        for (channel, acks) in self.waiting.drain() {
            if !acks.is_empty() {
                failed.push((channel, acks.len()));
            }
            for ack in acks {
                let _ = ack.send(Err(BrokerError::Command(why.to_owned())));
            }
        }
        failed
    }

    /// Sends a `PING` unless one is unanswered; `Some(why)` when the one
    /// that is has waited too long while nothing else arrived either.
    fn probe(&mut self) -> Option<String> {
        let unanswered = self.in_flight.iter().find_map(|c| match c {
            InFlight::Ping(at) => Some(*at),
            _ => None,
        });
        match unanswered {
            Some(at) if at.elapsed() >= PROBE_TIMEOUT && self.last_heard.elapsed() >= PROBE_TIMEOUT => {
                Some(format!("{SILENT} for {:?}", at.elapsed()))
            }
            Some(_) => None,
            None => {
                self.writer.queue(&redis::cmd("PING"));
                self.in_flight.push_back(InFlight::Ping(Instant::now()));
                None
            }
        }
    }
}
