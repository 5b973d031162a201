//! The router, shared state, and [`run`], used by `main` and by tests.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
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
    /// Fires when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Tracks session tasks so shutdown can wait for them.
    pub sessions: TaskTracker,
    accepting: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Whether new sockets are accepted and the broker can deliver.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && !self.shutdown.is_cancelled() && self.broker.is_ready()
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
        .merge(routes::assets::router())
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then closes every socket
/// with 1001 and returns once they are gone (or the grace period ran out).
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let token = CancellationToken::new();
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
            Arc::new(
                RedisBroker::start(options, registry.clone(), token.clone(), &background, Duration::from_secs(5))
                    .await?,
            )
        }
    };
    let grace = settings.shutdown_grace;
    let state = AppState(Arc::new(Shared {
        settings,
        registry,
        broker,
        shutdown: token.clone(),
        sessions: TaskTracker::new(),
        accepting: AtomicBool::new(true),
    }));

    let addr = listener.local_addr()?;
    tracing::info!(%addr, broker = if state.settings.redis_url.is_some() { "redis" } else { "memory" }, "listening");

    let stop = token.clone();
    let trigger = tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    let serve = axum::serve(listener, router(state.clone())).with_graceful_shutdown(token.clone().cancelled_owned());
    let closer = {
        let state = state.clone();
        async move {
            token.cancelled().await;
            state.accepting.store(false, Ordering::Relaxed);
            tracing::info!(sessions = state.registry.len(), "shutting down: closing sockets");
            for session in state.registry.all() {
                session.close(CloseReason::SHUTDOWN);
            }
        }
    };
    let (served, ()) = tokio::join!(serve.into_future(), closer);
    state.sessions.close();
    if tokio::time::timeout(grace, state.sessions.wait()).await.is_err() {
        tracing::warn!("shutdown grace period ran out with sockets still open");
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
    trigger.abort();
    tracing::info!("stopped");
    served.map_err(RunError::Io)
}
