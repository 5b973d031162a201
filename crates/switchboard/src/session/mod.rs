//! One WebSocket session, from upgrade to cleanup, in one task.
//!
//! Setup runs in a fixed order so that nothing is missed: register locally,
//! subscribe to the pair's channel, claim presence and announce the join (one
//! broker step, so one user's claims and joins share one order), then write
//! the welcome. After that the session waits on two things: its
//! client's next frame, and its handle's outbox (what the registry delivered,
//! pongs and pings) or a close request. A client message is checked and queued
//! on the broker in order, without waiting for Redis to confirm it (a failure
//! comes back as a `broker_unavailable` event). Queued frames go out in one
//! write per batch.
//!
//! A quiet session's task holds only `Live` and its wait: setup and cleanup
//! await large futures (Redis calls, the close handshake), so they run boxed
//! and take that memory only while they run; a read under way is boxed too
//! (see [`reader::Frames`]). Pings come from the instance's heartbeat, not
//! from a timer per socket.

pub mod clock;
pub mod confirm;
pub mod echo;
pub mod frames;
pub mod handle;
pub mod heartbeat;
pub mod limits;
pub mod outbox;
pub mod peer;
pub mod presence;
pub mod reader;
pub mod registry;
pub mod wire;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{Frame, OpCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::broker::envelope::{self, Kind};
use crate::broker::{BrokerError, Claimed, Numbered, RelayOrigin, Replay, Seq, SessionId, Waiting};
use crate::metrics::SetupStep;
use crate::pair::{Identity, Names, UserId};
use crate::protocol::{self, CloseReason, ServerEvent};
// Upward: the route that upgraded the socket hands the session the instance's
// shared state; `state.rs` sits above the session only because it holds the
// session registry.
use crate::state::{AppState, SocketPermit};
use confirm::Confirm;
use frames::{Assembler, Incoming};
use handle::SessionHandle;
use limits::{RateLimit, Verdict, FRAME, MESSAGE};
use outbox::Work;
use reader::{FrameResult, Frames, Reader};
use writer::{write_all, write_some};

/// How long a closing socket may take to finish the close handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How many raw bytes a closing socket's unread input is skipped by at a time.
const DRAIN_CHUNK: usize = 1024;

/// How a session's loop ended.
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
            End::Server(reason) => reason.label(),
            End::Gone => "gone",
        }
    }
}

/// A session ID as logs show it.
#[derive(Clone, Copy)]
struct Sid(u64);

impl std::fmt::Display for Sid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// What a new session asks of its pair's history (`resume` and `after` in
/// the query; see docs/protocol.md, "Resuming").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Not asked for, or resume is off: relayed frames go out as they came.
    Off,
    /// `resume=1`: relayed frames go out as `relay` events, and the welcome
    /// gives a resume token.
    Fresh,
    /// A valid resume token: the last `seq` the client received (`None`
    /// when `after` was missing or not a `seq`: a gap), the session that
    /// began the client's numbering of its messages (the token's), and the
    /// number of the first message it sends now (`next`).
    From {
        /// The last `seq` received.
        after: Option<Seq>,
        /// Whose numbering the client's messages carry on.
        lineage: SessionId,
        /// The first message's number on this socket.
        next: u64,
    },
    /// A resume token not made for this user and pair: closed with 4003.
    Refused,
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
///
/// Setup runs where this future is polled: the instance's front thread,
/// which also accepts connections and serves HTTP (see `app::run`). Once the
/// client is welcomed, the socket moves to the runtime of live sessions
/// (`AppState`'s `live` runtime), so a connect storm's handshakes and setups queue
/// behind one another, not in front of live calls' messages.
///
/// Not an `async fn`: the arguments go straight into the boxed setup, so the
/// task's future doesn't keep room for them for the socket's whole life.
pub fn run(
    state: AppState,
    socket: UpgradeFut,
    identity: Identity,
    permit: SocketPermit,
) -> impl Future<Output = ()> + Send {
    run_resumable(state, socket, identity, Resume::Off, permit)
}

