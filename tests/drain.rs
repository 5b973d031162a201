//! A drained replica's users come back elsewhere; their peers' calls carry on.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::{http_get, settings, Client, Instance, RedisServer};

fn draining(url: &str) -> switchboard::config::Settings {
    switchboard::config::Settings {
        drain: Duration::from_secs(1),
        presence_ttl: Duration::from_secs(3),
        ..settings(Some(url))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_relays_until_it_closes_its_sockets() {
    let redis = RedisServer::start().await;
    let old =
        Instance::start(switchboard::config::Settings { drain: Duration::from_secs(3), ..draining(&redis.url()) })
            .await;
    let new = Instance::start(draining(&redis.url())).await;
    let (mut alice, _) = old.join("alice", "bob").await;
    let (mut bob, _) = new.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    let old_addr = old.addr;
    let stopping = tokio::spawn(old.stop());
    // Draining: not ready, but the open socket still relays both ways.
    switchboard_tests::eventually("readyz 503", || async { http_get(old_addr, "/readyz").await.0 == 503 }).await;
    alice.send(r#"{"type":"offer","during":"drain"}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","during":"drain"}"#);
    bob.send(r#"{"type":"answer","during":"drain"}"#).await;
    assert_eq!(alice.recv_text().await, r#"{"type":"answer","during":"drain"}"#);
    assert_eq!(alice.expect_closed().await.code, Some(1012));
    stopping.await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ctrl_c_with_no_socket_open_ends_the_drain_at_once() {
    // A drain far longer than the test's deadline: only an early end passes.
    let instance =
        Instance::start(switchboard::config::Settings { drain: Duration::from_secs(600), ..settings(None) }).await;
    let (alice, _) = instance.join("alice", "bob").await;
    instance.interrupt();
    let addr = instance.addr;
    switchboard_tests::eventually("readyz 503", || async { http_get(addr, "/readyz").await.0 == 503 }).await;
    // The last socket leaves: nothing is left to drain.
    drop(alice);
    instance.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_closes_every_socket_at_once() {
    let instance =
        Instance::start(switchboard::config::Settings { drain: Duration::from_secs(600), ..settings(None) }).await;
    let (mut alice, _) = instance.join("alice", "bob").await;
    instance.request_stop();
    let addr = instance.addr;
    switchboard_tests::eventually("readyz 503", || async { http_get(addr, "/readyz").await.0 == 503 }).await;
    alice.send(r#"{"type":"offer","during":"drain"}"#).await;
    instance.request_stop();
    let closed = alice.expect_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1012), "service restart"));
    instance.stop().await;
}

/// A masked client text frame (mask key 0), written below the WebSocket layer.
fn raw_text(payload: &str) -> Vec<u8> {
    assert!(payload.len() < 126, "a short frame");
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// A drain (1012) loses nothing by itself (issue #14): what a client sent
/// before it read the close, and so before its close reply, is published
/// before the instance hangs up. Alice reads the 1012 first and only then
/// writes 20 messages and her close reply, straight onto TCP (a WebSocket
/// library refuses to send after a close): on the wire, exactly what a
/// client's in-flight messages look like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_publishes_what_the_client_sent_before_its_close_reply() {
    let redis = RedisServer::start().await;
    let (old, new) = (Instance::start(draining(&redis.url())).await, Instance::start(draining(&redis.url())).await);
    let (mut alice, _) = old.join("alice", "bob").await;
    let (mut bob, _) = new.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    let stopping = tokio::spawn(old.stop());
    assert_eq!(alice.read_raw_until_close().await, Some(1012));
    let mut burst = Vec::new();
    for n in 0..20 {
        burst.extend(raw_text(&json!({"type": "n", "n": n}).to_string()));
    }
    // The close reply: code 1000, masked with key 0.
    burst.extend([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
    alice.send_raw(&burst).await;
    for n in 0..20 {
        let got = bob.recv_json().await;
        assert_eq!(got, json!({"type": "n", "n": n}), "message {n} of the burst");
    }
    stopping.await.unwrap();
}
