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

mod upkeep {
    //! The instance-wide presence upkeep against a real Redis, one step at a time.

    use std::sync::Arc;

    use switchboard::broker::redis::RedisBroker;
    use switchboard::broker::Broker;
    use switchboard::pair::{PairId, UserId};
    use switchboard::session::handle::SessionHandle;
    use switchboard::session::presence;
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
        presence::refresh(&broker, std::slice::from_ref(&handle)).await;
        assert_eq!(broker.claim_presence(&pair, &bob, 0xb0).await.unwrap(), Some(0xa1));

        handle.peer.mark_presence_released();
        broker.release_presence(&pair, &alice, 0xa1).await.unwrap();
        presence::refresh(&broker, std::slice::from_ref(&handle)).await;
        assert_eq!(broker.claim_presence(&pair, &bob, 0xb0).await.unwrap(), None, "released stays released");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_that_finds_the_peer_gone_tells_the_session_once() {
        let redis = RedisServer::start().await;
        let Upkeep { broker, stop, handle, .. } = upkeep(&redis).await;
        let registry = Registry::new();
        // Bob is known to alice's session, but bob has no presence key (his replica died).
        assert!(registry.finish_setup(&handle, Some(0xb0)));

        presence::refresh(&broker, std::slice::from_ref(&handle)).await;
        let work = handle.next_work().await.expect("work");
        let frames: Vec<&[u8]> = work.frames.iter().map(|f| &f[..]).collect();
        assert_eq!(frames, [&br#"{"type":"peer-left","peerID":"bob"}"#[..]]);

        presence::refresh(&broker, std::slice::from_ref(&handle)).await;
        handle.ping();
        let work = handle.next_work().await.expect("work");
        assert!(work.frames.is_empty(), "told once");
        stop.cancel();
    }
}
