//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;

use crate::state::AppState;

/// `GET /healthz`: 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::handle().render())
}

/// `GET /readyz`: 200 while sockets are accepted and the broker is connected,
/// 503 otherwise. In a Redis Cluster with one shard failing over, 200 with
/// the body `degraded`: new sessions are still taken (those of the lost
/// shard are refused with 1013), and every replica is in the same state, so
/// taking this one out of the load balancer would help no one.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.is_ready() && state.broker.is_degraded() {
        (StatusCode::OK, "degraded: a Redis shard is failing over\n")
    } else if state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
    }
}
