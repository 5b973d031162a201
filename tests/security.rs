//! Signed links, the Origin check and TURN credentials, end to end over real sockets.

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha1::Sha1;
use switchboard::auth::{LinkSigner, Secret};
use switchboard::config::Settings;
use switchboard::origin::AllowedOrigins;
use switchboard::pair::UserId;
use switchboard::turn::Turn;
use switchboard_tests::{http_get_raw, Client, Cluster, Instance};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Error as WsError;

const KEY: &str = "test-only key: 0123456789abcdef0123456789abcdef";
const TURN_SECRET: &str = "turn shared secret";

fn signer(key: &str) -> LinkSigner {
    LinkSigner::new(&Secret::new(key))
}

fn id(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// A token signed with the server's key.
fn token(user: &str, peer: &str) -> String {
    signer(KEY).sign(&id(user), &id(peer), in_an_hour())
}

/// Test settings, in memory, stopping without the paced drain (these tests are not about shutdown).
fn settings() -> Settings {
    let mut s = switchboard_tests::settings(None);
    s.drain = Duration::ZERO;
    s
}

async fn signed_instance() -> Instance {
    let mut s = settings();
    s.auth = Some(signer(KEY));
    Instance::start(s).await
}

/// Opens `/ws?{query}`, with an `Origin` header if given.
async fn open(node: &Instance, query: &str, origin: Option<&str>) -> Result<Client, WsError> {
    let mut request = format!("ws://{}/ws?{query}", node.addr).into_client_request().unwrap();
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    Client::connect_request(request).await
}

/// Asserts the upgrade was refused with `status`, and returns the response body.
async fn refused(node: &Instance, query: &str, origin: Option<&str>, status: u16) -> String {
    match open(node, query, origin).await {
        Ok(_) => panic!("{query}: upgraded, expected HTTP {status}"),
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), status, "{query}");
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned()
        }
        Err(other) => panic!("{query}: expected HTTP {status}, got {other}"),
    }
}

/// Asserts a 401 whose body names `why` and doesn't repeat the token.
async fn unauthorized(node: &Instance, query: &str, why: &str) {
    let body = refused(node, query, None, 401).await;
    assert!(body.contains(why), "{query}: body {body:?} should say {why:?}");
    if let Some((_, token)) = query.split_once("token=") {
        let token = token.split('&').next().unwrap();
        assert!(token.len() < 8 || !body.contains(token), "the 401 body repeats the token: {body}");
    }
}

