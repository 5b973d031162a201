//! Reads whole messages from the socket, enforcing the size limit across fragments.
//!
//! fastwebsockets checks each frame's declared length before it allocates
//! (`max_message_size`); its `FragmentCollector` does not bound the sum of
//! fragments, so continuation frames are assembled here, and the running total
//! is checked before each fragment is appended. A binary message is refused
//! at its first frame, and a message the rate limit dropped is skipped to its
//! end (its framing and size still checked).

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};

/// One complete thing read from a client.
#[derive(Debug)]
pub enum Incoming {
    /// A whole text message.
    Text(Bytes),
    /// The end of a text message the rate limit dropped (its client heard
    /// of it already): a message all the same, for confirmed sends' count.
    Dropped,
    /// The first frame of a binary message (refused with 1003).
    Binary,
    /// The client's close frame, with its code if it gave one.
    Close(Option<u16>),
    /// A message over the limit (1009).
    TooBig,
    /// A protocol violation (1002).
    Protocol,
    /// A frame not finished within the frame timeout (1008).
    TooSlow,
}

/// A fragmented text message under way.
#[derive(Debug)]
struct Partial {
    buf: BytesMut,
    /// Its bytes so far, kept also while it is skipped.
    len: usize,
    /// The rate limit dropped a frame of it: the rest is skipped.
    dropped: bool,
}

/// Assembles fragmented messages with a byte limit.
#[derive(Debug)]
pub struct Assembler {
    limit: usize,
    /// Boxed: fragmented messages are rare, and an idle session keeps only the pointer.
    partial: Option<Box<Partial>>,
}

fn into_bytes(payload: Payload<'_>) -> BytesMut {
    match payload {
        Payload::Bytes(b) => b,
        other => BytesMut::from(&other[..]),
    }
}

impl Assembler {
    /// An assembler accepting messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, partial: None }
    }

    /// Feeds one frame; returns a result when a message is complete.
    pub fn push(&mut self, frame: Frame<'_>) -> Option<Incoming> {
        self.feed(frame, true)
    }

    /// Feeds a frame the rate limit dropped: the message it belongs to is
    /// dropped whole, and never comes out. Its framing and size are still
    /// checked, so that a skipped message can't go on for ever.
    pub fn skip(&mut self, frame: Frame<'_>) -> Option<Incoming> {
        self.feed(frame, false)
    }

    fn feed(&mut self, frame: Frame<'_>, keep: bool) -> Option<Incoming> {
        match frame.opcode {
            OpCode::Text | OpCode::Binary if self.partial.is_some() => Some(Incoming::Protocol),
            // Refused at once: a binary message is never read through.
            OpCode::Binary => Some(Incoming::Binary),
            OpCode::Text => {
                let len = frame.payload.len();
                if len > self.limit {
                    return Some(Incoming::TooBig);
                }
                match (frame.fin, keep) {
                    (true, true) => Some(Incoming::Text(into_bytes(frame.payload).freeze())),
                    (true, false) => Some(Incoming::Dropped),
                    (false, _) => {
                        let buf = if keep { into_bytes(frame.payload) } else { BytesMut::new() };
                        self.partial = Some(Box::new(Partial { buf, len, dropped: !keep }));
                        None
                    }
                }
            }
            OpCode::Continuation => {
                let Some(partial) = self.partial.as_deref_mut() else {
                    return Some(Incoming::Protocol);
                };
                partial.len += frame.payload.len();
                if partial.len > self.limit {
                    self.partial = None;
                    return Some(Incoming::TooBig);
                }
                if !keep && !partial.dropped {
                    partial.dropped = true;
                    partial.buf = BytesMut::new();
                }
                if !partial.dropped {
                    partial.buf.extend_from_slice(&frame.payload);
                }
                if !frame.fin {
                    return None;
                }
                let Partial { buf, dropped, .. } = *self.partial.take()?;
                if dropped {
                    return Some(Incoming::Dropped);
                }
                match std::str::from_utf8(&buf) {
                    Ok(_) => Some(Incoming::Text(buf.freeze())),
                    Err(_) => Some(Incoming::Protocol),
                }
            }
            OpCode::Close => Some(Incoming::Close(super::wire::close_code(&frame.payload))),
            OpCode::Ping | OpCode::Pong => None,
        }
    }
}

