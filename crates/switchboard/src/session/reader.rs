//! The reading side of a socket, which holds no read buffer while its client is quiet.
//!
//! fastwebsockets' reader allocates an 8 KiB buffer when it is made and keeps
//! it for its life: with a reader per socket, that buffer was most of an idle
//! connection's memory. [`Reader`] makes a reader only when bytes arrive, and
//! drops it again as soon as its buffer is provably empty. That is when every
//! frame whose bytes the reader took from the socket has come back out of it.
//!
//! To know where frames end, the bytes pass through a `Metered` reader
//! that follows the frame headers ([`Boundaries`], with [`wire::Header`]) as
//! they go by; it also refuses a frame without the mask bit. While no reader
//! exists, [`Reader`] waits with a one-byte peek, which holds no buffer and
//! leaves the byte in the socket.
//!
//! A read keeps its place across calls, but a call must not be dropped half
//! way: fastwebsockets loses a frame's header when its future is dropped
//! mid-frame. The session reads through [`Frames`], which keeps a read under
//! way alive while other work runs, and boxes it so that a quiet session's
//! task stays small.
//!
//! The socket is a [`Source`]: a `TcpStream` in the server. With the
//! `fuzzing` feature, `scripted` adds one that hands out bytes from memory,
//! so that the fuzz target drives this same code.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fastwebsockets::{Frame, Payload, Role, WebSocketError, WebSocketRead};
use std::future::Future;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use super::wire::{self, Header};

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod scripted;

/// What a [`Reader`] reads: a socket, read through a shared reference (as
/// `&TcpStream` is), so that the writing side can share it.
pub trait Source: Send + Sync + 'static {
    /// Waits until bytes are waiting, and copies some into `buf` without
    /// taking them. Returns how many it copied: 0 at the end of the stream.
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<usize>>;

    /// Takes bytes that are waiting into `buf` (none at the end of the stream).
    fn poll_take(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
}

impl Source for TcpStream {
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<usize>> {
        TcpStream::poll_peek(self, cx, buf)
    }

    fn poll_take(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_read_ready(cx))?;
            match self.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                // The readiness was stale; polling again registers for the next one.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Where the frames that passed through a `Metered` reader end.
#[derive(Debug, Default)]
pub struct Boundaries {
    /// The current frame's header bytes seen so far.
    head: [u8; wire::MAX_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// Frames whose last byte has gone by.
    complete: u64,
    /// Whether a frame header without the mask bit went by.
    unmasked: bool,
}

impl Boundaries {
    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                if self.payload_left == 0 {
                    self.complete += 1;
                }
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(header) = Header::parse(&self.head[..self.have]) {
                if self.have == header.len {
                    self.unmasked |= !header.masked;
                    self.have = 0;
                    self.payload_left = header.payload_len;
                    if header.payload_len == 0 {
                        self.complete += 1;
                    }
                }
            }
        }
    }

    /// Frames whose last byte has gone by.
    pub fn complete(&self) -> u64 {
        self.complete
    }

    /// Whether a frame arrived unmasked, which RFC 6455 forbids a client
    /// (section 5.1: the server must close the connection).
    pub fn saw_unmasked(&self) -> bool {
        self.unmasked
    }

    /// Whether the bytes so far end exactly where a frame ends.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }
}

/// The error a read ends with when the client sent an unmasked frame.
#[derive(Debug)]
pub struct Unmasked;

impl std::fmt::Display for Unmasked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a client frame was not masked")
    }
}

impl std::error::Error for Unmasked {}

/// The error a read ends with when a frame was not finished in time.
#[derive(Debug)]
pub struct SlowFrame;

impl std::fmt::Display for SlowFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a client frame was not finished in time")
    }
}

impl std::error::Error for SlowFrame {}

/// What a [`Metered`] reader has seen, readable while a fastwebsockets reader owns it.
#[derive(Debug, Default)]
struct Seen {
    complete: AtomicU64,
    at_boundary: AtomicBool,
}

/// The socket as a fastwebsockets reader sees it: bytes left over from the
/// HTTP request first, then the socket, all followed by [`Boundaries`].
struct Metered<S> {
    socket: Arc<S>,
    leftover: Bytes,
    boundaries: Boundaries,
    seen: Arc<Seen>,
}

