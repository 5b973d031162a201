//! Abuse limits: message rate, floods, sockets per instance, slow handshakes, dead peers.

use serde_json::json;
use switchboard_tests::{eventually, Client, Cluster, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn strict_rate(s: &mut switchboard::config::Settings) {
    s.rate_per_sec = 1;
    s.rate_burst = 3;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_rate_a_message_is_dropped_with_an_error_event() {
    let c = Cluster::redis_with(2, strict_rate).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    for n in 0..5 {
        alice.send(json!({"type": "candidate", "n": n}).to_string()).await;
    }
    // The burst of three passes, in order; what is over the rate is refused out loud.
    for n in 0..3 {
        assert_eq!(bob.recv_json().await, json!({"type": "candidate", "n": n}));
    }
    let event = alice.recv_json().await;
    assert_eq!((event["type"].as_str(), event["code"].as_str()), (Some("error"), Some("rate_limited")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_closes_with_1008_and_spares_the_others() {
    let c = Cluster::redis_with(2, strict_rate).await;
    let (mut carol, mut dave) = {
        let (mut x, _) = c.node(0).join("carol", "dave").await;
        let (y, _) = c.node(1).join("dave", "carol").await;
        assert_eq!(x.recv_json().await["type"], "peer-joined");
        (x, y)
    };
    let (mut alice, mut bob) = c.alice_and_bob().await;
    for n in 0..50 {
        alice.send(json!({"type": "candidate", "n": n}).to_string()).await;
    }
    let closed = loop {
        match alice.try_recv_json().await {
            Ok(event) => assert_eq!(event["code"], "rate_limited"),
            Err(closed) => break closed,
        }
    };
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1008), "rate limit exceeded"));
    for n in 0..3 {
        assert_eq!(bob.recv_json().await["n"], n);
    }
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    carol.send(r#"{"type":"offer"}"#).await;
    assert_eq!(dave.recv_text().await, r#"{"type":"offer"}"#);
}

/// Reads rate_limited events until the socket closes, and checks the close.
async fn expect_flood_close(client: &mut Client, what: &str) {
    let mut events = 0;
    let closed = loop {
        match client.try_recv_json().await {
            Ok(event) => {
                assert_eq!(event["code"], "rate_limited", "{what}: {event}");
                events += 1;
            }
            Err(closed) => break closed,
        }
    };
    assert!(events > 0, "{what}: a drop is said out loud before the close");
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1008), "rate limit exceeded"), "{what}");
}

/// A masked frame with an all-zero mask: `first` is FIN, RSV and opcode.
fn raw_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_and_continuation_floods_are_held_like_message_floods() {
    let c = Cluster::redis_with(2, strict_rate).await;
    let floods = [
        ("pings", raw_frame(0x89, b"hi"), None),
        ("pongs", raw_frame(0x8A, b""), None),
        // One text message that never ends: empty continuation frames.
        ("continuations", raw_frame(0x00, b""), Some(raw_frame(0x01, br#"{"type":"#))),
    ];
    for (what, frame, start) in floods {
        let (mut alice, mut bob) = c.alice_and_bob().await;
        let mut flood = start.unwrap_or_default();
        for _ in 0..2000 {
            flood.extend_from_slice(&frame);
        }
        alice.send_raw(&flood).await;
        expect_flood_close(&mut alice, what).await;
        assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}), "{what}");
        bob.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_fragments_within_the_burst_go_unnoticed() {
    let c = Cluster::redis_with(2, strict_rate).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    // A burst of three tokens: two messages in eight fragments each, and a
    // ping after each, take 2 × (1 + 7/16 + 1/16) = 3 tokens.
    for n in 0..2 {
        alice.send_fragment(br#"{"type":"candidate","n":"#, true, false).await;
        for _ in 0..6 {
            alice.send_fragment(b" ", false, false).await;
        }
        alice.send_fragment(format!("{n}}}").as_bytes(), false, true).await;
        alice.ping(b"still there?").await;
        assert_eq!(alice.recv_pong().await, b"still there?");
        let got: serde_json::Value = serde_json::from_str(&bob.recv_text().await).expect("JSON");
        assert_eq!(got, json!({"type": "candidate", "n": n}));
    }
    // Nothing was dropped: Alice's next frame is Bob's reply, no error event.
    bob.send(r#"{"type":"answer"}"#).await;
    assert_eq!(alice.recv_text().await, r#"{"type":"answer"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_over_the_instance_limit_get_503() {
    let c = Cluster::memory_with(|s| s.max_sockets = 2).await;
    let node = c.node(0);
    let (first, _) = node.join("a", "b").await;
    let (_second, _) = node.join("b", "a").await;
    let refused = Client::connect(&node.ws_url("c", "d")).await.err().expect("third socket refused");
    assert!(refused.to_string().contains("503"), "{refused}");
    first.close().await;
    eventually("a slot frees up", || async { Client::connect(&node.ws_url("c", "d")).await.is_ok() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handshake_is_cut_off() {
    let c = Cluster::memory_with(|s| s.handshake_timeout = std::time::Duration::from_secs(1)).await;
    let node = c.node(0);
    let mut slow = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(b"GET /ws?userID=a&peerID=b HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Never finish the head: the server must hang up on its own.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the server kept a half-sent request open");
    // Everyone else is served as usual.
    let (_a, welcome) = node.join("a", "b").await;
    assert_eq!(welcome["type"], "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_no_ping_is_closed_and_reported_gone() {
    let c = Cluster::redis_with(2, |s| {
        s.ping_interval = std::time::Duration::from_secs(1);
        s.pong_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (mut alice, _) = c.node(0).join("alice", "bob").await;
    // Bob's client never reads again, so it never answers a ping.
    let (_bob, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
    // Alice keeps reading (and so answering pings) and stays.
    assert_eq!(alice.recv_json().await, json!({"type": "peer-left", "peerID": "bob"}));
    let (mut bob2, _) = c.node(1).join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    bob2.send(r#"{"type":"offer"}"#).await;
    assert_eq!(alice.recv_text().await, r#"{"type":"offer"}"#);
}
