//! The subscriber: which channels this instance listens to, and on which
//! Redis connection each one lives.
//!
//! It counts local sessions per channel, subscribing on a channel's first
//! session and unsubscribing after its last, so `PUBSUB NUMSUB` falls back to
//! 0. The connections themselves are [`super::node`] tasks of switchboard's
//! own, one per server: the one standalone server (or Sentinel's current
//! master), or, in a Redis Cluster, each master that serves a subscribed
//! channel's slot (sharded pub/sub). Nodes deliver messages straight into
//! the [`Inbox`]; this task only places channels, so nothing it waits for
//! ever holds up delivery.
//!
//! When a node's connection ends (Redis closed it, a `PING` went
//! unanswered, a subscribe was refused) its channels are lost: the inbox is
//! told at once (their senders stop waiting for echoes), `/readyz` turns
//! unready, and after a backoff they are placed again: on the standalone
//! server once it answers (Sentinel is asked anew), or in a cluster on
//! whichever master the refreshed slot map names. Channels that Redis drops
//! by itself (a cluster failover or slot migration) or that a node answers
//! with `MOVED` are placed again the same way, and only they are touched.
//! Each node tells the inbox which channels are back as it resubscribes
//! them; pub/sub is at-most-once, so anything published meanwhile is gone
//! (the sessions tell their clients `resync`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cluster::{self, Address, SlotMap};
use super::node::{self, Ack, NodeCmd, NodeEvent, NodeId, NodeSpec, Verbs};
use super::pubsub::Endpoint;
use super::target::Target;
use super::{BrokerError, Inbox};

/// The first wait before placing lost channels again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts: short, because in a cluster or under
/// Sentinel the replacement master usually appears within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Time allowed to ask Sentinel or a cluster node where things are.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most requests taken from the queue at once.
const MAX_REQUESTS: usize = 1024;
/// How long a cluster master that stopped answering gets no channels while
/// the slot map still names it: about the time its replica takes over.
const SUSPECT_GRACE: Duration = Duration::from_secs(6);
/// A channel that has no node right now.
const NOWHERE: NodeId = NodeId::MAX;

/// A session's request to the subscriber.
pub enum Request {
    /// Count one more local session on the channel; answered once it is live.
    Subscribe(Arc<str>, Ack),
    /// Count one fewer.
    Unsubscribe(Box<str>),
}

/// A subscribed channel: its local sessions, and the node it lives on.
#[derive(Clone, Copy)]
struct Placed {
    count: u32,
    node: NodeId,
}

/// A channel waiting to be placed again, and the sessions waiting for it.
#[derive(Default)]
struct Homeless {
    acks: Vec<Ack>,
    /// Whether it was subscribed before (its sessions hear `resync` when it is back).
    live: bool,
}

/// A running node task.
struct Link {
    address: Address,
    tx: mpsc::UnboundedSender<NodeCmd>,
    stop: CancellationToken,
    /// Every channel it was given is subscribed.
    up: bool,
    /// Resubscribe commands sent to it; an `Up` that counts fewer is stale.
    asked: u32,
}

/// Where things are: the standalone server, or a cluster's slot map.
enum Layout {
    Single(Endpoint),
    Cluster(SlotMap),
}

type Asking = Pin<Box<dyn Future<Output = Result<Layout, BrokerError>> + Send>>;

/// The subscriber task's state.
pub struct Subscriber {
    target: Target,
    inbox: Arc<dyn Inbox>,
    ready: Arc<AtomicBool>,
    /// Ready, with some channels cut off (a cluster shard failing over).
    degraded: Arc<AtomicBool>,
    /// A cluster node answered the last question about the slot map.
    reachable: bool,
    first: Option<oneshot::Sender<()>>,
    tracker: TaskTracker,
    /// Local sessions per subscribed channel.
    channels: HashMap<Arc<str>, Placed>,
    /// Channels whose node was lost or that must move.
    homeless: HashMap<Arc<str>, Homeless>,
    /// Node tasks by id; `None` once ended.
    links: Vec<Option<Link>>,
    /// The cluster's slot map (empty when standalone or not known yet).
    slots: SlotMap,
    /// The standalone server (or Sentinel's master) when last asked.
    single: Option<Endpoint>,
    events_tx: mpsc::UnboundedSender<NodeEvent>,
    backoff: Duration,
    /// When to ask again where things are.
    retry_at: Option<Instant>,
    /// The last reason a connection failed, logged once until it changes.
    last_why: Option<String>,
    /// Cluster masters that stopped answering, and since when: asked last
    /// for the slot map, and not given channels for [`SUSPECT_GRACE`] unless
    /// the slot map changes (their replica is likely being promoted).
    suspects: Vec<(Address, Instant)>,
    /// Slots whose channels a node dropped (`sunsubscribe`: it no longer
    /// serves them), and that node. It is asked first for the next slot
    /// map, and a map that still names it for one of those slots is stale:
    /// other nodes may not have heard of the failover yet, and a replica
    /// takes sharded subscriptions for its master's slots but may not hear
    /// the new master's messages yet.
    dropped_by: Vec<(u16, Address)>,
    connected_before: bool,
    /// Every channel was subscribed when last looked at.
    was_whole: bool,
}