impl<S: Source> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.leftover.is_empty() {
            ready!(this.socket.poll_take(cx, buf))?;
        } else {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover[..n]);
            this.leftover.advance(n);
        }
        this.boundaries.feed(&buf.filled()[before..]);
        if this.boundaries.saw_unmasked() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Unmasked)));
        }
        this.seen.complete.store(this.boundaries.complete(), Ordering::Relaxed);
        let clean = this.boundaries.at_boundary() && this.leftover.is_empty();
        this.seen.at_boundary.store(clean, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Reads a socket's frames, with a fastwebsockets reader only while bytes are in flight.
pub struct Reader<S = TcpStream> {
    socket: Arc<S>,
    /// A box, not `Bytes`: smaller while empty, which is nearly always.
    leftover: Box<[u8]>,
    /// Boxed: it exists only while bytes are in flight.
    reader: Option<Box<WebSocketRead<Metered<S>>>>,
    /// Shared with the current reader's [`Metered`]; made with it.
    seen: Option<Arc<Seen>>,
    /// Frames the current reader has handed back.
    returned: u64,
    max_message_size: u32,
    /// How long a frame may take from its first byte to its last, in
    /// milliseconds; 0 = no limit. (A `u32` fits where a `Duration` would
    /// grow every quiet session.)
    frame_timeout_ms: u32,
}

impl<S: Source> Reader<S> {
    /// Reads `socket`, starting with `leftover` (bytes the HTTP server read past
    /// the upgrade request). Frames of `max_message_size` bytes or more are
    /// refused by fastwebsockets. Pings come out like other frames: the
    /// session charges them to its rate limit before it answers.
    pub fn new(socket: Arc<S>, leftover: Box<[u8]>, max_message_size: usize) -> Self {
        let max_message_size = u32::try_from(max_message_size).unwrap_or(u32::MAX);
        Self { socket, leftover, reader: None, seen: None, returned: 0, max_message_size, frame_timeout_ms: 0 }
    }

    /// Limits the time a frame may take from its first byte to its last:
    /// a read that takes longer ends with a [`SlowFrame`] error and drops the
    /// reader's buffer, so a client can't hold a frame's worth of memory by
    /// stopping one byte short of its end. Needs a Tokio runtime with time.
    pub fn with_frame_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.frame_timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        self
    }

    /// Reads a frame once bytes are known to be waiting, within the frame
    /// timeout if there is one. The clock starts here, at the frame's first
    /// byte (or at once, when the reader holds the frame's first bytes).
    async fn read_frame_in_time(&mut self) -> Result<Frame<'static>, WebSocketError> {
        if self.frame_timeout_ms == 0 {
            return self.read_frame().await;
        }
        let limit = std::time::Duration::from_millis(u64::from(self.frame_timeout_ms));
        match tokio::time::timeout(limit, self.read_frame()).await {
            Ok(frame) => frame,
            Err(_) => {
                // The read was dropped half way through a frame: the reader
                // is of no further use, and its buffer goes now.
                self.reader = None;
                self.seen = None;
                Err(WebSocketError::IoError(io::Error::new(io::ErrorKind::TimedOut, SlowFrame)))
            }
        }
    }

    /// Whether a fastwebsockets reader (and its buffer) exists right now.
    #[cfg(any(test, feature = "fuzzing"))]
    fn holds_buffer(&self) -> bool {
        self.reader.is_some()
    }

    /// Polls until bytes are waiting (true) or the client hung up (false).
    /// While no reader exists, this is a one-byte peek: on a `TcpStream`,
    /// `poll_peek` waits in the socket's single reader slot, which also drops
    /// the waker the HTTP connection's task left there (`peek().await` would
    /// queue beside it and keep that task's memory alive for the socket's life).
    fn poll_arrival(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.reader.is_some() || !self.leftover.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let mut one = [0u8; 1];
        let peeked = ready!(self.socket.poll_peek(cx, &mut ReadBuf::new(&mut one)))?;
        Poll::Ready(Ok(peeked > 0))
    }

    /// The next frame. The session reads through
    /// [`Frames`], which does the same in two steps.
    #[cfg(test)]
    async fn next_frame(&mut self) -> Result<Frame<'static>, WebSocketError> {
        if !std::future::poll_fn(|cx| self.poll_arrival(cx)).await? {
            return Err(WebSocketError::UnexpectedEOF);
        }
        self.read_frame().await
    }

    /// Reads a frame once bytes are known to be waiting.
    async fn read_frame(&mut self) -> Result<Frame<'static>, WebSocketError> {
        if self.reader.is_none() {
            let seen = Arc::new(Seen { complete: AtomicU64::new(0), at_boundary: AtomicBool::new(true) });
            let metered = Metered {
                socket: self.socket.clone(),
                leftover: Bytes::from(std::mem::take(&mut self.leftover)),
                boundaries: Boundaries::default(),
                seen: seen.clone(),
            };
            let (mut reader, _) = fastwebsockets::after_handshake_split(metered, tokio::io::sink(), Role::Server);
            reader.set_auto_close(false);
            reader.set_auto_pong(false);
            reader.set_max_message_size(self.max_message_size as usize);
            self.seen = Some(seen);
            self.returned = 0;
            self.reader = Some(Box::new(reader));
        }
        let reader = self.reader.as_mut().expect("made above");
        // Nothing to send: pings come out like any frame, for the session
        // to charge to the rate limit and answer, and closes are answered
        // by the session.
        let mut nothing = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        let frame = reader.read_frame(&mut nothing).await.map(owned);
        self.returned += 1;
        let seen = self.seen.as_ref().expect("made with the reader");
        let drained =
            seen.at_boundary.load(Ordering::Relaxed) && seen.complete.load(Ordering::Relaxed) == self.returned;
        if frame.is_ok() && drained {
            self.reader = None;
            self.seen = None;
        }
        frame
    }
}

