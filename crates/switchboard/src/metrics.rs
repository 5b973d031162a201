//! Prometheus metrics, rendered at `GET /metrics`.
//!
//! The `metrics` facade's recorder is global, so one process has one set of
//! series, whatever the number of `run` calls in it (tests run several).

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Series names.
pub mod names {
    /// Gauge: WebSocket sessions open now.
    pub const OPEN_SOCKETS: &str = "switchboard_open_sockets";
    /// Gauge: HTTP connections open now that are not WebSockets.
    pub const HTTP_CONNECTIONS: &str = "switchboard_http_connections";
    /// Counter: sessions opened.
    pub const SESSIONS_OPENED: &str = "switchboard_sessions_opened_total";
    /// Counter: sessions closed, by `reason`.
    pub const SESSIONS_CLOSED: &str = "switchboard_sessions_closed_total";
    /// Counter: client messages received.
    pub const MESSAGES_IN: &str = "switchboard_messages_in_total";
    /// Counter: frames written to sockets.
    pub const MESSAGES_OUT: &str = "switchboard_messages_out_total";
    /// Counter: bytes of client messages received.
    pub const BYTES_IN: &str = "switchboard_bytes_in_total";
    /// Counter: bytes of frames written to sockets.
    pub const BYTES_OUT: &str = "switchboard_bytes_out_total";
    /// Counter: refused upgrades and frames, by `reason`.
    pub const REJECTS: &str = "switchboard_rejects_total";
    /// Counter: sessions replaced by a newer one of the same user.
    pub const REPLACED: &str = "switchboard_sessions_replaced_total";
    /// Histogram: time to publish one message to the broker.
    pub const PUBLISH_SECONDS: &str = "switchboard_broker_publish_seconds";
    /// Counter: broker subscriber reconnections.
    pub const RECONNECTS: &str = "switchboard_broker_reconnects_total";
    /// Counter: subscriber connections given up because Redis stopped answering `PING`.
    pub const PROBE_FAILURES: &str = "switchboard_broker_probe_failures_total";
    /// Counter: `SUBSCRIBE` commands Redis answered with an error.
    pub const SUBSCRIBE_REFUSED: &str = "switchboard_broker_subscribe_refused_total";
    /// Counter: command-lane connections to Redis found dead (closed while
    /// idle, or silent to an idle PING) and replaced before use.
    pub const DEAD_CONNECTIONS: &str = "switchboard_broker_dead_connections_total";
    /// Gauge: pair channels with at least one local session (subscriptions, with Redis).
    pub const PAIR_SUBSCRIPTIONS: &str = "switchboard_pair_subscriptions";
    /// Histogram: from a session receiving the first offer to it sending the first answer.
    pub const CALL_SETUP_SECONDS: &str = "switchboard_call_setup_seconds";
    /// Histogram: each step of a session's setup, by `step` (see [`super::SetupStep`]).
    pub const SESSION_SETUP_SECONDS: &str = "switchboard_session_setup_seconds";
}

/// The steps of a session's setup, in order; each is timed into
/// [`names::SESSION_SETUP_SECONDS`] with its [`SetupStep::label`] as `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    /// From the handler's upgrade to the socket back from hyper (the 101 is written meanwhile).
    Upgrade,
    /// Waiting for the subscriber to confirm the pair's channel.
    Subscribe,
    /// Waiting for Redis to claim presence and announce the join (one script).
    Claim,
    /// Building and writing the welcome.
    Welcome,
    /// Moving the socket to the runtime of live sessions, until it is registered there.
    Handoff,
}

impl SetupStep {
    /// Every step, in order.
    pub const ALL: [SetupStep; 5] =
        [SetupStep::Upgrade, SetupStep::Subscribe, SetupStep::Claim, SetupStep::Welcome, SetupStep::Handoff];

