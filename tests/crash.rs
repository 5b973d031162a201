//! A replica killed with SIGKILL says nothing; presence expiry tells the peer.

use serde_json::json;
use switchboard_tests::{settings, Client, Instance, Process, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_on_a_killed_replica_is_reported_gone_within_the_ttl() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut doomed = Process::spawn(&[("SWITCHBOARD_REDIS_URL", &url), ("SWITCHBOARD_PRESENCE_TTL_SECS", "3")]);
    let survivor = Instance::start(switchboard::config::Settings {
        presence_ttl: std::time::Duration::from_secs(3),
        ..settings(Some(&url))
    })
    .await;

    let mut alice = Client::connect(&doomed.ws_url("alice", "bob")).await.unwrap();
    assert_eq!(alice.recv_json().await["type"], "welcome");
    let (mut bob, welcome) = survivor.join("bob", "alice").await;
    assert_eq!(welcome["peerOnline"], true, "presence says alice is there");

    doomed.kill();
    // No leave envelope is ever published; the expired presence key tells.
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    let (_, welcome) = survivor.join("carol", "alice").await;
    assert_eq!(welcome["peerOnline"], false);
}
