//! The router and [`run`], which serves a listener through the instance's
//! [`Phase`]s; used by `main` and by tests.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisOptions};
use crate::broker::target::Target;
use crate::broker::tls::Tls;
use crate::broker::{Broker, BrokerError, Inbox};
use crate::config::{RedisMode, Settings};
use crate::routes;
use crate::session::registry::Registry;
use crate::state::{AppState, Phase};

/// How long the broker's first connection may take before the server starts
/// anyway (it keeps retrying, and `/readyz` says 503 meanwhile).
const FIRST_BROKER_CONNECT: Duration = Duration::from_secs(5);
/// How long in-flight HTTP requests may take once the listener closed.
const HTTP_GRACE: Duration = Duration::from_secs(5);
/// How long the background tasks may take to stop.
const BACKGROUND_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (out of file descriptors and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// After the first failed `accept` is logged, at most one more line per this span.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);
/// hyper's smallest allowed read buffer bound.
const MIN_HEAD_BUFFER: usize = 8192;
/// File descriptors the process needs besides its sockets: listener, Redis
/// lanes and subscriber, runtime, logs, and connections still in their handshake.
pub const FD_RESERVE: u64 = 64;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Serving HTTP failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// `SWITCHBOARD_METRICS_LISTEN` could not be bound.
    #[error("cannot listen on {0} (SWITCHBOARD_METRICS_LISTEN): {1}")]
    MetricsListen(std::net::SocketAddr, std::io::Error),
}

/// The HTTP routes over `state`. `/metrics` is among them unless
/// `SWITCHBOARD_METRICS_LISTEN` gives it a listener of its own (then it is a 404 here).
pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/ws", get(routes::ws::upgrade))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz));
    if state.settings.metrics_listen.is_none() {
        router = router.route("/metrics", get(routes::health::metrics));
    }
    router.merge(routes::assets::router()).with_state(state)
}

/// Serves `/metrics` alone on `addr` until `stop`, on `background`.
async fn start_metrics(
    addr: std::net::SocketAddr,
    stop: &CancellationToken,
    background: &TaskTracker,
) -> Result<(), RunError> {
    let listener = TcpListener::bind(addr).await.map_err(|e| RunError::MetricsListen(addr, e))?;
    let metrics_addr = listener.local_addr()?;
    tracing::info!(%metrics_addr, "serving /metrics");
    let router = Router::new().route("/metrics", get(routes::health::metrics));
    let stop = stop.clone();
    background.spawn(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the /metrics listener failed");
        }
    });
    Ok(())
}

/// The listen backlog asked for; the kernel caps it at `net.core.somaxconn`
/// (4096 on current Linux).
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds the listener, with a listen backlog as deep as the kernel allows.
///
/// `TcpListener::bind` asks for 1024. When 5,000 clients per instance
/// reconnected at once, the kernel's accept queue overflowed 14,048 times
/// and 12,350 SYNs were sent again after 1 s or 3 s (the client's SYN
/// timeouts), which set the pace of the whole storm, not the server.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std's and tokio's `bind` do on Unix: a restart may bind while old
    // connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Who asks the instance to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// An orchestrator (SIGTERM): the drain runs its whole span, so that load
    /// balancers see `/readyz` 503 before the listener closes.
    Terminate,
    /// A person at a terminal (SIGINT, Ctrl-C): the drain ends as soon as no
    /// socket is left, at once when there is none.
    Interrupt,
}