/// base64url without padding, as in JWTs.
fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401() {
    let node = signed_instance().await;
    unauthorized(&node, "userID=alice&peerID=bob", "token is required").await;
    unauthorized(&node, "userID=alice&peerID=bob&token=", "token is required").await;
    // A plain GET is refused the same way, before the upgrade check.
    assert_eq!(node.get("/ws?userID=alice&peerID=bob").await.0, 401);
    // With a valid token the same query upgrades: the 401s above were about the token.
    let (mut alice, welcome) =
        join_signed(&node, &format!("userID=alice&peerID=bob&token={}", token("alice", "bob"))).await;
    assert_eq!(welcome["userID"], "alice");
    alice.send(r#"{"type":"bye"}"#).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_are_401() {
    let node = signed_instance().await;
    let good = token("alice", "bob");
    let (header, rest) = good.split_once('.').unwrap();
    let (payload, _signature) = rest.split_once('.').unwrap();
    let alg_none = format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
    for bad in [
        "x".to_owned(),
        "a.b.c".to_owned(),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.@@@"),
        good[..good.len() - 10].to_owned(),
        format!("{header}.{}.{}", b64url(b"not json"), b64url(b"sig")),
    ] {
        unauthorized(&node, &format!("userID=alice&peerID=bob&token={bad}"), "unauthorized").await;
    }
    unauthorized(&node, &format!("userID=alice&peerID=bob&token={alg_none}"), "unauthorized").await;
    node.stop().await;
}

/// A token with these claims, signed with the server's key (HS256).
fn signed_claims(claims: &serde_json::Value) -> String {
    let message = format!("{}.{}", b64url(br#"{"typ":"JWT","alg":"HS256"}"#), b64url(claims.to_string().as_bytes()));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    format!("{message}.{}", b64url(&mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_beyond_the_longest_link_lifetime_or_with_an_audience_are_401_with_their_reason() {
    let node = signed_instance().await;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let forever = signed_claims(&json!({"sub": "alice", "peer": "bob", "exp": u64::MAX}));
    unauthorized(&node, &format!("token={forever}"), "longest link lifetime").await;
    let eleven_years = signed_claims(&json!({"sub": "alice", "peer": "bob", "exp": now + 11 * 366 * 86400}));
    unauthorized(&node, &format!("token={eleven_years}"), "longest link lifetime").await;
    let audience = signed_claims(&json!({"sub": "alice", "peer": "bob", "exp": now + 3600, "aud": "other-app"}));
    unauthorized(&node, &format!("token={audience}"), "audience (aud)").await;
    let later = signed_claims(&json!({"sub": "alice", "peer": "bob", "exp": now + 3600, "nbf": now + 600}));
    unauthorized(&node, &format!("token={later}"), "not valid yet").await;
    // Registered claims links don't use are ignored: this one opens.
    let extra = signed_claims(&json!({"sub": "alice", "peer": "bob", "exp": now + 3600, "iat": now, "iss": "app"}));
    let (_alice, welcome) = join_signed(&node, &format!("token={extra}")).await;
    assert_eq!(welcome["userID"], "alice");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_token_is_401() {
    let node = signed_instance().await;
    let good = token("alice", "bob");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    // Keep the signature, claim to be mallory calling bob instead.
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
    parts[1] = b64url(json!({"sub": "mallory", "peer": "bob", "exp": exp}).to_string().as_bytes());
    let tampered = parts.join(".");
    unauthorized(&node, &format!("token={tampered}"), "signature is not valid").await;
    // Flip one character of the signature.
    let mut sig: Vec<u8> = good.rsplit_once('.').unwrap().1.bytes().collect();
    sig[3] = if sig[3] == b'A' { b'B' } else { b'A' };
    let flipped = format!("{}.{}", good.rsplit_once('.').unwrap().0, String::from_utf8(sig).unwrap());
    unauthorized(&node, &format!("token={flipped}"), "signature is not valid").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_another_secret_is_401() {
    let node = signed_instance().await;
    let other = signer("someone else's key, 32 bytes or more").sign(&id("alice"), &id("bob"), in_an_hour());
    unauthorized(&node, &format!("userID=alice&peerID=bob&token={other}"), "signature is not valid").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_401() {
    let node = signed_instance().await;
    let expired = signer(KEY).sign(&id("alice"), &id("bob"), SystemTime::now() - Duration::from_secs(60));
    unauthorized(&node, &format!("userID=alice&peerID=bob&token={expired}"), "expired").await;
    unauthorized(&node, &format!("token={expired}"), "expired").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_contradicting_the_query_is_401() {
    let node = signed_instance().await;
    let alice = token("alice", "bob");
    // Bob can't use Alice's link, nor can Alice use it to reach someone else.
    unauthorized(&node, &format!("userID=bob&peerID=alice&token={alice}"), "another userID").await;
    unauthorized(&node, &format!("userID=alice&peerID=carol&token={alice}"), "another peerID").await;
    unauthorized(&node, &format!("peerID=carol&token={alice}"), "another peerID").await;
    unauthorized(&node, &format!("userID=mallory&token={alice}"), "another userID").await;
    node.stop().await;
}

/// Upgrades with `query` and reads the welcome.
async fn join_signed(node: &Instance, query: &str) -> (Client, serde_json::Value) {
    let mut client = open(node, query, None).await.unwrap_or_else(|e| panic!("{query}: {e}"));
    let welcome = client.recv_json().await;
    assert_eq!(welcome["type"], "welcome");
    (client, welcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_pair_calls_across_replicas_with_identity_from_the_token() {
    let c = Cluster::redis_with(2, |s| s.auth = Some(signer(KEY))).await;
    // Alice gives only her token; Bob gives his IDs as well.
    let (mut alice, welcome) = join_signed(c.node(0), &format!("token={}", token("alice", "bob"))).await;
    assert_eq!((welcome["userID"].as_str(), welcome["peerID"].as_str()), (Some("alice"), Some("bob")));
    let (mut bob, welcome) =
        join_signed(c.node(1), &format!("userID=bob&peerID=alice&token={}", token("bob", "alice"))).await;
    assert_eq!((welcome["userID"].as_str(), welcome["peerID"].as_str()), (Some("bob"), Some("alice")));
    assert_eq!(welcome["peerOnline"], true);
    assert_eq!(alice.recv_json().await, json!({"type": "peer-joined", "peerID": "bob"}));
    alice.send(r#"{"type":"offer","sdp":"signed"}"#).await;
    assert_eq!(bob.recv_text().await, r#"{"type":"offer","sdp":"signed"}"#);
    bob.send(r#"{"type":"answer","sdp":"signed"}"#).await;
    assert_eq!(alice.recv_text().await, r#"{"type":"answer","sdp":"signed"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_origin_is_403_and_own_pages_and_non_browsers_are_allowed() {
    let node = Instance::start(settings()).await;
    let query = "userID=alice&peerID=bob";
    for evil in ["https://evil.example", "http://127.0.0.1:1", "null", "http://localhost.evil.example"] {
        let body = refused(&node, query, Some(evil), 403).await;
        assert!(body.contains("SWITCHBOARD_ALLOWED_ORIGINS"), "{body}");
    }
    // The bundled page: same host and port as the request.
    let own = format!("http://{}", node.addr);
    let mut alice = open(&node, query, Some(&own)).await.expect("own origin upgrades");
    assert_eq!(alice.recv_json().await["type"], "welcome");
    // No Origin: not a browser page.
    let mut bob = open(&node, "userID=bob&peerID=alice", None).await.expect("no origin upgrades");
    assert_eq!(bob.recv_json().await["type"], "welcome");
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    node.stop().await;
}

/// Opens `/ws?{query}` with these `Host` and `Origin` headers, as a page whose
/// domain name was made to resolve to this server (DNS rebinding) would.
async fn open_as(node: &Instance, query: &str, host: &str, origin: &str) -> Result<Client, WsError> {
    let mut request = format!("ws://{}/ws?{query}", node.addr).into_client_request().unwrap();
    request.headers_mut().insert("host", HeaderValue::from_str(host).unwrap());
    request.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
    Client::connect_request(request).await
}

fn status_of(result: Result<Client, WsError>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP answer, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_a_forged_host_matching_the_origin_is_403() {
    // Issue 16: the same-origin check compared Origin with Host, which a
    // rebinding page controls, and the welcome carries TURN credentials.
    let port = 8080;
    let rebound = (format!("evil.example:{port}"), format!("http://evil.example:{port}"));
    // With SWITCHBOARD_PUBLIC_URL set (as an operator would, through the settings).
    let mut s = Settings::load_with_env(None, &[("SWITCHBOARD_PUBLIC_URL", "https://call.example.com")]).unwrap();
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.drain = Duration::ZERO;
    let node = Instance::start(s).await;
    let q = "userID=alice&peerID=bob";
    assert_eq!(status_of(open_as(&node, q, &rebound.0, &rebound.1).await), 403);
    assert_eq!(status_of(open_as(&node, q, "call.example.com", "https://evil.example").await), 403);
    let mut own = open_as(&node, q, "call.example.com", "https://call.example.com").await.expect("the public origin");
    assert_eq!(own.recv_json().await["type"], "welcome");
    node.stop().await;
    // Without it: Host counts only when it is an IP address or localhost.
    let node = Instance::start(settings()).await;
    assert_eq!(status_of(open_as(&node, q, &rebound.0, &rebound.1).await), 403);
    assert_eq!(status_of(open_as(&node, q, "call.example.com", "https://call.example.com").await), 403);
    let addr = node.addr.to_string();
    let mut own = open_as(&node, q, &addr, &format!("http://{addr}")).await.expect("an IP address");
    assert_eq!(own.recv_json().await["type"], "welcome");
    let local = format!("localhost:{}", node.addr.port());
    let mut other =
        open_as(&node, "userID=bob&peerID=alice", &local, &format!("http://{local}")).await.expect("localhost");
    assert_eq!(other.recv_json().await["type"], "welcome");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origins_are_allowed_and_star_allows_all() {
    let mut s = settings();
    s.allowed_origins = AllowedOrigins::parse("https://app.example.com, http://localhost:3000").unwrap();
    let node = Instance::start(s).await;
    for ok in ["https://app.example.com", "http://localhost:3000", "HTTPS://APP.example.com:443"] {
        let mut client = open(&node, "userID=alice&peerID=bob", Some(ok)).await.unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(client.recv_json().await["type"], "welcome", "{ok}");
        client.close().await;
    }
    for bad in ["http://app.example.com", "https://app.example.com:8443", "https://evil.example"] {
        refused(&node, "userID=alice&peerID=bob", Some(bad), 403).await;
    }
    node.stop().await;

    let mut s = settings();
    s.allowed_origins = AllowedOrigins::parse("*").unwrap();
    let node = Instance::start(s).await;
    let mut client = open(&node, "userID=alice&peerID=bob", Some("https://anywhere.example")).await.unwrap();
    assert_eq!(client.recv_json().await["type"], "welcome");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_checked_before_the_token() {
    let node = signed_instance().await;
    let query = format!("userID=alice&peerID=bob&token={}", token("alice", "bob"));
    refused(&node, &query, Some("https://evil.example"), 403).await;
    let own = format!("http://{}", node.addr);
    let mut client = open(&node, &query, Some(&own)).await.expect("signed, own origin");
    assert_eq!(client.recv_json().await["type"], "welcome");
    node.stop().await;
}

fn hmac_sha1_b64(secret: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Checks a TURN entry for `user` and returns its expiry.
fn check_turn_entry(entry: &serde_json::Value, user: &str) -> u64 {
    assert_eq!(entry["urls"], json!(["turn:127.0.0.1:3478", "turns:127.0.0.1:5349?transport=tcp"]));
    let username = entry["username"].as_str().expect("a username");
    let (expiry, who) = username.split_once(':').expect("expiry:userID");
    assert_eq!(who, user);
    assert_eq!(entry["credential"], hmac_sha1_b64(TURN_SECRET, username), "credential of {username}");
    expiry.parse().expect("a Unix time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_are_in_the_welcome_and_pushed_again_before_they_expire() {
    let stun = r#"[{"urls":"stun:stun.example:3478"}]"#;
    let c = Cluster::redis_with(1, |s| {
        s.ice_servers.configured = serde_json::value::RawValue::from_string(stun.to_owned()).unwrap();
        s.ice_servers.turn = Some(Turn {
            secret: Secret::new(TURN_SECRET),
            urls: vec!["turn:127.0.0.1:3478".into(), "turns:127.0.0.1:5349?transport=tcp".into()],
            ttl: Duration::from_secs(3),
        });
    })
    .await;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (mut alice, welcome) = c.node(0).join("alice", "bob").await;
    let servers = welcome["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers.len(), 2, "{welcome}");
    assert_eq!(servers[0], json!({"urls": "stun:stun.example:3478"}));
    let first = check_turn_entry(&servers[1], "alice");
    assert!((now + 2..=now + 5).contains(&first), "expiry {first} is not about 3 s after {now}");

    // At 80% of 3 s the session pushes fresh credentials, before the first expire.
    let pushed = alice.recv_json().await;
    assert_eq!(pushed["type"], "ice-servers", "{pushed}");
    let servers = pushed["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers[0], json!({"urls": "stun:stun.example:3478"}));
    let second = check_turn_entry(&servers[1], "alice");
    assert!(second > first, "pushed expiry {second} should be later than {first}");
    // The session is still a working session.
    let (mut bob, _) = c.node(0).join("bob", "alice").await;
    let joined = loop {
        let event = alice.recv_json().await;
        if event["type"] != "ice-servers" {
            break event;
        }
    };
    assert_eq!(joined, json!({"type": "peer-joined", "peerID": "bob"}));
    bob.send(r#"{"type":"offer"}"#).await;
    let relayed = loop {
        let event = alice.recv_json().await;
        if event["type"] != "ice-servers" {
            break event;
        }
    };
    assert_eq!(relayed, json!({"type": "offer"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_turn_the_welcome_has_only_the_configured_servers() {
    let node = Instance::start(settings()).await;
    let (_alice, welcome) = node.join("alice", "bob").await;
    assert_eq!(welcome["iceServers"], json!([]));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_never_pass_their_link_on_as_a_referer() {
    let node = Instance::start(settings()).await;
    // `/call` links carry the user's token in their query.
    for path in ["/", "/call?userID=alice&peerID=bob&token=t", "/switchboard.js"] {
        let response = http_get_raw(node.addr, path).await.to_ascii_lowercase();
        assert!(response.starts_with("http/1.1 200"), "{path}: {response}");
        let head = response.split("\r\n\r\n").next().unwrap_or_default();
        assert!(head.contains("\r\nreferrer-policy: no-referrer\r\n"), "{path}: {head}");
        assert!(head.contains("\r\nx-content-type-options: nosniff\r\n"), "{path}: {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_have_a_content_security_policy_and_may_not_be_framed() {
    // Issue 16: no CSP, no frame-ancestors. The browser tests (tests/e2e) fail on
    // any CSP violation, so this policy is known to let the pages work.
    let node = Instance::start(settings()).await;
    for path in ["/", "/call?userID=alice&peerID=bob", "/call.js", "/switchboard.js", "/style.css"] {
        let response = http_get_raw(node.addr, path).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
        let head = response.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
        let csp = head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy in {head}"));
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for wanted in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(directives.contains(&wanted), "{path}: {csp} lacks {wanted}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval") && !csp.contains('*'), "{csp}");
        assert!(head.contains("\r\nx-frame-options: deny\r\n"), "{path}: {head}");
    }
    node.stop().await;
}
