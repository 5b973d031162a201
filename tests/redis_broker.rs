//! What the Redis broker does in Redis itself: channels, counts, connections, names.

use futures_util::StreamExt;
use switchboard_tests::{eventually, Client, Cluster};

const CHANNEL: &str = "switchboard:pair:alice:bob";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_counted_and_numsub_returns_to_zero() {
    let c = Cluster::redis(2).await;
    let redis = c.redis.as_ref().unwrap();
    assert_eq!(redis.numsub(CHANNEL).await, 0);
    // Subscribed before the welcome: the count is there as soon as join returns.
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    assert_eq!(redis.numsub(CHANNEL).await, 1);
    let (bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(redis.numsub(CHANNEL).await, 2);
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    // A second local session of the pair shares node 0's subscription.
    let (alice2, _) = c.node(0).join("alice", "bob").await;
    assert_eq!(alice.expect_closed().await.code, Some(4001));
    assert_eq!(redis.numsub(CHANNEL).await, 2);
    bob.close().await;
    eventually("node 1 unsubscribed", || async { redis.numsub(CHANNEL).await == 1 }).await;
    alice2.close().await;
    eventually("every instance unsubscribed", || async { redis.numsub(CHANNEL).await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscriber_connection_per_instance() {
    let c = Cluster::redis(3).await;
    let redis = c.redis.as_ref().unwrap();
    let mut clients = Vec::new();
    for i in 0..12 {
        let (a, b) = (format!("u{i}"), format!("v{i}"));
        clients.push(c.node(i).join(&a, &b).await.0);
        clients.push(c.node(i + 1).join(&b, &a).await.0);
    }
    assert_eq!(redis.pubsub_clients().await, 3, "24 sessions on 3 instances");
    let channels: Vec<String> =
        redis::cmd("PUBSUB").arg("CHANNELS").arg("*").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(channels.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_channel_and_key_starts_with_the_prefix() {
    let c = Cluster::redis_with(2, |s| s.channel_prefix = "acme.sb".into()).await;
    let redis = c.redis.as_ref().unwrap();
    let (_alice, _) = c.node(0).join("alice", "bob").await;
    let (_bob, _) = c.node(1).join("bob", "alice").await;
    let mut conn = redis.conn().await;
    let channels: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").arg("*").query_async(&mut conn).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert_eq!(channels, vec!["acme.sb:pair:alice:bob".to_owned()]);
    let mut kinds: Vec<&str> = keys.iter().filter_map(|k| k.strip_prefix("acme.sb:")?.split(':').next()).collect();
    kinds.sort_unstable();
    // With resume on (the default): the pair's history, and the replicas' shared resume key.
    assert_eq!(kinds, ["history", "presence", "presence", "secret"], "one presence key per user: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_carries_the_sender_and_the_exact_bytes() {
    let c = Cluster::redis(1).await;
    let redis = c.redis.as_ref().unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut spy = client.get_async_pubsub().await.unwrap();
    spy.subscribe(CHANNEL).await.unwrap();
    let mut stream = spy.on_message();

    let mut alice = Client::connect(&c.node(0).ws_url("alice", "bob")).await.unwrap();
    assert_eq!(alice.recv_json().await["type"], "welcome");
    let join = stream.next().await.unwrap().get_payload_bytes().to_vec();
    assert!(join.starts_with(b"J alice "), "{:?}", String::from_utf8_lossy(&join));

    let frame = "{ \"type\":\"offer\" ,\"sdp\" : \"v=0\\r\\n\" }";
    alice.send(frame).await;
    let published = stream.next().await.unwrap().get_payload_bytes().to_vec();
    let text = String::from_utf8(published).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    assert!(header.starts_with("O alice "), "an offer is flagged for the call-setup metric: {header}");
    assert_eq!(body, frame, "the client's JSON is published as is");

    let other = r#"{"type":"candidate","candidate":{}}"#;
    alice.send(other).await;
    let published = String::from_utf8(stream.next().await.unwrap().get_payload_bytes().to_vec()).unwrap();
    assert_eq!(published.split_once('\n').map(|(h, b)| (&h[..8], b)), Some(("M alice ", other)));
}

mod scripts_and_lanes {
    //! How the broker talks to Redis: scripts by SHA1, one reply per pipelined command.

    use switchboard::broker::envelope::{self, Kind};
    use switchboard::broker::lanes::Lanes;
    use switchboard::broker::Broker;
    use switchboard::pair::{PairId, UserId};
    use switchboard_tests::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// `calls` of `command` in `INFO commandstats` (0 before its first call).
    async fn calls(redis: &RedisServer, command: &str) -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut redis.conn().await).await.unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn presence_scripts_go_by_sha1_and_survive_a_script_flush() {
        let redis = RedisServer::start().await;
        let (broker, stop) = redis.broker("sha").await;
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let pair = PairId::new(&alice, &bob).unwrap();
        let claim = |user: &'static str, session| {
            let user = UserId::parse(user).unwrap();
            let (broker, pair) = (&broker, &pair);
            async move {
                let join = envelope::encode(Kind::Join, &user, session, b"");
                broker.claim_presence(pair, &user, session, "sha:pair:alice:bob", join).await
            }
        };
        let round = || async {
            assert_eq!(claim("alice", 0xa1).await.unwrap(), None);
            assert_eq!(broker.refresh_presences(&[(&pair, &alice, 0xa1)]).await.unwrap(), [None]);
            broker.release_presence(&pair, &alice, 0xa1).await.unwrap();
        };
        // The first round finds Redis without the scripts and sends each body once.
        round().await;
        let (eval, evalsha) = (calls(&redis, "eval").await, calls(&redis, "evalsha").await);
        assert!((1..=3).contains(&eval), "each script's body sent at most once: {eval}");
        round().await;
        round().await;
        assert_eq!(calls(&redis, "eval").await, eval, "no body is sent again");
        assert_eq!(calls(&redis, "evalsha").await, evalsha + 6, "every later call goes by SHA1");

        // Redis forgets every script (as after a restart): the body goes again, once.
        let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut redis.conn().await).await.unwrap();
        assert_eq!(claim("bob", 0xb0).await.unwrap(), None);
        assert_eq!(claim("alice", 0xa1).await.unwrap(), Some(0xb0));
        assert_eq!(calls(&redis, "eval").await, eval + 1);
        stop.cancel();
    }

    /// Commands queued together go out as one pipeline; one that Redis refuses
    /// fails alone, and the others get their replies.
    #[tokio::test]
    async fn a_refused_command_fails_alone_in_its_pipeline() {
        let redis = RedisServer::start().await;
        let target = switchboard::broker::target::Target::standalone(&redis.url(), None).unwrap();
        let stop = CancellationToken::new();
        let lanes = Lanes::start(target, None, 1, 8, &TaskTracker::new(), stop.clone());
        let mut bad = redis::cmd("INCR");
        bad.arg("k");
        let () = redis::cmd("SET").arg("k").arg("not a number").query_async(&mut redis.conn().await).await.unwrap();
        let mut good = redis::cmd("GET");
        good.arg("k");
        let before = calls(&redis, "get").await;
        // On this single-threaded runtime the lane runs only once both are queued.
        let (bad, good) = tokio::join!(lanes.call("lane", bad), lanes.call("lane", good));
        assert!(bad.is_err(), "{bad:?}");
        assert_eq!(good.unwrap(), redis::Value::BulkString(b"not a number".to_vec()));
        assert_eq!(calls(&redis, "get").await, before + 1);
        stop.cancel();
    }
}
