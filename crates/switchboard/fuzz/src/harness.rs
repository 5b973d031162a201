//! What each fuzz target does with its input, and the properties it checks.
//!
//! - [`frames`]: raw client bytes through the session's own read path: the
//!   buffer-free `session::reader` (its mask check, and the fastwebsockets
//!   reader it drops once that reader's buffer is proven empty), fed from
//!   memory by `session::reader::scripted` in three arrival patterns, then
//!   `session::frames::Assembler`, then `protocol::check_client_frame`.
//! - [`client_frame`]: one message straight into `check_client_frame`, checked
//!   against `serde_json` as an independent oracle.
//! - [`query`]: a `/ws` query string through axum's `Query` extractor,
//!   `routes::ws::identify`, the signed-link check, and the ID and channel
//!   parsers of `pair`.
//!
//! Every function panics when a property fails; libFuzzer reports that as a crash.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use axum::extract::Query;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use fastwebsockets::{Frame, OpCode, Role, WebSocketError};
use futures_util::FutureExt;
use switchboard::auth::{LinkSigner, Secret};
use switchboard::pair::{PairId, UserId, MAX_ID_LEN};
use switchboard::protocol::{check_client_frame, FrameError, RESERVED_TYPES};
use switchboard::routes::ws::{authorize, identify, WsQuery};
use switchboard::session::frames::{on_error, Assembler, Incoming};
use switchboard::session::reader::scripted::{self, Scripted, Step};
use switchboard::session::reader::Unmasked;

/// Feeds `data` to the session's read path as if a client sent it. The first
/// byte picks the message size limit (1 to 4081 bytes) so that limits are hit.
///
/// The rest is read three times, arriving whole, a byte at a time with a wait
/// before each, and in a mix of both that the input itself decides. Each time:
/// - the frames are those one long-lived fastwebsockets reader (the session's
///   settings) reads from the same bytes, until the session would stop;
/// - no frame comes out once an unmasked header has arrived, and the read
///   fails then (1002);
/// - after each frame, the reader holds a buffer exactly when bytes past that
///   frame's end have arrived (so a quiet socket holds none);
/// - a read waits only where the arrival pattern makes it wait;
/// - no message over the limit or with invalid UTF-8 gets through, and every
///   message passes [`client_frame`].
pub fn frames(data: &[u8]) {
    let Some((&knob, stream)) = data.split_first() else { return };
    let limit = 1 + usize::from(knob) * 16;
    let expected = long_lived_reader(stream, limit);
    let layout = Layout::of(stream);
    let mut rng = Rng::seeded(stream);
    let mixed = Arrival {
        leftover: rng.below(stream.len().min(64) + 1),
        steps: (0..stream.len() / 4 + 1)
            .map(|_| match rng.below(4) {
                0 => Step::Stall,
                n => Step::Bytes(1 + rng.below([0, 8, 300, 5000][n])),
            })
            .collect(),
    };
    let whole = Arrival { leftover: 0, steps: Vec::new() };
    let bytewise = Arrival { leftover: 0, steps: [Step::Stall, Step::Bytes(1)].repeat(stream.len()) };
    for arrival in [whole, bytewise, mixed] {
        read_path(stream, limit, &arrival, &expected, &layout);
    }
}

/// How the bytes of a stream arrive.
struct Arrival {
    /// Bytes the HTTP server read past the upgrade request.
    leftover: usize,
    /// How the rest arrives.
    steps: Vec<Step>,
}

/// A frame as the reader hands it out.
type Read = (bool, OpCode, Vec<u8>);

