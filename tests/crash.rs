//! A replica killed with SIGKILL says nothing; presence that stays gone past
//! the TTL tells the peer.

use serde_json::json;
use switchboard_tests::{settings, Client, Instance, Process, RedisCluster, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_on_a_killed_replica_is_reported_gone_once_its_key_stays_gone_past_the_ttl() {
    let redis = RedisServer::start().await;
    peer_on_a_killed_replica(&redis.url(), switchboard::config::RedisMode::Standalone, "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_too() {
    let cluster = RedisCluster::start().await;
    peer_on_a_killed_replica(&cluster.urls(), switchboard::config::RedisMode::Cluster, "cluster").await;
}

async fn peer_on_a_killed_replica(url: &str, mode: switchboard::config::RedisMode, mode_name: &str) {
    let mut doomed = Process::spawn(&[
        ("SWITCHBOARD_REDIS_URL", url),
        ("SWITCHBOARD_REDIS_MODE", mode_name),
        ("SWITCHBOARD_PRESENCE_TTL_SECS", "3"),
    ]);
    let survivor = Instance::start(switchboard::config::Settings {
        presence_ttl: std::time::Duration::from_secs(3),
        redis_mode: mode,
        ..settings(Some(url))
    })
    .await;

    let mut alice = Client::connect(&doomed.ws_url("alice", "bob")).await.unwrap();
    assert_eq!(alice.recv_json().await["type"], "welcome");
    let (mut bob, welcome) = survivor.join("bob", "alice").await;
    assert_eq!(welcome["peerOnline"], true, "presence says alice is there");

    doomed.kill();
    let killed = std::time::Instant::now();
    // No leave envelope is ever published: the key expires (within the TTL)
    // and stays missing on every refresh for more than the TTL.
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    let took = killed.elapsed();
    eprintln!("{mode_name}: peer-left {:.1} s after the kill (TTL 3 s)", took.as_secs_f64());
    assert!(took > std::time::Duration::from_secs(3), "not before the key stayed missing past the TTL: {took:?}");
    let (_, welcome) = survivor.join("carol", "alice").await;
    assert_eq!(welcome["peerOnline"], false);
}

mod upkeep {
    //! The instance-wide presence upkeep against a real Redis, one step at a time.

    use std::sync::Arc;

    use switchboard::broker::redis::RedisBroker;
    use switchboard::broker::Broker;
    use switchboard::pair::{PairId, UserId};
    use switchboard::session::handle::SessionHandle;
    use switchboard::session::presence::{self, Judgement};
    use switchboard::session::registry::Registry;
    use switchboard_tests::RedisServer;
    use tokio_util::sync::CancellationToken;

    struct Upkeep {
        broker: RedisBroker,
        stop: CancellationToken,
        alice: UserId,
        bob: UserId,
        pair: PairId,
        /// Alice's session (0xa1).
        handle: Arc<SessionHandle>,
    }

    async fn upkeep(redis: &RedisServer) -> Upkeep {
        let (broker, stop) = broker(redis).await;
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let pair = PairId::new(&alice, &bob).unwrap();
        let handle = Arc::new(SessionHandle::new(0xa1, alice.clone(), pair.clone(), 16, 1 << 20));
        Upkeep { broker, stop, alice, bob, pair, handle }
    }

    async fn broker(redis: &RedisServer) -> (RedisBroker, CancellationToken) {
        redis.broker("upkeep").await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_keeps_live_sessions_and_never_revives_a_released_one() {
        let redis = RedisServer::start().await;
        let Upkeep { broker, stop, alice, bob, pair, handle } = upkeep(&redis).await;

        // A key that expired (or was never claimed) is put back for a live session.
        assert!(presence::refresh(&broker, std::slice::from_ref(&handle), at(0)).await);
        assert_eq!(claim(&broker, &pair, &bob, 0xb0).await, Some(0xa1));

        handle.peer.mark_presence_released();
        broker.release_presence(&pair, &alice, 0xa1).await.unwrap();
        presence::refresh(&broker, std::slice::from_ref(&handle), at(1)).await;
        assert_eq!(claim(&broker, &pair, &bob, 0xb0).await, None, "released stays released");
        stop.cancel();
    }

    /// A refresh at `now` ms, with the broker healthy since 1 ms and a 30 s TTL.
    fn at(now: u64) -> Judgement {
        Judgement { now: now + 1, healthy_since: 1, ttl_ms: 30_000 }
    }

    async fn claim(broker: &RedisBroker, pair: &PairId, user: &UserId, session: u64) -> Option<u64> {
        let join = switchboard::broker::envelope::encode(switchboard::broker::envelope::Kind::Join, user, session, b"");
        broker.claim_presence(pair, user, session, &pair.channel("upkeep"), join).await.unwrap()
    }

    fn frames(work: &switchboard::session::outbox::Work) -> Vec<&[u8]> {
        work.frames.iter().map(|f| &f[..]).collect()
    }

    /// A missing key alone proves nothing (Redis restarted, was flushed, or
    /// stalled past the TTL): only one missing on every refresh for more than
    /// the TTL, with the broker healthy throughout, is a peer that is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_key_is_judged_only_after_the_ttl_with_the_broker_healthy() {
        let redis = RedisServer::start().await;
        let Upkeep { broker, stop, handle, .. } = upkeep(&redis).await;
        let registry = Registry::new();
        assert!(registry.finish_setup(&handle, Some(0xb0)));
        let one = std::slice::from_ref(&handle);

        // Missing at 0 s and at 30 s: not more than the TTL apart yet.
        assert!(presence::refresh(&broker, one, at(0)).await);
        assert!(presence::refresh(&broker, one, at(30_000)).await);
        handle.ping();
        assert!(frames(&handle.next_work().await.expect("work")).is_empty(), "no verdict within the TTL");

        // The broker lost its connection at 31 s: the misses before don't count.
        let healthy_again = Judgement { now: 40_001, healthy_since: 31_001, ttl_ms: 30_000 };
        assert!(presence::refresh(&broker, one, healthy_again).await);
        let later = Judgement { now: 70_001, healthy_since: 31_001, ttl_ms: 30_000 };
        assert!(presence::refresh(&broker, one, later).await);
        handle.ping();
        assert!(frames(&handle.next_work().await.expect("work")).is_empty(), "the clock restarted at 40 s");

        let proven = Judgement { now: 70_101, healthy_since: 31_001, ttl_ms: 30_000 };
        assert!(presence::refresh(&broker, one, proven).await);
        assert_eq!(frames(&handle.next_work().await.expect("work")), [&br#"{"type":"peer-left","peerID":"bob"}"#[..]]);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_that_finds_the_peer_gone_tells_the_session_once() {
        let redis = RedisServer::start().await;
        let Upkeep { broker, stop, handle, pair, bob, .. } = upkeep(&redis).await;
        let registry = Registry::new();
        // Bob is known to alice's session, but bob has no presence key (his replica died).
        assert!(registry.finish_setup(&handle, Some(0xb0)));

        let one = std::slice::from_ref(&handle);
        presence::refresh(&broker, one, at(0)).await;
        presence::refresh(&broker, one, at(30_100)).await;
        let work = handle.next_work().await.expect("work");
        assert_eq!(frames(&work), [&br#"{"type":"peer-left","peerID":"bob"}"#[..]]);

        presence::refresh(&broker, one, at(40_000)).await;
        handle.ping();
        let work = handle.next_work().await.expect("work");
        assert!(work.frames.is_empty(), "told once");

        // Bob's replica puts his key back (it was cut off from Redis past the
        // TTL): alice's client hears that he is back.
        assert_eq!(claim(&broker, &pair, &bob, 0xb0).await, Some(0xa1));
        presence::refresh(&broker, one, at(50_000)).await;
        let work = handle.next_work().await.expect("work");
        assert_eq!(frames(&work), [&br#"{"type":"peer-joined","peerID":"bob"}"#[..]]);
        stop.cancel();
    }
}