/// [`run`], for a session that asked `resume` of its pair's history.
pub fn run_resumable(
    state: AppState,
    socket: UpgradeFut,
    identity: Identity,
    resume: Resume,
    permit: SocketPermit,
) -> impl Future<Output = ()> + Send {
    let opening = Box::pin(open(state, socket, identity, resume, random_session_id(), Instant::now()));
    async move {
        if let Some(opened) = opening.await {
            let (tracker, runtime) = (opened.state.sessions.clone(), opened.state.live.clone());
            tracker.spawn_on(live(opened, permit), &runtime);
        }
    }
}

/// The rest of a session's life, on the runtime of live sessions.
async fn live(opened: Box<Opened>, permit: SocketPermit) {
    if let Some(mut live) = Box::pin(opened.into_live()).await {
        let end = if live.joined { live.serve().await } else { End::Server(CloseReason::BrokerUnavailable) };
        Box::pin(live.finish(end)).await;
    }
    drop(permit);
}

/// A session that is set up (and its client welcomed, if `joined`), on its
/// way to the runtime of live sessions: its socket is registered with no
/// runtime meanwhile.
struct Opened {
    state: AppState,
    handle: Arc<SessionHandle>,
    channel: Arc<str>,
    stream: std::net::TcpStream,
    /// Bytes hyper read past the request.
    leftover: Box<[u8]>,
    joined: bool,
    /// A resumable session's count of its client's messages.
    confirm: Option<Arc<Confirm>>,
    /// When the socket left the front thread.
    released_at: Instant,
}

impl Opened {
    /// Registers the socket with the current runtime and makes the session
    /// live; if that fails, the session ends as if the connection were gone.
    async fn into_live(self: Box<Self>) -> Option<Box<Live>> {
        let Opened { state, handle, channel, stream, leftover, joined, confirm, released_at } = *self;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => {
                crate::metrics::setup_step(SetupStep::Handoff, released_at.elapsed());
                Arc::new(stream)
            }
            Err(e) => {
                tracing::warn!(error = %e, session = %Sid(handle.id), "cannot register the socket");
                clean_up(&state, &handle, &channel, &End::Gone).await;
                return None;
            }
        };
        let settings = &state.settings;
        // fastwebsockets refuses frames of `max_message_size` bytes or more.
        let reader = Reader::new(stream.clone(), leftover, settings.max_message_bytes + 1)
            .with_frame_timeout(settings.frame_timeout);
        Some(Box::new(Live {
            frames: Frames::new(reader),
            stream,
            joined,
            assembler: Assembler::new(settings.max_message_bytes),
            limit: RateLimit::new(settings.rate_per_sec, settings.rate_burst),
            turn_refresh: crate::turn::Refresh::new(settings.ice_servers.refresh_every()),
            broken: false,
            confirm,
            channel,
            handle,
            state,
        }))
    }
}

/// Takes the socket back from hyper, sets the session up and welcomes the
/// client, then lets go of the socket's registration with this runtime.
/// Boxed, the session takes no room twice in the task's future.
async fn open(
    state: AppState,
    socket: UpgradeFut,
    identity: Identity,
    resume: Resume,
    id: u64,
    upgraded_at: Instant,
) -> Option<Box<Opened>> {
    let Identity { user, pair } = identity;
    let (stream, leftover) = take_socket(socket, &user, Sid(id)).await?;
    crate::metrics::setup_step(SetupStep::Upgrade, upgraded_at.elapsed());
    crate::metrics::session_opened();
    if resume == Resume::Refused {
        tracing::info!(user = %user, session = %Sid(id), "resume refused: the token is not this user's and pair's");
        let reason = CloseReason::ResumeRefused;
        let _ = write_all(&stream, &wire::close(reason.code(), reason.text())).await;
        crate::metrics::session_closed(reason.label());
        return None;
    }
    let settings = &state.settings;
    let channel: Arc<str> = Names::new(&settings.channel_prefix, settings.tagged_names()).channel(&pair).into();
    let handle = Arc::new(SessionHandle::new(id, user, pair, settings.outbox_messages, settings.outbox_bytes));
    if resume != Resume::Off {
        state.registry.make_resumable(id, matches!(resume, Resume::From { .. }));
    }
    let (joined, confirm) = join(&state, &handle, &channel, &stream, resume).await?;
    // A session that opened while the server began to stop closes at once.
    if let Some(reason) = state.stop_reason() {
        handle.close(reason);
    }
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, session = %Sid(id), "cannot release the socket");
            clean_up(&state, &handle, &channel, &End::Gone).await;
            return None;
        }
    };
    Some(Box::new(Opened { state, handle, channel, stream, leftover, joined, confirm, released_at: Instant::now() }))
}

