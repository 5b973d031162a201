//! The router, shared state, and [`run`], used by `main` and by tests.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisOptions};
use crate::broker::{Broker, BrokerError};
use crate::config::Settings;
use crate::registry::Registry;
use crate::routes;
use crate::session::handle::CloseReason;

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
    /// Fires when a shutdown is requested (SIGTERM): readiness turns 503 at once.
    pub shutdown: CancellationToken,
    /// Fires when the server stops taking new connections; new sessions close at once.
    pub stopping: CancellationToken,
    /// Tracks session tasks so shutdown can wait for them.
    pub sessions: TaskTracker,
    open_sockets: AtomicUsize,
    accepting: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// One of the instance's `SWITCHBOARD_MAX_SOCKETS` slots, given back on drop.
pub struct SocketPermit(AppState);

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    /// Whether new sockets are accepted and the broker can deliver.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && !self.shutdown.is_cancelled() && self.broker.is_ready()
    }

    /// Takes a socket slot, or `None` when the instance is full.
    pub fn try_open_socket(&self) -> Option<SocketPermit> {
        let before = self.open_sockets.fetch_add(1, Ordering::Relaxed);
        let permit = SocketPermit(self.clone());
        (before < self.settings.max_sockets).then_some(permit)
    }

    /// How a session that starts now must be closed, if the server is stopping.
    pub fn stop_reason(&self) -> Option<CloseReason> {
        self.stopping.is_cancelled().then(|| self.closing_reason())
    }

    fn closing_reason(&self) -> CloseReason {
        if self.settings.drain.is_zero() {
            CloseReason::SHUTDOWN
        } else {
            CloseReason::DRAIN
        }
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Serving HTTP failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

/// The HTTP routes over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(routes::ws::upgrade))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .merge(routes::assets::router())
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then shuts down: at once
/// (close 1001) when `drain` is zero, otherwise with a paced drain: `/readyz`
/// answers 503 while serving goes on for `drain`, then sockets close with 1012
/// at random moments spread over another `drain`. Returns once every socket is
/// gone or the grace period ran out.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    crate::metrics::handle();
    let requested = CancellationToken::new();
    // The broker outlives the drain: sessions relay until they close, and
    // announce their leave on the way out.
    let broker_stop = CancellationToken::new();
    let background = TaskTracker::new();
    let registry = Arc::new(Registry::new());
    let broker: Arc<dyn Broker> = match &settings.redis_url {
        None => Arc::new(MemoryBroker::new(registry.clone())),
        Some(url) => {
            let options = RedisOptions {
                url: url.clone(),
                prefix: settings.channel_prefix.clone(),
                presence_ttl: settings.presence_ttl,
                pool_size: settings.redis_pool_size,
            };
            let start =
                RedisBroker::start(options, registry.clone(), broker_stop.clone(), &background, Duration::from_secs(5));
            Arc::new(start.await?)
        }
    };
    // Presence upkeep stops with the broker: sessions still open during a drain keep theirs.
    background.spawn(crate::presence::keep_alive(
        registry.clone(),
        broker.clone(),
        settings.presence_ttl / 3,
        broker_stop.clone(),
    ));
    // Pings stop with the broker too: a draining socket is still looked after.
    if !settings.ping_interval.is_zero() {
        background.spawn(crate::heartbeat::run(
            registry.clone(),
            settings.ping_interval,
            settings.pong_timeout,
            broker_stop.clone(),
        ));
    }
    let grace = settings.shutdown_grace;
    let state = AppState(Arc::new(Shared {
        settings,
        registry,
        broker,
        shutdown: requested.clone(),
        stopping: CancellationToken::new(),
        sessions: TaskTracker::new(),
        open_sockets: AtomicUsize::new(0),
        accepting: AtomicBool::new(true),
    }));

    let addr = listener.local_addr()?;
    let broker_kind = if state.settings.redis_url.is_some() { "redis" } else { "memory" };
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, broker = broker_kind, workers, "listening");

    let trigger = tokio::spawn({
        let requested = requested.clone();
        async move {
            shutdown.await;
            requested.cancel();
        }
    });
    let server = serve(listener, router(state.clone()), state.settings.handshake_timeout, state.stopping.clone());
    let (served, ()) = tokio::join!(server, lifecycle(state.clone()));
    state.sessions.close();
    if tokio::time::timeout(grace, state.sessions.wait()).await.is_err() {
        tracing::warn!("shutdown grace period ran out with sockets still open");
    }
    broker_stop.cancel();
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
    trigger.abort();
    tracing::info!("stopped");
    served.map_err(RunError::Io)
}

/// Waits for the shutdown request, then drains or closes.
async fn lifecycle(state: AppState) {
    state.shutdown.cancelled().await;
    state.accepting.store(false, Ordering::Relaxed);
    let drain = state.settings.drain;
    if drain.is_zero() {
        state.stopping.cancel();
        tracing::info!(sessions = state.registry.len(), "shutting down: closing sockets");
        for session in state.registry.all() {
            session.close(CloseReason::SHUTDOWN);
        }
        return;
    }
    tracing::info!(drain_secs = drain.as_secs_f64(), sessions = state.registry.len(), "draining: /readyz is 503");
    tokio::time::sleep(drain).await;
    state.stopping.cancel();
    let mut plan: Vec<_> =
        state.registry.all().into_iter().map(|s| (drain.mul_f64(rand::rng().random::<f64>()), s)).collect();
    plan.sort_by_key(|(at, _)| *at);
    tracing::info!(sessions = plan.len(), "draining: closing sockets with 1012, spread over the drain span");
    let start = tokio::time::Instant::now();
    for (at, session) in plan {
        tokio::time::sleep_until(start + at).await;
        session.close(CloseReason::DRAIN);
    }
    // Sessions that opened while the closes were being planned.
    for session in state.registry.all() {
        session.close(CloseReason::DRAIN);
    }
}

/// Accepts connections until `stop`, serving HTTP/1.1 with upgrades and a
/// deadline on the request head (against slowloris), then waits briefly for
/// in-flight requests. Upgraded sockets are the sessions' business.
async fn serve(
    listener: TcpListener,
    router: Router,
    head_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(head_timeout);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    Ok(())
}
