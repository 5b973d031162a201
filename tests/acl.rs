//! ACL users: an instance logs in as the user of its URL, needs no more than
//! the minimal ACL of docs/operations.md, and never shows its password.

use switchboard_tests::redis_server::Setup;
use switchboard_tests::{
    eventually, http_get, metric, relays_both_ways, settings, Client, Cluster, Instance, Process, RedisServer,
};

const PASSWORD: &str = "s3cret-Pa55word";

/// The rules of the `ACL SETUSER switchboard …` line of docs/operations.md
/// (prefix `switchboard`), with the password in.
fn documented_acl() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let line =
        doc.lines().find_map(|l| l.strip_prefix("ACL SETUSER switchboard ")).expect("the minimal ACL in the doc");
    let rules: Vec<String> = line.split_whitespace().map(|r| r.replace(">PASSWORD", &format!(">{PASSWORD}"))).collect();
    assert!(rules.contains(&format!(">{PASSWORD}")) && rules.contains(&"+publish".to_owned()), "{rules:?}");
    rules
}

/// Every right, for the tests about passwords.
fn all_rights() -> Vec<String> {
    ["on", &format!(">{PASSWORD}"), "~*", "&*", "+@all"].map(String::from).to_vec()
}

/// A Redis whose default user is off: the test logs in as `admin`, and the
/// user `switchboard` has `rules`.
async fn acl_redis(rules: Vec<String>) -> RedisServer {
    let mut args: Vec<String> = ["--user", "admin", "on", ">admin-pw", "~*", "&*", "+@all"].map(String::from).to_vec();
    args.extend(["--user".to_owned(), "switchboard".to_owned()]);
    args.extend(rules);
    args.extend(["--user", "default", "off"].map(String::from));
    RedisServer::start_with(Setup { args, login: Some(("admin".into(), "admin-pw".into())), ..Setup::default() }).await
}

fn url(redis: &RedisServer, password: &str) -> String {
    format!("redis://switchboard:{password}@127.0.0.1:{}", redis.port())
}