/// Reads `stream` as `session::Live::serve` does, with the bytes arriving as
/// `arrival` says, and checks the properties listed at [`frames`].
fn read_path(stream: &[u8], limit: usize, arrival: &Arrival, expected: &Expected, layout: &Layout) {
    let (leftover, rest) = stream.split_at(arrival.leftover);
    let source = Arc::new(Scripted::new(rest.to_vec(), arrival.steps.iter().copied()));
    // As in `session::open`: fastwebsockets refuses frames of `limit + 1` bytes or more.
    let mut frames = scripted::frames(source.clone(), leftover, limit + 1);
    let mut assembler = Assembler::new(limit);
    let stalls = arrival.steps.iter().filter(|&&s| s == Step::Stall).count();
    let mut cx = Context::from_waker(Waker::noop());
    let mut waits = 0;
    let mut returned = 0;
    loop {
        let read = loop {
            let mut next = std::pin::pin!(frames.next());
            if let Poll::Ready(read) = next.as_mut().poll(&mut cx) {
                break read;
            }
            // Dropped, as `Live::serve`'s `select!` drops it when other work wins.
            waits += 1;
            assert!(waits <= stalls, "a read waits with every byte there");
        };
        let arrived = leftover.len() + source.taken();
        assert!(!layout.unmasked_within(arrived) || read.is_err(), "a frame came out after an unmasked header");
        // The session's own steps: `Live::serve`.
        let incoming = match read {
            Ok(frame) => {
                let end = layout.end_of_returned(returned);
                let got: Read = (frame.fin, frame.opcode, frame.payload.to_vec());
                assert_eq!(
                    expected.frames.get(returned),
                    Some(&got),
                    "frame {returned} differs from a long-lived reader's"
                );
                returned += 1;
                assert_eq!(
                    frames.holds_buffer(),
                    arrived != end,
                    "after frame {returned} (ending at byte {end}) with {arrived} bytes arrived"
                );
                assembler.push(frame)
            }
            Err(e) => {
                if is_unmasked(&e) {
                    assert!(layout.unmasked_within(arrived), "refused as unmasked, but every header so far is masked");
                } else {
                    assert_eq!(returned, expected.frames.len(), "stopped early: {e}");
                    assert_eq!(format!("{:?}", on_error(&e)), expected.end, "stopped with {e}");
                }
                match on_error(&e) {
                    Some(incoming) => Some(incoming),
                    None => return, // the socket is gone
                }
            }
        };
        match incoming {
            // A message the rate limit dropped: counted, and the session reads on.
            None | Some(Incoming::Dropped) => {}
            Some(Incoming::Text(payload)) => {
                assert!(payload.len() <= limit, "a {}-byte message passed the {limit}-byte limit", payload.len());
                assert!(std::str::from_utf8(&payload).is_ok(), "a text message that is not UTF-8 got through");
                client_frame(&payload);
            }
            // The session ends on each of these.
            Some(Incoming::Binary | Incoming::TooBig | Incoming::Protocol | Incoming::TooSlow | Incoming::Close(_)) => {
                return
            }
        }
    }
}

fn is_unmasked(error: &WebSocketError) -> bool {
    matches!(error, WebSocketError::IoError(e) if e.get_ref().is_some_and(|inner| inner.is::<Unmasked>()))
}

/// What one fastwebsockets reader, kept for the whole stream, reads.
struct Expected {
    /// Its frames, pings included (the session answers them itself).
    frames: Vec<Read>,
    /// What the session makes of the error it stops with (`on_error`, as text).
    end: String,
}

/// Reads `stream` with one fastwebsockets reader, set up as the session sets up its own.
fn long_lived_reader(stream: &[u8], limit: usize) -> Expected {
    let (mut reader, _writer) = fastwebsockets::after_handshake_split(stream, tokio::io::sink(), Role::Server);
    reader.set_auto_close(false);
    reader.set_auto_pong(false);
    reader.set_max_message_size(limit + 1);
    let mut obligations = |_: Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
    let mut frames = Vec::new();
    // Every frame takes at least two bytes, so this bounds the loop.
    for _ in 0..=stream.len() / 2 {
        // An in-memory reader never waits: the read finishes in one poll.
        let Some(read) = reader.read_frame(&mut obligations).now_or_never() else {
            panic!("reading from memory should not pend");
        };
        match read {
            Ok(frame) => frames.push((frame.fin, frame.opcode, frame.payload.to_vec())),
            Err(e) => return Expected { frames, end: format!("{:?}", on_error(&e)) },
        }
    }
    unreachable!("more frames than pairs of bytes")
}