    /// The `step` label.
    pub fn label(self) -> &'static str {
        match self {
            SetupStep::Upgrade => "upgrade",
            SetupStep::Subscribe => "subscribe",
            SetupStep::Claim => "claim",
            SetupStep::Welcome => "welcome",
            SetupStep::Handoff => "handoff",
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Handles of the per-message series, registered once: looking a series up by
/// name costs a hash and a lock on every call. They are first used after
/// [`handle`] installed the recorder (`app::run` calls it first).
struct Hot {
    messages_in: Counter,
    bytes_in: Counter,
    messages_out: Counter,
    bytes_out: Counter,
    publish_seconds: Histogram,
}

/// The setup steps' histograms, in [`SetupStep::ALL`]'s order.
static SETUP: LazyLock<Vec<Histogram>> = LazyLock::new(|| {
    handle();
    SetupStep::ALL.iter().map(|step| histogram!(names::SESSION_SETUP_SECONDS, "step" => step.label())).collect()
});

static HOT: LazyLock<Hot> = LazyLock::new(|| {
    handle();
    Hot {
        messages_in: counter!(names::MESSAGES_IN),
        bytes_in: counter!(names::BYTES_IN),
        messages_out: counter!(names::MESSAGES_OUT),
        bytes_out: counter!(names::BYTES_OUT),
        publish_seconds: histogram!(names::PUBLISH_SECONDS),
    }
});

/// Installs the recorder once per process and returns its handle.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::PUBLISH_SECONDS.into()),
                &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::CALL_SETUP_SECONDS.into()),
                    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::SESSION_SETUP_SECONDS.into()),
                    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
                )
            })
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        register();
        handle
    })
}

fn describe() {
    use names::*;
    describe_gauge!(OPEN_SOCKETS, "WebSocket sessions open now");
    describe_gauge!(HTTP_CONNECTIONS, "HTTP connections open now that are not WebSockets");
    describe_counter!(SESSIONS_OPENED, "Sessions opened");
    describe_counter!(SESSIONS_CLOSED, "Sessions closed, by reason");
    describe_counter!(MESSAGES_IN, "Client messages received");
    describe_counter!(MESSAGES_OUT, "Frames written to sockets");
    describe_counter!(BYTES_IN, Unit::Bytes, "Bytes of client messages received");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes of frames written to sockets");
    describe_counter!(REJECTS, "Refused upgrades and frames, by reason");
    describe_counter!(REPLACED, "Sessions replaced by a newer session of the same user");
    describe_histogram!(PUBLISH_SECONDS, Unit::Seconds, "Time to publish one message to the broker");
    describe_counter!(RECONNECTS, "Broker subscriber reconnections");
    describe_counter!(PROBE_FAILURES, "Broker subscriber connections given up because Redis stopped answering PING");
    describe_counter!(SUBSCRIBE_REFUSED, "SUBSCRIBE commands Redis answered with an error");
    describe_counter!(DEAD_CONNECTIONS, "Command-lane connections to Redis found dead and replaced before use");
    describe_gauge!(PAIR_SUBSCRIPTIONS, "Pair channels with at least one local session");
    describe_histogram!(
        CALL_SETUP_SECONDS,
        Unit::Seconds,
        "From the first offer a session receives to its first answer"
    );
    describe_histogram!(
        SESSION_SETUP_SECONDS,
        Unit::Seconds,
        "Each step of a session's setup, from the upgrade to the welcome and the move to the live runtime"
    );
}

/// `reason` values of [`names::SESSIONS_CLOSED`] (docs/operations.md lists them).
pub const CLOSE_REASONS: &[&str] = &[
    "client_close",
    "gone",
    "replaced",
    "drain",
    "shutdown",
    "slow_consumer",
    "flood",
    "ping_timeout",
    "binary",
    "too_big",
    "protocol",
    "broker_unavailable",
    "slow_frame",
    "resume_refused",
];

/// `reason` values of [`names::REJECTS`] (docs/operations.md lists them).
pub const REJECT_REASONS: &[&str] = &[
    "bad_param",
    "not_upgrade",
    "bad_handshake",
    "method_not_allowed",
    "shutting_down",
    "too_many_sockets",
    "too_many_connections",
    "broker_unavailable",
    "unauthorized",
    "forbidden_origin",
    "invalid_json",
    "reserved_type",
    "rate_limited",
];

