//! A socket that never reads, while its peer sends 50 MB: it is closed with
//! 1008, memory stays bounded, and nobody else notices. Alone in its test
//! binary so that the process's memory is this test's.

use serde_json::json;
use switchboard_tests::{metric, Cluster};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_closed_and_memory_stays_bounded() {
    let c = Cluster::redis_with(2, |s| {
        s.rate_per_sec = 1_000_000;
        s.rate_burst = 1_000_000;
    })
    .await;
    let redis = c.redis.as_ref().unwrap();
    let (mut carol, _) = c.node(0).join("carol", "dave").await;
    let (mut dave, _) = c.node(1).join("dave", "carol").await;
    assert_eq!(carol.recv_json().await["type"], "peer-joined");
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    // Bob connects, then never reads again.
    let (mut bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");

    let before = rss_kib();
    let chunk = format!(r#"{{"type":"candidate","pad":"{}"}}"#, "x".repeat(64 * 1024 - 40));
    let total = 50 << 20;
    for _ in 0..total / chunk.len() {
        alice.send(chunk.clone()).await;
    }
    // Alice learns that Bob is gone; nothing of the 50 MB piled up anywhere.
    assert_eq!(alice.recv_json().await, json!({"type": "peer-left", "peerID": "bob"}));
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 40, "process memory grew by {grown_mib} MiB while 50 MB were sent to a non-reader");

    // Bob's socket ends with 1008 once he finally looks (after what was queued).
    let closed = loop {
        match bob.try_recv_json().await {
            Ok(_) => continue,
            Err(closed) => break closed,
        }
    };
    assert!(matches!(closed.code, Some(1008) | None), "{closed:?}");

    // The other pair and the subscriber connections were untouched.
    carol.send(r#"{"type":"offer"}"#).await;
    assert_eq!(dave.recv_text().await, r#"{"type":"offer"}"#);
    assert_eq!(redis.pubsub_clients().await, 2);
    let (_, metrics) = c.node(0).get("/metrics").await;
    assert_eq!(metric(&metrics, "switchboard_broker_reconnects_total").unwrap_or(0.0), 0.0, "a subscriber reconnected");
    assert_eq!(
        metric(&metrics, r#"switchboard_sessions_closed_total{reason="slow_consumer"}"#),
        Some(1.0),
        "{metrics}"
    );
}
