//! Redis outages: sessions stay open, senders are told, and `resync` follows recovery.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::{eventually, metric, relays_both_ways, Client, Cluster};

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

/// Issue #16, defect 1: a subscriber whose `SUBSCRIBE` Redis refuses is never
/// deaf while it looks healthy. A password set under running instances lets
/// their authenticated connections be, but the subscribers, cut off, come
/// back without one: Redis refuses their `SUBSCRIBE` with `NOAUTH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_is_unready_until_redis_takes_it() {
    const REFUSED: &str = "switchboard_broker_subscribe_refused_total";
    // Resume off: a frame that reaches nobody is refused (with resume on it
    // is kept in the history instead: tests/resume.rs, the blip tests).
    let c = Cluster::redis_with(2, |s| {
        s.resume = std::time::Duration::ZERO;
        s.resume_key = None;
    })
    .await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "before").await;
    let refused_before = metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0);

    // One connection, authenticated before the password, for the whole test.
    let mut admin = redis.conn().await;
    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("x").query_async(&mut admin).await.unwrap();
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 2);
    for node in &c.instances {
        eventually("readyz is 503 while the subscriber is refused", || async { node.get("/readyz").await.0 == 503 })
            .await;
    }
    eventually("the refusals counted", || async {
        metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0) >= refused_before + 2.0
    })
    .await;
    // Refused again and again, never subscribed: no instance is ready meanwhile.
    let refused_now = metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0);
    eventually("refused again", || async {
        metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0) > refused_now
    })
    .await;
    for node in &c.instances {
        assert_eq!(node.get("/readyz").await.0, 503);
    }
    // A frame sent now reaches nobody (Redis takes the PUBLISH, on a lane
    // authenticated before the password, and counts no subscriber): the
    // sender hears so, rather than nothing.
    alice.send(r#"{"type":"candidate","during":"refusal"}"#).await;
    let event = alice.recv_json().await;
    assert_eq!(
        (event["type"].as_str(), event["code"].as_str()),
        (Some("error"), Some("broker_unavailable")),
        "{event}"
    );
    assert_eq!(
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("switchboard:pair:alice:bob")
            .query_async::<(String, i64)>(&mut admin)
            .await
            .unwrap()
            .1,
        0
    );

    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("").query_async(&mut admin).await.unwrap();
    let accepted = std::time::Instant::now();
    // The first thing each client hears since the outage is its resync, once
    // (a resync while deaf would come first and be followed by another).
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    eprintln!("refused SUBSCRIBE: resync {} ms after Redis accepted again", accepted.elapsed().as_millis());
    for node in &c.instances {
        node.wait_ready().await;
    }
    relays_both_ways(&mut alice, &mut bob, "after").await;
}

/// Issue #16, defect 5: a Redis that stops answering (frozen, or a network
/// that drops everything) is noticed by the subscriber's PING probe: the
/// instances turn unready, senders are told, new sessions are turned away at
/// once rather than kept waiting, and `resync` follows recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_noticed_and_told() {
    const PROBES: &str = "switchboard_broker_probe_failures_total";
    let redis = switchboard_tests::RedisServer::start_with(switchboard_tests::Setup {
        args: vec!["--enable-debug-command".into(), "local".into()],
        ..Default::default()
    })
    .await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        instances.push(switchboard_tests::Instance::on(&redis).await);
    }
    let c = Cluster { redis: Some(redis), redis_cluster: None, instances };
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "before").await;
    let probes_before = metric(&c.node(0).get("/metrics").await.1, PROBES).unwrap_or(0.0);

    // Redis answers nothing for 10 s.
    let mut frozen = c.redis.as_ref().unwrap().conn().await;
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG").arg("SLEEP").arg(10).query_async(&mut frozen).await;
    });
    for node in &c.instances {
        eventually("readyz 503 while Redis is frozen", || async { node.get("/readyz").await.0 == 503 }).await;
    }
    let noticed = started.elapsed();
    assert!(metric(&c.node(0).get("/metrics").await.1, PROBES).unwrap_or(0.0) > probes_before, "the probe failed");
    // A message sent now is refused, and the sender hears so.
    alice.send(r#"{"type":"candidate","during":"freeze"}"#).await;
    let event = alice.recv_json().await;
    assert_eq!((event["type"].as_str(), event["code"].as_str()), (Some("error"), Some("broker_unavailable")));
    // A new session is turned away at once, not kept waiting for the freeze to end.
    let asked = std::time::Instant::now();
    let refused = Client::connect(&c.node(0).ws_url("carol", "dave")).await.err().expect("refused");
    assert!(refused.to_string().contains("503"), "{refused}");
    let refused_in = asked.elapsed();

    // Redis wakes: the sessions stayed open, and each is told that messages may have been lost.
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    let recovered = started.elapsed();
    eprintln!("frozen redis: unready after {noticed:?}, a new session refused in {refused_in:?}, resync after {recovered:?} (freeze 10 s)");
    for node in &c.instances {
        node.wait_ready().await;
    }
    relays_both_ways(&mut alice, &mut bob, "after").await;
    sleeper.await.unwrap();
}