/// Finishes the upgrade and takes the connection back from hyper, with the
/// bytes hyper read past the request (a client that didn't wait for the 101).
///
/// The upgraded connection is our own `TcpStream` (see `app::serve`): taking
/// it back lets the reading side wait for bytes without holding a buffer (see
/// `reader`).
async fn take_socket(socket: UpgradeFut, user: &UserId, sid: Sid) -> Option<(TcpStream, Box<[u8]>)> {
    let ws = match socket.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, user = %user, session = %sid, "upgrade failed");
            return None;
        }
    };
    let Ok(parts) = ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>() else {
        tracing::error!("upgraded connection is not a TCP stream");
        return None;
    };
    // Copied out: the `Bytes` holds the server's whole read buffer.
    let leftover = Box::from(&parts.read_buf[..]);
    Some((parts.io.into_inner(), leftover))
}

/// Registers and subscribes the session before anything can be announced,
/// claims its presence and announces the join (one broker step), then writes
/// the welcome. `None`: the broker refused the session, which is closed with
/// 1013. `Some((false, _))`: the welcome could not be written, and the session
/// ends at once. A resumable session also gets its count of its client's
/// messages (confirmed sends).
async fn join(
    state: &AppState,
    handle: &Arc<SessionHandle>,
    channel: &Arc<str>,
    stream: &TcpStream,
    resume: Resume,
) -> Option<(bool, Option<Arc<Confirm>>)> {
    let (id, user, sid) = (handle.id, &handle.user, Sid(handle.id));
    state.registry.insert(channel, handle.clone());
    let claimed = match subscribe_and_claim(state, handle, channel).await {
        Ok(claimed) => claimed,
        Err(e) => {
            tracing::warn!(error = %e, user = %user, session = %sid, "session refused: broker unavailable");
            state.registry.remove(channel, id);
            let reason = CloseReason::BrokerUnavailable;
            let _ = write_all(stream, &wire::close(reason.code(), reason.text())).await;
            crate::metrics::session_closed(reason.label());
            return None;
        }
    };
    if resume != Resume::Off {
        state.registry.joined(handle, claimed.seq);
    }
    let resume = resume_from(state, handle, channel, resume, claimed.seq).await;
    let confirm = resume.as_ref().map(|r| Confirm::new(handle.clone(), r.lineage, r.next));
    let welcoming = Instant::now();
    let peer_online = state.registry.finish_setup(handle, claimed.peer);
    let welcome = welcome(state, handle, peer_online, resume);
    // Anything the channel delivered meanwhile waits in the outbox, which is
    // written after this.
    let joined = match write_all(stream, &wire::text(&welcome)).await {
        Ok(()) => {
            crate::metrics::messages_out(1, welcome.len());
            crate::metrics::setup_step(SetupStep::Welcome, welcoming.elapsed());
            Ok(())
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &joined {
        tracing::warn!(error = %e, user = %user, session = %sid, "session setup failed");
    }
    tracing::debug!(peer_online, user = %user, session = %sid, "session open");
    Some((joined.is_ok(), confirm))
}

/// Subscribes to the pair's channel, then claims the user's presence and
/// announces the join in one broker step (so one user's claims and joins
/// share one order); returns the peer's live session, if any. On failure
/// nothing stays subscribed.
async fn subscribe_and_claim(
    state: &AppState,
    handle: &SessionHandle,
    channel: &Arc<str>,
) -> Result<Claimed, BrokerError> {
    let broker = &state.broker;
    let start = Instant::now();
    broker.subscribe(channel).await?;
    let subscribed = Instant::now();
    crate::metrics::setup_step(SetupStep::Subscribe, subscribed - start);
    let join = envelope::encode(Kind::Join, &handle.user, handle.id, b"");
    let claimed = broker
        .claim(&handle.pair, &handle.user, handle.id, channel, join)
        .await
        .inspect_err(|_| broker.unsubscribe(channel))?;
    crate::metrics::setup_step(SetupStep::Claim, subscribed.elapsed());
    Ok(claimed)
}

/// For a resumable session, once its join is in the pair's history (at
/// `join`): replays what its client missed when it resumes, and returns the
/// welcome's resume token and `seq`, and where the client's numbering of its
/// messages stands. Whatever it queues (replayed `relay`
/// events, or `resync` when the history has a gap) goes out after the
/// welcome and before any live frame.
async fn resume_from(
    state: &AppState,
    handle: &SessionHandle,
    channel: &str,
    resume: Resume,
    join: Option<Seq>,
) -> Option<Resumed> {
    let (lineage, next) = match resume {
        Resume::Off | Resume::Refused => return None,
        Resume::Fresh => (handle.id, 1),
        Resume::From { lineage, next, .. } => (lineage, next),
    };
    let registry = &state.registry;
    let identity = Identity { user: handle.user.clone(), pair: handle.pair.clone() };
    let token = state.settings.resume_key.as_ref().and_then(|key| key.token(&identity, lineage));
    let (Some(token), Some(join)) = (token, join) else {
        // No history to resume from (the broker keeps none), or no key to
        // sign a token with (a shared one not learned yet).
        let first = if resume == Resume::Fresh { Vec::new() } else { vec![ServerEvent::Resync.to_bytes()] };
        registry.finish_replay(handle, first, None);
        return None;
    };
    let resumed = |seq| Some(Resumed { token, seq, lineage, next });
    let Resume::From { after, .. } = resume else { return resumed(join) };
    let replay = match after {
        Some(after) => state.broker.replay(channel, after).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, session = %Sid(handle.id), "replay failed: the client gets resync");
            Replay::Gap { last: None }
        }),
        None => Replay::Gap { last: None },
    };
    let settings = &state.settings;
    // A replay the outbound queue can't hold beside live traffic would close
    // the socket as a slow consumer, and the client would come back with the
    // same `seq`, again and again: it gets `resync` instead.
    let fits = |frames: &[Bytes]| {
        frames.len() <= settings.outbox_messages / 2
            && frames.iter().map(Bytes::len).sum::<usize>() <= settings.outbox_bytes / 2
    };
    // What the client gets: the replayed frames up to the history's newest
    // entry, or (`Err`) `resync` and nothing up to that entry.
    let replayed = match (replay, after) {
        (Replay::Covered { envelopes, last }, Some(after)) => {
            let frames = handle::replayed(&handle.user, &envelopes);
            if fits(&frames) {
                Ok((frames, last, after))
            } else {
                Err(Some(last))
            }
        }
        (Replay::Covered { .. }, None) => Err(None),
        (Replay::Gap { last }, _) => Err(last),
    };
    let seq = match replayed {
        Ok((frames, last, after)) => {
            tracing::debug!(session = %Sid(handle.id), frames = frames.len(), "resumed");
            // With frames to come, the client stands where it asked until
            // they arrive; without, at the history's newest entry.
            let seq = if frames.is_empty() { last } else { after };
            registry.finish_replay(handle, frames, Some(last));
            seq
        }
        Err(last) => {
            tracing::debug!(session = %Sid(handle.id), "resume: the history does not cover the gap");
            registry.finish_replay(handle, vec![ServerEvent::Resync.to_bytes()], last);
            last.map_or(join, |last| last.max(join))
        }
    };
    resumed(seq)
}

