//! Sentinel mode: instances find the master through the Sentinels, and when
//! the master dies they follow the Sentinels to the promoted replica, with
//! their sessions open. The Sentinels and the data nodes may each require a
//! login of their own, and everything may be TLS.

use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::config::Login;
use switchboard::config::RedisMode;
use switchboard_tests::sentinel::{SentinelSetup, Sentinels, MASTER};
use switchboard_tests::tls::Certificates;
use switchboard_tests::{eventually, http_get, relays_both_ways, settings, Client, Instance, Process, RedisServer};

/// The data nodes' ACL user and password, and the Sentinels' (all different).
const DATA_USER: &str = "switchboard";
const DATA_PASSWORD: &str = "data-Pa55word";
const SENTINEL_USER: &str = "watcher";
const SENTINEL_PASSWORD: &str = "sentinel-Pa55word";

async fn instance(sentinels: &Sentinels) -> Instance {
    instance_with(sentinels, &sentinels.urls(), None).await
}

/// An instance whose Sentinel URLs are `urls`, logging in to the master
/// with `master_login`, trusting the set's CA.
async fn instance_with(sentinels: &Sentinels, urls: &str, master_login: Option<Login>) -> Instance {
    let mut s = settings(Some(urls));
    s.redis_mode = RedisMode::Sentinel;
    s.redis_sentinel_master = Some(MASTER.into());
    s.redis_master_login = master_login;
    s.redis_ca_file = sentinels.ca();
    Instance::start(s).await
}

