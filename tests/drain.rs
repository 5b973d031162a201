//! A drained replica's users come back elsewhere; their peers' calls carry on.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::{settings, Client, Instance, RedisServer};

fn draining(url: &str) -> switchboard::config::Settings {
    switchboard::config::Settings {
        drain: Duration::from_secs(1),
        presence_ttl: Duration::from_secs(3),
        ..settings(Some(url))
    }
}

/// Alice on a replica that then drains away, Bob on one that stays.
/// Returns once Alice's socket got its 1012 and the old replica stopped.
async fn drain_alice_away(redis: &RedisServer) -> (Instance, Client, Client) {
    let old = Instance::start(draining(&redis.url())).await;
    let new = Instance::start(draining(&redis.url())).await;
    let (mut alice, _) = old.join("alice", "bob").await;
    let (bob, _) = new.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    let stopping = tokio::spawn(old.stop());
    let closed = alice.expect_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1012), "service restart"));
    stopping.await.unwrap();
    (new, alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_user_reconnects_elsewhere_without_a_peer_left() {
    let redis = RedisServer::start().await;
    let (new, _, mut bob) = drain_alice_away(&redis).await;

    // Alice comes back through another replica; Bob hears a join, never a leave.
    let mut alice = Client::connect(&new.ws_url("alice", "bob")).await.unwrap();
    let welcome = alice.recv_json().await;
    assert_eq!(welcome["peerOnline"], true);
    assert_eq!(bob.recv_json().await, json!({"type": "peer-joined", "peerID": "alice"}));
    alice.send(r#"{"type":"offer","again":true}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","again":true}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_user_who_never_returns_is_reported_gone_after_the_ttl() {
    let redis = RedisServer::start().await;
    let (_new, alice, mut bob) = drain_alice_away(&redis).await;
    drop(alice);
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
}
