//! `/metrics` counts what happened. Alone in its test binary: the metrics
//! recorder is per process.

use serde_json::json;
use switchboard_tests::{eventually, metric, Cluster, Instance};

async fn scrape(node: &Instance) -> String {
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_messages_rejects_and_broker_events() {
    let c = Cluster::redis(1).await;
    let node = c.node(0);
    let redis = c.redis.as_ref().unwrap();

    let (mut alice, _) = node.join("alice", "bob").await;
    let (mut bob, _) = node.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    let offer = r#"{"type":"offer","sdp":"v=0"}"#;
    alice.send(offer).await;
    assert_eq!(bob.recv_text().await, offer);
    let answer = r#"{"type":"answer","sdp":"v=0"}"#;
    bob.send(answer).await;
    assert_eq!(alice.recv_text().await, answer);

    assert_eq!(node.get("/ws?userID=alice").await.0, 400);
    bob.send("not json").await;
    assert_eq!(bob.recv_json().await["code"], "invalid_json");

    let (_alice2, _) = node.join("alice", "bob").await;
    assert_eq!(alice.expect_closed().await.code, Some(4001));
    assert_eq!(bob.recv_json().await["type"], "peer-joined");

    let _: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));

    eventually("the replaced session is counted closed", || async {
        metric(&scrape(node).await, r#"switchboard_sessions_closed_total{reason="replaced"}"#) == Some(1.0)
    })
    .await;
    let m = scrape(node).await;
    let value = |series: &str| metric(&m, series).unwrap_or_else(|| panic!("{series} missing from:\n{m}"));
    assert_eq!(value("switchboard_open_sockets"), 2.0);
    assert_eq!(value("switchboard_sessions_opened_total"), 3.0);
    assert_eq!(value("switchboard_sessions_replaced_total"), 1.0);
    assert_eq!(value("switchboard_messages_in_total"), 3.0, "offer, answer, and the refused frame");
    assert_eq!(value("switchboard_bytes_in_total"), (offer.len() + answer.len() + "not json".len()) as f64);
    // Out: 3 welcomes, 2 peer-joined, the offer, the answer, the error event, resync.
    assert!(value("switchboard_messages_out_total") >= 8.0);
    assert!(value("switchboard_bytes_out_total") > (offer.len() + answer.len()) as f64);
    assert_eq!(value(r#"switchboard_rejects_total{reason="bad_param"}"#), 1.0);
    assert_eq!(value(r#"switchboard_rejects_total{reason="invalid_json"}"#), 1.0);
    assert_eq!(value("switchboard_broker_publish_seconds_count"), 2.0);
    assert_eq!(value("switchboard_broker_reconnects_total"), 1.0);
    assert_eq!(value("switchboard_pair_subscriptions"), 1.0);
    assert_eq!(value("switchboard_call_setup_seconds_count"), 1.0);
    assert!(m.contains("switchboard_broker_publish_seconds_bucket{le=\"0.001\"}"), "a histogram, not a summary");
}
