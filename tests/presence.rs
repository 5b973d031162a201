//! Presence through Redis faults (issue 16, points 2–4): a restart or a
//! `FLUSHALL` is no peer leaving, simultaneous sessions of one user leave the
//! newest one present, and command lanes replace dead connections before a
//! session or a frame needs them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard::config::Settings;
use switchboard_tests::{eventually, every_broker, Client, Cluster, RedisServer};
use tokio_util::sync::CancellationToken;

every_broker!(simultaneous_sessions_of_one_user_leave_the_newest_present);

/// A short TTL, so that refreshes come every second.
fn short_ttl(s: &mut Settings) {
    s.presence_ttl = Duration::from_secs(3);
}

/// The next frame that is not `resync` (which a Redis restart sends); fails
/// on `peer-left`, `peer-joined` or an error.
async fn next_past_resync(client: &mut Client, who: &str) -> Value {
    loop {
        let frame = client.recv_json().await;
        match frame["type"].as_str() {
            Some("resync") => continue,
            Some("peer-left" | "peer-joined" | "error") => panic!("{who} was told {frame}"),
            _ => return frame,
        }
    }
}

/// Alice and Bob relay a message each way, and hear nothing else first.
async fn relays_both_ways_and_nothing_else(alice: &mut Client, bob: &mut Client, tag: &str) {
    alice.send(json!({"type": "offer", "tag": tag}).to_string()).await;
    assert_eq!(next_past_resync(bob, "bob").await, json!({"type": "offer", "tag": tag}));
    bob.send(json!({"type": "answer", "tag": tag}).to_string()).await;
    assert_eq!(next_past_resync(alice, "alice").await, json!({"type": "answer", "tag": tag}));
}

async fn key_exists(redis: &RedisServer, user: &str) -> bool {
    let key = format!("switchboard:presence:alice:bob:{user}");
    redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut redis.conn().await).await.unwrap() == 1
}

/// Waits until both users' presence keys exist: each replica's refresh put
/// its own back. Returns how long that took.
async fn both_keys_back(redis: &RedisServer) -> Duration {
    let since = Instant::now();
    eventually("both presence keys are back", || async {
        key_exists(redis, "alice").await && key_exists(redis, "bob").await
    })
    .await;
    since.elapsed()
}

/// A Redis restart wipes every presence key (it runs without persistence).
/// Neither user hears `peer-left`; each replica puts its own keys back, and
/// relaying works once the subscribers are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_not_a_peer_leaving() {
    let mut c = Cluster::redis_with(2, short_ttl).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    let redis = c.redis.as_mut().unwrap();
    redis.restart().await;
    let restarted = Instant::now();
    assert!(!key_exists(redis, "alice").await && !key_exists(redis, "bob").await, "the restart wiped the keys");
    let healed = both_keys_back(redis).await;
    for node in &c.instances {
        node.wait_ready().await;
    }
    eventually("both instances subscribed again", || async {
        c.redis.as_ref().unwrap().numsub("switchboard:pair:alice:bob").await == 2
    })
    .await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "after").await;
    eprintln!(
        "restart: keys back {:.2} s, relaying {:.2} s after Redis answered again (TTL 3 s)",
        healed.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    // Alice's presence is back for a newcomer: a new session of bob's hears so.
    let (_, welcome) = c.node(0).join("bob", "alice").await;
    assert_eq!(welcome["peerOnline"], true);
}

/// `FLUSHALL` (or keys lost to a write outage or a stall past the TTL) wipes
/// the keys while every connection stays up: no `peer-left` either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_is_not_a_peer_leaving() {
    let c = Cluster::redis_with(2, short_ttl).await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    let () = redis::cmd("FLUSHALL").query_async(&mut redis.conn().await).await.unwrap();
    let healed = both_keys_back(redis).await;
    eprintln!("FLUSHALL: both keys back after {:.2} s (TTL 3 s)", healed.as_secs_f64());
    // Had either replica taken a missing key for a departure, its client
    // would hear `peer-left` before this.
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "after").await;
}

/// How many sessions of one user open at once, per round.
const SIMULTANEOUS: usize = 50;