/// Registers every series, and every known label value, at zero: a scrape
/// right after start shows them all, so rates and alerts have a first point.
fn register() {
    use names::*;
    for name in [OPEN_SOCKETS, HTTP_CONNECTIONS, PAIR_SUBSCRIPTIONS] {
        gauge!(name).increment(0.0);
    }
    for name in [
        SESSIONS_OPENED,
        MESSAGES_IN,
        MESSAGES_OUT,
        BYTES_IN,
        BYTES_OUT,
        REPLACED,
        RECONNECTS,
        PROBE_FAILURES,
        SUBSCRIBE_REFUSED,
        DEAD_CONNECTIONS,
    ] {
        counter!(name).increment(0);
    }
    for reason in CLOSE_REASONS {
        counter!(SESSIONS_CLOSED, "reason" => *reason).increment(0);
    }
    for reason in REJECT_REASONS {
        counter!(REJECTS, "reason" => *reason).increment(0);
    }
    for name in [PUBLISH_SECONDS, CALL_SETUP_SECONDS] {
        // A registered histogram renders its buckets, sum and count at zero.
        let _ = histogram!(name);
    }
    for step in SetupStep::ALL {
        let _ = histogram!(SESSION_SETUP_SECONDS, "step" => step.label());
    }
}

/// An HTTP connection was accepted under the cap.
pub fn http_connection_opened() {
    gauge!(names::HTTP_CONNECTIONS).increment(1.0);
}

/// An HTTP connection ended or became a WebSocket.
pub fn http_connection_closed() {
    gauge!(names::HTTP_CONNECTIONS).decrement(1.0);
}

/// A session opened.
pub fn session_opened() {
    counter!(names::SESSIONS_OPENED).increment(1);
    gauge!(names::OPEN_SOCKETS).increment(1.0);
}

/// A session closed for `reason`.
pub fn session_closed(reason: &'static str) {
    counter!(names::SESSIONS_CLOSED, "reason" => reason).increment(1);
    gauge!(names::OPEN_SOCKETS).decrement(1.0);
    if reason == "replaced" {
        counter!(names::REPLACED).increment(1);
    }
}

/// A client message of `bytes` arrived.
pub fn message_in(bytes: usize) {
    HOT.messages_in.increment(1);
    HOT.bytes_in.increment(bytes as u64);
}

/// `count` text frames of `bytes` bytes in all went to one socket.
pub fn messages_out(count: usize, bytes: usize) {
    HOT.messages_out.increment(count as u64);
    HOT.bytes_out.increment(bytes as u64);
}

/// An upgrade or a frame was refused for `reason`.
pub fn reject(reason: &'static str) {
    counter!(names::REJECTS, "reason" => reason).increment(1);
}

/// A publish took `elapsed`.
pub fn publish_latency(elapsed: Duration) {
    HOT.publish_seconds.record(elapsed.as_secs_f64());
}

/// The broker's subscriber reconnected.
pub fn broker_reconnect() {
    counter!(names::RECONNECTS).increment(1);
}

/// The subscriber gave up a connection that stopped answering `PING`.
pub fn broker_probe_failed() {
    counter!(names::PROBE_FAILURES).increment(1);
}

/// Redis refused a `SUBSCRIBE`.
pub fn broker_subscribe_refused() {
    counter!(names::SUBSCRIBE_REFUSED).increment(1);
}

/// A command lane found its connection dead and dropped it.
pub fn broker_dead_connection() {
    counter!(names::DEAD_CONNECTIONS).increment(1);
}

/// A pair channel got its first local session.
pub fn pair_channel_opened() {
    gauge!(names::PAIR_SUBSCRIPTIONS).increment(1.0);
}

/// A pair channel lost its last local session.
pub fn pair_channel_closed() {
    gauge!(names::PAIR_SUBSCRIPTIONS).decrement(1.0);
}

/// A session's setup step took `elapsed`.
pub fn setup_step(step: SetupStep, elapsed: Duration) {
    SETUP[step as usize].record(elapsed.as_secs_f64());
}

/// A call was set up in `elapsed`, offer to answer.
pub fn call_setup(elapsed: Duration) {
    histogram!(names::CALL_SETUP_SECONDS).record(elapsed.as_secs_f64());
}