/// `frame` without a borrow of the reader that made it (its payload is owned already).
fn owned(frame: Frame<'_>) -> Frame<'static> {
    let payload = match frame.payload {
        Payload::Bytes(bytes) => bytes,
        Payload::Owned(vec) => BytesMut::from(&vec[..]),
        Payload::Borrowed(slice) => BytesMut::from(slice),
        Payload::BorrowedMut(slice) => BytesMut::from(&slice[..]),
    };
    Frame::new(frame.fin, frame.opcode, None, Payload::Bytes(payload))
}

/// A frame read from a socket, or why none could be.
pub type FrameResult = Result<Frame<'static>, WebSocketError>;

/// A read under way: it owns the [`Reader`] and gives it back with the frame.
type Reading<S> = Pin<Box<dyn Future<Output = (FrameResult, Reader<S>)> + Send>>;

/// The frames of a [`Reader`], read so that a quiet socket costs little.
///
/// While the client is quiet, this holds the [`Reader`] and a peek waits in
/// the socket. Once bytes arrive, the read (fastwebsockets' reader and its
/// future) moves into a box that lives only until the frame is out, so the
/// session's task doesn't carry a read's state while it waits.
///
/// [`Frames::next`] is cancel-safe: dropping it (in a `select!`) keeps the
/// read under way, and the next call picks it up.
pub struct Frames<S = TcpStream> {
    state: State<S>,
}

enum State<S> {
    Quiet(Reader<S>),
    Reading(Reading<S>),
    /// Only while switching between the two.
    Moving,
}

impl<S: Source> Frames<S> {
    /// Reads the frames of `reader`.
    pub fn new(reader: Reader<S>) -> Self {
        Self { state: State::Quiet(reader) }
    }

    /// The next frame. Cancel-safe.
    pub async fn next(&mut self) -> FrameResult {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// Polls for the next frame. `Pending` means every byte the client sent
    /// so far has been read from the socket: the session has caught up.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<FrameResult> {
        loop {
            match &mut self.state {
                State::Quiet(reader) => {
                    if !ready!(reader.poll_arrival(cx))? {
                        return Poll::Ready(Err(WebSocketError::UnexpectedEOF));
                    }
                    let State::Quiet(mut reader) = std::mem::replace(&mut self.state, State::Moving) else {
                        unreachable!("matched above")
                    };
                    self.state = State::Reading(Box::pin(async move {
                        let frame = reader.read_frame_in_time().await;
                        (frame, reader)
                    }));
                }
                State::Reading(read) => {
                    let (frame, reader) = ready!(read.as_mut().poll(cx));
                    self.state = State::Quiet(reader);
                    return Poll::Ready(frame);
                }
                State::Moving => unreachable!("never left between polls"),
            }
        }
    }

    /// Whether a read is under way (its bytes partly taken from the socket).
    pub fn mid_read(&self) -> bool {
        matches!(self.state, State::Reading(_))
    }

    /// Whether a fastwebsockets reader (and its buffer) exists right now.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn holds_buffer(&self) -> bool {
        match &self.state {
            State::Quiet(reader) => reader.holds_buffer(),
            State::Reading(_) | State::Moving => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, payload_len: usize) -> Vec<u8> {
        let mut out = vec![0x81];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => out.push(mask_bit | payload_len as u8),
            126..=65535 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(b'x', payload_len));
        out
    }

    #[test]
    fn boundaries_follow_frames_of_every_length_form_split_anywhere() {
        let sizes = [0, 1, 125, 126, 127, 300, 65535, 65536, 70000];
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            stream.extend(frame(i % 2 == 0, size));
            ends.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 13, 4096, stream.len()] {
            let mut b = Boundaries::default();
            let mut fed = 0;
            for piece in stream.chunks(chunk) {
                b.feed(piece);
                fed += piece.len();
                let done = ends.iter().filter(|&&e| e <= fed).count() as u64;
                assert_eq!(b.complete(), done, "chunk {chunk}, after {fed} bytes");
                assert_eq!(b.at_boundary(), ends.contains(&fed), "chunk {chunk}, after {fed} bytes");
            }
        }
    }

    #[test]
    fn an_unmasked_frame_is_noticed_once_its_header_is_complete() {
        let mut b = Boundaries::default();
        b.feed(&frame(true, 5));
        assert!(!b.saw_unmasked());
        let unmasked = frame(false, 300);
        b.feed(&unmasked[..2]);
        assert!(!b.saw_unmasked(), "the extended length is still to come");
        b.feed(&unmasked[2..]);
        assert!(b.saw_unmasked());
    }

    #[test]
    fn a_header_split_before_its_length_is_not_a_boundary() {
        let mut b = Boundaries::default();
        b.feed(&[0x81]);
        assert!(!b.at_boundary());
        b.feed(&[0x80 | 126, 0x01]);
        assert!(!b.at_boundary());
        b.feed(&[0x00, 1, 2, 3, 4]);
        assert_eq!(b.complete(), 0);
        b.feed(&[b'y'; 256]);
        assert_eq!(b.complete(), 1);
        assert!(b.at_boundary());
    }

    /// A connected socket pair: our side split as the session splits it, and the client's end.
    async fn pair() -> (Reader, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (Reader::new(Arc::new(server), Box::default(), 1 << 20), client)
    }

    #[tokio::test]
    async fn the_reader_and_its_buffer_exist_only_while_bytes_are_in_flight() {
        use tokio::io::AsyncWriteExt;
        let (mut inbound, mut client) = pair().await;
        assert!(!inbound.holds_buffer(), "no reader before the first byte");

        client.write_all(&frame(true, 300)).await.expect("write");
        let got = inbound.next_frame().await.expect("a frame");
        assert_eq!(got.payload.len(), 300);
        assert!(!inbound.holds_buffer(), "dropped once the frame is out");

        // Two frames and a ping in one write: the reader stays until the last is out.
        let mut burst = frame(true, 10);
        burst.extend([0x89, 0x80 | 2, 0, 0, 0, 0, b'h', b'i']);
        burst.extend(frame(true, 20));
        client.write_all(&burst).await.expect("write");
        assert_eq!(inbound.next_frame().await.expect("first").payload.len(), 10);
        assert!(inbound.holds_buffer(), "the rest is buffered");
        let ping = inbound.next_frame().await.expect("the ping");
        assert_eq!(ping.opcode, fastwebsockets::OpCode::Ping, "a ping comes out, for the session to charge and answer");
        assert!(inbound.holds_buffer());
        assert_eq!(inbound.next_frame().await.expect("second").payload.len(), 20);
        assert!(!inbound.holds_buffer());

        drop(client);
        assert!(inbound.next_frame().await.is_err(), "end of stream");
    }

    #[tokio::test]
    async fn a_read_dropped_half_way_through_a_frame_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (inbound, mut client) = pair().await;
        let mut frames = Frames::new(inbound);
        let whole = frame(true, 70_000);
        // The header and part of the payload, then a `select!` that gives up.
        client.write_all(&whole[..20_000]).await.expect("write");
        let gave_up = tokio::select! {
            biased;
            _ = frames.next() => false,
            _ = tokio::task::yield_now() => true,
        };
        assert!(gave_up, "the frame can't be complete yet");
        assert!(frames.mid_read(), "the read is kept");
        client.write_all(&whole[20_000..]).await.expect("write");
        let got = frames.next().await.expect("a frame");
        assert!(!frames.mid_read());
        assert_eq!(got.payload.len(), 70_000);
        let mask = [1u8, 2, 3, 4];
        assert!(got.payload.iter().enumerate().all(|(i, &b)| b == b'x' ^ mask[i % 4]), "unmasked intact");
    }

    #[tokio::test]
    async fn bytes_read_past_the_upgrade_request_come_first() {
        use tokio::io::AsyncWriteExt;
        let (inbound, mut client) = pair().await;
        let Reader { socket, .. } = inbound;
        let early = frame(true, 5).into_boxed_slice();
        let mut inbound = Reader::new(socket, early, 1 << 20);
        client.write_all(&frame(true, 6)).await.expect("write");
        assert_eq!(inbound.next_frame().await.expect("early").payload.len(), 5);
        assert_eq!(inbound.next_frame().await.expect("later").payload.len(), 6);
        assert!(!inbound.holds_buffer());
    }
}