/// What the welcome tells a resumable session's client (see [`resume_from`]).
struct Resumed {
    /// The resume token, for the client's next reconnect.
    token: String,
    /// Where the client stands in the pair's history.
    seq: Seq,
    /// The session that began the client's numbering (the token's).
    lineage: SessionId,
    /// The number of the client's next message.
    next: u64,
}

/// The welcome event for `handle`'s client.
fn welcome(state: &AppState, handle: &SessionHandle, peer_online: bool, resume: Option<Resumed>) -> Bytes {
    let (user, pair) = (&handle.user, &handle.pair);
    let ice_servers = state.settings.ice_servers.for_user(user);
    let resume =
        resume.as_ref().map(|r| protocol::ResumeInfo { token: &r.token, seq: r.seq.to_string(), next: r.next });
    ServerEvent::Welcome {
        user_id: user.as_str(),
        peer_id: pair.other(user).as_str(),
        polite: pair.is_polite(user),
        peer_online,
        ice_servers: &ice_servers,
        resume,
    }
    .to_bytes()
}

/// What a session between setup and cleanup holds.
struct Live {
    state: AppState,
    handle: Arc<SessionHandle>,
    /// The pair's channel; the registry's key is this same string.
    channel: Arc<str>,
    frames: Frames,
    /// The socket, shared with `frames`: reading and writing both go
    /// through `&TcpStream`.
    stream: Arc<TcpStream>,
    /// Whether the welcome went out (the join was announced with the claim); if not, the session closes at once.
    joined: bool,
    /// Joins fragments into messages.
    assembler: Assembler,
    /// The client's message rate.
    limit: RateLimit,
    /// When TURN credentials are due again.
    turn_refresh: crate::turn::Refresh,
    /// A write was cut off half way through a frame: no close frame can follow.
    broken: bool,
    /// A resumable session's count of its client's messages (confirmed sends).
    confirm: Option<Arc<Confirm>>,
}

