//! `GET /ws?userID=..&peerID=..`: query checks, then the WebSocket upgrade.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use fastwebsockets::upgrade::IncomingUpgrade;
use serde::Deserialize;

use crate::app::AppState;
use crate::error::ApiError;
use crate::pair::{PairId, UserId};
use crate::session;

/// The query of `/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    #[serde(rename = "userID")]
    user_id: Option<String>,
    #[serde(rename = "peerID")]
    peer_id: Option<String>,
}

/// Validated identities of a new session.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The connecting user.
    pub user: UserId,
    /// The pair of the user and the peer.
    pub pair: PairId,
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

/// Validates the query and upgrades; the session runs on its own task.
pub async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    upgrade: Result<IncomingUpgrade, StatusCode>,
) -> Result<Response, ApiError> {
    let identity = identify(&query)?;
    let upgrade = upgrade.map_err(|_| ApiError::NotUpgrade)?;
    // From the start of a drain, new sockets go elsewhere: a load balancer
    // retries another replica on 503 sooner than it notices /readyz.
    if state.shutdown.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    if !state.broker.is_ready() {
        return Err(ApiError::BrokerUnavailable);
    }
    let permit = state.try_open_socket().ok_or(ApiError::TooManySockets)?;
    let (response, socket) = upgrade.upgrade().map_err(|_| ApiError::NotUpgrade)?;
    state.sessions.spawn(session::run(state.clone(), socket, identity, permit));
    Ok(response.map(Body::new))
}