/// Serves on `listener` through the instance's [`Phase`]s. The first item of
/// `requests` starts the shutdown: at once (close 1001) when `drain` is
/// zero, otherwise a paced drain: `/readyz` answers 503 while serving goes
/// on for `drain` (for an [`StopRequest::Interrupt`], only while a socket is
/// left), then sockets close with 1012 at random moments spread over another
/// `drain`. A second item closes every socket at once. Returns once every
/// socket is gone or the grace period ran out.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    requests: impl Stream<Item = StopRequest> + Send + 'static,
) -> Result<(), RunError> {
    crate::metrics::handle();
    // The broker outlives the drain: sessions relay until they close, and
    // announce their leave on the way out.
    let broker_stop = CancellationToken::new();
    let background = TaskTracker::new();
    if let Some(addr) = settings.metrics_listen {
        start_metrics(addr, &broker_stop, &background).await?;
    }
    let registry = Arc::new(Registry::new());
    let broker = start_broker(&settings, registry.clone(), &broker_stop, &background).await?;
    start_upkeep(&settings, &registry, &broker, &broker_stop, &background);
    if let Some(key) = settings.resume_key.clone().filter(crate::auth::ResumeKey::is_shared) {
        share_resume_key(key, broker.clone(), &broker_stop, &background).await;
    }
    let grace = settings.shutdown_grace;
    let state = AppState::new(settings, registry, broker);

    let addr = listener.local_addr()?;
    let broker_kind = if state.settings.redis_url.is_some() { "redis" } else { "memory" };
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, broker = broker_kind, workers, "listening");
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => {
            if let Some(warning) = fd_limit_warning(state.settings.max_sockets, soft) {
                tracing::warn!(max_sockets = state.settings.max_sockets, open_file_limit = soft, "{warning}");
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the open-file limit"),
    }

    let mut front = Front::start(listener, state.clone())?;
    let (served, ()) = tokio::join!(front.served(), shut_down(state.clone(), Box::pin(requests)));
    state.sessions.close();
    if tokio::time::timeout(grace, state.sessions.wait()).await.is_err() {
        tracing::warn!("shutdown grace period ran out with sockets still open");
    }
    front.stop();
    state.lifecycle.advance(Phase::Stopped);
    broker_stop.cancel();
    background.close();
    let _ = tokio::time::timeout(BACKGROUND_GRACE, background.wait()).await;
    tracing::info!("stopped");
    served.map_err(RunError::Io)
}

