//! One WebSocket session, from upgrade to cleanup.
//!
//! Setup runs in a fixed order so that nothing is missed: register locally,
//! subscribe to the pair's channel, claim presence, write the welcome, then
//! announce the join. After that the reader loop (this task) reads whole
//! messages and queues them on the broker in order without waiting for Redis
//! to confirm each (a failure comes back as a `broker_unavailable` event),
//! while a writer task drains the outbox that the registry fills.

pub mod frames;
pub mod handle;
pub mod inbound;
pub mod limits;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::{AppState, SocketPermit};
use crate::broker::envelope::{self, Kind};
use crate::protocol::{self, close, ServerEvent};
use crate::routes::ws::Identity;
use frames::{Assembler, Incoming};
use inbound::Inbound;

/// One frame read from a socket, or why none could be.
type FrameResult = Result<Frame<'static>, WebSocketError>;
use handle::{CloseReason, SessionHandle};
use limits::{RateLimit, Verdict};

/// How long a closing socket may take to finish the close handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How a session's reader loop ended.
enum End {
    /// The client closed; answer with this code.
    ClientClosed(u16),
    /// The server closes with this reason.
    Server(CloseReason),
    /// The connection is gone.
    Gone,
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::ClientClosed(_) => "client_close",
            End::Server(reason) => reason.label,
            End::Gone => "gone",
        }
    }
}

fn random_session_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// Runs a session on an upgraded socket until it ends.
pub async fn run(state: AppState, socket: UpgradeFut, identity: Identity, permit: SocketPermit) {
    let id = random_session_id();
    let span = tracing::info_span!("session", user = %identity.user, session = format_args!("{id:x}"));
    run_session(state, socket, identity, id).instrument(span).await;
    drop(permit);
}

