//! Redis behind a frozen network (issue 16, defects 4 and 5): a TCP proxy
//! between the instances and `redis-server` stops forwarding while keeping
//! its sockets open, as a NAT that forgot a flow or a route that drops
//! everything would. Nothing closes, so only PINGs and timeouts can tell.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::config::Settings;
use switchboard_tests::{eventually, metric, settings, Client, Cluster, Instance, Proxy, RedisServer};

/// Longer than [`switchboard_tests::DEADLINE`]: waits that include the lanes'
/// 10 s idle PING and its 2 s reply limit.
const IDLE_DEADLINE: Duration = Duration::from_secs(45);

/// The two tests read counters that every instance in this process shares
/// (the metrics are process-wide): one at a time, so that neither counts
/// the other's faults.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Instances on `redis` through `proxy`, with settings adjusted by `tune`.
async fn behind(redis: RedisServer, proxy: &Proxy, n: usize, tune: impl Fn(&mut Settings)) -> Cluster {
    let mut instances = Vec::new();
    for _ in 0..n {
        let mut s = settings(Some(&proxy.url()));
        tune(&mut s);
        instances.push(Instance::start(s).await);
    }
    Cluster { redis: Some(redis), redis_cluster: None, instances }
}

/// The addresses Redis sees its subscriber connections come from.
async fn subscriber_addrs(redis: &RedisServer) -> Vec<SocketAddr> {
    let list: String =
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(&mut redis.conn().await).await.unwrap();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("addr=")))
        .map(|a| a.parse().expect("an address"))
        .collect()
}

/// The next frame that is not `resync`; fails on `peer-left` or `peer-joined`.
async fn next_past_resync(client: &mut Client, who: &str) -> serde_json::Value {
    loop {
        let frame = client.recv_json().await;
        match frame["type"].as_str() {
            Some("resync") => continue,
            Some("peer-left" | "peer-joined") => panic!("{who} was told {frame}"),
            _ => return frame,
        }
    }
}