/// Kills the master while Alice and Bob are paired: both hear `resync`, and
/// their next messages relay on the promoted replica. Prints the timings.
async fn fail_over(set: &mut Sentinels, alice: &mut Client, bob: &mut Client, what: &str) {
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
    let secs = Duration::as_secs_f64;
    eprintln!(
        "sentinel failover ({what}): the Sentinels named the replica after {:.2} s; resync after {:.2} s (alice) \
         and {:.2} s (bob), first relayed message after {:.2} s",
        secs(&promoted),
        secs(&alice_resync),
        secs(&bob_resync),
        secs(&relayed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_the_sentinels_to_the_promoted_replica() {
    let mut set = Sentinels::start().await;
    let nodes = [instance(&set).await, instance(&set).await];
    let (mut alice, _) = nodes[0].join("alice", "bob").await;
    let (mut bob, _) = nodes[1].join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "before").await;
    fail_over(&mut set, &mut alice, &mut bob, "plain").await;
    for node in &nodes {
        eventually("ready on the new master", || async { node.get("/readyz").await.0 == 200 }).await;
    }
    // New sessions work too.
    let (mut carol, _) = nodes[1].join("carol", "dave").await;
    let (mut dave, _) = nodes[0].join("dave", "carol").await;
    assert_eq!(carol.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut carol, &mut dave, "new").await;
}

/// The pub/sub clients of `server` that are not Sentinels (theirs are named
/// `sentinel-…-pubsub`): `CLIENT LIST` lines.
async fn subscribers(server: &RedisServer) -> Vec<String> {
    let list: String =
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(&mut server.conn().await).await.unwrap();
    list.lines().filter(|l| !l.trim().is_empty() && !l.contains("name=sentinel-")).map(str::to_owned).collect()
}

/// A `switchboard` process in Sentinel mode: the Sentinels' URLs carry their
/// login, the master's is in its own settings; debug logs.
fn process(set: &Sentinels) -> Process {
    let urls = set.urls();
    Process::spawn(&[
        ("SWITCHBOARD_REDIS_URL", &urls),
        ("SWITCHBOARD_REDIS_MODE", "sentinel"),
        ("SWITCHBOARD_REDIS_SENTINEL_MASTER", MASTER),
        ("SWITCHBOARD_REDIS_MASTER_USERNAME", DATA_USER),
        ("SWITCHBOARD_REDIS_MASTER_PASSWORD", DATA_PASSWORD),
        ("RUST_LOG", "switchboard=debug,info"),
    ])
}

/// Connects `user` to the pair with `peer` on `process` and reads the welcome.
async fn join(process: &Process, user: &str, peer: &str) -> Client {
    let mut client = Client::connect(&process.ws_url(user, peer)).await.expect("upgrade");
    assert_eq!(client.recv_json().await["type"], "welcome");
    client
}

/// Whether `text` shows either password, or any long part of one.
fn leaks(text: &str) -> bool {
    [DATA_PASSWORD, SENTINEL_PASSWORD].iter().any(|p| text.contains(p) || text.contains(&p[..8]))
}

/// The Sentinels require a login of their own (an ACL user allowed nothing
/// but `SENTINEL GET-MASTER-ADDR-BY-NAME`), the master and replica another
/// (their default user off; the replica and the Sentinels log in to the
/// master as it). Two processes relay, follow a failover, and never show
/// either password: not in their logs (at debug), /readyz or /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_data_nodes_with_logins_of_their_own_through_a_failover() {
    let mut set = Sentinels::start_with(SentinelSetup {
        data_login: Some((DATA_USER.into(), DATA_PASSWORD.into())),
        sentinel_login: Some((SENTINEL_USER.into(), SENTINEL_PASSWORD.into())),
        tls: None,
    })
    .await;
    let nodes = [process(&set), process(&set)];
    for node in &nodes {
        eventually("ready", || async { http_get(node.addr, "/readyz").await.0 == 200 }).await;
    }
    let mut alice = join(&nodes[0], "alice", "bob").await;
    let mut bob = join(&nodes[1], "bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "before").await;
    fail_over(&mut set, &mut alice, &mut bob, "ACL users").await;
    for node in &nodes {
        eventually("ready on the new master", || async { http_get(node.addr, "/readyz").await.0 == 200 }).await;
    }
    let clients = subscribers(&set.replica).await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert!(clients.iter().all(|c| c.contains(&format!(" user={DATA_USER} "))), "{clients:?}");
    for node in &nodes {
        let (_, ready) = http_get(node.addr, "/readyz").await;
        let (_, metrics) = http_get(node.addr, "/metrics").await;
        for (what, text) in [("readyz", ready), ("metrics", metrics), ("log", node.output().lines().join("\n"))] {
            assert!(!leaks(&text), "a password in the {what}:\n{text}");
        }
    }
}

/// The Sentinels require no login at all, the master an ACL user: the
/// Sentinel URLs carry no login and the master's is set on its own. (With
/// the master's login in the Sentinel URLs, as the only way before, the
/// Sentinels refuse it: the instance stays unready and says so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_login_with_sentinels_that_take_none() {
    let set = Sentinels::start_with(SentinelSetup {
        data_login: Some((DATA_USER.into(), DATA_PASSWORD.into())),
        ..SentinelSetup::default()
    })
    .await;
    let login = || Some(Login::new(Some(DATA_USER.into()), DATA_PASSWORD.into()));
    let nodes = [instance_with(&set, &set.urls(), login()).await, instance_with(&set, &set.urls(), login()).await];
    let (mut alice, _) = nodes[0].join("alice", "bob").await;
    let (mut bob, _) = nodes[1].join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "master login").await;

    let urls = set.urls_as(Some((DATA_USER, DATA_PASSWORD)));
    let old_way = Process::spawn(&[
        ("SWITCHBOARD_REDIS_URL", &urls),
        ("SWITCHBOARD_REDIS_MODE", "sentinel"),
        ("SWITCHBOARD_REDIS_SENTINEL_MASTER", MASTER),
    ]);
    let line = old_way
        .output()
        .wait_for("the Sentinel's refusal", |l| l.contains("can't find Redis") && l.contains("authentication failed"));
    assert!(set.ports().iter().any(|port| line.contains(&format!("127.0.0.1:{port}"))), "{line}");
    assert_eq!(http_get(old_way.addr, "/readyz").await.0, 503);
    let output = old_way.output().lines().join("\n");
    assert!(!leaks(&output), "a password in the log:\n{output}");
}

/// Master, replica and Sentinels speak TLS only (`tls-port`, `port 0`,
/// `tls-replication yes`, a CA made here): `rediss://` Sentinel URLs, and the
/// master the Sentinels name (its TLS port) is reached over TLS too, before
/// and after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_master_over_tls_through_a_failover() {
    let certs = Certificates::new();
    let mut set =
        Sentinels::start_with(SentinelSetup { tls: Some(certs.server_files()), ..SentinelSetup::default() }).await;
    assert!(set.urls().starts_with("rediss://"));
    let nodes = [instance(&set).await, instance(&set).await];
    let (mut alice, _) = nodes[0].join("alice", "bob").await;
    let (mut bob, _) = nodes[1].join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "tls").await;
    assert_eq!(subscribers(set.master.as_ref().unwrap()).await.len(), 2, "one subscriber per instance, over TLS");
    fail_over(&mut set, &mut alice, &mut bob, "TLS").await;
    for node in &nodes {
        eventually("ready on the new master", || async { node.get("/readyz").await.0 == 200 }).await;
    }
    assert_eq!(subscribers(&set.replica).await.len(), 2, "both subscribers on the promoted replica, over TLS");
}