/// Many sessions of one user open at once, spread over the instances: the
/// newest (the last join) survives, every other one is replaced (4001), and
/// the survivor's presence stays: the peer never hears `peer-left`, a
/// message reaches the survivor, and a new session of the peer is told
/// `peerOnline: true`.
async fn simultaneous_sessions_of_one_user_leave_the_newest_present(c: &Cluster) {
    // The race is narrow in memory (one process, no round trips): more rounds.
    let rounds = if c.redis.is_some() { 8 } else { 150 };
    for round in 0..rounds {
        let (alice, bob) = (format!("alice{round}"), format!("bob{round}"));
        let (mut peer, _) = c.node(0).join(&bob, &alice).await;

        let stop = CancellationToken::new();
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut sessions = Vec::new();
        for i in 0..SIMULTANEOUS {
            let url = c.node(i).ws_url(&alice, &bob);
            let (stop, closed) = (stop.clone(), closed_tx.clone());
            sessions.push(tokio::spawn(async move {
                let mut client = Client::connect(&url).await.expect("upgrade");
                let welcome = client.recv_json().await;
                assert_eq!(welcome["type"], "welcome", "{welcome}");
                tokio::select! {
                    ended = client.try_recv_json() => {
                        let ended = ended.expect_err("a replaced session hears nothing before its close");
                        assert_eq!((ended.code, ended.reason.as_str()), (Some(4001), "replaced"));
                        let _ = closed.send(());
                        None
                    }
                    () = stop.cancelled() => Some(client),
                }
            }));
        }
        for _ in 1..SIMULTANEOUS {
            tokio::time::timeout(switchboard_tests::DEADLINE, closed_rx.recv()).await.expect("replaced in time");
        }
        stop.cancel();
        let mut survivors = Vec::new();
        for session in sessions {
            survivors.extend(session.await.expect("session task"));
        }
        assert_eq!(survivors.len(), 1, "round {round}: one session survives");
        let mut survivor = survivors.pop().unwrap();

        // The peer heard joins only, and its messages reach the survivor.
        peer.send(json!({"type": "offer", "round": round}).to_string()).await;
        assert_eq!(survivor.recv_json().await, json!({"type": "offer", "round": round}));
        survivor.send(json!({"type": "answer", "round": round}).to_string()).await;
        loop {
            let frame = peer.recv_json().await;
            match frame["type"].as_str() {
                Some("peer-joined") => continue,
                Some("answer") => break,
                _ => panic!("round {round}: the peer was told {frame}"),
            }
        }
        // The survivor's presence is there for a newcomer.
        let (_, welcome) = c.node(1).join(&bob, &alice).await;
        assert_eq!(welcome["peerOnline"], true, "round {round}: {alice}'s newest session is online");
    }
}

/// Redis's idle `timeout` closes the lanes' connections. A new session still
/// gets its welcome, and a frame still relays, on the first try: each lane
/// sees its connection is closed and connects anew before writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_closed_by_the_idle_timeout_connect_anew_before_use() {
    // One lane, which everything uses; presence refreshes too rare to wake it.
    let c = Cluster::redis_with(2, |s| {
        s.redis_pool_size = 1;
        s.presence_ttl = Duration::from_secs(3600);
    })
    .await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    let () =
        redis::cmd("CONFIG").arg("SET").arg("timeout").arg("1").query_async(&mut redis.conn().await).await.unwrap();
    lane_connections_closed(redis).await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "after the idle timeout").await;

    lane_connections_closed(redis).await;
    let since = Instant::now();
    let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
    let welcome = carol.try_recv_json().await.expect("a welcome, not a close");
    assert_eq!(welcome["type"], "welcome");
    eprintln!("idle timeout: welcome {} ms after the upgrade", since.elapsed().as_millis());
    let (_, text) = c.node(0).get("/metrics").await;
    let dead = switchboard_tests::metric(&text, "switchboard_broker_dead_connections_total").unwrap_or(0.0);
    assert!(dead >= 1.0, "the dead connections are counted: {dead}");
}

/// Waits until Redis lists no command connection but the one asking: it
/// closed the lanes' idle connections (subscribers are exempt).
async fn lane_connections_closed(redis: &RedisServer) {
    eventually("Redis closed the lanes' idle connections", || async {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        list.lines().filter(|l| !l.trim().is_empty() && !l.contains("cmd=client|list")).count() == 0
    })
    .await;
}

/// After a Redis restart on the same port, the first new session succeeds:
/// its claim goes on a fresh connection, not the lane's dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_first_new_session_succeeds() {
    let mut c = Cluster::redis_with(1, |s| {
        s.redis_pool_size = 1;
        s.presence_ttl = Duration::from_secs(3600);
    })
    .await;
    // The lane's connection is up and has carried traffic.
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    c.redis.as_mut().unwrap().restart().await;
    let back = Instant::now();
    c.node(0).wait_ready().await;
    let ready = back.elapsed();
    let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
    let welcome = carol.try_recv_json().await.expect("a welcome, not a close");
    assert_eq!(welcome["type"], "welcome");
    eprintln!(
        "restart: /readyz 200 {} ms and the first welcome {} ms after Redis answered again",
        ready.as_millis(),
        back.elapsed().as_millis()
    );
}