/// Defect 4, "PING when idle": the lanes' connections go silent while idle
/// (a NAT forgot the flows: the sockets stay open, nothing arrives, no FIN).
/// The subscriber's connections keep working, so nothing else notices. Each
/// lane's idle PING finds its dead connection and drops it, so the next
/// session's claim goes on a fresh connection: a welcome at once, not a 2 s
/// timeout and a 1013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lane_whose_flow_went_silent_is_replaced_before_use() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const DEAD: &str = "switchboard_broker_dead_connections_total";
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    // One lane each, which everything uses; presence refreshes too rare to wake it.
    let c = behind(redis, &proxy, 2, |s| {
        s.redis_pool_size = 1;
        s.presence_ttl = Duration::from_secs(3600);
    })
    .await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    switchboard_tests::relays_both_ways(&mut alice, &mut bob, "before").await;
    // Process-wide: both instances' lanes count in one counter.
    let dead_before = metric(&c.node(0).get("/metrics").await.1, DEAD).unwrap_or(0.0);

    // Every flow open now but the subscribers' goes silent: the lanes'.
    let subscribers = subscriber_addrs(redis).await;
    assert_eq!(subscribers.len(), 2, "one subscriber connection per instance");
    let frozen = proxy.freeze_existing(|addr| !subscribers.contains(&addr));
    assert!(frozen >= 2, "one lane connection per instance at least: {frozen}");
    let since = Instant::now();

    // Each lane's idle PING goes unanswered, and the lane drops the connection.
    let lanes = c.instances.len() as f64;
    let deadline = Instant::now() + IDLE_DEADLINE;
    while metric(&c.node(0).get("/metrics").await.1, DEAD).unwrap_or(0.0) < dead_before + lanes {
        assert!(Instant::now() < deadline, "the idle PING did not find every silent connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = since.elapsed();
    for node in &c.instances {
        assert_eq!(node.get("/readyz").await.0, 200, "the subscriber was never affected");
    }

    // The next session's claim goes on a fresh connection.
    let asked = Instant::now();
    let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
    let welcome = carol.try_recv_json().await.expect("a welcome, not a close");
    assert_eq!(welcome["type"], "welcome");
    let welcomed = asked.elapsed();
    // And a frame on the other instance's lane relays at once.
    bob.send(json!({"type": "offer", "tag": "after"}).to_string()).await;
    assert_eq!(next_past_resync(&mut alice, "alice").await, json!({"type": "offer", "tag": "after"}));
    eprintln!(
        "silent idle lanes: found {:.1} s after the flows froze, then a welcome {} ms after the upgrade",
        found.as_secs_f64(),
        welcomed.as_millis()
    );
    assert!(welcomed < Duration::from_secs(2), "no wait for a reply timeout: {welcomed:?}");
}

/// Defect 5, "a network that drops everything": every flow to Redis, new
/// ones included, goes silent. The subscriber's PING probe turns the
/// instances unready, senders hear `broker_unavailable`, new sessions are
/// turned away at once; when the network comes back, `resync`, then relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_drops_everything_is_noticed_and_told() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const PROBES: &str = "switchboard_broker_probe_failures_total";
    const UNAVAILABLE: &str = "switchboard_rejects_total{reason=\"broker_unavailable\"}";
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    let c = behind(redis, &proxy, 2, |_| {}).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    switchboard_tests::relays_both_ways(&mut alice, &mut bob, "before").await;
    let metrics_before = c.node(0).get("/metrics").await.1;
    let probes_before = metric(&metrics_before, PROBES).unwrap_or(0.0);
    let unavailable_before = metric(&metrics_before, UNAVAILABLE).unwrap_or(0.0);

    proxy.freeze_all();
    let frozen = Instant::now();
    for node in &c.instances {
        eventually("readyz 503 while the network drops everything", || async { node.get("/readyz").await.0 == 503 })
            .await;
    }
    let noticed = frozen.elapsed();
    // A message sent now is refused after the lane's reply limit, and the sender hears so.
    let sent = Instant::now();
    alice.send(r#"{"type":"candidate","during":"blackhole"}"#).await;
    let event = alice.recv_json().await;
    assert_eq!(
        (event["type"].as_str(), event["code"].as_str()),
        (Some("error"), Some("broker_unavailable")),
        "{event}"
    );
    let told = sent.elapsed();
    // A new session is turned away at once.
    let asked = Instant::now();
    let refused = Client::connect(&c.node(0).ws_url("carol", "dave")).await.err().expect("refused");
    assert!(refused.to_string().contains("503"), "{refused}");
    let refused_in = asked.elapsed();
    let metrics = c.node(0).get("/metrics").await.1;
    assert!(metric(&metrics, PROBES).unwrap_or(0.0) > probes_before, "the probe failed");
    assert!(metric(&metrics, UNAVAILABLE).unwrap_or(0.0) > unavailable_before, "the refused frame is counted");

    proxy.thaw();
    let thawed = Instant::now();
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    let resynced = thawed.elapsed();
    for node in &c.instances {
        node.wait_ready().await;
    }
    // The refused frame's PUBLISH was held in the frozen flow and reaches
    // Redis when it thaws: bob may still hear it, late (as after a real outage).
    alice.send(json!({"type": "offer", "tag": "after"}).to_string()).await;
    let mut late = false;
    loop {
        let frame = next_past_resync(&mut bob, "bob").await;
        if frame["during"] == "blackhole" {
            late = true;
            continue;
        }
        assert_eq!(frame, json!({"type": "offer", "tag": "after"}));
        break;
    }
    bob.send(json!({"type": "answer", "tag": "after"}).to_string()).await;
    assert_eq!(next_past_resync(&mut alice, "alice").await, json!({"type": "answer", "tag": "after"}));
    eprintln!(
        "network black hole: unready after {:.1} s, a frame refused {:.1} s after it was sent, a new session \
         refused in {} ms, resync {} ms after the network came back (refused frame delivered late: {late})",
        noticed.as_secs_f64(),
        told.as_secs_f64(),
        refused_in.as_millis(),
        resynced.as_millis()
    );
}
