//! The wire protocol: client frame checks, server events and close codes.
//!
//! A client text frame must be a JSON object. It is forwarded byte for byte, so
//! the check here only scans it: `serde` walks the object with [`IgnoredAny`]
//! for every value except `type`, and nothing is built on the heap unless a
//! `type` string holds escapes.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Serialize;

/// WebSocket close codes the server sends.
pub mod close {
    /// Normal closure, in reply to a client's close.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client sent a binary frame.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Never sent: the connection was lost without a close frame.
    pub const ABNORMAL: u16 = 1006;
    /// A policy was broken: flood, a socket too slow to read its queue, or a
    /// frame not finished in time.
    pub const POLICY: u16 = 1008;
    /// A frame or message was over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server restarts; reconnect (possibly to another replica).
    pub const SERVICE_RESTART: u16 = 1012;
    /// The broker is unavailable; try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The same user connected again to the same pair; the older session ends.
    pub const REPLACED: u16 = 4001;
    /// A resume token that was not made for this user and pair.
    pub const RESUME_REFUSED: u16 = 4003;
}

/// Why the server ends a session: the close code and text it sends, and the
/// `reason` label of the sessions-closed metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// A newer session of the same user took over.
    Replaced = 1,
    /// The server is shutting down.
    Shutdown,
    /// The server drains before a restart; reconnect elsewhere.
    Drain,
    /// The socket did not read its queue fast enough.
    SlowConsumer,
    /// The socket failed; no close frame can be sent.
    Gone,
    /// The client sent a binary frame.
    Binary,
    /// The client sent a message over the limit.
    TooBig,
    /// The client broke the WebSocket protocol.
    Protocol,
    /// The client kept sending over its rate limit.
    Flood,
    /// The client answered no ping in time.
    PingTimeout,
    /// The broker failed while the session opened.
    BrokerUnavailable,
    /// The client started a frame and did not finish it in time.
    SlowFrame,
    /// The client asked to resume with a token not made for its user and pair.
    ResumeRefused,
}

impl CloseReason {
    /// Every reason, in `repr` order.
    const ALL: [Self; 13] = [
        Self::Replaced,
        Self::Shutdown,
        Self::Drain,
        Self::SlowConsumer,
        Self::Gone,
        Self::Binary,
        Self::TooBig,
        Self::Protocol,
        Self::Flood,
        Self::PingTimeout,
        Self::BrokerUnavailable,
        Self::SlowFrame,
        Self::ResumeRefused,
    ];

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Self::Replaced => close::REPLACED,
            Self::Shutdown | Self::PingTimeout => close::GOING_AWAY,
            Self::Drain => close::SERVICE_RESTART,
            Self::SlowConsumer | Self::Flood | Self::SlowFrame => close::POLICY,
            Self::Gone => close::ABNORMAL,
            Self::Binary => close::UNSUPPORTED_DATA,
            Self::TooBig => close::TOO_BIG,
            Self::Protocol => close::PROTOCOL_ERROR,
            Self::BrokerUnavailable => close::TRY_AGAIN_LATER,
            Self::ResumeRefused => close::RESUME_REFUSED,
        }
    }

    /// The close frame's reason text.
    pub fn text(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::Shutdown => "server shutting down",
            Self::Drain => "service restart",
            Self::SlowConsumer => "outbound queue overflow",
            Self::Gone => "connection lost",
            Self::Binary => "binary frames are not supported",
            Self::TooBig => "message too big",
            Self::Protocol => "protocol error",
            Self::Flood => "rate limit exceeded",
            Self::PingTimeout => "ping timeout",
            Self::BrokerUnavailable => "broker unavailable",
            Self::SlowFrame => "frame not finished in time",
            Self::ResumeRefused => "resume token refused",
        }
    }

    /// The `reason` label of the sessions-closed metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::Drain => "drain",
            Self::SlowConsumer => "slow_consumer",
            Self::Gone => "gone",
            Self::Binary => "binary",
            Self::TooBig => "too_big",
            Self::Protocol => "protocol",
            Self::Flood => "flood",
            Self::PingTimeout => "ping_timeout",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::SlowFrame => "slow_frame",
            Self::ResumeRefused => "resume_refused",
        }
    }

    /// The reason stored as `n` (its `repr`), if any.
    pub fn from_repr(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }
}

