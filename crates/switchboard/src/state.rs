//! What every request and session shares: [`AppState`], the instance's
//! [`Phase`] in its life, and the socket and connection caps.

use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Settings;
use crate::protocol::CloseReason;
use crate::session::registry::Registry;

/// Where the instance is in its life. Phases only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting sockets; `/readyz` is 200 while the broker is connected.
    Serving,
    /// A shutdown was asked for: `/readyz` and new `/ws` requests get 503,
    /// while open sessions carry on.
    Draining,
    /// The listener is closed and sessions are being closed; one that
    /// finishes opening now closes at once.
    Closing,
    /// Sessions are gone (or the grace period ran out): the broker, presence
    /// and heartbeat tasks stop.
    Stopped,
}

/// The instance's [`Phase`], watched by whoever must act on a change.
#[derive(Debug)]
pub struct Lifecycle(watch::Sender<Phase>);

impl Default for Lifecycle {
    fn default() -> Self {
        Self(watch::Sender::new(Phase::Serving))
    }
}

impl Lifecycle {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Moves on to `to`, unless the instance is there or further already.
    pub fn advance(&self, to: Phase) {
        self.0.send_if_modified(|now| {
            let forward = to > *now;
            if forward {
                *now = to;
            }
            forward
        });
    }

    /// Resolves once the instance reached `phase` (at once if it did already).
    pub fn reached(&self, phase: Phase) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut watch = self.0.subscribe();
        async move {
            // The sender lives in `AppState`; if it is gone, so is the instance.
            let _ = watch.wait_for(|now| *now >= phase).await;
        }
    }
}

/// One of the instance's `SWITCHBOARD_MAX_SOCKETS` slots, given back on drop.
///
/// Not tokio's `OwnedSemaphorePermit`: that holds its own `Arc` and a count
/// (16 bytes), and every session task keeps its permit for the socket's whole
/// life; this is the one pointer of the state the session holds anyway.
pub struct SocketPermit(AppState);

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.0.sockets.add_permits(1);
    }
}

/// One of the instance's `SWITCHBOARD_MAX_HTTP_CONNECTIONS` slots, given back
/// (and counted off `switchboard_http_connections`) on drop.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        crate::metrics::http_connection_closed();
    }
}

/// State shared by every request and session.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// Validated settings.
    pub settings: Settings,
    /// Local sessions by pair.
    pub registry: Arc<Registry>,
    /// Memory or Redis.
    pub broker: Arc<dyn Broker>,
    /// Serving, draining, closing or stopped.
    pub lifecycle: Lifecycle,
    /// Tracks session tasks so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// The runtime that live sessions run on: the one [`AppState::new`] was
    /// called on. Connections are accepted and sessions set up on the
    /// instance's front thread (see `app::run`), then moved here.
    pub live: tokio::runtime::Handle,
    /// Free socket slots.
    sockets: Semaphore,
    /// Free slots for HTTP connections that are not WebSockets (yet).
    connections: Arc<Semaphore>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// State over `broker` and `registry`, serving; live sessions run on the
    /// current runtime.
    pub fn new(settings: Settings, registry: Arc<Registry>, broker: Arc<dyn Broker>) -> Self {
        let sockets = Semaphore::new(settings.max_sockets.min(Semaphore::MAX_PERMITS));
        let connections = Arc::new(Semaphore::new(settings.max_http_connections.min(Semaphore::MAX_PERMITS)));
        let live = tokio::runtime::Handle::current();
        // After a broker reconnect, resumable sessions get what they missed
        // from the history, replayed on the runtime of live sessions.
        registry.replay_with(&broker, live.clone(), (settings.outbox_messages, settings.outbox_bytes));
        Self(Arc::new(Shared {
            settings,
            registry,
            broker,
            lifecycle: Lifecycle::default(),
            sessions: TaskTracker::new(),
            live,
            sockets,
            connections,
        }))
    }

    /// Whether new sockets are accepted and the broker can deliver.
    pub fn is_ready(&self) -> bool {
        self.lifecycle.phase() == Phase::Serving && self.broker.is_ready() && self.resume_key_known()
    }

    /// Whether resume tokens can be made and checked: always, but for a
    /// resume key shared through Redis that is not learned yet.
    pub fn resume_key_known(&self) -> bool {
        self.settings.resume_key.as_ref().is_none_or(crate::auth::ResumeKey::is_known)
    }

    /// Whether a shutdown was asked for.
    pub fn is_shutting_down(&self) -> bool {
        self.lifecycle.phase() >= Phase::Draining
    }

    /// Takes a socket slot, or `None` when the instance is full.
    pub fn try_open_socket(&self) -> Option<SocketPermit> {
        // Forgotten here, given back by the permit's `Drop`.
        self.sockets.try_acquire().ok()?.forget();
        Some(SocketPermit(self.clone()))
    }

    /// Takes an HTTP connection slot, held from `accept` until the connection
    /// ends or becomes a WebSocket, or `None` when
    /// `SWITCHBOARD_MAX_HTTP_CONNECTIONS` are open. A connection costs its
    /// task, hyper's buffers and its file descriptor while it sends its
    /// request head, so half-open ones must not pile up without a bound.
    pub fn try_open_connection(&self) -> Option<ConnectionSlot> {
        let permit = self.connections.clone().try_acquire_owned().ok()?;
        crate::metrics::http_connection_opened();
        Some(ConnectionSlot { _permit: permit })
    }

    /// Waits for an HTTP connection slot (see [`AppState::try_open_connection`]).
    pub async fn open_connection(&self) -> ConnectionSlot {
        let permit = self.connections.clone().acquire_owned().await.expect("the connection semaphore is never closed");
        crate::metrics::http_connection_opened();
        ConnectionSlot { _permit: permit }
    }

    /// How sessions close when the instance closes them: 1012 after a drain
    /// (reconnect elsewhere), 1001 without one.
    pub fn closing_reason(&self) -> CloseReason {
        if self.settings.drain.is_zero() {
            CloseReason::Shutdown
        } else {
            CloseReason::Drain
        }
    }

    /// How a session that finishes opening now must be closed, if the
    /// instance is closing.
    pub fn stop_reason(&self) -> Option<CloseReason> {
        (self.lifecycle.phase() >= Phase::Closing).then(|| self.closing_reason())
    }
}
