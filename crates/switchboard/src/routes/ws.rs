//! `GET /ws?userID=..&peerID=..`: query checks, then the WebSocket upgrade.
//!
//! Before anything else: the `Origin` check ([`crate::origin`], 403), then,
//! with signed links on, the token ([`crate::auth`], 401). The query holds a
//! credential then, so nothing here logs the query or the URI.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use fastwebsockets::upgrade::IncomingUpgrade;
use serde::Deserialize;

use crate::broker::Seq;
use crate::error::ApiError;
use crate::pair::{Identity, PairId, UserId};
use crate::session::{self, Resume};
use crate::state::AppState;

/// The query of `/ws`.
#[derive(Deserialize)]
pub struct WsQuery {
    #[serde(rename = "userID")]
    user_id: Option<String>,
    #[serde(rename = "peerID")]
    peer_id: Option<String>,
    token: Option<String>,
    /// `1` to be able to resume later, or a resume token (with `after`).
    resume: Option<String>,
    /// The last `seq` the client received, when resuming.
    after: Option<String>,
    /// When resuming: the number of the first message the client sends now
    /// (its oldest one without an `ack`; confirmed sends).
    next: Option<String>,
}

impl std::fmt::Debug for WsQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsQuery")
            .field("user_id", &self.user_id)
            .field("peer_id", &self.peer_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("resume", &self.resume.as_ref().map(|_| "<redacted>"))
            .field("after", &self.after)
            .field("next", &self.next)
            .finish()
    }
}

fn id_param(param: &'static str, value: Option<&str>) -> Result<UserId, ApiError> {
    let value = value.ok_or(ApiError::BadParam { param, why: "is required".into() })?;
    UserId::parse(value).map_err(|e| ApiError::BadParam { param, why: e.to_string() })
}

/// Checks the query: both IDs valid and different.
pub fn identify(query: &WsQuery) -> Result<Identity, ApiError> {
    let user = id_param("userID", query.user_id.as_deref())?;
    let peer = id_param("peerID", query.peer_id.as_deref())?;
    let pair = PairId::new(&user, &peer).map_err(|e| ApiError::BadParam { param: "peerID", why: e.to_string() })?;
    Ok(Identity { user, pair })
}

/// The identity of a request under `settings`: from the signed token when
/// `SWITCHBOARD_AUTH_SECRET` is set, else from the query.
pub fn authorize(settings: &crate::config::Settings, query: &WsQuery) -> Result<Identity, ApiError> {
    match &settings.auth {
        Some(signer) => {
            Ok(signer.identify(query.token.as_deref(), query.user_id.as_deref(), query.peer_id.as_deref())?)
        }
        None => identify(query),
    }
}

/// What the client asks of the pair's history (`resume`, `after`): nothing
/// while resume is off (`SWITCHBOARD_RESUME_SECS=0`) or not asked for.
pub fn resume_request(settings: &crate::config::Settings, query: &WsQuery, identity: &Identity) -> Resume {
    let (Some(key), Some(asked)) = (&settings.resume_key, query.resume.as_deref()) else { return Resume::Off };
    if settings.resume.is_zero() {
        return Resume::Off;
    }
    if asked == "1" {
        return Resume::Fresh;
    }
    let Some(lineage) = key.verify(identity, asked) else { return Resume::Refused };
    // Missing or not a number: 1, as if the client had sent nothing yet.
    let next = query.next.as_deref().and_then(|n| n.parse::<u64>().ok()).filter(|&n| n > 0).unwrap_or(1);
    Resume::From { after: query.after.as_deref().and_then(Seq::parse), lineage, next }
}

/// Whether a header of `name` lists `token` (comma-separated, any case).
fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Checks the upgrade request as RFC 6455 4.2.1 describes it (fastwebsockets
/// looks at the key and the version only): a request that asks for no
/// WebSocket upgrade, or for another version than 13, gets 426; one that
/// asks for it with a handshake short of a header gets 400.
pub fn check_handshake(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    // axum serves HEAD with the GET handler; a HEAD can't be upgraded.
    if method != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    if !lists(headers, header::UPGRADE, "websocket") {
        return Err(ApiError::NotUpgrade);
    }
    if !lists(headers, header::CONNECTION, "upgrade") {
        return Err(ApiError::BadHandshake("the Connection header must list upgrade"));
    }
    if !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        return Err(ApiError::BadHandshake("Sec-WebSocket-Key is missing"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(ApiError::NotUpgrade);
    }
    Ok(())
}

/// Validates the origin, the query and the handshake and upgrades; the
/// session runs on its own task.
pub async fn upgrade(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
    upgrade: Result<IncomingUpgrade, StatusCode>,
) -> Result<Response, ApiError> {
    if !state.settings.allowed_origins.permits(&headers) {
        return Err(ApiError::ForbiddenOrigin);
    }
    let identity = authorize(&state.settings, &query)?;
    let resume = resume_request(&state.settings, &query, &identity);
    check_handshake(&method, &headers)?;
    let upgrade = upgrade.map_err(|_| ApiError::NotUpgrade)?;
    // From the start of a drain, new sockets go elsewhere: a load balancer
    // retries another replica on 503 sooner than it notices /readyz.
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    if !state.broker.is_ready() || !state.resume_key_known() {
        return Err(ApiError::BrokerUnavailable);
    }
    let permit = state.try_open_socket().ok_or(ApiError::TooManySockets)?;
    let (response, socket) = upgrade.upgrade().map_err(|_| ApiError::NotUpgrade)?;
    state.sessions.spawn(session::run_resumable(state.clone(), socket, identity, resume, permit));
    Ok(response.map(Body::new))
}