/// Types that only the server may send; a client frame using one is refused.
pub const RESERVED_TYPES: &[&str] = &["welcome", "peer-joined", "peer-left", "error", "resync", "ice-servers"];

/// The `error` message for an object that repeats its `type` key (code `invalid_json`).
pub const DUPLICATE_TYPE: &str = "duplicate `type` key";

/// Why a client frame was refused. Each maps to an `error` event code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, JSON but not an object, or an object with `type` twice ([`DUPLICATE_TYPE`]).
    #[error("{0}")]
    InvalidJson(String),
    /// The object's `type` is one of [`RESERVED_TYPES`].
    #[error("type {0:?} is reserved for server events")]
    ReservedType(String),
}

impl FrameError {
    /// The `code` of the `error` event sent back to the client.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::ReservedType(_) => "reserved_type",
        }
    }
}

/// What the relay learned from a valid client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo<'a> {
    /// The `type` field when it is a string.
    pub kind: Option<Cow<'a, str>>,
}

/// Checks that `payload` is one JSON object whose `type` is not reserved.
pub fn check_client_frame(payload: &[u8]) -> Result<FrameInfo<'_>, FrameError> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(FrameError::InvalidJson("frame must be a JSON object".into()));
    }
    let duplicate = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let probe = ProbeSeed(&duplicate).deserialize(&mut de).and_then(|probe| de.end().map(|()| probe));
    let probe = probe.map_err(|e| {
        if duplicate.get() {
            FrameError::InvalidJson(DUPLICATE_TYPE.into())
        } else {
            FrameError::InvalidJson(format!("frame is not valid JSON: {e}"))
        }
    })?;
    if let Some(kind) = &probe.kind {
        if RESERVED_TYPES.contains(&kind.as_ref()) {
            return Err(FrameError::ReservedType(kind.to_string()));
        }
    }
    Ok(FrameInfo { kind: probe.kind })
}

/// A JSON object scanned for its `type` field only.
struct Probe<'a> {
    kind: Option<Cow<'a, str>>,
}

/// Reads a [`Probe`]; sets the flag when the object repeats `type`.
struct ProbeSeed<'f>(&'f Cell<bool>);

impl<'de> DeserializeSeed<'de> for ProbeSeed<'_> {
    type Value = Probe<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Probe<'de>, D::Error> {
        struct ObjectVisitor<'f>(&'f Cell<bool>);
        impl<'de> Visitor<'de> for ObjectVisitor<'_> {
            type Value = Probe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe<'de>, A::Error> {
                let mut kind = None;
                let mut seen_type = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "type" {
                        if seen_type {
                            self.0.set(true);
                            return Err(de::Error::custom(DUPLICATE_TYPE));
                        }
                        seen_type = true;
                        kind = map.next_value::<TypeField<'de>>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Probe { kind })
            }
        }
        d.deserialize_map(ObjectVisitor(self.0))
    }
}