/// What woke the session.
enum Event {
    Work(Option<Work>),
    Turn,
    Frame(FrameResult),
}

impl Live {
    /// Relays until the session ends, and tells how.
    async fn serve(&mut self) -> End {
        loop {
            let event = tokio::select! {
                biased;
                work = self.handle.next_work() => Event::Work(work),
                () = std::future::poll_fn(|cx| self.turn_refresh.poll_due(cx)) => Event::Turn,
                // Cancel-safe: `Frames` keeps a read that is under way.
                frame = std::future::poll_fn(|cx| poll_frame(&mut self.frames, &mut self.limit, cx)) => {
                    Event::Frame(frame)
                }
            };
            let frame = match event {
                Event::Work(Some(work)) => {
                    // Boxed: a quiet session's task carries no write state.
                    if let Err(end) = Box::pin(self.write(work)).await {
                        return end;
                    }
                    continue;
                }
                Event::Work(None) => return self.closed_end(),
                Event::Turn => {
                    let servers = self.state.settings.ice_servers.for_user(&self.handle.user);
                    self.handle.deliver(ServerEvent::IceServers { ice_servers: &servers }.to_bytes());
                    continue;
                }
                Event::Frame(frame) => frame,
            };
            // One clock read per frame, for the heartbeat and the rate limit.
            let now = Instant::now();
            self.handle.heard(now);
            let incoming = match frame {
                Ok(frame) => match self.admit(frame, now) {
                    Ok(incoming) => incoming,
                    Err(end) => return end,
                },
                Err(e) => match frames::on_error(&e) {
                    Some(incoming) => Some(incoming),
                    None => return End::Gone,
                },
            };
            match incoming {
                None => {}
                Some(Incoming::Text(payload)) => {
                    if let Some(wait) = self.on_text(payload) {
                        // Not reading meanwhile: what piles up in the socket
                        // is not the client's burst (see `limits`).
                        wait.await;
                        self.limit.stalled(now, Instant::now());
                    }
                }
                Some(Incoming::Dropped) => {
                    if let Some(confirm) = &self.confirm {
                        confirm.refused();
                    }
                }
                Some(Incoming::Binary) => return End::Server(CloseReason::Binary),
                Some(Incoming::TooBig) => return End::Server(CloseReason::TooBig),
                Some(Incoming::Protocol) => return End::Server(CloseReason::Protocol),
                Some(Incoming::TooSlow) => return End::Server(CloseReason::SlowFrame),
                Some(Incoming::Close(code)) => {
                    return End::ClientClosed(wire::reply_code(code));
                }
            }
        }
    }

