//! Receive-side resume (`SWITCHBOARD_RESUME_SECS`, issue #14): a client that
//! reconnects with its resume token and last `seq` gets what it missed,
//! exactly once and in order, then live traffic; past the history, `resync`.
//! Each test runs against the in-memory broker, three instances on one
//! Redis, and three instances on a Redis Cluster. When Redis cuts the
//! instances' subscribers (a broker blip), resumable sessions resume from
//! their own position the same way, with `resync` only past the history.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard::auth::Secret;
use switchboard_tests::client::{ClientRx, ClientTx};
use switchboard_tests::resuming::{resume_on, SECRET};
use switchboard_tests::{eventually, Client, Cluster, Instance};
use tokio::sync::watch;

/// Frames the sender may be ahead of what the receiver has seen: well
/// inside the history (64 entries), so a cut never outruns it.
const WINDOW: usize = 24;

macro_rules! every_broker_with_resume {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(&switchboard_tests::Cluster::memory_with(super::resume_on).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(&switchboard_tests::Cluster::redis_with(3, super::resume_on).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$name(&switchboard_tests::Cluster::redis_cluster_with(3, super::resume_on).await).await
            }
        }
    )+};
}

every_broker_with_resume!(
    a_cut_receiver_resumes_on_another_instance_losing_nothing,
    a_gap_past_the_history_gives_resync_only,
    cut_senders_resend_and_nothing_is_lost_or_doubled
);