impl Subscriber {
    /// A subscriber for `target`, delivering into `inbox`. `health` is
    /// (ready, degraded): one server (or Sentinel's master) is ready when
    /// every live channel is subscribed; a cluster is ready while its slot
    /// map is known and a node answers, and degraded while some channels are
    /// cut off. `first` is told after the first attempt to connect
    /// (successful or not). Node tasks run on `tracker`.
    pub fn new(
        target: Target,
        inbox: Arc<dyn Inbox>,
        (ready, degraded): (Arc<AtomicBool>, Arc<AtomicBool>),
        first: oneshot::Sender<()>,
        tracker: TaskTracker,
    ) -> (Self, mpsc::UnboundedReceiver<NodeEvent>) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let subscriber = Self {
            target,
            inbox,
            ready,
            degraded,
            reachable: false,
            first: Some(first),
            tracker,
            channels: HashMap::new(),
            homeless: HashMap::new(),
            links: Vec::new(),
            slots: SlotMap::default(),
            single: None,
            events_tx,
            backoff: FIRST_BACKOFF,
            retry_at: Some(Instant::now()),
            suspects: Vec::new(),
            dropped_by: Vec::new(),
            last_why: None,
            connected_before: false,
            was_whole: false,
        };
        (subscriber, events)
    }

    /// Runs until `shutdown`, serving `requests`.
    pub async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut events: mpsc::UnboundedReceiver<NodeEvent>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(64);
        let mut asking: Option<Asking> = None;
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                n = requests.recv_many(&mut batch, MAX_REQUESTS) => {
                    if n == 0 {
                        break;
                    }
                    for request in batch.drain(..) {
                        self.request(request);
                    }
                }
                Some(event) = events.recv() => self.node_event(event),
                _ = sleep_until(retry_at), if retry_at.is_some() && asking.is_none() => {
                    self.retry_at = None;
                    asking = Some(self.ask());
                }
                layout = async { asking.as_mut().expect("guarded").await }, if asking.is_some() => {
                    asking = None;
                    self.placed(layout);
                }
            }
            self.update_ready();
        }
        for link in self.links.iter().flatten() {
            link.stop.cancel();
        }
    }

    /// Asks where things are: Sentinel's master, or the cluster's slot map.
    fn ask(&self) -> Asking {
        let target = self.target.clone();
        // Healthy masters first: a frozen one would hold the question up.
        let suspect = |m: &Address| self.suspects.iter().any(|(a, _)| a == m);
        let mut prefer: Vec<Address> = self.dropped_by.iter().map(|(_, a)| a.clone()).collect();
        prefer.dedup();
        let first = prefer.clone();
        prefer.extend(self.slots.masters().into_iter().filter(|m| !suspect(m) && !first.contains(m)));
        prefer.extend(self.suspects.iter().map(|(a, _)| a.clone()));
        Box::pin(async move {
            if target.is_cluster() {
                Ok(Layout::Cluster(cluster::fetch(&target, &prefer, ASK_TIMEOUT).await?))
            } else {
                let server = target.server(ASK_TIMEOUT).await?;
                Ok(Layout::Single(Endpoint::from_info(&server)?))
            }
        })
    }

    /// The answer to [`Subscriber::ask`]: places every homeless channel.
    fn placed(&mut self, layout: Result<Layout, BrokerError>) {
        match layout {
            Ok(Layout::Single(endpoint)) => {
                if self.single.as_ref() != Some(&endpoint) {
                    // Sentinel names another master: leave the old one.
                    self.drop_links_except(&[(endpoint.host.clone(), endpoint.port)]);
                }
                self.single = Some(endpoint);
                self.ensure_single();
            }
            Ok(Layout::Cluster(map)) => {
                self.reachable = true;
                if self.dropped_by.iter().any(|(slot, node)| map.master_of(*slot) == Some(node)) {
                    tracing::debug!(
                        "redis subscriber: the slot map still names the node that dropped them; asking again"
                    );
                    self.lost_attempt();
                    return;
                }
                self.dropped_by.clear();
                if map != self.slots {
                    self.suspects.clear();
                    self.target.topology_changed();
                }
                self.slots = map;
                let masters = self.slots.masters();
                self.drop_links_except(&masters);
                // Channels whose slot moved to another master while their node stayed up.
                let moved: Vec<Arc<str>> = self
                    .channels
                    .iter()
                    .filter(|(name, placed)| {
                        placed.node != NOWHERE
                            && self.slots.master_of(cluster::slot(name)) != self.address_of(placed.node)
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in moved {
                    self.unplace(name, true);
                }
            }
            Err(e) => {
                self.reachable = false;
                tracing::warn!(error = %e, "redis subscriber: can't find Redis");
                self.lost_attempt();
                return;
            }
        }
        self.place_homeless();
    }

    /// Starts the standalone node if it isn't running.
    fn ensure_single(&mut self) {
        let Some(endpoint) = self.single.clone() else { return };
        if self.links.first().is_some_and(Option::is_some) {
            return;
        }
        self.spawn_link(0, endpoint);
    }

    fn address_of(&self, node: NodeId) -> Option<&Address> {
        self.links.get(node as usize)?.as_ref().map(|l| &l.address)
    }

    /// Stops the links whose address is not in `keep`; their channels move.
    fn drop_links_except(&mut self, keep: &[Address]) {
        let gone: Vec<NodeId> = self
            .links
            .iter()
            .enumerate()
            .filter_map(|(id, link)| link.as_ref().filter(|l| !keep.contains(&l.address)).map(|_| id as NodeId))
            .collect();
        for id in gone {
            if let Some(link) = self.links[id as usize].take() {
                link.stop.cancel();
            }
            self.node_gone(id);
        }
    }

    /// The node for `address`, started if need be.
    fn node_at(&mut self, address: &Address) -> Result<NodeId, BrokerError> {
        if let Some(id) = self.links.iter().position(|l| l.as_ref().is_some_and(|l| &l.address == address)) {
            return Ok(id as NodeId);
        }
        let endpoint = self.target.node_endpoint(&address.0, address.1)?;
        let id = self.links.iter().position(Option::is_none).unwrap_or(self.links.len());
        self.spawn_link(id as NodeId, endpoint);
        Ok(id as NodeId)
    }

    fn spawn_link(&mut self, id: NodeId, endpoint: Endpoint) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let spec = NodeSpec {
            id,
            endpoint: endpoint.clone(),
            tls: self.target.tls().cloned(),
            verbs: if self.target.is_cluster() { Verbs::Sharded } else { Verbs::Classic },
            check_master: self.target.checks_master(),
        };
        let address = (endpoint.host, endpoint.port);
        self.tracker.spawn(node::run(spec, self.inbox.clone(), rx, self.events_tx.clone(), stop.clone()));
        let link = Some(Link { address, tx, stop, up: false, asked: 0 });
        match self.links.get_mut(id as usize) {
            Some(slot) => *slot = link,
            None => self.links.push(link),
        }
    }

    /// Where a channel goes now: the standalone node, or its slot's master.
    fn home(&mut self, channel: &str) -> Result<NodeId, BrokerError> {
        if !self.target.is_cluster() {
            return match self.links.first() {
                Some(Some(_)) => Ok(0),
                _ => Err(BrokerError::Disconnected),
            };
        }
        let master = self.slots.master_of(cluster::slot(channel)).cloned().ok_or(BrokerError::Disconnected)?;
        if self.suspects.iter().any(|(a, since)| *a == master && since.elapsed() < SUSPECT_GRACE) {
            return Err(BrokerError::Disconnected);
        }
        self.node_at(&master)
    }

    fn send(&mut self, node: NodeId, cmd: NodeCmd) -> Result<(), NodeCmd> {
        match self.links.get(node as usize).and_then(Option::as_ref) {
            Some(link) => link.tx.send(cmd).map_err(|e| e.0),
            None => Err(cmd),
        }
    }

    fn request(&mut self, request: Request) {
        match request {
            Request::Subscribe(channel, ack) => self.join(channel, ack),
            Request::Unsubscribe(channel) => self.leave(&channel),
        }
    }

    fn join(&mut self, channel: Arc<str>, ack: Ack) {
        if let Some(placed) = self.channels.get_mut(&channel) {
            placed.count += 1;
            let node = placed.node;
            if node == NOWHERE {
                // Lost with its node: the session waits until it is back.
                self.homeless.entry(channel).or_default().acks.push(ack);
                return;
            }
            if let Err(NodeCmd::Subscribe { ack, .. }) =
                self.send(node, NodeCmd::Subscribe { channel: channel.clone(), ack, first: false })
            {
                self.homeless.entry(channel).or_default().acks.push(ack);
            }
            return;
        }
        let node = match self.home(&channel) {
            Ok(node) => node,
            Err(e) => {
                let _ = ack.send(Err(e));
                return;
            }
        };
        self.channels.insert(channel.clone(), Placed { count: 1, node });
        if let Err(NodeCmd::Subscribe { ack, .. }) =
            self.send(node, NodeCmd::Subscribe { channel: channel.clone(), ack, first: true })
        {
            self.channels.remove(&channel);
            let _ = ack.send(Err(BrokerError::Disconnected));
        }
    }

    fn leave(&mut self, channel: &str) {
        let Some(placed) = self.channels.get_mut(channel) else { return };
        placed.count = placed.count.saturating_sub(1);
        if placed.count > 0 {
            return;
        }
        let node = placed.node;
        let (name, _) = self.channels.remove_entry(channel).expect("present");
        if node == NOWHERE {
            if let Some(homeless) = self.homeless.remove(channel) {
                for ack in homeless.acks {
                    let _ = ack.send(Err(BrokerError::Disconnected));
                }
            }
        } else {
            let _ = self.send(node, NodeCmd::Unsubscribe(name));
        }
    }

    /// Drops `n` counts of `channel` whose joins failed.
    fn uncount(&mut self, channel: &str, n: usize) {
        let Some(placed) = self.channels.get_mut(channel) else { return };
        placed.count = placed.count.saturating_sub(n as u32);
        if placed.count == 0 {
            self.channels.remove(channel);
            self.homeless.remove(channel);
        }
    }

    /// Marks `channel` as needing a new home; its sessions hear nothing from
    /// the old one any more.
    fn unplace(&mut self, channel: Arc<str>, live: bool) {
        if let Some(placed) = self.channels.get_mut(&channel) {
            if placed.node != NOWHERE {
                let old = placed.node;
                placed.node = NOWHERE;
                // The old node must not keep it (a slot that moved while it stayed up).
                let _ = self.send(old, NodeCmd::Unsubscribe(channel.clone()));
            }
            let homeless = self.homeless.entry(channel).or_default();
            homeless.live |= live;
        }
    }

    fn node_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Up(id, answered) => {
                if let Some(Some(link)) = self.links.get_mut(id as usize) {
                    link.up = answered == link.asked;
                }
                self.backoff = FIRST_BACKOFF;
            }
            NodeEvent::Refused(_, refused) => {
                for (channel, n) in refused {
                    self.uncount(&channel, n);
                }
            }
            NodeEvent::Misplaced(id, misplaced) => {
                let mut lost = Vec::new();
                let dropper = self.address_of(id).cloned();
                for (channel, acks) in misplaced {
                    let Some(placed) = self.channels.get_mut(&channel) else {
                        for ack in acks {
                            let _ = ack.send(Err(BrokerError::Disconnected));
                        }
                        continue;
                    };
                    if placed.node != id {
                        continue;
                    }
                    placed.node = NOWHERE;
                    if let Some(address) = &dropper {
                        self.dropped_by.push((cluster::slot(&channel), address.clone()));
                    }
                    // A channel with sessions beyond those still waiting was live here.
                    let live = placed.count as usize > acks.len();
                    let homeless = self.homeless.entry(channel.clone()).or_default();
                    homeless.live |= live;
                    homeless.acks.extend(acks);
                    if live {
                        lost.push(channel);
                    }
                }
                tracing::info!(channels = lost.len(), "redis subscriber: subscriptions moved; asking the cluster");
                self.inbox.connection_lost(&mut lost.iter().map(|c| &**c));
                self.schedule(Duration::ZERO);
            }
            NodeEvent::Lost { node, why, failed, silent } => {
                for (channel, n) in failed {
                    self.uncount(&channel, n);
                }
                let current = self.links.get(node as usize).and_then(Option::as_ref).map(|l| (l.up, l.address.clone()));
                if let Some((was_up, address)) = current {
                    self.links[node as usize] = None;
                    if was_up {
                        tracing::warn!(reason = %why, "redis subscriber: connection lost");
                    } else if self.last_why.as_deref() != Some(why.as_str()) {
                        // A new reason (a refused login after a plain disconnect, say) is worth a line.
                        tracing::warn!(reason = %why, "redis subscriber: can't connect");
                    } else {
                        tracing::debug!(reason = %why, "redis subscriber: still can't connect");
                    }
                    self.last_why = Some(why);
                    if silent && self.target.is_cluster() {
                        self.suspects.retain(|(a, _)| *a != address);
                        self.suspects.push((address, Instant::now()));
                    }
                    self.node_gone(node);
                } else {
                    tracing::debug!(reason = %why, "redis subscriber: an old connection ended");
                }
                if let Some(first) = self.first.take() {
                    let _ = first.send(());
                }
                self.lost_attempt();
            }
        }
    }

    /// Every channel of `node` (now stopped) is lost until placed again.
    fn node_gone(&mut self, node: NodeId) {
        let mut lost = Vec::new();
        for (name, placed) in self.channels.iter_mut() {
            if placed.node == node {
                placed.node = NOWHERE;
                lost.push(name.clone());
            }
        }
        // Whatever was published on them and not read yet is gone with the connection.
        self.inbox.connection_lost(&mut lost.iter().map(|c| &**c));
        for name in lost {
            self.homeless.entry(name).or_default().live = true;
        }
    }

    /// An attempt failed: try again after the backoff.
    fn lost_attempt(&mut self) {
        let wait = self.backoff.min(self.target.max_backoff());
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF).min(self.target.max_backoff());
        self.schedule(wait);
    }

    fn schedule(&mut self, wait: Duration) {
        let at = Instant::now() + wait;
        self.retry_at = Some(self.retry_at.map_or(at, |t| t.min(at)));
    }

    /// Sends every homeless channel to its node, starting nodes as needed.
    fn place_homeless(&mut self) {
        if !self.target.is_cluster() {
            self.ensure_single();
        }
        let homeless: Vec<(Arc<str>, Homeless)> = self.homeless.drain().collect();
        let mut resubscribe: HashMap<NodeId, Vec<Arc<str>>> = HashMap::new();
        let mut joins: Vec<(NodeId, Arc<str>, Ack, bool)> = Vec::new();
        let mut failed = false;
        for (channel, Homeless { acks, live }) in homeless {
            let node = match self.home(&channel) {
                Ok(node) => node,
                Err(_) => {
                    failed = true;
                    self.homeless.insert(channel, Homeless { acks, live });
                    continue;
                }
            };
            if let Some(placed) = self.channels.get_mut(&channel) {
                placed.node = node;
            }
            if live {
                resubscribe.entry(node).or_default().push(channel.clone());
            }
            // A channel that was never live is subscribed by its first waiting session.
            for (i, ack) in acks.into_iter().enumerate() {
                joins.push((node, channel.clone(), ack, !live && i == 0));
            }
        }
        for (node, channels) in resubscribe {
            if let Some(Some(link)) = self.links.get_mut(node as usize) {
                link.up = false;
                link.asked += 1;
            }
            let _ = self.send(node, NodeCmd::Resubscribe(channels));
        }
        for (node, channel, ack, first) in joins {
            if let Err(NodeCmd::Subscribe { channel, ack, .. }) =
                self.send(node, NodeCmd::Subscribe { channel, ack, first })
            {
                self.uncount(&channel, 1);
                let _ = ack.send(Err(BrokerError::Disconnected));
            }
        }
        if failed {
            self.lost_attempt();
        }
    }

    fn update_ready(&mut self) {
        // A node that was given channels back is up once it has them all; a
        // new cluster node connecting for its first channel is no reason to
        // turn sessions away (they wait for their own confirmation).
        let nodes_up = self.links.iter().flatten().all(|l| l.up || l.asked == 0);
        let single_ok =
            self.target.is_cluster() || self.links.first().is_some_and(|l| l.as_ref().is_some_and(|l| l.up));
        let cluster_ok = !self.target.is_cluster() || !self.slots.is_empty();
        let whole = nodes_up && single_ok && cluster_ok && self.homeless.is_empty() && self.retry_at.is_none();
        // A cluster that lost one shard still serves the others: new
        // sessions are taken (a lost shard's are refused), and /readyz says
        // "degraded". Turning every replica away would empty the load
        // balancer for the whole failover.
        let ready = whole || (self.target.is_cluster() && cluster_ok && self.reachable);
        self.degraded.store(ready && !whole, Ordering::Relaxed);
        self.ready.store(ready, Ordering::Relaxed);
        if whole && !self.was_whole {
            self.was_whole = true;
            self.last_why = None;
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            if self.connected_before {
                tracing::info!(channels = self.channels.len(), "redis subscriber: reconnected");
                crate::metrics::broker_reconnect();
            } else {
                tracing::info!("redis subscriber: connected");
            }
            self.connected_before = true;
        } else if !whole {
            self.was_whole = false;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
