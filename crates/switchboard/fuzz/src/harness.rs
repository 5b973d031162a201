//! What each fuzz target does with its input, and the properties it checks.
//!
//! - [`frames`]: raw client bytes through the session's own reading path:
//!   fastwebsockets' reader (server role, the session's settings), then
//!   `session::frames::Assembler`, then `protocol::check_client_frame`.
//! - [`client_frame`]: one message straight into `check_client_frame`, checked
//!   against `serde_json` as an independent oracle.
//! - [`query`]: a `/ws` query string through axum's `Query` extractor,
//!   `routes::ws::identify`, the signed-link check, and the ID and channel
//!   parsers of `pair`.
//!
//! Every function panics when a property fails; libFuzzer reports that as a crash.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use axum::extract::Query;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use fastwebsockets::{Frame, Role};
use futures_util::FutureExt;
use switchboard::auth::{LinkSigner, Secret};
use switchboard::pair::{PairId, UserId, MAX_ID_LEN};
use switchboard::protocol::{check_client_frame, FrameError, RESERVED_TYPES};
use switchboard::routes::ws::{authorize, identify, WsQuery};
use switchboard::session::frames::{on_error, Assembler, Incoming};

/// Feeds `data` to the server's frame reader as if a client sent it. The first
/// byte picks the message size limit (1 to 4081 bytes) so that limits are hit.
pub fn frames(data: &[u8]) {
    let Some((&knob, stream)) = data.split_first() else { return };
    let limit = 1 + usize::from(knob) * 16;
    let (mut reader, _writer) = fastwebsockets::after_handshake_split(stream, tokio::io::sink(), Role::Server);
    // As in `session::run_session`.
    reader.set_auto_close(false);
    reader.set_auto_pong(true);
    reader.set_max_message_size(limit + 1);
    let mut assembler = Assembler::new(limit);
    let mut obligations = |_: Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
    // Every frame takes at least two bytes, so this bounds the loop.
    for _ in 0..=stream.len() / 2 {
        // An in-memory reader never waits: the read finishes in one poll.
        let Some(read) = reader.read_frame(&mut obligations).now_or_never() else {
            panic!("reading from memory should not pend");
        };
        let incoming = match read {
            Ok(frame) => assembler.push(frame),
            Err(e) => match on_error(&e) {
                Some(incoming) => Some(incoming),
                None => return, // end of input
            },
        };
        match incoming {
            None => {}
            Some(Incoming::Text(payload)) => {
                assert!(payload.len() <= limit, "a {}-byte message passed the {limit}-byte limit", payload.len());
                assert!(std::str::from_utf8(&payload).is_ok(), "a text message that is not UTF-8 got through");
                client_frame(&payload);
            }
            // The session ends on each of these.
            Some(Incoming::Binary | Incoming::TooBig | Incoming::Protocol | Incoming::Close(_)) => return,
        }
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
            assert!(pair.lower() < pair.higher());
        }
    }
}