/// Connects `user` to `peer` with `query` appended, and reads the welcome.
async fn connect(node: &Instance, user: &str, peer: &str, query: &str) -> (Client, Value) {
    let mut client = Client::connect(&format!("{}{query}", node.ws_url(user, peer))).await.expect("upgrade");
    let welcome = client.recv_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

/// The welcome's resume token and `seq`.
fn resume_of(welcome: &Value) -> (String, String) {
    let token = welcome["resume"]["token"].as_str().unwrap_or_else(|| panic!("a resume token: {welcome}"));
    let seq = welcome["resume"]["seq"].as_str().unwrap_or_else(|| panic!("a resume seq: {welcome}"));
    (token.to_owned(), seq.to_owned())
}

/// A receiver's view: numbered frames in arrival order, and its cursor.
struct Receiver {
    got: Vec<usize>,
    seq: String,
    /// Tells the sender how many arrived.
    seen: tokio::sync::watch::Sender<usize>,
}

impl Receiver {
    /// Reads `relay` events until `until` frames in all arrived.
    async fn read(&mut self, client: &mut Client, until: usize) {
        while self.got.len() < until {
            let event = client.recv_json().await;
            match event["type"].as_str() {
                Some("relay") => {
                    self.seq = event["seq"].as_str().unwrap_or_else(|| panic!("a seq: {event}")).to_owned();
                    let n = event["data"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered frame: {event}"));
                    self.got.push(n as usize);
                    self.seen.send_replace(self.got.len());
                }
                Some("peer-joined" | "peer-left") => {}
                _ => panic!("unexpected event {event}"),
            }
        }
    }
}

async fn a_cut_receiver_resumes_on_another_instance_losing_nothing(c: &Cluster) {
    const TOTAL: usize = 400;
    let (mut bob, welcome) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    let (token, seq) = resume_of(&welcome);
    let (alice, welcome) = connect(c.node(0), "alice", "bob", "").await;
    assert_eq!(welcome["peerOnline"], true);
    assert!(welcome.get("resume").is_none(), "alice did not ask: {welcome}");
    assert_eq!(bob.recv_json().await["type"], "peer-joined");

    // Alice sends numbered frames without pause, at most WINDOW ahead of
    // what Bob has seen, while Bob's socket is cut and comes back.
    let (seen, mut seen_rx) = tokio::sync::watch::channel(0);
    let (mut alice_tx, alice_rx) = alice.split();
    let sender = tokio::spawn(async move {
        for n in 0..TOTAL {
            seen_rx.wait_for(|&seen| n < seen + WINDOW).await.expect("the receiver is there");
            alice_tx.send(json!({"type": "n", "n": n, "pad": "x".repeat(200)}).to_string()).await;
        }
        alice_tx
    });
    let mut receiver = Receiver { got: Vec::new(), seq, seen };
    receiver.read(&mut bob, 150).await;
    bob.reset_connection();

    // Back on another instance (the only one, in memory), from its last seq.
    let query = format!("&resume={token}&after={}", receiver.seq);
    let (mut bob, welcome) = connect(c.node(2), "bob", "alice", &query).await;
    let (_, seq) = resume_of(&welcome);
    receiver.seq = seq;
    receiver.read(&mut bob, TOTAL).await;
    let expected: Vec<usize> = (0..TOTAL).collect();
    assert_eq!(receiver.got, expected, "every frame exactly once, in order");

    // And the new cursor resumes too: a second cut, with nothing missed.
    let (token, _) = resume_of(&welcome);
    bob.reset_connection();
    let query = format!("&resume={token}&after={}", receiver.seq);
    let (mut bob, welcome) = connect(c.node(0), "bob", "alice", &query).await;
    assert!(welcome["resume"]["seq"].is_string());
    let mut alice_tx = sender.await.expect("sender");
    alice_tx.send(json!({"type": "n", "n": TOTAL}).to_string()).await;
    let next = bob.recv_json().await;
    assert_eq!((next["type"].as_str(), next["data"]["n"].as_u64()), (Some("relay"), Some(TOTAL as u64)), "{next}");
    drop(alice_rx);
}

async fn a_gap_past_the_history_gives_resync_only(c: &Cluster) {
    let (mut bob, welcome) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    let (token, seq) = resume_of(&welcome);
    let (mut alice, _) = connect(c.node(0), "alice", "bob", "").await;
    assert_eq!(bob.recv_json().await["type"], "peer-joined");
    alice.send(r#"{"type":"n","n":0}"#).await;
    let first = bob.recv_json().await;
    assert_eq!(first["data"]["n"], 0, "{first}");
    let after = first["seq"].as_str().expect("a seq").to_owned();
    assert_ne!(after, seq);
    bob.reset_connection();

    // Far more than the history holds (Redis trims whole stream nodes of 100
    // entries, so it may keep up to about 164), all handled before Bob is
    // back (on Alice's instance: in Redis, the same command lane as hers).
    for n in 1..=300 {
        alice.send(json!({"type": "n", "n": n}).to_string()).await;
    }
    alice.round_trip().await;
    let (mut bob, welcome) = connect(c.node(0), "bob", "alice", &format!("&resume={token}&after={after}")).await;
    assert!(welcome["resume"]["token"].is_string(), "a new token all the same: {welcome}");
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));

    // Nothing else: the next thing Bob hears is Alice's next frame, live.
    alice.send(r#"{"type":"n","n":"live"}"#).await;
    let next = bob.recv_json().await;
    assert_eq!((next["type"].as_str(), next["data"]["n"].as_str()), (Some("relay"), Some("live")), "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_user_or_pair_is_refused_with_4003() {
    let c = Cluster::memory_with(resume_on).await;
    let node = c.node(0);
    let (_bob, welcome) = connect(node, "bob", "alice", "&resume=1").await;
    let (token, seq) = resume_of(&welcome);
    let (_, mac) = token.split_once('.').expect("session.mac");
    for (user, peer, token) in [
        ("alice", "bob", token.clone()),
        ("bob", "carol", token.clone()),
        ("bob", "alice", format!("1{token}")),
        ("bob", "alice", format!("0.{mac}")),
        ("bob", "alice", "garbage".to_owned()),
    ] {
        let url = format!("{}&resume={token}&after={seq}", node.ws_url(user, peer));
        let mut client = Client::connect(&url).await.expect("upgrade");
        let closed = client.expect_closed().await;
        assert_eq!(
            (closed.code, closed.reason.as_str()),
            (Some(4003), "resume token refused"),
            "{user}/{peer} {token}"
        );
    }
    // Bob's own token still works: after its own seq, nothing is missed.
    let (_bob, welcome) = connect(node, "bob", "alice", &format!("&resume={token}&after={seq}")).await;
    assert!(welcome["resume"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resume_off_a_resume_request_changes_nothing() {
    let c = Cluster::redis_with(2, |s| {
        s.resume = Duration::ZERO;
        s.resume_key = None;
    })
    .await;
    let (mut bob, welcome) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    assert!(welcome.get("resume").is_none(), "{welcome}");
    let (mut alice, _) = connect(c.node(0), "alice", "bob", "").await;
    assert_eq!(bob.recv_json().await["type"], "peer-joined");
    let frame = r#"{"type":"offer", "sdp":"x"}"#;
    alice.send(frame).await;
    assert_eq!(bob.recv_text().await, frame, "byte for byte, unwrapped");
    // A token (even a forged one) is not looked at.
    let (_again, welcome) = connect(c.node(0), "bob", "alice", "&resume=abc.def&after=1-0").await;
    assert!(welcome.get("resume").is_none());
    let redis = c.redis.as_ref().expect("redis");
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("*history*").query_async(&mut redis.conn().await).await.expect("KEYS");
    assert!(keys.is_empty(), "no history kept: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_half_the_outbound_queue_gives_resync() {
    let c = Cluster::memory_with(|s| {
        resume_on(s);
        s.outbox_messages = 16;
    })
    .await;
    let node = c.node(0);
    let (mut bob, welcome) = connect(node, "bob", "alice", "&resume=1").await;
    let (token, seq) = resume_of(&welcome);
    let (mut alice, _) = connect(node, "alice", "bob", "").await;
    assert_eq!(bob.recv_json().await["type"], "peer-joined");
    bob.reset_connection();
    // Within the history (64), but more than 8 of a 16-frame queue.
    for n in 0..9 {
        alice.send(json!({"type": "n", "n": n}).to_string()).await;
    }
    alice.round_trip().await;
    let (mut bob, _) = connect(node, "bob", "alice", &format!("&resume={token}&after={seq}")).await;
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}));
    alice.send(r#"{"type":"n","n":"live"}"#).await;
    assert_eq!(bob.recv_json().await["data"]["n"], "live");

    // Eight fit.
    let (token, seq) = resume_of(&{
        let (bob, welcome) = connect(node, "bob", "alice", "&resume=1").await;
        bob.reset_connection();
        welcome
    });
    drop(bob);
    for n in 0..8 {
        alice.send(json!({"type": "n", "n": n}).to_string()).await;
    }
    alice.round_trip().await;
    let (mut bob, _) = connect(node, "bob", "alice", &format!("&resume={token}&after={seq}")).await;
    for n in 0..8 {
        assert_eq!(bob.recv_json().await["data"]["n"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_signed_links_the_token_must_match_the_links_identity() {
    use switchboard::auth::LinkSigner;
    use switchboard::pair::UserId;
    let signer = LinkSigner::new(&Secret::new("a link secret for tests, 32+ bytes long"));
    let c = Cluster::memory_with(|s| {
        resume_on(s);
        s.auth = Some(signer.clone());
    })
    .await;
    let node = c.node(0);
    let link = |user: &str, peer: &str| {
        let (user, peer) = (UserId::parse(user).unwrap(), UserId::parse(peer).unwrap());
        let jwt = signer.sign(&user, &peer, std::time::SystemTime::now() + Duration::from_secs(3600));
        format!("ws://{}/ws?token={jwt}", node.addr)
    };
    let mut bob = Client::connect(&format!("{}&resume=1", link("bob", "alice"))).await.expect("upgrade");
    let (token, seq) = resume_of(&bob.recv_json().await);
    // Alice's link with Bob's resume token: refused.
    let mut alice =
        Client::connect(&format!("{}&resume={token}&after={seq}", link("alice", "bob"))).await.expect("upgrade");
    assert_eq!(alice.expect_closed().await.code, Some(4003));
    // Bob's own link resumes.
    let mut bob =
        Client::connect(&format!("{}&resume={token}&after={seq}", link("bob", "alice"))).await.expect("upgrade");
    let welcome = bob.recv_json().await;
    assert_eq!(
        (welcome["type"].as_str(), welcome["resume"]["token"].is_string()),
        (Some("welcome"), true),
        "{welcome}"
    );
}

/// `/ws` URLs of the cluster's instances, starting at instance `first`.
fn urls(c: &Cluster, first: usize) -> switchboard_tests::resuming::Urls {
    switchboard_tests::resuming::urls(
        (0..c.instances.len()).map(|i| format!("ws://{}/ws", c.node(first + i).addr)).collect(),
    )
}

/// Confirmed sends: both sides send numbered messages without pause while
/// each has its socket reset mid-stream (what it wrote last may or may not
/// have reached the server) and comes back on another instance, resending
/// what has no `ack`. Each side gets the other's messages exactly once, in
/// order, and never `resync`.
async fn cut_senders_resend_and_nothing_is_lost_or_doubled(c: &Cluster) {
    use switchboard_tests::resuming::{assert_exactly_once_in_order, exchange, Plan, Side};
    const TOTAL: usize = 400;
    let (bob, mut bob_client) = Side::connect("bob", "alice", urls(c, 1)).await;
    let alice = Side::connect("alice", "bob", urls(c, 0)).await;
    assert_eq!(bob_client.recv_json().await["type"], "peer-joined");
    let plans = [Plan { cut_after: Some(150), ..Plan::default() }, Plan { cut_after: Some(260), ..Plan::default() }];
    let (alice, bob) = exchange(alice, (bob, bob_client), TOTAL, plans).await;
    for side in [&alice, &bob] {
        assert_exactly_once_in_order(side, TOTAL);
        assert_eq!((side.resumed, side.resyncs), (1, 0));
        assert!(side.errors.is_empty(), "{:?}", side.errors);
    }
    eprintln!("resent after the cut: alice {}, bob {}", alice.resent, bob.resent);
}

macro_rules! redis_brokers_with_resume {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(&switchboard_tests::Cluster::redis_with(2, super::resume_on).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$name(&switchboard_tests::Cluster::redis_cluster_with(2, super::resume_on).await).await
            }
        }
    )+};
}

redis_brokers_with_resume!(a_subscriber_blip_loses_nothing_either_way);

/// Sends `total` numbered frames without pause, at most [`WINDOW`] ahead of
/// what the peer's receiver counted (`seen`).
async fn send_numbered(mut tx: ClientTx, mut seen: watch::Receiver<usize>, total: usize) -> ClientTx {
    for n in 0..total {
        seen.wait_for(|&seen| n < seen + WINDOW).await.expect("the receiver is there");
        tx.send(json!({"type": "n", "n": n, "pad": "x".repeat(100)}).to_string()).await;
    }
    tx
}

/// Reads `relay` events until `total` numbered frames arrived, counting
/// them in `seen`; returns their numbers in arrival order. Fails on `resync`
/// or anything else unexpected.
async fn receive_numbered(mut rx: ClientRx, seen: watch::Sender<usize>, total: usize) -> (ClientRx, Vec<usize>) {
    let mut got = Vec::new();
    while got.len() < total {
        let text = rx.recv_text().await;
        let event: Value = serde_json::from_str(&text).expect("JSON");
        match event["type"].as_str() {
            Some("relay") => {
                assert!(event["seq"].is_string(), "a seq: {event}");
                got.push(event["data"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered frame: {event}")) as usize);
                seen.send_replace(got.len());
            }
            // Confirmations of this side's own frames: not looked at here.
            Some("peer-joined" | "peer-left" | "ack") => {}
            _ => panic!("unexpected event after {} frames: {event}", got.len()),
        }
    }
    (rx, got)
}

/// Cuts every subscriber connection of the test's Redis (each master of a
/// cluster), as Redis does to one over its output-buffer limit; returns how many.
async fn kill_subscribers(c: &Cluster) -> i64 {
    let kill = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").clone();
    if let Some(redis) = &c.redis {
        return kill.query_async(&mut redis.conn().await).await.expect("CLIENT KILL");
    }
    let cluster = c.redis_cluster.as_ref().expect("a Redis");
    let mut killed = 0;
    for master in cluster.masters().await {
        killed += kill.query_async::<i64>(&mut cluster.node_conn(master).await).await.expect("CLIENT KILL");
    }
    killed
}

/// Issue #14, broker blips: both ends resumable, numbered frames flowing
/// both ways between two instances, and Redis cuts every subscriber
/// mid-stream. What was published while they were away comes from the
/// history: each side gets every frame exactly once, in order, and never
/// `resync`.
async fn a_subscriber_blip_loses_nothing_either_way(c: &Cluster) {
    const TOTAL: usize = 300;
    const BLIP_AT: usize = 100;
    let (mut bob, _) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    let (alice, welcome) = connect(c.node(0), "alice", "bob", "&resume=1").await;
    assert_eq!(welcome["peerOnline"], true);
    assert_eq!(bob.recv_json().await["type"], "peer-joined");

    let ((alice_tx, alice_rx), (bob_tx, bob_rx)) = (alice.split(), bob.split());
    let (alice_seen, alice_count) = watch::channel(0);
    let (bob_seen, bob_count) = watch::channel(0);
    let alice_sends = tokio::spawn(send_numbered(alice_tx, bob_count.clone(), TOTAL));
    let bob_sends = tokio::spawn(send_numbered(bob_tx, alice_count.clone(), TOTAL));
    let alice_gets = tokio::spawn(receive_numbered(alice_rx, alice_seen, TOTAL));
    let bob_gets = tokio::spawn(receive_numbered(bob_rx, bob_seen, TOTAL));

    for mut count in [alice_count, bob_count] {
        count.wait_for(|&n| n >= BLIP_AT).await.expect("frames flow");
    }
    assert!(kill_subscribers(c).await >= 2, "one subscriber connection per instance at least");

    let expected: Vec<usize> = (0..TOTAL).collect();
    let (alice_rx, alice_got) = alice_gets.await.expect("Alice's receiver");
    let (bob_rx, bob_got) = bob_gets.await.expect("Bob's receiver");
    assert_eq!(alice_got, expected, "Alice: every frame exactly once, in order");
    assert_eq!(bob_got, expected, "Bob: every frame exactly once, in order");

    // And live traffic goes on, with nothing else (no late resync) before it.
    let mut alice = alice_sends.await.expect("Alice's sender").reunite(alice_rx);
    let mut bob = bob_sends.await.expect("Bob's sender").reunite(bob_rx);
    alice.send(r#"{"type":"n","n":"after"}"#).await;
    let next = past_acks(&mut bob).await;
    assert_eq!((next["type"].as_str(), next["data"]["n"].as_str()), (Some("relay"), Some("after")), "{next}");
    bob.send(r#"{"type":"n","n":"after"}"#).await;
    let next = past_acks(&mut alice).await;
    assert_eq!((next["type"].as_str(), next["data"]["n"].as_str()), (Some("relay"), Some("after")), "{next}");
}

/// The next event that is not an `ack` of the client's own frames.
async fn past_acks(client: &mut Client) -> Value {
    loop {
        let event = client.recv_json().await;
        if event["type"] != "ack" {
            return event;
        }
    }
}

/// Issue #14, broker blips past the history: the subscribers are kept out
/// (a password set under the instances lets their logged-in command
/// connections be, but refuses the subscribers' new ones) while far more
/// frames than the history holds are published. The resumable session gets
/// `resync`, then only frames newer than the history's newest entry; the
/// session that is not resumable gets `resync` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blip_longer_than_the_history_gives_resync_then_only_newer_frames() {
    let c = Cluster::redis_with(2, resume_on).await;
    let redis = c.redis.as_ref().expect("redis");
    let (mut bob, _) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    let (mut alice, welcome) = connect(c.node(0), "alice", "bob", "").await;
    assert!(welcome.get("resume").is_none());
    assert_eq!(bob.recv_json().await["type"], "peer-joined");
    alice.send(r#"{"type":"n","n":0}"#).await;
    assert_eq!(bob.recv_json().await["data"]["n"], 0);

    let mut admin = redis.conn().await;
    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("x").query_async(&mut admin).await.unwrap();
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 2);
    for node in &c.instances {
        eventually("readyz is 503 while the subscriber is out", || async { node.get("/readyz").await.0 == 503 }).await;
    }
    // Redis trims whole stream nodes of 100 entries: it may keep up to about 164.
    const PUBLISHED: usize = 300;
    for n in 1..=PUBLISHED {
        alice.send(json!({"type": "n", "n": n}).to_string()).await;
    }
    assert_eq!(alice.round_trip().await, Vec::<String>::new(), "every frame was taken");
    eventually("every frame in the history", || {
        let mut admin = admin.clone();
        async move {
            type Entry = (String, Vec<(Vec<u8>, Vec<u8>)>);
            let newest: Vec<Entry> = redis::cmd("XREVRANGE")
                .arg("switchboard:history:alice:bob")
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut admin)
                .await
                .unwrap();
            let last = format!(r#""n":{PUBLISHED}"#);
            newest.iter().flat_map(|(_, fields)| fields).any(|(_, v)| String::from_utf8_lossy(v).contains(&last))
        }
    })
    .await;

    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("").query_async(&mut admin).await.unwrap();
    assert_eq!(alice.recv_json().await, json!({"type": "resync"}), "not resumable: resync, as before");
    assert_eq!(bob.recv_json().await, json!({"type": "resync"}), "the history lost what Bob missed");
    for node in &c.instances {
        node.wait_ready().await;
    }
    // Nothing older follows: the next thing Bob hears is Alice's next frame, live.
    alice.send(r#"{"type":"n","n":"live"}"#).await;
    let next = bob.recv_json().await;
    assert_eq!((next["type"].as_str(), next["data"]["n"].as_str()), (Some("relay"), Some("live")), "{next}");
}

/// A replica SIGKILLed mid-stream (issue #14): what it had read but not
/// published is lost with it, and the client resends every message without
/// an `ack` to the replica it comes back on, which publishes those the
/// broker does not have yet. Both ways: zero loss, zero duplicates, zero
/// reordering, no `resync`. On one Redis and on a Redis Cluster.
async fn a_killed_replicas_clients_resend_and_lose_nothing(url: &str, mode: &str) {
    use switchboard_tests::resuming::{self, assert_exactly_once_in_order, exchange_with, Plan, Side};
    use switchboard_tests::Process;
    const TOTAL: usize = 400;
    let mut doomed = Process::spawn(&[
        ("SWITCHBOARD_REDIS_URL", url),
        ("SWITCHBOARD_REDIS_MODE", mode),
        ("SWITCHBOARD_RESUME_SECS", "30"),
        ("SWITCHBOARD_RESUME_SECRET", SECRET),
        ("SWITCHBOARD_RATE_PER_SEC", "100000"),
        ("SWITCHBOARD_RATE_BURST", "100000"),
    ]);
    let mut s = switchboard_tests::settings(Some(url));
    if mode == "cluster" {
        s.redis_mode = switchboard::config::RedisMode::Cluster;
    }
    resume_on(&mut s);
    let survivor = Instance::start(s).await;
    let (doomed_url, survivor_url) = (format!("ws://{}/ws", doomed.addr), format!("ws://{}/ws", survivor.addr));
    let (bob, mut bob_client) = Side::connect("bob", "alice", resuming::urls(vec![survivor_url.clone()])).await;
    let alice = Side::connect("alice", "bob", resuming::urls(vec![doomed_url, survivor_url])).await;
    assert_eq!(bob_client.recv_json().await["type"], "peer-joined");
    let kill = async { doomed.kill() };
    let (alice, bob) = exchange_with(alice, (bob, bob_client), TOTAL, [Plan::default(); 2], 120, kill).await;
    for side in [&alice, &bob] {
        assert_exactly_once_in_order(side, TOTAL);
        assert_eq!(side.resyncs, 0, "no resync");
        assert!(side.errors.is_empty(), "{:?}", side.errors);
    }
    assert_eq!(alice.resumed, 1, "alice came back once, on the survivor");
    eprintln!("{mode}: alice resent {} messages after the kill", alice.resent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_clients_resend_and_lose_nothing_on_redis() {
    let redis = switchboard_tests::RedisServer::start().await;
    a_killed_replicas_clients_resend_and_lose_nothing(&redis.url(), "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_clients_resend_and_lose_nothing_on_a_redis_cluster() {
    let cluster = switchboard_tests::RedisCluster::start().await;
    a_killed_replicas_clients_resend_and_lose_nothing(&cluster.urls(), "cluster").await;
}

/// A rolling restart of every replica (issue #14): each in turn drains
/// (1012) after its successor started, as a deployment replaces pods, while
/// both sides send 600 numbered messages (one per 10 ms, so traffic lasts
/// through the restarts); the clients know the replicas as a
/// load balancer does (the list changes as they come and go). Every message
/// arrives exactly once, in order, with no `resync`.
async fn a_rolling_restart_loses_nothing(url: &str, cluster: bool) {
    use switchboard_tests::resuming::{self, assert_exactly_once_in_order, exchange_with, Plan, Side};
    const TOTAL: usize = 600;
    let start = || async {
        let mut s = switchboard_tests::settings(Some(url));
        if cluster {
            s.redis_mode = switchboard::config::RedisMode::Cluster;
        }
        resume_on(&mut s);
        s.drain = Duration::from_secs(1);
        Instance::start(s).await
    };
    let url_of = |i: &Instance| format!("ws://{}/ws", i.addr);
    let (a, b) = (start().await, start().await);
    let balancer = resuming::urls(vec![url_of(&b), url_of(&a)]);
    let (bob, mut bob_client) = Side::connect("bob", "alice", balancer.clone()).await;
    balancer.lock().unwrap().reverse();
    let alice = Side::connect("alice", "bob", balancer.clone()).await;
    assert_eq!(bob_client.recv_json().await["type"], "peer-joined");
    let roll = {
        let balancer = balancer.clone();
        async move {
            for old in [a, b] {
                let new = start().await;
                let (old_url, new_url) = (url_of(&old), url_of(&new));
                balancer.lock().unwrap().retain(|u| *u != old_url);
                balancer.lock().unwrap().push(new_url);
                // Drains (1012 to its sockets), then stops; the new one stays up.
                old.stop().await;
                std::mem::forget(new);
            }
        }
    };
    let plan = Plan { pace: Some(Duration::from_millis(10)), ..Plan::default() };
    let (alice, bob) = exchange_with(alice, (bob, bob_client), TOTAL, [plan; 2], 60, roll).await;
    for side in [&alice, &bob] {
        assert_exactly_once_in_order(side, TOTAL);
        assert_eq!(side.resyncs, 0, "no resync");
        assert!(side.errors.is_empty(), "{:?}", side.errors);
        assert!(side.resumed >= 1, "each side's replica was restarted under it");
    }
    eprintln!("resent after the restarts: alice {}, bob {}", alice.resent, bob.resent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_on_redis() {
    let redis = switchboard_tests::RedisServer::start().await;
    a_rolling_restart_loses_nothing(&redis.url(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_on_a_redis_cluster() {
    let cluster = switchboard_tests::RedisCluster::start().await;
    a_rolling_restart_loses_nothing(&cluster.urls(), true).await;
}

/// The pair's history stream of the only pair on `redis`.
async fn history_key(admin: &mut redis::aio::MultiplexedConnection) -> String {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*history*").query_async(admin).await.unwrap();
    let streams: Vec<&String> = keys.iter().filter(|k| !k.contains(":sent:")).collect();
    assert_eq!(streams.len(), 1, "one pair, one stream: {keys:?}");
    streams[0].clone()
}

/// Two instances with resume on, on one Redis: Alice on the first (with
/// `alice_query`), Bob on the second (resumable, so relays reach him as
/// `relay` events), and an admin connection to Redis. Alice has heard Bob join.
async fn pair_on_two_instances(alice_query: &str) -> (Cluster, redis::aio::MultiplexedConnection, Client, Client) {
    let c = Cluster::redis_with(2, resume_on).await;
    let admin = c.redis.as_ref().unwrap().conn().await;
    let (mut alice, _) = connect(&c.instances[0], "alice", "bob", alice_query).await;
    let (bob, _) = connect(&c.instances[1], "bob", "alice", "&resume=1").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    (c, admin, alice, bob)
}

/// Relays are sent by the script's SHA1 (`EVALSHA`). A Redis that no longer
/// knows the script (restarted, newly promoted, or `SCRIPT FLUSH`) answers
/// `NOSCRIPT`, so the script did not run: the lane sends it once more with
/// its body, and the message is relayed once, with no error for the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_script_redis_forgot_is_sent_again_with_its_body() {
    let (_c, mut admin, mut alice, mut bob) = pair_on_two_instances("&resume=1").await;
    for round in 1..=3u64 {
        let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut admin).await.unwrap();
        alice.send(&json!({"type": "n", "n": round}).to_string()).await;
        let got = bob.recv_json().await;
        assert_eq!((got["type"].as_str(), got["data"]["n"].as_u64()), (Some("relay"), Some(round)), "{got}");
        // Alice hears the frame's confirmation, and no error before it.
        let ack = alice.recv_json().await;
        assert_eq!(ack, json!({"type": "ack", "n": round}), "confirmed, not failed");
    }
}

/// The pair's stream lives at least the resume window after its last entry
/// (30 s here), and at most one renewal period (5 s) longer: a relay renews
/// its TTL unless this instance did so less than a period ago, and always
/// when it had to create the stream anew. It never lives without a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_stream_lives_the_resume_window_after_each_relay() {
    let (_c, mut admin, mut alice, mut bob) = pair_on_two_instances("").await;
    let stream = history_key(&mut admin).await;
    for n in 1..=5 {
        if n == 2 {
            // Gone (as if it expired, or Redis restarted), though relay 1 just
            // renewed it: relay 2 is not due to renew, yet it gives the stream
            // it creates a TTL.
            let () = redis::cmd("DEL").arg(&stream).query_async(&mut admin).await.unwrap();
        }
        alice.send(&json!({"type": "n", "n": n}).to_string()).await;
        assert_eq!(bob.recv_json().await["data"]["n"], n);
        let ttl: i64 = redis::cmd("TTL").arg(&stream).query_async(&mut admin).await.unwrap();
        // Whole seconds, rounded down: 29 is a window less a fraction of a second.
        assert!((29..=35).contains(&ttl), "after relay {n}: TTL {ttl}, not the window (plus up to 5 s)");
    }
}

/// Resume is on by default, and replicas given no secret share the key of
/// resume tokens through Redis: the first to start stores a random one
/// (`{prefix}:secret:resume`), the others read it. So a token from one
/// replica resumes on another (with a key of each replica's own, the
/// second would close with 4003), and the client gets what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_replicas_share_the_resume_key_through_redis() {
    let c = Cluster::redis(2).await;
    let mut admin = c.redis.as_ref().unwrap().conn().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*:secret:resume").query_async(&mut admin).await.unwrap();
    assert_eq!(keys.len(), 1, "one shared key: {keys:?}");
    let secret: String = redis::cmd("GET").arg(&keys[0]).query_async(&mut admin).await.unwrap();
    assert!(secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()), "32 random bytes in hex");

    let (mut bob, welcome) = connect(c.node(1), "bob", "alice", "&resume=1").await;
    let (token, seq) = resume_of(&welcome);
    let (mut alice, _) = connect(c.node(0), "alice", "bob", "").await;
    assert_eq!(bob.recv_json().await["type"], "peer-joined");
    alice.send(&json!({"type": "n", "n": 1}).to_string()).await;
    let first = bob.recv_json().await;
    assert_eq!(first["data"]["n"], 1, "{first}");
    let after = first["seq"].as_str().unwrap_or(&seq).to_owned();
    bob.reset_connection();
    alice.send(&json!({"type": "n", "n": 2}).to_string()).await;

    // Back on the other replica with the first one's token.
    let (mut bob, welcome) = connect(c.node(0), "bob", "alice", &format!("&resume={token}&after={after}")).await;
    assert!(welcome["resume"]["token"].is_string(), "resumed, not refused: {welcome}");
    let missed = bob.recv_json().await;
    assert_eq!((missed["type"].as_str(), missed["data"]["n"].as_u64()), (Some("relay"), Some(2)), "{missed}");
}

/// Relays that queue up behind a busy Redis go as one script call for the
/// whole run (`APPEND_MANY`), not one call each: each still gets its own
/// entry and `seq`, in order, and its confirmation, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_queued_behind_a_busy_redis_go_as_one_script_call_in_order() {
    const FRAMES: u64 = 30;
    let (_c, mut admin, mut alice, mut bob) = pair_on_two_instances("&resume=1").await;
    let stream = history_key(&mut admin).await;
    let before: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut admin).await.unwrap();
    // Writes wait for a second (the admin's commands are not writes): what
    // Alice sends meanwhile queues on the lane, and goes in the next batch.
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("WRITE").query_async(&mut admin).await.unwrap();
    for n in 1..=FRAMES {
        alice.send(&json!({"type": "n", "n": n}).to_string()).await;
    }
    let mut seqs = Vec::new();
    for n in 1..=FRAMES {
        let got = bob.recv_json().await;
        assert_eq!((got["type"].as_str(), got["data"]["n"].as_u64()), (Some("relay"), Some(n)), "{got}");
        seqs.push(got["seq"].as_str().expect("a seq").to_owned());
    }
    let mut sorted = seqs.clone();
    sorted.sort_by_key(|s| {
        let (ms, i) = s.split_once('-').expect("a stream ID");
        (ms.parse::<u64>().unwrap(), i.parse::<u64>().unwrap())
    });
    sorted.dedup();
    assert_eq!(sorted, seqs, "one entry each, in order");
    loop {
        let event = alice.recv_json().await;
        assert_eq!(event["type"], "ack", "confirmed, not failed: {event}");
        if event["n"] == FRAMES {
            break;
        }
    }
    let after: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut admin).await.unwrap();
    assert_eq!(after - before, FRAMES as usize, "each frame is one entry of the pair's history");
    let sha1 = &switchboard::broker::scripts::APPEND_MANY.sha1;
    let ran: Vec<bool> = redis::cmd("SCRIPT").arg("EXISTS").arg(sha1).query_async(&mut admin).await.unwrap();
    assert_eq!(ran, [true], "the queued relays went as one APPEND_MANY call");
}
