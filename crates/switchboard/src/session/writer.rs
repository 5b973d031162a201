//! The writing side of a socket: what the session has to send, encoded as
//! server frames into one buffer and written with one call.
//!
//! Server frames are never masked, so a frame is a two-to-ten-byte header and
//! the payload (RFC 6455 section 5.2). fastwebsockets' writer makes one
//! `write` system call per frame and keeps a buffer for the socket's life;
//! encoding a whole batch here makes one call per batch and keeps nothing
//! between batches.

use bytes::Bytes;
use fastwebsockets::OpCode;

use super::outbox::Work;

/// Appends one final, unmasked frame of `opcode` carrying `payload`.
pub fn encode(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    out.push(0x80 | opcode as u8);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// What one batch puts on the wire.
#[derive(Debug)]
pub struct Batch {
    /// The encoded frames: pong and ping first, then text frames, oldest first.
    pub bytes: Vec<u8>,
    /// Text frames in it.
    pub texts: usize,
    /// Their payload bytes (as counted by the outbox).
    pub text_bytes: usize,
}

/// Encodes `work` as one batch.
pub fn batch(work: &Work) -> Batch {
    let text_bytes: usize = work.frames.iter().map(Bytes::len).sum();
    let control = work.pong.as_ref().map_or(0, |p| p.len() + 2) + if work.ping { 2 } else { 0 };
    let mut bytes = Vec::with_capacity(control + text_bytes + 10 * work.frames.len());
    if let Some(payload) = &work.pong {
        encode(&mut bytes, OpCode::Pong, payload);
    }
    if work.ping {
        encode(&mut bytes, OpCode::Ping, b"");
    }
    for frame in &work.frames {
        encode(&mut bytes, OpCode::Text, frame);
    }
    Batch { bytes, texts: work.frames.len(), text_bytes }
}

/// A close frame with `code` and `reason`.
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::with_capacity(4 + payload.len());
    encode(&mut out, OpCode::Close, &payload);
    out
}

/// A single text frame.
pub fn text(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + payload.len());
    encode(&mut out, OpCode::Text, payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `wire` back with fastwebsockets, as a client would.
    async fn parse(wire: Vec<u8>) -> Vec<(fastwebsockets::OpCode, Vec<u8>)> {
        use fastwebsockets::{Role, WebSocket};
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut server, &wire).await.expect("write");
        drop(server);
        let mut ws = WebSocket::after_handshake(client, Role::Client);
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        let mut out = Vec::new();
        while let Ok(frame) = ws.read_frame().await {
            assert!(frame.fin, "every frame is final");
            out.push((frame.opcode, frame.payload.to_vec()));
        }
        out
    }

    #[tokio::test]
    async fn a_batch_reads_back_as_the_frames_it_holds_in_order() {
        use fastwebsockets::OpCode;
        let sizes = [0usize, 1, 125, 126, 127, 65535, 65536, 70_000];
        let work = Work {
            pong: Some(Box::from(&b"p"[..])),
            ping: true,
            frames: sizes.iter().map(|&n| Bytes::from(vec![b'a' + (n % 26) as u8; n])).collect(),
        };
        let b = batch(&work);
        assert_eq!(b.texts, sizes.len());
        assert_eq!(b.text_bytes, sizes.iter().sum::<usize>());
        let got = parse(b.bytes).await;
        assert_eq!(got[0], (OpCode::Pong, b"p".to_vec()));
        assert_eq!(got[1], (OpCode::Ping, Vec::new()));
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(got[2 + i].0, OpCode::Text);
            assert_eq!(got[2 + i].1, vec![b'a' + (n % 26) as u8; n], "frame of {n} bytes");
        }
        assert_eq!(got.len(), 2 + sizes.len());
    }

    #[tokio::test]
    async fn close_and_text_frames_read_back() {
        use fastwebsockets::OpCode;
        let mut wire = text(br#"{"type":"welcome"}"#);
        wire.extend(close(1008, "outbound queue overflow"));
        let got = parse(wire).await;
        assert_eq!(got[0], (OpCode::Text, br#"{"type":"welcome"}"#.to_vec()));
        assert_eq!(got[1].0, OpCode::Close);
        assert_eq!(&got[1].1[..2], &1008u16.to_be_bytes());
        assert_eq!(&got[1].1[2..], b"outbound queue overflow");
    }
}
