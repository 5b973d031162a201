//! Reads whole messages from the socket, enforcing the size limit across fragments.
//!
//! fastwebsockets checks each frame's declared length before it allocates
//! (`max_message_size`); its `FragmentCollector` does not bound the sum of
//! fragments, so continuation frames are assembled here, and the running total
//! is checked before each fragment is appended.

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};

/// One complete thing read from a client.
#[derive(Debug)]
pub enum Incoming {
    /// A whole text message.
    Text(Bytes),
    /// A binary message (refused with 1003).
    Binary,
    /// The client's close frame, with its code if it gave one.
    Close(Option<u16>),
    /// A message over the limit (1009).
    TooBig,
    /// A protocol violation (1002).
    Protocol,
}

/// Assembles fragmented messages with a byte limit.
#[derive(Debug)]
pub struct Assembler {
    limit: usize,
    /// Boxed: fragmented messages are rare, and an idle session keeps only the pointer.
    partial: Option<Box<(OpCode, BytesMut)>>,
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
        match frame.opcode {
            OpCode::Text | OpCode::Binary if self.partial.is_some() => Some(Incoming::Protocol),
            OpCode::Binary => {
                if frame.fin {
                    Some(Incoming::Binary)
                } else {
                    self.partial = Some(Box::new((OpCode::Binary, BytesMut::new())));
                    None
                }
            }
            OpCode::Text => {
                if frame.payload.len() > self.limit {
                    return Some(Incoming::TooBig);
                }
                if frame.fin {
                    Some(Incoming::Text(into_bytes(frame.payload).freeze()))
                } else {
                    self.partial = Some(Box::new((OpCode::Text, into_bytes(frame.payload))));
                    None
                }
            }
            OpCode::Continuation => {
                let Some((opcode, buf)) = self.partial.as_deref_mut() else {
                    return Some(Incoming::Protocol);
                };
                if *opcode == OpCode::Text {
                    if buf.len() + frame.payload.len() > self.limit {
                        self.partial = None;
                        return Some(Incoming::TooBig);
                    }
                    buf.extend_from_slice(&frame.payload);
                }
                if !frame.fin {
                    return None;
                }
                let (opcode, buf) = *self.partial.take()?;
                if opcode == OpCode::Binary {
                    return Some(Incoming::Binary);
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
    fn refuses_stray_continuations_and_interleaving() {
        let mut a = Assembler::new(10);
        assert!(matches!(a.push(cont(true, b"x")), Some(Incoming::Protocol)));
        assert!(a.push(text(false, b"x")).is_none());
        assert!(matches!(a.push(text(true, b"y")), Some(Incoming::Protocol)));
    }
}