/// A Redis with `DEBUG` enabled, and two instances on it with a 3 s TTL.
async fn debuggable_pair() -> Cluster {
    let redis = RedisServer::start_with(switchboard_tests::Setup {
        args: vec!["--enable-debug-command".into(), "local".into()],
        ..Default::default()
    })
    .await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut s = switchboard_tests::settings(Some(&redis.url()));
        short_ttl(&mut s);
        instances.push(switchboard_tests::Instance::start(s).await);
    }
    Cluster { redis: Some(redis), redis_cluster: None, instances }
}

/// Reads both clients for `quiet`: anything but `resync` fails the test (a
/// `peer-left` above all).
async fn nothing_but_resync_for(alice: &mut Client, bob: &mut Client, quiet: Duration) {
    let until = tokio::time::Instant::now() + quiet;
    for (client, who) in [(alice, "alice"), (bob, "bob")] {
        while let Ok(frame) = tokio::time::timeout_at(until, client.recv_json()).await {
            assert_eq!(frame["type"], "resync", "{who} was told {frame}");
        }
    }
}

/// Issue 16, defect 2, end to end: Redis stalls (`DEBUG SLEEP 5`) for longer
/// than the presence TTL (3 s), so both users' keys expire under a
/// connected pair. Neither client hears `peer-left`, during the stall or
/// for three TTLs after it; each hears `resync` (the subscribers' probe gave
/// up during the stall), and relaying goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_the_ttl_is_not_a_peer_leaving() {
    let c = debuggable_pair().await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    let mut sleeper = redis.conn().await;
    let stalled = Instant::now();
    let () = redis::cmd("DEBUG").arg("SLEEP").arg(5).query_async(&mut sleeper).await.unwrap();
    let woke = stalled.elapsed();
    // The subscribers gave up on the silent connection (a PING unanswered
    // for 3 s): each client is told `resync` once its channel is back. A
    // frame published before then may be lost, as that `resync` says.
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}));
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    let healed = both_keys_back(redis).await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "after the stall").await;
    // Long enough for any verdict on the keys that expired in the stall.
    nothing_but_resync_for(&mut alice, &mut bob, Duration::from_secs(9)).await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "later").await;
    eprintln!(
        "DEBUG SLEEP 5 (TTL 3 s): Redis answered after {:.1} s, both keys back {:.2} s later, no peer-left",
        woke.as_secs_f64(),
        healed.as_secs_f64()
    );
}

/// Issue 16, defect 2: a write outage. With `maxmemory` below what Redis
/// holds and `noeviction`, every write that needs memory fails with `OOM`
/// (presence claims and refreshes), while `PUBLISH` still works. Nothing is
/// silent: frames relay, a new session is closed with 1013, and no client
/// hears `peer-left`. Once `maxmemory` is lifted, the next session is
/// welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_outage_is_not_a_peer_leaving_and_never_silent() {
    let c = Cluster::redis_with(2, short_ttl).await;
    let redis = c.redis.as_ref().unwrap();
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "before").await;

    let mut admin = redis.conn().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();
    let refused = redis::cmd("SET").arg("probe").arg("x").query_async::<()>(&mut admin).await.expect_err("OOM");
    assert!(refused.to_string().contains("OOM"), "{refused}");
    let since = Instant::now();

    // Relaying goes on (PUBLISH needs no memory to speak of).
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "during").await;
    // A new session can't claim its presence: it is closed, and says why.
    let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
    let closed = carol.try_recv_json().await.expect_err("a close, not a welcome");
    assert_eq!(closed.code, Some(1013), "{closed:?}");
    // Refreshes fail for three TTLs while the keys are gone: still no peer-left.
    nothing_but_resync_for(&mut alice, &mut bob, Duration::from_secs(9)).await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "still during").await;
    let (status, body) = c.node(0).get("/readyz").await;
    let (_, metrics) = c.node(0).get("/metrics").await;
    let lasted = since.elapsed();

    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query_async(&mut admin).await.unwrap();
    let lifted = Instant::now();
    let mut attempts = 0;
    let welcomed = loop {
        attempts += 1;
        let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
        if let Ok(welcome) = carol.try_recv_json().await {
            assert_eq!(welcome["type"], "welcome");
            break lifted.elapsed();
        }
        assert!(lifted.elapsed() < switchboard_tests::DEADLINE, "no welcome after maxmemory 0");
    };
    let healed = both_keys_back(redis).await;
    relays_both_ways_and_nothing_else(&mut alice, &mut bob, "after").await;
    eprintln!(
        "OOM for {:.1} s: /readyz {status} {body:?} meanwhile; after maxmemory 0 a welcome in {} ms ({attempts} \
         attempts), both keys back {:.2} s later; counted meanwhile: {:?}",
        lasted.as_secs_f64(),
        welcomed.as_millis(),
        healed.as_secs_f64(),
        metrics.lines().filter(|l| l.contains("broker_unavailable") && !l.ends_with(" 0")).collect::<Vec<_>>()
    );
}