async fn run_session(state: AppState, socket: UpgradeFut, identity: Identity, id: u64) {
    let ws = match socket.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    // The upgraded connection is our own `TcpStream` (see `app::serve`): taking
    // it back gives owned halves without a lock, and lets the reading side wait
    // for bytes without holding a buffer (see `inbound`).
    let parts = match ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        }
    };
    crate::metrics::session_opened();
    let (read_half, write_half) = parts.io.into_inner().into_split();
    let read_half = Arc::new(read_half);
    let (_, mut ws_writer) = fastwebsockets::after_handshake_split(tokio::io::empty(), write_half, Role::Server);

    let Identity { user, pair } = identity;
    let peer = pair.other(&user).clone();
    let channel = pair.channel(&state.settings.channel_prefix);
    let handle = Arc::new(SessionHandle::new(
        id,
        user.clone(),
        pair.clone(),
        state.settings.outbox_messages,
        state.settings.outbox_bytes,
    ));

    // Register and subscribe before anything can be announced.
    state.registry.insert(&channel, handle.clone());
    let broker = &state.broker;
    let setup = async {
        broker.subscribe(&channel).await?;
        let peer_session = match broker.claim_presence(&pair, &user, id).await {
            Ok(p) => p,
            Err(e) => {
                broker.unsubscribe(&channel);
                return Err(e);
            }
        };
        Ok(peer_session)
    }
    .await;
    let peer_session = match setup {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "session refused: broker unavailable");
            state.registry.remove(&channel, id);
            let reason = CloseReason::BROKER_UNAVAILABLE;
            let _ = ws_writer.write_frame(Frame::close(reason.code, reason.reason.as_bytes())).await;
            let _ = ws_writer.flush().await;
            crate::metrics::session_closed(reason.label);
            return;
        }
    };
    let peer_online = state.registry.finish_setup(&handle, peer_session);
    let ice_servers = crate::turn::ice_servers(&state.settings, &user);
    let welcome = ServerEvent::Welcome {
        user_id: user.as_str(),
        peer_id: peer.as_str(),
        polite: pair.is_polite(&user),
        peer_online,
        ice_servers: &ice_servers,
    }
    .to_bytes();
    let welcomed = async {
        ws_writer.write_frame(Frame::text(Payload::Borrowed(&welcome))).await?;
        ws_writer.flush().await?;
        crate::metrics::message_out(welcome.len());
        Ok::<(), fastwebsockets::WebSocketError>(())
    }
    .await;
    let joined = match welcomed {
        Ok(()) => {
            broker.publish(&channel, envelope::encode(Kind::Join, &user, id, b"")).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    tracing::debug!(peer_online, "session open");
    // A session that opened while the server began to stop closes at once.
    if let Some(reason) = state.stop_reason() {
        handle.close(reason);
    }

    let writer = tokio::spawn(writer::run(ws_writer, handle.clone()));
    // fastwebsockets refuses frames of `max_message_size` bytes or more.
    // Bytes the HTTP server read past the request (a client that didn't wait for
    // the 101). Copied out: the `Bytes` holds the server's whole read buffer.
    let leftover = if parts.read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&parts.read_buf) };
    drop(parts.read_buf);
    let inbound = Inbound::new(read_half.clone(), leftover, handle.clone(), state.settings.max_message_bytes + 1);
    let mut frames = std::pin::pin!(inbound::frames(inbound));

    let end = match joined {
        Err(e) => {
            tracing::warn!(error = %e, "session setup failed");
            End::Server(CloseReason::BROKER_UNAVAILABLE)
        }
        Ok(()) => {
            let mut session = Session { state: &state, handle: &handle, channel: &channel, user: &user };
            session.read_loop(frames.as_mut()).await
        }
    };

    // Tell the socket why, then clean up so the peer hears of it at once.
    match end {
        End::ClientClosed(code) => handle.send_close(code, ""),
        End::Server(reason) => handle.send_close(reason.code, reason.reason),
        End::Gone => handle.stop_writer(),
    }
    state.registry.remove(&channel, id);
    broker.unsubscribe(&channel);
    // A drain or shutdown close expects the user back on another replica:
    // presence is kept (its TTL ends it if they never return) and no leave is
    // announced, so the peer's call carries on. A replaced session's user is
    // still here by definition.
    let returning = matches!(end, End::Server(r) if r == CloseReason::DRAIN || r == CloseReason::SHUTDOWN);
    let replaced = handle.close_reason() == Some(CloseReason::REPLACED);
    if !returning {
        handle.mark_presence_released();
        if let Err(e) = broker.release_presence(&pair, &user, id).await {
            tracing::debug!(error = %e, "presence release failed");
        }
    }
    if !replaced && !returning {
        let _ = broker.publish(&channel, envelope::encode(Kind::Leave, &user, id, b"")).await;
    }
    crate::metrics::session_closed(end.label());
    tracing::debug!(reason = end.label(), "session closed");
    let abort = writer.abort_handle();
    if !finish_close(end, frames.as_mut(), writer).await {
        // A frame the reader gave up on may be half read: skip raw bytes until
        // the client hangs up, so unread input doesn't turn into a reset.
        let socket: &TcpStream = (*read_half).as_ref();
        let drain = async {
            let mut scratch = [0u8; 1024];
            loop {
                if socket.readable().await.is_err() {
                    break;
                }
                match socket.try_read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
    }
    abort.abort();
}

/// Ends the close handshake where the frame reader is still intact; returns
/// false when it is not (the caller then drains raw bytes). Browsers wait for
/// the server to drop TCP after the close frames are exchanged, so the server
/// drops it as soon as the handshake is done.
async fn finish_close(end: End, mut frames: Pin<&mut impl Stream<Item = FrameResult>>, writer: JoinHandle<()>) -> bool {
    match end {
        // The client closed first: once our reply is written, we are done.
        End::ClientClosed(_) => {
            let _ = tokio::time::timeout(CLOSE_LINGER, writer).await;
        }
        End::Server(reason) if reason == CloseReason::TOO_BIG || reason == CloseReason::PROTOCOL => return false,
        // We closed first: wait for the client's close reply, then hang up.
        End::Server(_) => {
            let reply = async {
                while let Some(Ok(frame)) = frames.next().await {
                    if frame.opcode == OpCode::Close {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_LINGER, reply).await;
        }
        End::Gone => {}
    }
    true
}

/// The reading side of a live session.
struct Session<'a> {
    state: &'a AppState,
    handle: &'a Arc<SessionHandle>,
    channel: &'a str,
    user: &'a crate::pair::UserId,
}

impl Session<'_> {
    async fn read_loop(&mut self, mut frames: Pin<&mut impl Stream<Item = FrameResult>>) -> End {
        let settings = &self.state.settings;
        let mut assembler = Assembler::new(settings.max_message_bytes);
        let mut limit = RateLimit::new(settings.rate_per_sec, settings.rate_burst);
        // With pings off, the ticker still exists but never finds the socket silent.
        let pings_on = !settings.ping_interval.is_zero();
        let ping_every = if pings_on { settings.ping_interval } else { Duration::from_secs(3600) };
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut turn_refresh = crate::turn::Refresh::new(settings);
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.handle.closing() => {
                    return match self.handle.close_reason() {
                        Some(CloseReason::GONE) | None => End::Gone,
                        Some(reason) => End::Server(reason),
                    };
                }
                _ = ping.tick(), if pings_on => {
                    if last_heard.elapsed() > settings.ping_interval + settings.pong_timeout {
                        tracing::debug!("no frame since the last ping's deadline");
                        return End::Server(CloseReason::PING_TIMEOUT);
                    }
                    self.handle.ping();
                    continue;
                }
                () = turn_refresh.due() => {
                    turn_refresh.push(settings, self.handle, self.user);
                    continue;
                }
                // Cancel-safe: the stream keeps a read that is under way.
                frame = frames.next() => frame.unwrap_or(Err(WebSocketError::UnexpectedEOF)),
            };
            last_heard = Instant::now();
            let incoming = match frame {
                Ok(frame) => assembler.push(frame),
                Err(e) => match frames::on_error(&e) {
                    Some(incoming) => Some(incoming),
                    None => return End::Gone,
                },
            };
            match incoming {
                None => {}
                Some(Incoming::Text(payload)) => match limit.check(last_heard) {
                    Verdict::Pass => self.on_text(payload).await,
                    Verdict::Drop => {
                        crate::metrics::reject("rate_limited");
                        let message = "too many messages; this one was dropped";
                        self.handle.deliver(ServerEvent::Error { code: "rate_limited", message }.to_bytes());
                    }
                    Verdict::Flood => {
                        crate::metrics::reject("rate_limited");
                        return End::Server(CloseReason::FLOOD);
                    }
                },
                Some(Incoming::Binary) => return End::Server(CloseReason::BINARY),
                Some(Incoming::TooBig) => return End::Server(CloseReason::TOO_BIG),
                Some(Incoming::Protocol) => return End::Server(CloseReason::PROTOCOL),
                Some(Incoming::Close(code)) => {
                    let valid = code.filter(|c| (1000..5000).contains(c) && *c != 1005 && *c != 1006);
                    return End::ClientClosed(valid.unwrap_or(close::NORMAL));
                }
            }
        }
    }

    /// Checks a client message and publishes it, or answers with an error event.
    async fn on_text(&mut self, payload: Bytes) {
        crate::metrics::message_in(payload.len());
        let kind = match protocol::check_client_frame(&payload) {
            Ok(info) => Kind::of_message(info.kind.as_deref()),
            Err(e) => {
                crate::metrics::reject(e.code());
                let message = e.to_string();
                self.handle.deliver(ServerEvent::Error { code: e.code(), message: &message }.to_bytes());
                return;
            }
        };
        let env = envelope::encode(kind, self.user, self.handle.id, &payload);
        if kind == Kind::Answer {
            if let Some(setup) = self.handle.call_setup_time() {
                crate::metrics::call_setup(setup);
            }
        }
        // Keep pace with this instance's own subscriber (see `ECHO_WINDOW`).
        if !self.handle.echo_room(env.len()).await {
            return;
        }
        // Not awaited past the queue: a failure comes back as `broker_unavailable`.
        self.state.broker.relay(self.channel, env, self.handle.clone()).await;
    }
}