/// The value of `type`: kept when it is a string, skipped otherwise.
struct TypeField<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for TypeField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TypeVisitor;
        impl<'de> Visitor<'de> for TypeVisitor {
            type Value = TypeField<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TypeField(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TypeField(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(TypeField(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TypeField(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TypeField(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TypeField(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TypeField(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TypeField(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TypeField(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TypeField(None))
            }
        }
        d.deserialize_any(TypeVisitor)
    }
}

/// An event the server itself sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerEvent<'a> {
    /// The first frame of every session.
    Welcome {
        /// This session's user.
        #[serde(rename = "userID")]
        user_id: &'a str,
        /// The other user of the pair.
        #[serde(rename = "peerID")]
        peer_id: &'a str,
        /// Whether this side is polite in perfect negotiation.
        polite: bool,
        /// Whether the peer has a live session right now.
        #[serde(rename = "peerOnline")]
        peer_online: bool,
        /// STUN/TURN servers for `RTCPeerConnection`.
        #[serde(rename = "iceServers")]
        ice_servers: &'a serde_json::value::RawValue,
        /// With resume on, for a client that asked for it: how to resume.
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<ResumeInfo<'a>>,
    },
    /// The peer opened a session.
    PeerJoined {
        /// The peer's ID.
        #[serde(rename = "peerID")]
        peer_id: &'a str,
    },
    /// The peer's session ended.
    PeerLeft {
        /// The peer's ID.
        #[serde(rename = "peerID")]
        peer_id: &'a str,
    },
    /// A frame was refused or could not be relayed.
    Error {
        /// A stable machine-readable code.
        code: &'a str,
        /// A human-readable explanation.
        message: &'a str,
    },
    /// Messages may have been lost (the broker reconnected): renegotiate.
    Resync,
    /// Fresh STUN/TURN servers (new TURN credentials) before the old ones expire.
    IceServers {
        /// STUN/TURN servers for `RTCPeerConnection.setConfiguration`.
        #[serde(rename = "iceServers")]
        ice_servers: &'a serde_json::value::RawValue,
    },
    /// Confirmed sends (a resumable session): the server is done with the
    /// client's messages up to number `n`, each published to the broker or
    /// answered with an error event. One per batch of writes, not per message.
    Ack {
        /// The number of the last message done (see [`ResumeInfo::next`]).
        n: u64,
    },
}

/// The welcome's `resume` field: what a client names when it reconnects.
#[derive(Debug, Serialize)]
pub struct ResumeInfo<'a> {
    /// The resume token of this user, pair and session.
    pub token: &'a str,
    /// Where the client stands in the pair's history until a `relay` event
    /// says otherwise.
    pub seq: String,
    /// The number the server gives the client's next message (the `next`
    /// the client named when resuming, else 1): confirmed sends count from it.
    pub next: u64,
}

/// The `relay` event that carries a peer's `frame` (a JSON object, kept
/// byte for byte) with its place `seq` in the pair's history, for a client
/// that asked to resume: `{"type":"relay","seq":"…","data":<frame>}`. The
/// frame is copied once; its bytes are not parsed.
pub fn relay_event(seq: Option<&str>, frame: &[u8]) -> bytes::Bytes {
    const HEAD: &[u8] = br#"{"type":"relay","#;
    let seq_len = seq.map_or(0, |s| s.len() + 9);
    let mut out = Vec::with_capacity(HEAD.len() + seq_len + 8 + frame.len() + 1);
    out.extend_from_slice(HEAD);
    if let Some(seq) = seq {
        // A stream ID: digits and a dash, nothing to escape.
        out.extend_from_slice(br#""seq":""#);
        out.extend_from_slice(seq.as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(br#""data":"#);
    out.extend_from_slice(frame);
    out.push(b'}');
    out.into()
}

impl ServerEvent<'_> {
    /// The event as JSON text.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).map(Into::into).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_objects_and_reads_type() {
        let info = check_client_frame(br#" {"type":"offer","sdp":"v=0\r\n","n":[1,{"a":null}]}"#).unwrap();
        assert_eq!(info.kind.as_deref(), Some("offer"));
        assert_eq!(check_client_frame(b"{}").unwrap().kind, None);
        assert_eq!(check_client_frame(br#"{"type":7}"#).unwrap().kind, None);
    }

    #[test]
    fn rejects_non_objects() {
        for bad in [&b"[]"[..], b"\"x\"", b"12", b"null", b"", b"{", b"{} x", br#"["type","offer"]"#, b"{\"a\":1,}"] {
            let err = check_client_frame(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_json", "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rejects_reserved_types_even_escaped_or_duplicated() {
        for t in RESERVED_TYPES {
            let frame = format!(r#"{{"type":"{t}"}}"#);
            assert_eq!(check_client_frame(frame.as_bytes()).unwrap_err().code(), "reserved_type");
        }
        let escaped = br#"{"type":"w\u0065lcome"}"#;
        assert_eq!(check_client_frame(escaped).unwrap_err().code(), "reserved_type");
        let dup = br#"{"type":"offer","type":"welcome"}"#;
        assert_eq!(check_client_frame(dup).unwrap_err().code(), "invalid_json");
    }

    #[test]
    fn a_duplicate_type_key_is_named_as_such() {
        for dup in [
            &br#"{"type":"offer","type":"welcome"}"#[..],
            br#"{"type":1,"a":{},"t\u0079pe":"x"}"#,
            br#" {"type":"x" , "type" : "x"} "#,
        ] {
            let err = check_client_frame(dup).unwrap_err();
            assert_eq!(err.code(), "invalid_json");
            assert_eq!(err.to_string(), "duplicate `type` key", "{:?}", String::from_utf8_lossy(dup));
        }
        // Other invalid JSON keeps serde_json's own description, with its position.
        let err = check_client_frame(br#"{"type":"x","sdp":"#).unwrap_err();
        assert!(err.to_string().starts_with("frame is not valid JSON: "), "{err}");
        // A `type` nested in another value is not a duplicate.
        assert!(check_client_frame(br#"{"type":"x","sdp":{"type":"y"}}"#).is_ok());
    }

    #[test]
    fn events_serialize_to_the_documented_shape() {
        let ice = serde_json::value::RawValue::from_string("[]".into()).unwrap();
        let w = ServerEvent::Welcome {
            user_id: "a",
            peer_id: "b",
            polite: false,
            peer_online: true,
            ice_servers: &ice,
            resume: None,
        };
        assert_eq!(
            &w.to_bytes()[..],
            br#"{"type":"welcome","userID":"a","peerID":"b","polite":false,"peerOnline":true,"iceServers":[]}"#
        );
        assert_eq!(&ServerEvent::PeerLeft { peer_id: "b" }.to_bytes()[..], br#"{"type":"peer-left","peerID":"b"}"#);
        assert_eq!(&ServerEvent::Resync.to_bytes()[..], br#"{"type":"resync"}"#);
        let resume = Some(ResumeInfo { token: "1f.x", seq: "5-1".into(), next: 3 });
        let w = ServerEvent::Welcome {
            user_id: "a",
            peer_id: "b",
            polite: true,
            peer_online: false,
            ice_servers: &ice,
            resume,
        };
        assert!(w.to_bytes().ends_with(br#""iceServers":[],"resume":{"token":"1f.x","seq":"5-1","next":3}}"#));
        assert_eq!(&ServerEvent::Ack { n: 12 }.to_bytes()[..], br#"{"type":"ack","n":12}"#);
        let frame = br#" {"type":"relay" ,"seq":"x"} "#;
        let relayed = relay_event(Some("17-0"), frame);
        assert_eq!(&relayed[..], br#"{"type":"relay","seq":"17-0","data": {"type":"relay" ,"seq":"x"} }"#);
        let parsed: serde_json::Value = serde_json::from_slice(&relayed).unwrap();
        assert_eq!((parsed["seq"].as_str(), parsed["data"]["seq"].as_str()), (Some("17-0"), Some("x")));
        assert_eq!(&relay_event(None, b"{}")[..], br#"{"type":"relay","data":{}}"#);
        assert_eq!(
            &ServerEvent::IceServers { ice_servers: &ice }.to_bytes()[..],
            br#"{"type":"ice-servers","iceServers":[]}"#
        );
    }
}
