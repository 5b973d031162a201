//! Relaying between two users, through one in-memory instance or across
//! instances on Redis.

use serde_json::json;
use switchboard_tests::{every_broker, Client, Cluster};

every_broker!(
    cross_instance_delivery_is_byte_exact,
    no_echo_to_the_sender,
    pairs_are_isolated,
    welcome_says_polite_and_peer_online,
    peer_joined_and_peer_left,
    newest_session_replaces_the_older,
);

async fn cross_instance_delivery_is_byte_exact(c: &Cluster) {
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    let (mut bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
    // Odd spacing, escapes and non-ASCII must survive untouched.
    let offer = "{ \"type\" : \"offer\",\n \"sdp\":\"v=0\\r\\no=- 1 2 IN IP4 127.0.0.1\\r\\n\", \"note\":\"h\u{e9}llo \u{1F600}\" }";
    alice.send(offer).await;
    assert_eq!(bob.recv_text().await, offer);
    let answer = r#"{"type":"answer","sdp":"v=0"}"#;
    bob.send(answer).await;
    assert_eq!(alice.recv_text().await, answer);
}

/// A JSON object of exactly `size` bytes carrying `seq`.
fn sized_message(seq: usize, size: usize) -> String {
    let head = format!(r#"{{"type":"candidate","seq":{seq},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let msg = format!("{head}{}\"}}", "x".repeat(pad));
    assert!(msg.len() == size || size < head.len() + 2);
    msg
}

/// Queues and a rate limit big enough for a burst of 1,000 messages both
/// ways: this test is about order; overflow and rate limits have their own.
fn roomy(s: &mut switchboard::config::Settings) {
    s.outbox_bytes = 256 << 20;
    s.outbox_messages = 4096;
    s.rate_per_sec = 1_000_000;
    s.rate_burst = 1_000_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_keep_order_in_memory() {
    thousand_messages_of_mixed_sizes_keep_order(&Cluster::memory_with(roomy).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_keep_order_across_instances() {
    thousand_messages_of_mixed_sizes_keep_order(&Cluster::redis_with(2, roomy).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_keep_order_on_a_redis_cluster() {
    thousand_messages_of_mixed_sizes_keep_order(&Cluster::redis_cluster_with(2, roomy).await).await;
}

async fn thousand_messages_of_mixed_sizes_keep_order(c: &Cluster) {
    let limit = c.node(0).max_message_bytes();
    let (alice, _) = c.node(0).join("alice", "bob").await;
    let (bob, _) = c.node(1).join("bob", "alice").await;
    let sizes = [40, 300, 4096, 1200, limit, 64, 20_000, limit - 1];
    let messages: Vec<String> = (0..1000).map(|i| sized_message(i, sizes[(i * 7 + i / 3) % sizes.len()])).collect();
    assert!(messages.iter().any(|m| m.len() == limit));

    // Both directions at once: each side sends while it receives.
    let run = |mut me: Client, expect_peer_joined: bool| {
        let messages = messages.clone();
        async move {
            if expect_peer_joined {
                assert_eq!(me.recv_json().await["type"], "peer-joined");
            }
            let (mut tx, mut rx) = me.split();
            let send = {
                let messages = messages.clone();
                async move {
                    for m in &messages {
                        tx.send(m.clone()).await;
                    }
                    tx
                }
            };
            let recv = async move {
                for (i, expected) in messages.iter().enumerate() {
                    let got = rx.recv_text().await;
                    assert!(
                        got == *expected,
                        "message {i}: got {} bytes, expected {} bytes",
                        got.len(),
                        expected.len()
                    );
                }
                rx
            };
            let (tx, rx) = tokio::join!(send, recv);
            tx.reunite(rx)
        }
    };
    let (a, b) = tokio::join!(run(alice, true), run(bob, false));
    a.close().await;
    b.close().await;
}

async fn no_echo_to_the_sender(c: &Cluster) {
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    let (mut bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    alice.send(r#"{"type":"offer","n":1}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","n":1}"#);
    bob.send(r#"{"type":"answer","n":2}"#).await;
    // Had alice's own frame been echoed, it would arrive before bob's.
    assert_eq!(alice.recv_text().await, r#"{"type":"answer","n":2}"#);
}

async fn pairs_are_isolated(c: &Cluster) {
    // IDs that would collide if channel names were joined carelessly, and one
    // user ("a") in two pairs at once.
    let pairs =
        [("a-b", "c"), ("a", "b-c"), ("a.b", "c"), ("a", "b.c"), ("a_b", "c"), ("a", "b_c"), ("a", "b"), ("a", "c")];
    let mut clients = Vec::new();
    for (i, (x, y)) in pairs.iter().enumerate() {
        let (sender, _) = c.node(i).join(x, y).await;
        let (receiver, _) = c.node(i + 1).join(y, x).await;
        clients.push((sender, receiver));
    }
    for (i, (sender, _)) in clients.iter_mut().enumerate() {
        assert_eq!(sender.recv_json().await["type"], "peer-joined");
        sender.send(json!({"type": "offer", "pair": i}).to_string()).await;
    }
    for (sender, _) in clients.iter_mut() {
        sender.send(r#"{"type":"done"}"#).await;
    }
    for (i, (_, receiver)) in clients.iter_mut().enumerate() {
        assert_eq!(receiver.recv_json().await, json!({"type": "offer", "pair": i}), "pair {:?}", pairs[i]);
        assert_eq!(receiver.recv_json().await, json!({"type": "done"}), "pair {:?}", pairs[i]);
    }
}

async fn welcome_says_polite_and_peer_online(c: &Cluster) {
    let (mut alice, welcome) = c.node(0).join("alice", "bob").await;
    assert_eq!(
        welcome,
        json!({"type":"welcome","userID":"alice","peerID":"bob","polite":false,"peerOnline":false,"iceServers":[]})
    );
    let (_bob, welcome) = c.node(1).join("bob", "alice").await;
    assert_eq!(
        welcome,
        json!({"type":"welcome","userID":"bob","peerID":"alice","polite":true,"peerOnline":true,"iceServers":[]})
    );
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
}

async fn peer_joined_and_peer_left(c: &Cluster) {
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    let (bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
    bob.close().await;
    assert_eq!(alice.recv_json().await, json!({"type": "peer-left", "peerID": "bob"}));

    let (bob, welcome) = c.node(2).join("bob", "alice").await;
    assert_eq!(welcome["peerOnline"], true);
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
    bob.drop_connection();
    assert_eq!(alice.recv_json().await, json!({"type": "peer-left", "peerID": "bob"}));
    let (_, welcome) = c.node(1).join("bob", "alice").await;
    assert_eq!(welcome["peerOnline"], true, "alice is still there");
}

async fn newest_session_replaces_the_older(c: &Cluster) {
    let (mut old, _) = c.node(0).join("alice", "bob").await;
    let (mut bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(old.recv_json().await["type"], "peer-joined");
    let (mut new, welcome) = c.node(2).join("alice", "bob").await;
    assert_eq!(welcome["peerOnline"], true);
    let closed = old.expect_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(4001), "replaced"));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-joined", "peerID": "alice"}));
    // The replaced session's end must not read as the peer leaving.
    bob.send(r#"{"type":"offer","to":"new"}"#).await;
    assert_eq!(new.recv_text().await, r#"{"type":"offer","to":"new"}"#);
    new.send(r#"{"type":"answer","from":"new"}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"answer","from":"new"}"#);
}
