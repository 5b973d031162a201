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

/// A request head that is never finished.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";

/// The value of `series` on the `/metrics` listener at `addr`.
async fn scrape(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    switchboard_tests::metric(&switchboard_tests::http_get(addr, "/metrics").await.1, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_past_the_cap_get_503_until_one_ends() {
    // A process of its own: its gauge counts only this test's connections.
    // /metrics on its own listener, which the cap does not cover.
    let server = switchboard_tests::Process::spawn(&[
        ("SWITCHBOARD_MAX_HTTP_CONNECTIONS", "3"),
        ("SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS", "300"),
        ("SWITCHBOARD_METRICS_LISTEN", "127.0.0.1:0"),
    ]);
    let line = server.output().wait_for("the /metrics address", |l| l.contains("serving /metrics"));
    let fields: serde_json::Value = serde_json::from_str(&line).unwrap();
    let metrics: std::net::SocketAddr = fields["fields"]["metrics_addr"].as_str().unwrap().parse().unwrap();
    let open = r"switchboard_http_connections";
    let refused = r#"switchboard_rejects_total{reason="too_many_connections"}"#;
    // Three connections that never finish their request head take every slot.
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        held.write_all(HALF_HEAD).await.unwrap();
        holders.push(held);
    }
    eventually("three connections counted", || async { scrape(metrics, open).await == Some(3.0) }).await;
    // A fourth is answered 503 and closed at once, rather than held.
    let mut fourth = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, fourth.read_to_end(&mut answer)).await.expect("closed at once").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert_eq!(scrape(metrics, refused).await, Some(1.0));
    assert_eq!(scrape(metrics, open).await, Some(3.0), "the refused one took no slot");
    // One holder goes: its slot is free again, and a request is served.
    drop(holders.pop());
    eventually("the slot is given back", || async { scrape(metrics, open).await == Some(2.0) }).await;
    assert_eq!(switchboard_tests::http_get(server.addr, "/healthz").await.0, 200);
    // The server may count that connection off just after the client saw it end.
    eventually("the request's slot is given back", || async { scrape(metrics, open).await == Some(2.0) }).await;
    // An upgraded socket no longer holds its HTTP slot.
    let (ws, _) = {
        let mut ws = Client::connect(&server.ws_url("a", "b")).await.expect("upgrade under the cap");
        let welcome = ws.recv_json().await;
        (ws, welcome)
    };
    eventually("the socket left the HTTP count", || async { scrape(metrics, open).await == Some(2.0) }).await;
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_http_cap_waits_for_slots_instead_of_being_refused() {
    // Four slots, and 64 WebSocket handshakes at once: slots come free as
    // handshakes finish, so each connection at the cap waits for one.
    let server = switchboard_tests::Process::spawn(&[("SWITCHBOARD_MAX_HTTP_CONNECTIONS", "4")]);
    let opening: Vec<_> = (0..64)
        .map(|i| {
            let url = server.ws_url(&format!("burst{i}a"), &format!("burst{i}b"));
            tokio::spawn(async move {
                let mut client = Client::connect(&url).await.expect("upgraded, not refused");
                assert_eq!(client.recv_json().await["type"], "welcome");
                client
            })
        })
        .collect();
    let mut clients = Vec::new();
    for task in opening {
        clients.push(task.await.unwrap());
    }
    let (_, m) = switchboard_tests::http_get(server.addr, "/metrics").await;
    let refused = switchboard_tests::metric(&m, r#"switchboard_rejects_total{reason="too_many_connections"}"#);
    assert_eq!(refused, Some(0.0));
    assert_eq!(clients.len(), 64);
}

/// The status line of the answer to `request` (sent whole), read to the end.
async fn answer_to(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await.expect("an answer in time");
    read.unwrap();
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_431() {
    let c = Cluster::memory_with(|s| s.handshake_timeout = std::time::Duration::from_secs(300)).await;
    let node = c.node(0);
    let limit = 16384;
    assert_eq!(switchboard::config::Settings::default().max_request_head_bytes, limit);
    // Padding just under the limit is served.
    let head = |pad: usize, end: &str| {
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}{end}", "p".repeat(pad))
    };
    let fits = head(limit - 200, "\r\n\r\n");
    assert!(fits.len() < limit);
    assert_eq!(answer_to(node.addr, fits.as_bytes()).await, "HTTP/1.1 200 OK");
    // A head that fills the limit without ending is refused at once, not
    // read on into a buffer of hundreds of kilobytes until the timeout.
    let mut padded = head(limit, "").into_bytes();
    padded.truncate(limit);
    assert_eq!(answer_to(node.addr, &padded).await, "HTTP/1.1 431 Request Header Fields Too Large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_stalled_short_of_its_end_closes_with_1008() {
    let c = Cluster::memory_with(|s| s.frame_timeout = std::time::Duration::from_secs(1)).await;
    let node = c.node(0);
    let (mut alice, _) = node.join("alice", "bob").await;
    let (mut bob, _) = node.join("bob", "alice").await;
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    // A masked text frame of 60,000 bytes (16-bit length), sent but for its last byte.
    let len: u16 = 60_000;
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend(std::iter::repeat_n(b' ', usize::from(len) - 1));
    alice.send_raw(&frame).await;
    // Bob hears nothing meanwhile; Alice is cut off with a reason, not left
    // holding the frame's buffer until the ping timeout.
    let closed = alice.expect_closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (Some(1008), "frame not finished in time"));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    let closes = switchboard_tests::metric(&body, r#"switchboard_sessions_closed_total{reason="slow_frame"}"#);
    assert!(closes >= Some(1.0), "{closes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_held_back_by_a_paused_redis_is_not_charged_as_a_burst() {
    // A client at 10 messages a second, half its limit of 20, with a burst of 2.
    let c = Cluster::redis_with(1, |s| {
        s.rate_per_sec = 20;
        s.rate_burst = 2;
        s.max_message_bytes = 128 * 1024;
    })
    .await;
    let redis = c.redis.as_ref().unwrap();
    let (alice, mut bob) = c.alice_and_bob().await;
    let (mut alice_tx, mut alice_rx) = alice.split();
    // 100 KB each: the echo window (256 KiB) holds two, so while Redis is
    // paused the third makes Alice's session wait, and it stops reading.
    let pad = "x".repeat(100_000);
    let total = 30;
    let sender = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
        for n in 0..total {
            every.tick().await;
            alice_tx.send(json!({"type": "candidate", "n": n, "pad": pad}).to_string()).await;
        }
        alice_tx
    });
    for n in 0..3 {
        assert_eq!(bob.recv_json().await["n"], n);
    }
    // A one-second freeze of Redis's writes (under the lanes' 2 s timeout):
    // about ten messages pile up in Alice's socket meanwhile.
    let paused: String =
        redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("WRITE").query_async(&mut redis.conn().await).await.unwrap();
    assert_eq!(paused, "OK");
    // Every message comes through, in order: none was dropped as a burst.
    for n in 3..total {
        assert_eq!(bob.recv_json().await["n"], n, "message {n}");
    }
    let alice_tx = sender.await.unwrap();
    // And Alice heard no complaint: her next frame is Bob's answer.
    bob.send(r#"{"type":"answer"}"#).await;
    assert_eq!(alice_rx.recv_text().await, r#"{"type":"answer"}"#);
    drop(alice_tx);
}
