//! RFC 6455 framing in one place: frame headers read and written, and the
//! payload of close frames.
//!
//! fastwebsockets reads and checks the frames themselves. What the session
//! needs beside it is here: where a client frame's header ends and whether
//! its mask bit is set ([`Header`], for the reader that follows frame
//! boundaries), and server frames encoded by hand ([`encode`], for the
//! writer's batches and the frames written outside them).

use fastwebsockets::OpCode;

/// The longest frame header: two bytes, an eight-byte length, a four-byte mask.
pub const MAX_HEADER: usize = 14;

/// What a frame header says about the frame's size and mask (section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The header's own length in bytes (2 to [`MAX_HEADER`]).
    pub len: usize,
    /// The payload's length in bytes.
    pub payload_len: u64,
    /// Whether the mask bit is set. A client must mask every frame (section 5.1).
    pub masked: bool,
}

impl Header {
    /// The header at the start of `head`, once `head` holds enough of it to tell.
    pub fn parse(head: &[u8]) -> Option<Header> {
        let &second = head.get(1)?;
        let masked = second & 0x80 != 0;
        let code = second & 0x7f;
        let extended = match code {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len = 2 + extended + if masked { 4 } else { 0 };
        if head.len() < len {
            return None;
        }
        let payload_len = match extended {
            0 => u64::from(code),
            2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            _ => u64::from_be_bytes(head[2..10].try_into().expect("eight bytes")),
        };
        Some(Header { len, payload_len, masked })
    }
}

/// The header length of a server frame (never masked) with `payload_len` bytes.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends one final, unmasked frame of `opcode` carrying `payload`, its
/// length in the shortest form.
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

/// A close frame with `code` and `reason` (section 5.5.1).
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    encode(&mut out, OpCode::Close, &payload);
    out
}

/// A single text frame.
pub fn text(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    encode(&mut out, OpCode::Text, payload);
    out
}

/// Whether `code` may travel in a close frame (RFC 6455 7.4): the codes
/// 1000–1003 and 1007–1014 defined so far, and 3000–4999. The rest is
/// reserved, or must never be sent (1005, 1006, 1015).
pub fn code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The code to answer a client's close frame with: its own when it may
/// travel on the wire, 1000 when it gave none, else 1002 (a protocol error).
pub fn reply_code(code: Option<u16>) -> u16 {
    use crate::protocol::close;
    match code {
        None => close::NORMAL,
        Some(code) if code_allowed(code) => code,
        Some(_) => close::PROTOCOL_ERROR,
    }
}

/// The status code of a close frame's `payload`, if it has one (its first two bytes).
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn a_client_close_code_is_echoed_when_valid_and_a_protocol_error_when_not() {
        for valid in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4001, 4999] {
            assert_eq!(reply_code(Some(valid)), valid);
        }
        for invalid in [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, u16::MAX] {
            assert_eq!(reply_code(Some(invalid)), 1002, "{invalid}");
        }
        assert_eq!(reply_code(None), 1000, "no code");
    }

    /// Reads `wire` back with fastwebsockets, as a client would.
    pub(in crate::session) async fn parse(wire: Vec<u8>) -> Vec<(OpCode, Vec<u8>)> {
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
    async fn close_and_text_frames_read_back() {
        let mut wire = text(br#"{"type":"welcome"}"#);
        wire.extend(close(1008, "outbound queue overflow"));
        let got = parse(wire).await;
        assert_eq!(got[0], (OpCode::Text, br#"{"type":"welcome"}"#.to_vec()));
        assert_eq!(got[1].0, OpCode::Close);
        assert_eq!(&got[1].1[..2], &1008u16.to_be_bytes());
        assert_eq!(&got[1].1[2..], b"outbound queue overflow");
    }

    #[test]
    fn a_close_code_is_the_first_two_bytes() {
        assert_eq!(close_code(&close(1008, "why")[2..]), Some(1008));
        assert_eq!(close_code(&[0x03, 0xe8]), Some(1000));
        assert_eq!(close_code(&[3]), None, "one byte is no code");
        assert_eq!(close_code(&[]), None);
    }

    #[test]
    fn encoded_headers_parse_back_in_every_length_form() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70_000] {
            let mut out = Vec::new();
            encode(&mut out, OpCode::Text, &vec![b'x'; len]);
            assert_eq!(out.len(), header_len(len) + len, "{len} bytes");
            let header = Header::parse(&out).expect("a whole header");
            assert_eq!(header, Header { len: header_len(len), payload_len: len as u64, masked: false });
            assert_eq!(Header::parse(&out[..header.len - 1]), None, "{len} bytes: one short");
        }
    }

    #[test]
    fn a_masked_header_counts_its_mask() {
        // A client text frame of 300 bytes: extended 16-bit length, then the mask.
        let head = [0x81, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
        assert_eq!(Header::parse(&head[..7]), None);
        assert_eq!(Header::parse(&head), Some(Header { len: 8, payload_len: 300, masked: true }));
        assert_eq!(Header::parse(&[0x81]), None);
    }
}
