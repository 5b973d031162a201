//! Redis outages: sessions stay open, senders are told, and `resync` follows recovery.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::{eventually, Client, Cluster};

async fn relays_both_ways(alice: &mut Client, bob: &mut Client, tag: &str) {
    alice.send(json!({"type": "offer", "tag": tag}).to_string()).await;
    assert_eq!(bob.recv_json().await, json!({"type": "offer", "tag": tag}));
    bob.send(json!({"type": "answer", "tag": tag}).to_string()).await;
    assert_eq!(alice.recv_json().await, json!({"type": "answer", "tag": tag}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_five_seconds_then_back() {
    let mut c = Cluster::redis(2).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "before").await;

    c.redis.as_mut().unwrap().kill();
    for node in &c.instances {
        eventually("readyz is 503 while Redis is down", || async { node.get("/readyz").await.0 == 503 }).await;
    }
    // A message sent now can't be relayed, and the sender hears so.
    alice.send(r#"{"type":"candidate","during":"outage"}"#).await;
    let event = alice.recv_json().await;
    assert_eq!((event["type"].as_str(), event["code"].as_str()), (Some("error"), Some("broker_unavailable")));
    // New sessions are turned away rather than half-opened.
    let refused = Client::connect(&c.node(0).ws_url("carol", "dave")).await.err().expect("refused");
    assert!(refused.to_string().contains("503"), "{refused}");

    // The outage itself lasts five seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.redis.as_mut().unwrap().restart().await;

    // Sessions stayed open, and each is told that messages may have been lost.
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    for node in &c.instances {
        node.wait_ready().await;
    }
    relays_both_ways(&mut alice, &mut bob, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_killed_by_redis_resubscribes_and_resyncs() {
    let c = Cluster::redis(2).await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "before").await;

    // What Redis does to a subscriber over its output-buffer limit.
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(killed, 2, "one subscriber connection per instance");

    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    eventually("both instances subscribed again", || async { redis.numsub("switchboard:pair:alice:bob").await == 2 })
        .await;
    relays_both_ways(&mut alice, &mut bob, "after").await;
}