/// Maps a read error to what the session does next: `None` means the socket is gone.
pub fn on_error(error: &WebSocketError) -> Option<Incoming> {
    match error {
        WebSocketError::FrameTooLarge => Some(Incoming::TooBig),
        WebSocketError::InvalidUTF8
        // A reserved opcode (0x3–0x7, 0xB–0xF).
        | WebSocketError::InvalidValue
        | WebSocketError::InvalidFragment
        | WebSocketError::InvalidContinuationFrame
        | WebSocketError::ReservedBitsNotZero
        | WebSocketError::ControlFrameFragmented
        | WebSocketError::PingFrameTooLarge
        | WebSocketError::InvalidCloseFrame
        | WebSocketError::InvalidCloseCode => Some(Incoming::Protocol),
        WebSocketError::IoError(e) if e.get_ref().is_some_and(|inner| inner.is::<super::reader::Unmasked>()) => {
            Some(Incoming::Protocol)
        }
        WebSocketError::IoError(e) if e.get_ref().is_some_and(|inner| inner.is::<super::reader::SlowFrame>()) => {
            Some(Incoming::TooSlow)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(fin: bool, data: &[u8]) -> Frame<'static> {
        Frame::new(fin, OpCode::Text, None, Payload::Owned(data.to_vec()))
    }

    fn cont(fin: bool, data: &[u8]) -> Frame<'static> {
        Frame::new(fin, OpCode::Continuation, None, Payload::Owned(data.to_vec()))
    }

    #[test]
    fn assembles_fragments_within_the_limit() {
        let mut a = Assembler::new(6);
        assert!(a.push(text(false, b"ab")).is_none());
        assert!(a.push(cont(false, b"cd")).is_none());
        match a.push(cont(true, b"ef")) {
            Some(Incoming::Text(b)) => assert_eq!(&b[..], b"abcdef"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_fragments_past_the_limit() {
        let mut a = Assembler::new(6);
        assert!(a.push(text(false, b"abcd")).is_none());
        assert!(matches!(a.push(cont(true, b"efg")), Some(Incoming::TooBig)));
    }

    #[test]
    fn a_binary_message_is_refused_at_its_first_frame() {
        let mut a = Assembler::new(10);
        let first = Frame::new(false, OpCode::Binary, None, Payload::Owned(vec![1, 2, 3]));
        assert!(matches!(a.push(first), Some(Incoming::Binary)));
    }

    #[test]
    fn a_dropped_fragment_drops_its_message_but_not_the_next() {
        let mut a = Assembler::new(6);
        assert!(a.push(text(false, b"ab")).is_none());
        assert!(a.skip(cont(false, b"cd")).is_none());
        assert!(matches!(a.push(cont(true, b"ef")), Some(Incoming::Dropped)), "the message was dropped, and counted");
        match a.push(text(true, b"next")) {
            Some(Incoming::Text(b)) => assert_eq!(&b[..], b"next"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.skip(text(true, b"gone")), Some(Incoming::Dropped)));
        // A skipped message is still held to the size limit and to framing.
        assert!(a.skip(text(false, b"abcd")).is_none());
        assert!(matches!(a.push(cont(false, b"efg")), Some(Incoming::TooBig)));
        assert!(matches!(a.skip(cont(true, b"x")), Some(Incoming::Protocol)), "no message under way");
    }

    #[test]
    fn refuses_stray_continuations_and_interleaving() {
        let mut a = Assembler::new(10);
        assert!(matches!(a.push(cont(true, b"x")), Some(Incoming::Protocol)));
        assert!(a.push(text(false, b"x")).is_none());
        assert!(matches!(a.push(text(true, b"y")), Some(Incoming::Protocol)));
    }
}