    /// Charges a frame to the rate limit and hands what passes to the
    /// assembler. Every frame but a close takes from the limit (see
    /// `limits`); a ping that passes is answered here.
    fn admit(&mut self, frame: Frame<'static>, now: Instant) -> Result<Option<Incoming>, End> {
        let opcode = frame.opcode;
        if opcode == OpCode::Close {
            return Ok(self.assembler.push(frame));
        }
        match self.limit.check(now, if opcode == OpCode::Text { MESSAGE } else { FRAME }) {
            Verdict::Pass if opcode == OpCode::Ping => {
                self.handle.pong(Box::from(&frame.payload[..]));
                Ok(None)
            }
            Verdict::Pass => Ok(self.assembler.push(frame)),
            Verdict::Drop => {
                crate::metrics::reject("rate_limited");
                let message = match opcode {
                    OpCode::Text => "too many messages; this one was dropped",
                    OpCode::Continuation => "too many frames; this message was dropped",
                    _ => "too many frames; this one was dropped",
                };
                self.handle.deliver(ServerEvent::Error { code: "rate_limited", message }.to_bytes());
                Ok(self.assembler.skip(frame))
            }
            Verdict::Flood => {
                crate::metrics::reject("rate_limited");
                Err(End::Server(CloseReason::Flood))
            }
        }
    }

    /// How the session ends when its handle was asked to close.
    fn closed_end(&self) -> End {
        match self.handle.close_reason() {
            Some(CloseReason::Gone) | None => End::Gone,
            Some(reason) => End::Server(reason),
        }
    }

    /// Writes a batch of queued frames; the session reads nothing meanwhile,
    /// which the rate limit does not charge the client for (see `limits`).
    async fn write(&mut self, work: Work) -> Result<(), End> {
        let since = Instant::now();
        let written = self.write_batch(work).await;
        self.limit.stalled(since, Instant::now());
        written
    }

