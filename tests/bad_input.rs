//! Every kind of bad input gets a clear answer, and nobody else notices.

use serde_json::json;
use switchboard_tests::{both_brokers, http_head_raw, Client, Cluster, Instance};

both_brokers!(
    bad_queries_get_400_naming_the_parameter,
    invalid_json_gets_an_error_event_and_the_socket_stays_open,
    reserved_types_are_refused_not_forwarded,
    binary_frame_closes_with_1003,
    binary_first_fragment_closes_with_1003_at_once,
    oversized_frame_closes_with_1009,
    oversized_fragmented_message_closes_with_1009,
    huge_declared_length_closes_with_1009_before_any_payload,
    fragmented_message_within_the_limit_is_relayed,
    unmasked_frame_closes_with_1002,
    reserved_opcodes_close_with_1002,
);

/// A pair that must keep working while another client misbehaves.
struct Bystanders(Client, Client);

impl Bystanders {
    async fn join(c: &Cluster) -> Self {
        let (mut x, _) = c.node(0).join("carol", "dave").await;
        let (y, _) = c.node(1).join("dave", "carol").await;
        assert_eq!(x.recv_json().await["type"], "peer-joined");
        Bystanders(x, y)
    }

    async fn still_relay(&mut self) {
        self.0.send(r#"{"type":"offer","still":"fine"}"#).await;
        assert_eq!(self.1.recv_text().await, r#"{"type":"offer","still":"fine"}"#);
        self.1.send(r#"{"type":"answer","still":"fine"}"#).await;
        assert_eq!(self.0.recv_text().await, r#"{"type":"answer","still":"fine"}"#);
    }
}

async fn bad_queries_get_400_naming_the_parameter(c: &Cluster) {
    let node: &Instance = c.node(0);
    let long = "x".repeat(65);
    let cases = [
        ("/ws?peerID=bob".to_owned(), "userID"),
        ("/ws?userID=alice".to_owned(), "peerID"),
        ("/ws?userID=&peerID=bob".to_owned(), "userID"),
        ("/ws?userID=al%20ice&peerID=bob".to_owned(), "userID"),
        ("/ws?userID=alice&peerID=b:ob".to_owned(), "peerID"),
        (format!("/ws?userID=alice&peerID={long}"), "peerID"),
        ("/ws?userID=alice&peerID=alice".to_owned(), "peerID"),
    ];
    for (path, param) in cases {
        let (status, body) = node.get(&path).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.contains(param), "{path}: body {body:?} should name {param}");
    }
    // Valid IDs but no upgrade.
    assert_eq!(node.get("/ws?userID=alice&peerID=bob").await.0, 426);
    // And a refused upgrade really is refused.
    let err = Client::connect(&node.ws_url("alice", "alice")).await.err().expect("no upgrade");
    assert!(err.to_string().contains("400"), "{err}");
}

async fn invalid_json_gets_an_error_event_and_the_socket_stays_open(c: &Cluster) {
    let (mut alice, mut bob) = c.alice_and_bob().await;
    for bad in ["not json", "[1,2]", "\"offer\"", "42", "{\"type\":\"offer\"", "{} {}", "null"] {
        alice.send(bad).await;
        let event = alice.recv_json().await;
        assert_eq!(event["type"], "error", "{bad}");
        assert_eq!(event["code"], "invalid_json", "{bad}");
        assert!(event["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    alice.send(r#"{"type":"offer","after":"errors"}"#).await;
    // Nothing of the bad frames reached bob: the valid one is his next frame.
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","after":"errors"}"#);
}

async fn reserved_types_are_refused_not_forwarded(c: &Cluster) {
    let (mut alice, mut bob) = c.alice_and_bob().await;
    for t in ["welcome", "peer-joined", "peer-left", "error", "resync", "ice-servers"] {
        alice.send(json!({"type": t, "peerID": "mallory"}).to_string()).await;
        let event = alice.recv_json().await;
        assert_eq!((event["type"].as_str(), event["code"].as_str()), (Some("error"), Some("reserved_type")), "{t}");
    }
    // Escaping does not get around it.
    alice.send(r#"{"type":"peer-\u006ceft","peerID":"bob"}"#).await;
    assert_eq!(alice.recv_json().await["code"], "reserved_type");
    alice.send(r#"{"type":"bye"}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"bye"}"#);
}

async fn binary_frame_closes_with_1003(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    alice.send_binary(vec![1, 2, 3]).await;
    assert_eq!(alice.expect_closed().await.code, Some(1003));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    others.still_relay().await;
}

async fn binary_first_fragment_closes_with_1003_at_once(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    // The first frame of a binary message, masked with zeros, and no more:
    // the refusal can't wait for the message to end (it may never).
    alice.send_raw(&[0x02, 0x83, 0, 0, 0, 0, 1, 2, 3]).await;
    assert_eq!(alice.expect_closed().await.code, Some(1003));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    others.still_relay().await;
}

async fn oversized_frame_closes_with_1009(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    let limit = c.node(0).max_message_bytes();
    let too_big = format!(r#"{{"type":"offer","sdp":"{}"}}"#, "x".repeat(limit));
    alice.send(too_big).await;
    assert_eq!(alice.expect_closed().await.code, Some(1009));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    others.still_relay().await;
}

async fn oversized_fragmented_message_closes_with_1009(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    let limit = c.node(0).max_message_bytes();
    // Every fragment is small; only their sum is over the limit.
    let chunk = vec![b'x'; limit / 4];
    alice.send_fragment(br#"{"type":"offer","sdp":""#, true, false).await;
    for _ in 0..5 {
        alice.send_fragment(&chunk, false, false).await;
    }
    alice.send_fragment(br#""}"#, false, true).await;
    assert_eq!(alice.expect_closed().await.code, Some(1009));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    others.still_relay().await;
}

async fn huge_declared_length_closes_with_1009_before_any_payload(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, _bob) = c.alice_and_bob().await;
    // A masked text frame header declaring 1 TiB, and no payload at all: the
    // server must refuse on the header instead of allocating or waiting.
    let mut header = vec![0x81, 0xFF];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    alice.send_raw(&header).await;
    assert_eq!(alice.expect_closed().await.code, Some(1009));
    others.still_relay().await;
}

async fn fragmented_message_within_the_limit_is_relayed(c: &Cluster) {
    let (mut alice, mut bob) = c.alice_and_bob().await;
    alice.send_fragment(br#"{"type":"offer","#, true, false).await;
    alice.send_fragment(br#""sdp":"v=0"#, false, false).await;
    alice.send_fragment(br#""}"#, false, true).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","sdp":"v=0"}"#);
}

async fn unmasked_frame_closes_with_1002(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    let (mut alice, mut bob) = c.alice_and_bob().await;
    // RFC 6455 section 5.1: a client must mask every frame, and a server that
    // receives an unmasked one must close the connection.
    alice.send_raw(&[0x81, 0x02, b'{', b'}']).await;
    assert_eq!(alice.expect_closed().await.code, Some(1002));
    assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
    others.still_relay().await;
}

/// An upgrade request for `/ws` as user `user`: `method`, the headers of a
/// valid handshake except those named in `without`, then `extra` lines.
fn handshake(method: &str, user: &str, without: &[&str], extra: &[&str]) -> String {
    let headers = [
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ];
    let mut request = format!("{method} /ws?userID={user}&peerID=zed HTTP/1.1\r\n");
    for line in headers.iter().filter(|h| !without.iter().any(|w| h.starts_with(w))).chain(extra) {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// RFC 6455 4.2.1 and 4.2.2: only a complete GET handshake is upgraded; a
/// request for no WebSocket (or another version) gets 426 saying which one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_complete_get_handshake_is_upgraded() {
    let c = Cluster::memory().await;
    let addr = c.node(0).addr;
    let upgraded = http_head_raw(addr, &handshake("GET", "u1", &[], &[])).await;
    assert!(upgraded.starts_with("http/1.1 101"), "{upgraded}");
    let listed =
        http_head_raw(addr, &handshake("GET", "u2", &["Connection"], &["Connection: keep-alive, Upgrade"])).await;
    assert!(listed.starts_with("http/1.1 101"), "upgrade is one token of a list: {listed}");

    let refused = [
        (handshake("HEAD", "u3", &[], &[]), "405", "allow: get"),
        (handshake("GET", "u3", &["Upgrade"], &["Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"]), "426", ""),
        (handshake("GET", "u3", &["Upgrade", "Connection"], &[]), "426", ""),
        (handshake("GET", "u3", &["Sec-WebSocket-Version"], &["Sec-WebSocket-Version: 8"]), "426", ""),
        (handshake("GET", "u3", &["Connection"], &[]), "400", ""),
        (handshake("GET", "u3", &["Connection"], &["Connection: keep-alive"]), "400", ""),
        (handshake("GET", "u3", &["Sec-WebSocket-Key"], &[]), "400", ""),
    ];
    for (request, status, header) in refused {
        let response = http_head_raw(addr, &request).await;
        let first = request.lines().next().unwrap_or_default();
        assert!(response.starts_with(&format!("http/1.1 {status}")), "{request:?}: {response}");
        assert!(response.contains(header), "{first}: {response}");
        if status == "426" {
            for header in ["sec-websocket-version: 13", "upgrade: websocket"] {
                assert!(response.contains(header), "{request:?}: 426 without {header}: {response}");
            }
        }
    }
}

async fn reserved_opcodes_close_with_1002(c: &Cluster) {
    let mut others = Bystanders::join(c).await;
    // RFC 6455 5.2: an opcode without a meaning fails the connection, with a close frame.
    for opcode in [0x3, 0x7, 0xB, 0xF] {
        let (mut alice, mut bob) = c.alice_and_bob().await;
        alice.send_raw(&[0x80 | opcode, 0x80, 0, 0, 0, 0]).await;
        let closed = alice.expect_closed().await;
        assert_eq!(closed.code, Some(1002), "opcode {opcode:#x}");
        assert_eq!(bob.recv_json().await, json!({"type": "peer-left", "peerID": "alice"}));
        bob.close().await;
    }
    others.still_relay().await;
}

/// RFC 6455 7.4: a valid close code is echoed, one that may not travel on
/// the wire is a protocol error (1002), and a close without a code gets 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_are_echoed_when_valid_and_refused_with_1002_when_not() {
    let c = Cluster::memory().await;
    let cases = [
        (None, 1000),
        (Some(1000), 1000),
        (Some(1001), 1001),
        (Some(1003), 1003),
        (Some(1008), 1008),
        (Some(3000), 3000),
        (Some(4999), 4999),
        (Some(0), 1002),
        (Some(999), 1002),
        (Some(1004), 1002),
        (Some(1005), 1002),
        (Some(1006), 1002),
        (Some(1015), 1002),
        (Some(1016), 1002),
        (Some(2999), 1002),
        (Some(5000), 1002),
    ];
    for (code, answer) in cases {
        let (mut alice, _) = c.node(0).join("alice", "bob").await;
        // A masked close frame, its mask all zeros.
        let mut frame = vec![0x88, 0x80, 0, 0, 0, 0];
        if let Some(code) = code {
            frame[1] |= 2;
            frame.extend_from_slice(&u16::to_be_bytes(code));
        }
        alice.send_raw(&frame).await;
        assert_eq!(alice.expect_closed().await.code, Some(answer), "close code {code:?}");
    }
}
