//! HTTP errors, each saying whose fault it is.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Whose fault a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse.
    Client,
    /// Redis is down or failed.
    Broker,
    /// This server is shutting down, or broke.
    Server,
}

/// An error answered over HTTP instead of an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query parameter is missing or invalid.
    #[error("{param}: {why}")]
    BadParam {
        /// The parameter's name.
        param: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// `/ws` without a WebSocket upgrade, or one of another version than 13
    /// (426, with `Upgrade: websocket` and `Sec-WebSocket-Version: 13`).
    #[error("this endpoint expects a WebSocket upgrade (version 13)")]
    NotUpgrade,
    /// A WebSocket upgrade whose handshake is incomplete (RFC 6455 4.2.1).
    #[error("bad WebSocket handshake: {0}")]
    BadHandshake(&'static str),
    /// `/ws` with another method than GET (a HEAD, say).
    #[error("this endpoint takes GET only")]
    MethodNotAllowed,
    /// The broker can't take new sessions right now.
    #[error("the message broker is unavailable; retry shortly")]
    BrokerUnavailable,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The instance holds `SWITCHBOARD_MAX_SOCKETS` sockets already.
    #[error("this instance is full; retry shortly")]
    TooManySockets,
    /// Signed links are on and the token is missing or refused.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] crate::auth::TokenError),
    /// A browser page from an origin that may not open sockets.
    #[error("this page's origin may not open sockets here (SWITCHBOARD_ALLOWED_ORIGINS)")]
    ForbiddenOrigin,
}

impl ApiError {
    /// Whose fault the error is.
    pub fn fault(&self) -> Fault {
        match self {
            ApiError::BadParam { .. } | ApiError::NotUpgrade => Fault::Client,
            ApiError::BadHandshake(_) | ApiError::MethodNotAllowed => Fault::Client,
            ApiError::Unauthorized(_) | ApiError::ForbiddenOrigin => Fault::Client,
            ApiError::BrokerUnavailable => Fault::Broker,
            ApiError::ShuttingDown | ApiError::TooManySockets => Fault::Server,
        }
    }

    /// The `reason` label of the reject counter.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadParam { .. } => "bad_param",
            ApiError::NotUpgrade => "not_upgrade",
            ApiError::BadHandshake(_) => "bad_handshake",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BrokerUnavailable => "broker_unavailable",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::TooManySockets => "too_many_sockets",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::ForbiddenOrigin => "forbidden_origin",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadParam { .. } | ApiError::BadHandshake(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotUpgrade => StatusCode::UPGRADE_REQUIRED,
            ApiError::BrokerUnavailable | ApiError::ShuttingDown | ApiError::TooManySockets => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ForbiddenOrigin => StatusCode::FORBIDDEN,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        crate::metrics::reject(self.reason());
        match self.fault() {
            Fault::Client => tracing::debug!(error = %self, "request refused"),
            Fault::Broker | Fault::Server => tracing::warn!(error = %self, "request failed"),
        }
        let mut response = (status, format!("{self}\n")).into_response();
        let headers = response.headers_mut();
        match self {
            // RFC 9110 15.5.20 and RFC 6455 4.2.2: say which upgrade, and which version.
            ApiError::NotUpgrade => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            ApiError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            _ => {}
        }
        response
    }
}