    /// Writes a batch of queued frames in one go. A close asked for meanwhile
    /// (a slow consumer's, say) stops a write the socket doesn't take.
    async fn write_batch(&mut self, mut work: Work) -> Result<(), End> {
        if let Some(confirm) = &self.confirm {
            // The empty frame that stands for an `ack` (see `confirm`).
            if work.frames.iter().any(Bytes::is_empty) {
                work.frames.retain(|f| !f.is_empty());
                work.ack = confirm.take_ack();
            }
        }
        let batch = writer::batch(&work);
        drop(work);
        let mut written = 0;
        while written < batch.bytes.len() {
            let step = tokio::select! {
                biased;
                n = write_some(&self.stream, &batch.bytes[written..]) => Some(n),
                () = self.handle.outbox.closed() => None,
            };
            match step {
                Some(Ok(0)) => return Err(End::Gone),
                Some(Ok(n)) => written += n,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, session = %Sid(self.handle.id), "socket write failed");
                    return Err(End::Gone);
                }
                None => {
                    self.broken = written > 0;
                    return Err(self.closed_end());
                }
            }
        }
        self.handle.outbox.sent(batch.text_bytes);
        crate::metrics::messages_out(batch.texts, batch.text_bytes);
        Ok(())
    }

    /// Checks a client message and queues it for publishing, or answers with
    /// an error event. Returns what the session must wait for before its next
    /// message, in the rare case there is something: its own echo (see
    /// `ECHO_WINDOW`) or room in the broker's queue. Boxed, that wait takes no
    /// room in a quiet session's task.
    fn on_text(&mut self, payload: Bytes) -> Option<Waiting> {
        let (env, origin, numbered) = self.prepare(payload)?;
        let handle = &self.handle;
        // Not awaited past the queue: a failure comes back as `broker_unavailable`.
        if handle.echo.try_room(env.len()) {
            return self.state.broker.relay(&self.channel, env, origin, numbered);
        }
        // Keep pace with this instance's own subscriber first.
        let (state, handle, channel) = (self.state.clone(), handle.clone(), self.channel.clone());
        Some(Box::pin(async move {
            if handle.echo_room(env.len()).await {
                if let Some(wait) = state.broker.relay(&channel, env, origin, numbered) {
                    wait.await;
                }
            }
            // Else the session is closing: its client resends what it has no `ack` for.
        }))
    }

    /// Checks a client message and makes it an envelope, with who to tell of
    /// its fate and, for a resumable session, its number; or answers it with
    /// an error event (`None`).
    fn prepare(&self, payload: Bytes) -> Option<(Bytes, Arc<dyn RelayOrigin>, Option<Numbered>)> {
        crate::metrics::message_in(payload.len());
        let kind = match protocol::check_client_frame(&payload) {
            Ok(info) => Kind::of_message(info.kind.as_deref()),
            Err(e) => {
                crate::metrics::reject(e.code());
                let message = e.to_string();
                self.handle.deliver(ServerEvent::Error { code: e.code(), message: &message }.to_bytes());
                if let Some(confirm) = &self.confirm {
                    confirm.refused();
                }
                return None;
            }
        };
        let handle = &self.handle;
        let env = envelope::encode(kind, &handle.user, handle.id, &payload);
        if kind == Kind::Answer {
            if let Some(setup) = handle.peer.call_setup_time() {
                crate::metrics::call_setup(setup);
            }
        }
        Some(match &self.confirm {
            Some(confirm) => {
                let numbered = confirm.relaying();
                (env, confirm.clone() as Arc<dyn RelayOrigin>, Some(numbered))
            }
            None => (env, handle.clone() as Arc<dyn RelayOrigin>, None),
        })
    }

    /// Says goodbye: the close frame goes out while the pair's channel hears
    /// of it, then the close handshake ends as the protocol wants.
    async fn finish(mut self: Box<Self>, end: End) {
        let frame = match &end {
            _ if self.broken => None,
            End::ClientClosed(code) => Some(wire::close(*code, "")),
            End::Server(reason) => Some(wire::close(reason.code(), reason.text())),
            End::Gone => None,
        };
        let stream = &*self.stream;
        let say_bye = async {
            if let Some(frame) = frame {
                let _ = tokio::time::timeout(CLOSE_LINGER, write_all(stream, &frame)).await;
            }
        };
        tokio::join!(say_bye, clean_up(&self.state, &self.handle, &self.channel, &end));
        match end {
            // The client closed first and has our reply, or the stream can
            // carry nothing more: done.
            End::ClientClosed(_) | End::Gone => {}
            _ if self.broken => {}
            // The frame reader may have given up half way through a frame:
            // skip raw bytes until the client hangs up, so unread input
            // doesn't turn into a reset.
            End::Server(CloseReason::TooBig | CloseReason::Protocol | CloseReason::SlowFrame) => {
                let _ = tokio::time::timeout(CLOSE_LINGER, drain(&self.stream)).await;
            }
            // A drain or shutdown: what the client sent before it read our
            // close is published, then we hang up after its close reply.
            End::Server(CloseReason::Drain | CloseReason::Shutdown) => {
                let _ = tokio::time::timeout(CLOSE_LINGER, self.relay_until_close()).await;
            }
            // We closed first: wait for the client's close reply, then hang
            // up (browsers wait for the server to drop TCP).
            End::Server(_) => {
                let frames = &mut self.frames;
                let reply = async {
                    while let Ok(frame) = frames.next().await {
                        if frame.opcode == OpCode::Close {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_LINGER, reply).await;
            }
        }
    }
}

impl Live {
    /// Reads until the client's close reply, publishing every message that
    /// comes before it (a drain loses nothing the client sent in time), and
    /// waits until the broker has the last one.
    async fn relay_until_close(&mut self) {
        let mut last = None;
        while let Ok(frame) = self.frames.next().await {
            match self.assembler.push(frame) {
                None => {}
                Some(Incoming::Text(payload)) => {
                    let Some((env, origin, numbered)) = self.prepare(payload) else { continue };
                    let (done, reported) = tokio::sync::oneshot::channel();
                    let origin = Arc::new(Reported { origin, done: std::sync::Mutex::new(Some(done)) });
                    if let Some(wait) = self.state.broker.relay(&self.channel, env, origin, numbered) {
                        wait.await;
                    }
                    last = Some(reported);
                }
                Some(Incoming::Dropped) => {
                    if let Some(confirm) = &self.confirm {
                        confirm.refused();
                    }
                }
                // The close reply, or a frame that ends the reading.
                Some(_) => break,
            }
        }
        // The broker reports one session's relays in order.
        if let Some(reported) = last {
            let _ = reported.await;
        }
    }
}

/// Tells `origin` of a relay's fate, and `done` that the broker reported it.
struct Reported {
    origin: Arc<dyn RelayOrigin>,
    done: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Reported {
    fn fire(&self) {
        if let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = done.send(());
        }
    }
}

impl RelayOrigin for Reported {
    fn relay_failed(&self, error: &BrokerError, len: usize) {
        self.origin.relay_failed(error, len);
        self.fire();
    }

    fn relay_done(&self) {
        self.origin.relay_done();
        self.fire();
    }
}

/// Polls for the client's next frame. `Pending` means the session has read
/// everything the client sent so far: credit from a stall lapses.
fn poll_frame(
    frames: &mut Frames,
    limit: &mut RateLimit,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<FrameResult> {
    let polled = frames.poll_frame(cx);
    if polled.is_pending() {
        limit.caught_up();
    }
    polled
}

/// Takes the session out of the registry, the channel and presence, and
/// tells the peer, unless the user is expected back.
async fn clean_up(state: &AppState, handle: &SessionHandle, channel: &str, end: &End) {
    let broker = &state.broker;
    state.registry.remove(channel, handle.id);
    broker.unsubscribe(channel);
    // A drain or shutdown close expects the user back on another replica:
    // presence is kept (its TTL ends it if they never return) and no leave is
    // announced, so the peer's call carries on. A replaced session's user is
    // still here by definition.
    let returning = matches!(end, End::Server(r) if *r == CloseReason::Drain || *r == CloseReason::Shutdown);
    let replaced = handle.close_reason() == Some(CloseReason::Replaced);
    if !returning {
        handle.peer.mark_presence_released();
        if let Err(e) = broker.release_presence(&handle.pair, &handle.user, handle.id).await {
            tracing::debug!(error = %e, "presence release failed");
        }
    }
    if !replaced && !returning {
        let _ = broker.publish(channel, envelope::encode(Kind::Leave, &handle.user, handle.id, b"")).await;
    }
    crate::metrics::session_closed(end.label());
    tracing::debug!(reason = end.label(), user = %handle.user, session = %Sid(handle.id), "session closed");
}

/// Reads and drops raw bytes until the client hangs up.
async fn drain(socket: &TcpStream) {
    let mut scratch = vec![0u8; DRAIN_CHUNK];
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `_f` returns, without calling it.
    fn returned_size<A, R>(_f: &impl Fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What a quiet session holds is most of an idle connection's memory:
    /// these bounds keep it near 1.7 KiB (`BENCHMARKS.md`). A field or a
    /// local kept across the wait shows up here first.
    #[test]
    fn a_quiet_session_stays_small() {
        let serve = |live: &'static mut Live| live.serve();
        let task = |(o, p): (Box<Opened>, SocketPermit)| live(o, p);
        assert!(returned_size(&task) <= 280, "the live session's task: {} bytes", returned_size(&task));
        // Setup's task lives only until the welcome, but a storm holds many at once.
        let setup = |(s, u, i, p): (AppState, UpgradeFut, Identity, SocketPermit)| run(s, u, i, p);
        assert!(returned_size(&setup) <= 64, "the setup task: {} bytes", returned_size(&setup));
        let opening =
            |(s, u, i, r, id, at): (AppState, UpgradeFut, Identity, Resume, u64, Instant)| open(s, u, i, r, id, at);
        // Boxed while a session is set up: 728 bytes, 872 with resume's
        // replay, 1,008 with confirmed sends' numbering (a storm of 10,000
        // setups holds 10 MB).
        assert!(returned_size(&opening) <= 1024, "the setup's future: {} bytes", returned_size(&opening));
        // Opened lives only between the front thread and the live runtime.
        assert!(std::mem::size_of::<Opened>() <= 80, "Opened: {} bytes", std::mem::size_of::<Opened>());
        assert!(returned_size(&serve) <= 224, "the wait: {} bytes", returned_size(&serve));
        assert!(std::mem::size_of::<Live>() <= 192, "Live: {} bytes", std::mem::size_of::<Live>());
        let handle = std::mem::size_of::<SessionHandle>();
        assert!(handle <= 216, "SessionHandle: {handle} bytes");
    }
}