/// The in-memory broker, or the Redis broker once its subscriber connected
/// (or [`FIRST_BROKER_CONNECT`] passed).
async fn start_broker(
    settings: &Settings,
    registry: Arc<Registry>,
    stop: &CancellationToken,
    background: &TaskTracker,
) -> Result<Arc<dyn Broker>, BrokerError> {
    let inbox: Arc<dyn Inbox> = registry;
    let Some(url) = &settings.redis_url else {
        return Ok(Arc::new(MemoryBroker::new(inbox).with_history(settings.resume)));
    };
    let ca_pem = match &settings.redis_ca_file {
        Some(path) => Some(
            tokio::fs::read(path)
                .await
                .map_err(|e| BrokerError::Connect(format!("SWITCHBOARD_REDIS_CA_FILE {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let tls = if ca_pem.is_some() || url.contains("rediss://") { Some(Tls::new(ca_pem)?) } else { None };
    let target = match settings.redis_mode {
        RedisMode::Standalone => Target::standalone(url, tls)?,
        RedisMode::Sentinel => {
            let master = settings.redis_sentinel_master.as_deref().unwrap_or_default();
            Target::sentinel(url, master, settings.redis_master_login.as_ref(), tls)?
        }
        RedisMode::Cluster => Target::cluster(url, tls)?,
    };
    let options = RedisOptions {
        target,
        prefix: settings.channel_prefix.clone(),
        presence_ttl: settings.presence_ttl,
        pool_size: settings.redis_pool_size,
    };
    let broker = RedisBroker::start(options, inbox, stop.clone(), background, FIRST_BROKER_CONNECT).await?;
    Ok(Arc::new(broker.with_history(settings.resume)))
}

/// How often replicas that share a resume key through Redis check it: each
/// puts its key back should Redis have lost it, or learns the one there.
const RESUME_KEY_CHECK: Duration = Duration::from_secs(30);
/// How soon a replica that has not learned the shared key yet asks again.
const RESUME_KEY_RETRY: Duration = Duration::from_secs(1);

/// Learns the resume key that replicas share through the broker (none was
/// configured): the first replica to start stores a random one, and the
/// others take it. Waits for the first answer up to [`FIRST_BROKER_CONNECT`]
/// (the replica is not ready until it has one), then checks it every
/// [`RESUME_KEY_CHECK`] on `background` until `stop`. When the key changes
/// (Redis lost it, and another replica stored its own first), the one before
/// still verifies tokens: a client resuming across the change gets its history.
async fn share_resume_key(
    key: crate::auth::ResumeKey,
    broker: Arc<dyn Broker>,
    stop: &CancellationToken,
    background: &TaskTracker,
) {
    let (learned, mut learned_rx) = tokio::sync::watch::channel(false);
    let stop = stop.clone();
    background.spawn(async move {
        let mut failures = 0u32;
        loop {
            let proposed = key.secret().unwrap_or_else(crate::auth::ResumeKey::random_secret);
            let wait = match broker.shared_secret("resume", &proposed).await {
                Ok(secret) => {
                    if key.adopt(&secret) {
                        tracing::info!(stored_here = secret == proposed, "resume key: learned the one replicas share");
                    }
                    failures = 0;
                    let _ = learned.send(true);
                    RESUME_KEY_CHECK
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(60) {
                        tracing::warn!(error = %e, known = key.is_known(), "resume key: cannot read it from Redis");
                    }
                    if key.is_known() {
                        RESUME_KEY_CHECK
                    } else {
                        RESUME_KEY_RETRY
                    }
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
    let _ = tokio::time::timeout(FIRST_BROKER_CONNECT, learned_rx.wait_for(|&known| known)).await;
}

/// Presence upkeep and pings: instance-wide tasks that stop with the broker,
/// so that sessions still open during a drain keep their presence and pings.
fn start_upkeep(
    settings: &Settings,
    registry: &Arc<Registry>,
    broker: &Arc<dyn Broker>,
    stop: &CancellationToken,
    background: &TaskTracker,
) {
    let ttl = settings.presence_ttl;
    background.spawn(crate::session::presence::keep_alive(registry.clone(), broker.clone(), ttl, stop.clone()));
    if !settings.ping_interval.is_zero() {
        let (every, timeout) = (settings.ping_interval, settings.pong_timeout);
        background.spawn(crate::session::heartbeat::run(registry.clone(), every, timeout, stop.clone()));
    }
}

/// Waits for the first shutdown request, then drains (or not) and closes
/// every session. A second request cuts the drain short.
async fn shut_down(state: AppState, mut requests: std::pin::Pin<Box<dyn Stream<Item = StopRequest> + Send>>) {
    let Some(first) = requests.next().await else {
        // No one can ask any more: serve until the process ends.
        return std::future::pending::<()>().await;
    };
    state.lifecycle.advance(Phase::Draining);
    let again = async move {
        if requests.next().await.is_none() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(again);
    let drain = state.settings.drain;
    if drain.is_zero() {
        state.lifecycle.advance(Phase::Closing);
        tracing::info!(sessions = state.registry.len(), "shutting down: closing sockets");
        close_all(&state);
        return;
    }
    tracing::info!(drain_secs = drain.as_secs_f64(), sessions = state.registry.len(), "draining: /readyz is 503");
    // New sockets are refused from now on, so once the session tasks are
    // all gone there is nothing left to drain; only a person is in a hurry.
    state.sessions.close();
    let emptied = async {
        if first == StopRequest::Interrupt {
            state.sessions.wait().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let hurried = tokio::select! {
        () = tokio::time::sleep(drain) => false,
        () = emptied => {
            tracing::info!("draining: no socket left");
            false
        }
        () = again.as_mut() => true,
    };
    state.lifecycle.advance(Phase::Closing);
    if hurried {
        tracing::info!(sessions = state.registry.len(), "asked again: closing every socket now");
        close_all(&state);
        return;
    }
    let mut plan: Vec<_> =
        state.registry.all().into_iter().map(|s| (drain.mul_f64(rand::rng().random::<f64>()), s)).collect();
    plan.sort_by_key(|(at, _)| *at);
    tracing::info!(sessions = plan.len(), "draining: closing sockets with 1012, spread over the drain span");
    let start = tokio::time::Instant::now();
    for (at, session) in plan {
        tokio::select! {
            () = tokio::time::sleep_until(start + at) => session.close(state.closing_reason()),
            () = again.as_mut() => {
                tracing::info!("asked again: closing every socket now");
                break;
            }
        }
    }
    // Sessions that were not reached yet, or that opened while the closes
    // were being planned.
    close_all(&state);
}

/// Closes every local session with the instance's closing reason.
fn close_all(state: &AppState) {
    let reason = state.closing_reason();
    for session in state.registry.all() {
        session.close(reason);
    }
}

/// The instance's front thread: a runtime of its own that accepts
/// connections, serves HTTP and sets sessions up, then hands each welcomed
/// session to the runtime that [`run`] was called on (see `session::run`).
///
/// Why a thread of its own: tokio runs ready tasks in turn, with no
/// priorities. In a connect storm, hundreds of handshakes and setups are
/// ready at once; on one runtime, every hop of a live call's message (its
/// sender's read, the publish, the subscriber, its receiver's write) waited
/// behind all of them, 86 ms at p99 for 8,000 sockets arriving 200 at a
/// time. On two threads the kernel shares the cores between the storm and
/// the live calls, and a live call's hops queue only behind other live work.
struct Front {
    served: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Front {
    /// Starts the front thread serving `listener`.
    fn start(listener: TcpListener, state: AppState) -> std::io::Result<Self> {
        let listener = listener.into_std()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (served_tx, served) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name("switchboard-front".into()).spawn(move || {
            runtime.block_on(async move {
                let served = match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, router(state.clone()), state).await,
                    Err(e) => Err(e),
                };
                let _ = served_tx.send(served);
                // Sessions still being set up finish here: the instance waits
                // for every session before it stops this thread.
                let _ = stop_rx.await;
            });
        })?;
        Ok(Self { served, stop })
    }

    /// Resolves once the listener is closed and in-flight requests are done.
    async fn served(&mut self) -> std::io::Result<()> {
        (&mut self.served).await.unwrap_or_else(|_| Err(std::io::Error::other("the front thread ended")))
    }

    /// Ends the front thread (once it has served).
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Accepts connections until the instance is closing, serving HTTP/1.1 with
/// upgrades, a deadline on the request head (against slowloris) and a bound
/// on its size, then waits briefly for in-flight requests. At most
/// `SWITCHBOARD_MAX_HTTP_CONNECTIONS` connections are served at once; one
/// more waits briefly for a slot, then is answered 503 and closed (see
/// [`AtTheCap`]). Upgraded sockets are the sessions' business.
async fn serve(listener: TcpListener, router: Router, state: AppState) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let settings = &state.settings;
    let head_bytes = settings.max_request_head_bytes;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        // 431 past the limit; the buffer bound keeps a padded head from
        // growing hyper's read buffer to its default (about 400 KB).
        .max_header_size(head_bytes)
        .max_buf_size(head_bytes.max(MIN_HEAD_BUFFER));
    let closing = state.lifecycle.reached(Phase::Closing);
    tokio::pin!(closing);
    let mut failures = AcceptFailures::default();
    let mut cap = AtTheCap::default();
    loop {
        let stream = tokio::select! {
            () = closing.as_mut() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(suppressed) = failures.log_now(std::time::Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match state.try_open_connection() {
            Some(slot) => Some(slot),
            None => cap.wait_for_slot(&state).await,
        };
        let Some(slot) = slot else {
            refuse(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let closing = state.lifecycle.reached(Phase::Closing);
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = closing => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            // Given back once the connection ended or became a WebSocket
            // (which hyper hands over as soon as the 101 is written).
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(HTTP_GRACE, connections.wait()).await;
    Ok(())
}

/// How long a connection accepted at the HTTP connection cap waits for a
/// slot before it is refused. In an unbounded reconnect of 5,000 sockets per
/// instance, 100 ms sometimes ran out before the busy front thread finished
/// a handshake, and the 503s that followed made 5,410 clients dial again.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// After a wait for a slot ran out, connections at the cap are refused at
/// once for this long.
const SLOT_WAIT_PAUSE: Duration = Duration::from_secs(1);

/// What the accept loop does at the HTTP connection cap. In a connect storm
/// slots come free within milliseconds, as handshakes finish: a connection
/// at the cap waits up to [`SLOT_WAIT`] for one, and meanwhile nothing more
/// is accepted (the kernel's listen backlog holds what arrives). Refusing
/// it instead made thousands of clients of an unbounded reconnect come back
/// a second time. When slots are held (connections that never finish their
/// request), the wait runs out: then connections at the cap are answered
/// 503 at once for [`SLOT_WAIT_PAUSE`], so that holding every slot stalls
/// the accept loop at most half the time, and each stall ends in a 503.
#[derive(Debug, Default)]
struct AtTheCap {
    refuse_until: Option<tokio::time::Instant>,
}

impl AtTheCap {
    async fn wait_for_slot(&mut self, state: &AppState) -> Option<crate::state::ConnectionSlot> {
        let now = tokio::time::Instant::now();
        if self.refuse_until.is_some_and(|until| now < until) {
            return None;
        }
        match tokio::time::timeout(SLOT_WAIT, state.open_connection()).await {
            Ok(slot) => Some(slot),
            Err(_) => {
                self.refuse_until = Some(tokio::time::Instant::now() + SLOT_WAIT_PAUSE);
                None
            }
        }
    }
}

/// What a connection past `SWITCHBOARD_MAX_HTTP_CONNECTIONS` is told before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n";

/// Answers a connection over the cap with a 503 and drops it, without a task
/// or a buffer: a single non-blocking write of a few bytes, which a fresh
/// socket's send buffer always takes.
fn refuse(stream: &tokio::net::TcpStream) {
    crate::metrics::reject("too_many_connections");
    let _ = stream.try_write(TOO_MANY_CONNECTIONS);
}

/// The warning for a `max_sockets` that the open-file limit `nofile` (soft)
/// does not allow, counting [`FD_RESERVE`] for everything but the sockets.
pub fn fd_limit_warning(max_sockets: usize, nofile: u64) -> Option<String> {
    let room = nofile.saturating_sub(FD_RESERVE);
    (max_sockets as u64 > room).then(|| {
        format!(
            "SWITCHBOARD_MAX_SOCKETS={max_sockets} exceeds what the open-file limit ({nofile}) allows, about {room} \
             sockets: raise the limit (ulimit -n, LimitNOFILE=, the container's nofile) or lower the setting"
        )
    })
}

/// Which failed `accept`s are logged: the first at once, then at most one per
/// [`ACCEPT_LOG_EVERY`], carrying the count of those not logged in between
/// (at the open-file limit, `accept` fails every [`ACCEPT_BACKOFF`]).
#[derive(Debug, Default)]
struct AcceptFailures {
    logged_at: Option<std::time::Instant>,
    suppressed: u64,
}

impl AcceptFailures {
    /// For a failure at `now`: `Some(failures not logged since the last line)`
    /// when this one is to be logged, `None` when it is counted instead.
    fn log_now(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < ACCEPT_LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.logged_at = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_are_logged_once_then_once_a_second_with_a_count() {
        let start = std::time::Instant::now();
        let mut failures = AcceptFailures::default();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // A failure every 50 ms for 2.5 s: three lines, not fifty.
        let logged: Vec<(u64, u64)> =
            (0..50).filter_map(|i| failures.log_now(at(i * 50)).map(|suppressed| (i * 50, suppressed))).collect();
        assert_eq!(logged, [(0, 0), (1000, 19), (2000, 19)]);
        // After a quiet spell the next failure is logged at once, with what was left uncounted.
        assert_eq!(failures.log_now(at(10_000)), Some(9));
        assert_eq!(failures.log_now(at(10_001)), None);
    }

    #[test]
    fn warns_when_max_sockets_exceeds_the_open_file_limit() {
        assert_eq!(fd_limit_warning(50_000, 1_048_576), None);
        assert_eq!(fd_limit_warning(1000, 1000 + FD_RESERVE), None);
        let warning = fd_limit_warning(50_000, 1024).unwrap();
        assert!(warning.contains("SWITCHBOARD_MAX_SOCKETS=50000") && warning.contains("(1024)"), "{warning}");
        assert!(warning.contains(&format!("about {} sockets", 1024 - FD_RESERVE)), "{warning}");
        assert!(fd_limit_warning(1, 10).is_some());
    }
}
