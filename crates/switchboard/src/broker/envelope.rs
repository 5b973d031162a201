//! The envelope a session publishes on its pair's channel.
//!
//! Layout: `{kind} {userID} {session:016x}\n{body}`, or with history on (see
//! [`super::history`]) `{kind} {userID} {session:016x} {seq}\n{body}` as the
//! broker publishes it ([`stamp`]), where the kind is `M`, or
//! `O`/`A` for messages whose `type` is `offer`/`answer` (for the call-setup
//! metric, so receivers need not parse bodies), `J` for join, `L` for leave. The sender's identity
//! travels in the header; the body is the client's JSON exactly as received,
//! never parsed into a value or re-encoded.

use bytes::{BufMut, Bytes, BytesMut};

use super::history::Seq;
use crate::pair::UserId;

/// A unique session number, random per session across all replicas.
pub type SessionId = u64;

/// What an envelope announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client frame to relay to the other user.
    Message,
    /// A client frame of `"type":"offer"`, relayed like any message.
    Offer,
    /// A client frame of `"type":"answer"`, relayed like any message.
    Answer,
    /// A session opened (and replaces older sessions of the same user).
    Join,
    /// A session ended.
    Leave,
}

impl Kind {
    /// The kind of a relayed client frame with this `type`.
    pub fn of_message(frame_type: Option<&str>) -> Self {
        match frame_type {
            Some("offer") => Kind::Offer,
            Some("answer") => Kind::Answer,
            _ => Kind::Message,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Kind::Message => b'M',
            Kind::Offer => b'O',
            Kind::Answer => b'A',
            Kind::Join => b'J',
            Kind::Leave => b'L',
        }
    }
}

/// A decoded envelope borrowing from the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// What it announces.
    pub kind: Kind,
    /// The user who sent it.
    pub from: &'a str,
    /// The session that sent it.
    pub session: SessionId,
    /// The client's frame for [`Kind::Message`], empty otherwise.
    pub body: &'a [u8],
    /// The envelope's place in the pair's history, when history is on.
    pub seq: Option<Seq>,
    /// How many bytes the broker added with the `seq` (0 without one): the
    /// sender counted the envelope without them.
    pub stamp_len: usize,
}

/// Encodes an envelope; the body is copied once, as is.
pub fn encode(kind: Kind, from: &UserId, session: SessionId, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(2 + from.as_str().len() + 18 + body.len());
    buf.put_u8(kind.byte());
    buf.put_u8(b' ');
    buf.put_slice(from.as_str().as_bytes());
    buf.put_u8(b' ');
    put_hex(&mut buf, session);
    buf.put_u8(b'\n');
    buf.put_slice(body);
    buf.freeze()
}

fn put_hex(buf: &mut BytesMut, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        buf.put_u8(DIGITS[((n >> (shift * 4)) & 0xf) as usize]);
    }
}

/// Decodes an envelope, or `None` when the bytes are not one.
pub fn decode(raw: &[u8]) -> Option<Envelope<'_>> {
    let newline = raw.iter().position(|&b| b == b'\n')?;
    let (header, body) = (&raw[..newline], &raw[newline + 1..]);
    let mut parts = header.split(|&b| b == b' ');
    let kind = match parts.next()? {
        b"M" => Kind::Message,
        b"O" => Kind::Offer,
        b"A" => Kind::Answer,
        b"J" => Kind::Join,
        b"L" => Kind::Leave,
        _ => return None,
    };
    let from = std::str::from_utf8(parts.next()?).ok()?;
    let session = u64::from_str_radix(std::str::from_utf8(parts.next()?).ok()?, 16).ok()?;
    let (seq, stamp_len) = match parts.next() {
        Some(seq) => (Some(Seq::parse(std::str::from_utf8(seq).ok()?)?), seq.len() + 1),
        None => (None, 0),
    };
    if parts.next().is_some() || from.is_empty() {
        return None;
    }
    Some(Envelope { kind, from, session, body, seq, stamp_len })
}

/// The envelope `raw` (without a `seq`) as published at `seq`: ` {seq}` added
/// to its header.
pub fn stamp(raw: &[u8], seq: Seq) -> Bytes {
    let seq = seq.to_string();
    let newline = raw.iter().position(|&b| b == b'\n').unwrap_or(raw.len());
    let mut buf = BytesMut::with_capacity(raw.len() + 1 + seq.len());
    buf.put_slice(&raw[..newline]);
    buf.put_u8(b' ');
    buf.put_slice(seq.as_bytes());
    buf.put_slice(&raw[newline..]);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_without_touching_the_body() {
        let user = UserId::parse("al-ice.1_").unwrap();
        let body = "{\"type\":\"offer\",\"sdp\":\"v=0\\r\\n\u{1F600}\"}\n\n".as_bytes();
        let raw = encode(Kind::Message, &user, 0xdead_beef_0000_0001, body);
        let env = decode(&raw).unwrap();
        let expected = Envelope {
            kind: Kind::Message,
            from: "al-ice.1_",
            session: 0xdead_beef_0000_0001,
            body,
            seq: None,
            stamp_len: 0,
        };
        assert_eq!(env, expected);
        let seq = Seq { ms: 1_700_000_000_000, n: 3 };
        let stamped = stamp(&raw, seq);
        let env = decode(&stamped).unwrap();
        assert_eq!((env.seq, env.body), (Some(seq), body));
        assert_eq!(stamped.len() - env.stamp_len, raw.len(), "the sender's count comes back");
        let join = encode(Kind::Join, &user, 7, b"");
        assert_eq!(decode(&join).unwrap().kind, Kind::Join);
    }

    #[test]
    fn rejects_garbage() {
        for bad in
            [&b""[..], b"M a 1", b"X a 1\n", b"M a zz\n", b"M  1\n", b"M a 1 2\n", b"M a 1 2-x\n", b"M a 1 2-3 4\n"]
        {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
