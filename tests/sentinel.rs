//! Sentinel mode: instances find the master through the Sentinels, and when
//! the master dies they follow the Sentinels to the promoted replica, with
//! their sessions open.

use std::time::Instant;

use serde_json::json;
use switchboard::config::RedisMode;
use switchboard_tests::sentinel::{Sentinels, MASTER};
use switchboard_tests::{eventually, relays_both_ways, settings, Instance};

async fn instance(sentinels: &Sentinels) -> Instance {
    let mut s = settings(Some(&sentinels.urls()));
    s.redis_mode = RedisMode::Sentinel;
    s.redis_sentinel_master = Some(MASTER.into());
    Instance::start(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_the_sentinels_to_the_promoted_replica() {
    let mut set = Sentinels::start().await;
    let nodes = [instance(&set).await, instance(&set).await];
    let (mut alice, _) = nodes[0].join("alice", "bob").await;
    let (mut bob, _) = nodes[1].join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "before").await;
    let replica = set.replica.port();
    // Everything went through the master: the replica holds the presence keys too.
    assert_eq!(set.master_port().await, Some(set.master.as_ref().unwrap().port()));

    let killed = Instant::now();
    set.kill_master();
    // Both sessions stay open, and each hears that messages may have been lost.
    let (promoted, alice_resync, bob_resync) = tokio::join!(
        async {
            eventually("the Sentinels name the replica", || async { set.master_port().await == Some(replica) }).await;
            killed.elapsed()
        },
        async {
            assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
            killed.elapsed()
        },
        async {
            assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
            killed.elapsed()
        },
    );
    // The first message after the resync goes through: no lane is left on the dead master.
    alice.send(json!({"type": "offer", "tag": "after"}).to_string()).await;
    assert_eq!(bob.recv_json().await, json!({"type": "offer", "tag": "after"}));
    let relayed = killed.elapsed();
    bob.send(json!({"type": "answer", "tag": "after"}).to_string()).await;
    assert_eq!(alice.recv_json().await, json!({"type": "answer", "tag": "after"}));
    for node in &nodes {
        eventually("ready on the new master", || async { node.get("/readyz").await.0 == 200 }).await;
    }
    eprintln!(
        "sentinel failover: the Sentinels named the replica after {:.2} s; resync after {:.2} s (alice) and \
         {:.2} s (bob), first relayed message after {:.2} s",
        promoted.as_secs_f64(),
        alice_resync.as_secs_f64(),
        bob_resync.as_secs_f64(),
        relayed.as_secs_f64()
    );
    // New sessions work too.
    let (mut carol, _) = nodes[1].join("carol", "dave").await;
    let (mut dave, _) = nodes[0].join("dave", "carol").await;
    assert_eq!(carol.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut carol, &mut dave, "new").await;
}