/// Where the frames of a stream lie, by RFC 6455 section 5.2 alone (written
/// here again, apart from the server's `session::wire`).
struct Layout {
    frames: Vec<Placed>,
}

struct Placed {
    /// Where its header ends and its payload ends (this may be past the stream's end).
    header_end: usize,
    end: usize,
    opcode: u8,
    masked: bool,
}

impl Layout {
    /// The frames of `stream` whose header is all there.
    fn of(stream: &[u8]) -> Layout {
        let mut frames = Vec::new();
        let mut at = 0;
        while let [first, second, ..] = stream[at.min(stream.len())..] {
            let masked = second & 0x80 != 0;
            let (extended, short) = match second & 0x7f {
                126 => (2, None),
                127 => (8, None),
                n => (0, Some(u64::from(n))),
            };
            let header_end = at + 2 + extended + if masked { 4 } else { 0 };
            if header_end > stream.len() {
                break;
            }
            let length = short.unwrap_or_else(|| {
                stream[at + 2..at + 2 + extended].iter().fold(0u64, |n, &b| (n << 8) | u64::from(b))
            });
            let end = usize::try_from(length).ok().and_then(|l| header_end.checked_add(l)).unwrap_or(usize::MAX);
            frames.push(Placed { header_end, end, opcode: first & 0x0f, masked });
            at = end;
        }
        Layout { frames }
    }

    /// Where the `n`th frame the reader hands out ends (pings come out too).
    fn end_of_returned(&self, n: usize) -> usize {
        self.frames.get(n).expect("the reader handed out a frame that is not there").end
    }

    /// Whether a header without the mask bit is all within the first `arrived` bytes.
    fn unmasked_within(&self, arrived: usize) -> bool {
        self.frames.iter().take_while(|f| f.header_end <= arrived).any(|f| !f.masked)
    }
}

/// xorshift64*, seeded from the input (FNV-1a), so an input always arrives the same way.
struct Rng(u64);

impl Rng {
    fn seeded(data: &[u8]) -> Rng {
        let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Rng(hash | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}

/// Checks `check_client_frame` on one message against `serde_json`.
pub fn client_frame(data: &[u8]) {
    let verdict = check_client_frame(data);
    // Client messages are UTF-8 (the reader refuses others); compare only those.
    if std::str::from_utf8(data).is_err() {
        return;
    }
    let oracle = serde_json::from_slice::<serde_json::Value>(data);
    match verdict {
        // The relay checks JSON's grammar (RFC 8259) and forwards the bytes.
        // serde_json's `Value` is stricter in three ways the grammar allows:
        // numbers out of f64 range (`1e400`), escapes of lone surrogates
        // (`"\ud800"`, which JavaScript's JSON.parse accepts too), and nesting
        // deeper than 128 (the relay skips values without recursing).
        Ok(_) if oracle.as_ref().is_err_and(|e| grammar_allows(&e.to_string(), data)) => {}
        Ok(info) => {
            let value = oracle.unwrap_or_else(|e| panic!("accepted, but serde_json says: {e}"));
            let object = value.as_object().expect("accepted a JSON value that is not an object");
            let kind = object.get("type").and_then(|t| t.as_str());
            assert_eq!(info.kind.as_deref(), kind, "read another type than serde_json");
            assert!(!kind.is_some_and(|k| RESERVED_TYPES.contains(&k)), "accepted a reserved type");
        }
        Err(FrameError::ReservedType(kind)) => {
            assert!(RESERVED_TYPES.contains(&kind.as_str()), "refused a type that is not reserved: {kind}");
            let value = oracle.expect("refused as reserved, but it is not JSON");
            assert_eq!(value.get("type").and_then(|t| t.as_str()), Some(kind.as_str()));
        }
        Err(FrameError::InvalidJson(_)) => {
            // Refused: not JSON, not an object, or an object with `type` twice
            // (which serde_json's map would silently collapse).
            if let Ok(serde_json::Value::Object(_)) = oracle {
                let text = std::str::from_utf8(data).unwrap();
                assert!(
                    text.matches("\"type\"").count() + text.matches("\\u").count() >= 2,
                    "refused an object: {text}"
                );
            }
        }
    }
}

/// Whether serde_json's error is one of the strictnesses beyond the grammar.
fn grammar_allows(error: &str, data: &[u8]) -> bool {
    // `\uD800` to `\uDFFF`, in either case.
    let surrogate_escape = data
        .windows(4)
        .any(|w| w[..2] == *b"\\u" && w[2].eq_ignore_ascii_case(&b'd') && b"89abcdefABCDEF".contains(&w[3]));
    error.starts_with("number out of range")
        || error.starts_with("recursion limit exceeded")
        || (surrogate_escape && (error.contains("surrogate") || error.contains("hex escape")))
}

fn signer() -> &'static (LinkSigner, switchboard::config::Settings) {
    static SIGNER: OnceLock<(LinkSigner, switchboard::config::Settings)> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let signer = LinkSigner::new(&Secret::new("fuzzing key, not a secret, 32+ bytes"));
        let settings = switchboard::config::Settings { auth: Some(signer.clone()), ..Default::default() };
        (signer, settings)
    })
}