/// Everything an instance does in Redis (subscribe, publish, presence scripts
/// loaded and run by SHA1, leaves, unsubscribe, pings) works with the minimal
/// ACL of docs/operations.md, and Redis denied it nothing. (Each of its
/// entries was checked to be needed by running this without it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_as_an_acl_user_with_the_minimal_acl() {
    let redis = acl_redis(documented_acl()).await;
    let nodes = [Instance::start(settings(Some(&url(&redis, PASSWORD)))).await, {
        Instance::start(settings(Some(&url(&redis, PASSWORD)))).await
    }];
    let c = Cluster { redis: None, redis_cluster: None, instances: nodes.into() };
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "acl").await;
    // The scripts' bodies again (as after a restart), then a leave and its unsubscribe.
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut redis.conn().await).await.unwrap();
    bob.close().await;
    assert_eq!(alice.recv_json().await["type"], "peer-left");
    let (mut bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "again").await;
    // Resume (on by default): Carol's session keeps a cursor, her socket is
    // cut, a frame is relayed meanwhile (appended to the pair's history), and
    // she resumes on the other instance, which reads it back from the history.
    let (mut carol, welcome) = c.node(0).join_with("carol", "dave", "&resume=1").await;
    let (mut dave, _) = c.node(1).join("dave", "carol").await;
    assert_eq!(carol.recv_json().await["type"], "peer-joined");
    let (token, seq) = (welcome["resume"]["token"].as_str().unwrap(), welcome["resume"]["seq"].as_str().unwrap());
    let resume = format!("&resume={token}&after={seq}");
    carol.reset_connection();
    dave.send(r#"{"type":"offer","while":"away"}"#).await;
    let heard = dave.round_trip().await;
    assert!(!heard.iter().any(|f| f.contains(r#""type":"error""#)), "relayed, no error: {heard:?}");
    let (mut carol, _) = c.node(1).join_with("carol", "dave", &resume).await;
    let mut missed = carol.recv_json().await;
    while missed["type"] == "peer-joined" {
        // Dave's join, if it came after Carol's cursor: replayed too.
        missed = carol.recv_json().await;
    }
    assert_eq!((missed["type"].as_str(), missed["data"]["while"].as_str()), (Some("relay"), Some("away")), "{missed}");
    let switchboard_clients: String =
        redis::cmd("CLIENT").arg("LIST").query_async(&mut redis.conn().await).await.unwrap();
    assert!(switchboard_clients.contains("user=switchboard"), "{switchboard_clients}");
    let denied: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut redis.conn().await).await.unwrap();
    assert!(denied.is_empty(), "Redis denied the switchboard user something: {denied:?}");
}

/// Whether `text` shows the password.
fn leaks(text: &str) -> bool {
    text.contains(PASSWORD)
}

/// A wrong password: unready, and the log says where and what failed
/// without showing the password, nor does anything else the process shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_unready_and_never_shown() {
    let redis = acl_redis(all_rights()).await;
    let wrong = format!("{PASSWORD}-wrong");
    let process =
        Process::spawn(&[("SWITCHBOARD_REDIS_URL", &url(&redis, &wrong)), ("RUST_LOG", "switchboard=debug,info")]);
    let endpoint = format!("127.0.0.1:{}", redis.port());
    let line = process.output().wait_for("the AUTH failure", |l| l.contains("AUTH"));
    assert!(line.contains(&endpoint) && line.contains("WRONGPASS"), "{line}");
    let (status, body) = http_get(process.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    // A second attempt, logged at debug.
    process.output().wait_for("another attempt", |l| l.contains("still can't connect"));
    let refused = Client::connect(&process.ws_url("alice", "bob")).await.err().expect("refused");
    let (_, metrics) = http_get(process.addr, "/metrics").await;
    for (what, text) in [("body", body), ("metrics", metrics), ("refusal", refused.to_string())] {
        assert!(!leaks(&text), "the password in the {what}: {text}");
    }
    let output = process.output().lines().join("\n");
    assert!(!leaks(&output), "the password in the log:\n{output}");
    assert!(!output.contains(&wrong[..6]), "any part of it:\n{output}");
}

/// The password is changed under running instances (the lanes and the
/// subscriber log in again and are refused): still never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_under_a_running_instance_is_never_shown() {
    let redis = acl_redis(all_rights()).await;
    let process = Process::spawn(&[("SWITCHBOARD_REDIS_URL", &url(&redis, PASSWORD))]);
    eventually("ready", || async { http_get(process.addr, "/readyz").await.0 == 200 }).await;
    let mut alice = Client::connect(&process.ws_url("alice", "bob")).await.unwrap();
    assert_eq!(alice.recv_json().await["type"], "welcome");
    let mut bob = Client::connect(&process.ws_url("bob", "alice")).await.unwrap();
    assert_eq!(bob.recv_json().await["type"], "welcome");
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice, &mut bob, "before").await;

    let mut admin = redis.conn().await;
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("switchboard")
        .arg("resetpass")
        .arg(">rotated")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("USER").arg("switchboard").query_async(&mut admin).await.unwrap();
    eventually("readyz 503", || async { http_get(process.addr, "/readyz").await.0 == 503 }).await;
    // A lane logs in again for this message, and is refused.
    alice.send(r#"{"type":"candidate"}"#).await;
    let event = alice.recv_json().await;
    assert_eq!(
        (event["type"].as_str(), event["code"].as_str()),
        (Some("error"), Some("broker_unavailable")),
        "{event}"
    );
    assert!(!leaks(&event.to_string()));
    let endpoint = format!("127.0.0.1:{}", redis.port());
    let lane = process.output().wait_for("the lane's failure", |l| l.contains("publish failed"));
    assert!(lane.contains(&endpoint) && lane.contains("authentication failed"), "{lane}");
    // The subscriber says why it can't come back, not only that it was cut off.
    let subscriber = process.output().wait_for("the subscriber's refused login", |l| {
        l.contains("redis subscriber") && l.contains("WRONGPASS") && l.contains("\"WARN\"")
    });
    assert!(subscriber.contains(&endpoint), "{subscriber}");
    let (_, metrics) = http_get(process.addr, "/metrics").await;
    assert!(!leaks(&metrics));
    let output = process.output().lines().join("\n");
    assert!(!leaks(&output), "the password in the log:\n{output}");
    assert!(
        metric(&metrics, "switchboard_broker_reconnects_total").is_none_or(|n| n == 0.0),
        "never reconnected with the old password"
    );
}

/// Issue 16, defect 1: an ACL that denies one pair's channel (`&pattern`
/// rules naming the others). Redis answers that pair's `SUBSCRIBE` with
/// `NOPERM`: its new session closes with 1013 and the refusal is counted,
/// while the subscriber's connection stays, other pairs relay, and `/readyz`
/// stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_acl_denies_refuses_its_pair_only() {
    const REFUSED: &str = "switchboard_broker_subscribe_refused_total";
    // The documented ACL, with its channels narrowed to alice's pairs.
    let rules: Vec<String> = documented_acl()
        .into_iter()
        .map(|r| if r == "&switchboard:*" { "&switchboard:pair:alice:*".to_owned() } else { r })
        .collect();
    assert!(rules.contains(&"&switchboard:pair:alice:*".to_owned()), "{rules:?}");
    let redis = acl_redis(rules).await;
    let nodes = [
        Instance::start(settings(Some(&url(&redis, PASSWORD)))).await,
        Instance::start(settings(Some(&url(&redis, PASSWORD)))).await,
    ];
    let c = Cluster { redis: None, redis_cluster: None, instances: nodes.into() };
    let (mut alice, mut bob) = c.alice_and_bob().await;
    relays_both_ways(&mut alice, &mut bob, "before").await;
    let refused_before = metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0);

    let mut carol = Client::connect(&c.node(0).ws_url("carol", "dave")).await.expect("upgrade");
    let closed = carol.try_recv_json().await.expect_err("a close, not a welcome");
    assert_eq!(closed.code, Some(1013), "{closed:?}");
    let denied: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut redis.conn().await).await.unwrap();
    assert!(format!("{denied:?}").contains("switchboard:pair:carol:dave"), "Redis denied the channel: {denied:?}");
    assert!(metric(&c.node(0).get("/metrics").await.1, REFUSED).unwrap_or(0.0) > refused_before, "counted");

    // Nothing else is touched: no resync, relaying goes on, both instances ready.
    relays_both_ways(&mut alice, &mut bob, "after").await;
    for node in &c.instances {
        assert_eq!(node.get("/readyz").await.0, 200);
    }
    let (mut alice2, _) = c.node(0).join("alice", "erin").await;
    let (mut erin, _) = c.node(1).join("erin", "alice").await;
    assert_eq!(alice2.recv_json().await["type"], "peer-joined");
    relays_both_ways(&mut alice2, &mut erin, "another pair").await;
}