/// Parses `data` as the query of `/ws` and checks what the server decides.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    ids_and_channels(text);
    let Ok(uri) = format!("/ws?{text}").parse::<Uri>() else { return };
    let Ok(Query(query)) = Query::<WsQuery>::try_from_uri(&uri) else { return };

    // Without signed links: a valid pair, or a 400 naming a parameter.
    match identify(&query) {
        Ok(identity) => {
            let peer = identity.pair.other(&identity.user).clone();
            assert_ne!(identity.user, peer);
            assert!(identity.pair.is_polite(&identity.user) != identity.pair.is_polite(&peer));
            let channel = identity.pair.channel("fuzz");
            assert_eq!(PairId::from_channel("fuzz", &channel), Some(identity.pair.clone()));
            // A token minted for this pair is accepted with the same IDs in the query.
            let (signer, _) = signer();
            let token = signer.sign(&identity.user, &peer, SystemTime::now() + Duration::from_secs(60));
            let signed = signer
                .identify(Some(&token), Some(identity.user.as_str()), Some(peer.as_str()))
                .expect("a token for this pair");
            assert_eq!((signed.user, signed.pair), (identity.user.clone(), identity.pair.clone()));
            // And refused for the peer's side.
            assert!(signer.identify(Some(&token), Some(peer.as_str()), None).is_err());
        }
        Err(e) => assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST),
    }
    // With signed links: a fuzzed token is never accepted (it can't carry a valid HMAC).
    let (_, settings) = signer();
    match authorize(settings, &query) {
        Ok(identity) => panic!("a fuzzed query passed the signed-link check as {:?}", identity.user),
        Err(e) => assert_eq!(e.into_response().status(), StatusCode::UNAUTHORIZED),
    }
}

/// `UserId::parse` and `PairId::from_channel` on arbitrary text.
fn ids_and_channels(text: &str) {
    match UserId::parse(text) {
        Ok(id) => {
            assert_eq!(id.as_str(), text);
            assert!(!text.is_empty() && text.len() <= MAX_ID_LEN);
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)));
        }
        Err(_) => assert!(
            text.is_empty()
                || text.len() > MAX_ID_LEN
                || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        ),
    }
    for prefix in ["switchboard", "a:b", ""] {
        if let Some(pair) = PairId::from_channel(prefix, text) {
            // Exactly one pair per channel name: parsing inverts `channel`.
            assert_eq!(pair.channel(prefix), text);
            // Sorted: the lower ID first.
            let ids: Vec<&str> = text[prefix.len() + ":pair:".len()..].split(':').collect();
            assert!(ids.len() == 2 && ids[0] < ids[1], "{text}");
        }
    }
}
