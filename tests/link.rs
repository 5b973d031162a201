//! `switchboard link` as an operator runs it, against the binary serving with
//! debug logs on: the printed links work, and no token reaches the logs.

use std::process::Command;
use std::time::{Duration, SystemTime};

use switchboard::auth::{LinkSigner, Secret};
use switchboard::pair::UserId;
use switchboard_tests::{http_get, process, Client, Process};
use tokio_tungstenite::tungstenite::Error as WsError;

const SECRET: &str = "link-test secret, at least 32 bytes long";

fn switchboard() -> Command {
    let mut cmd = process::command();
    cmd.env("SWITCHBOARD_AUTH_SECRET", SECRET);
    cmd
}

/// Starts the binary on port 0 with every log level on, collecting stdout and stderr.
fn start_server() -> Process {
    Process::spawn(&[("SWITCHBOARD_AUTH_SECRET", SECRET), ("RUST_LOG", "trace")])
}

/// Stops the server with SIGTERM and returns everything it printed.
fn stop(server: Process) -> Vec<String> {
    server.sigterm();
    let (status, lines) = server.wait();
    assert_eq!(status.code(), Some(0));
    lines
}

/// Runs `switchboard link` and returns its lines as (user, URL).
fn links(args: &[&str]) -> Vec<(String, String)> {
    let out = switchboard().arg("link").args(args).output().unwrap();
    assert!(out.status.success(), "link failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (user, url) = line.split_once(": ").expect("lines of `user: URL`");
            (user.to_owned(), url.to_owned())
        })
        .collect()
}

fn token_of(url: &str) -> &str {
    url.split_once("token=").expect("a token in the link").1
}

/// The WebSocket URL the call page opens for a call link.
fn ws_url(call_link: &str) -> String {
    call_link.replacen("http://", "ws://", 1).replacen("/call?", "/ws?", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_links_connect_and_tokens_never_reach_the_logs() {
    let server = tokio::task::spawn_blocking(start_server).await.unwrap();
    let base = format!("http://{}/", server.addr);
    let printed = links(&["--user", "alice", "--peer", "bob", "--ttl", "1h", "--base-url", &base]);
    assert_eq!(printed.len(), 2, "{printed:?}");
    assert_eq!(printed[0].0, "alice");
    assert_eq!(printed[1].0, "bob");
    let prefix = format!("http://{}/call?", server.addr);
    assert!(printed[0].1.starts_with(&format!("{prefix}userID=alice&peerID=bob&token=")), "{}", printed[0].1);
    assert!(printed[1].1.starts_with(&format!("{prefix}userID=bob&peerID=alice&token=")), "{}", printed[1].1);
    let mut tokens: Vec<String> = printed.iter().map(|(_, url)| token_of(url).to_owned()).collect();

    // A browser fetches the page with the token in its URL; that request isn't logged either.
    let path = printed[0].1.trim_start_matches(&format!("http://{}", server.addr)).to_owned();
    assert_ne!(http_get(server.addr, &path).await.0, 0);

    // Both links open a session, with the identities the links name.
    let mut alice = Client::connect(&ws_url(&printed[0].1)).await.expect("alice's link");
    let welcome = alice.recv_json().await;
    assert_eq!((welcome["userID"].as_str(), welcome["peerID"].as_str()), (Some("alice"), Some("bob")));
    let mut bob = Client::connect(&ws_url(&printed[1].1)).await.expect("bob's link");
    assert_eq!(bob.recv_json().await["userID"], "bob");
    assert_eq!(alice.recv_json().await["type"], "peer-joined");
    alice.send(r#"{"type":"offer","sdp":"x"}"#).await;
    assert_eq!(bob.recv_json().await["type"], "offer");

    // Swapped links, an expired token and a bad signature are refused, and logged as refused.
    let swapped = format!("ws://{}/ws?userID=bob&peerID=alice&token={}", server.addr, tokens[0]);
    let expired = LinkSigner::new(&Secret::new(SECRET)).sign(
        &UserId::parse("alice").unwrap(),
        &UserId::parse("bob").unwrap(),
        SystemTime::now() - Duration::from_secs(10),
    );
    let mut forged = tokens[0].clone();
    forged.push('A');
    for token in [&expired, &forged] {
        let url = format!("ws://{}/ws?userID=alice&peerID=bob&token={token}", server.addr);
        match Client::connect(&url).await {
            Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 401),
            Err(other) => panic!("expected 401, got {other:?}"),
            Ok(_) => panic!("expected 401, got a socket"),
        }
    }
    match Client::connect(&swapped).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        Err(other) => panic!("expected 401, got {other:?}"),
        Ok(_) => panic!("expected 401, got a socket"),
    }
    tokens.push(expired);
    tokens.push(forged);
    alice.close().await;
    bob.close().await;

    let log = tokio::task::spawn_blocking(move || stop(server)).await.unwrap();
    // Debug and trace lines were on, including the session and refusal lines...
    assert!(log.iter().any(|l| l.contains("session open")), "no debug output:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("request refused")), "no refusal logged:\n{}", log.join("\n"));
    // ...and none of them holds a token, nor any of their signatures, nor the secret.
    for line in &log {
        for token in &tokens {
            let signature = token.rsplit_once('.').unwrap().1;
            assert!(!line.contains(token.as_str()) && !line.contains(signature), "token in the log: {line}");
        }
        assert!(!line.contains(SECRET), "secret in the log: {line}");
    }
}

#[test]
fn link_refuses_without_a_secret_or_with_bad_arguments() {
    let out = switchboard()
        .env_remove("SWITCHBOARD_AUTH_SECRET")
        .args(["link", "--user", "alice", "--peer", "bob", "--base-url", "http://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SWITCHBOARD_AUTH_SECRET"));
    assert!(out.stdout.is_empty());
    for args in [
        ["--user", "alice", "--peer", "alice", "--base-url", "http://x", "--ttl", "1h"],
        ["--user", "al ice", "--peer", "bob", "--base-url", "http://x", "--ttl", "1h"],
        ["--user", "alice", "--peer", "bob", "--base-url", "x.example", "--ttl", "1h"],
        ["--user", "alice", "--peer", "bob", "--base-url", "http://x", "--ttl", "soon"],
        ["--user", "alice", "--peer", "bob", "--base-url", "http://x", "--ttl", "0s"],
    ] {
        let out = switchboard().arg("link").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // The ttl reaches the token: 30 minutes from now.
    let before = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let printed =
        links(&["--user", "carol", "--peer", "dave", "--ttl", "30m", "--base-url", "https://call.example.com"]);
    let claims = LinkSigner::new(&Secret::new(SECRET)).verify(token_of(&printed[0].1)).unwrap();
    assert!((before + 1800..=before + 1805).contains(&claims.exp), "{} vs {before}", claims.exp);
    assert_eq!((claims.sub.as_str(), claims.peer.as_str()), ("carol", "dave"));
}

#[test]
fn serving_without_a_subcommand_still_takes_config() {
    let out = switchboard().args(["--config", "/nonexistent/switchboard.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = switchboard().args(["link", "--help"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--base-url"));
}

#[test]
fn link_defaults_its_base_url_to_the_public_url_then_the_listen_address() {
    let from_public = switchboard()
        .env("SWITCHBOARD_PUBLIC_URL", "https://call.example.com/")
        .env("SWITCHBOARD_LISTEN", "0.0.0.0:9000")
        .args(["link", "--user", "alice", "--peer", "bob"])
        .output()
        .unwrap();
    assert!(from_public.status.success(), "{}", String::from_utf8_lossy(&from_public.stderr));
    let stdout = String::from_utf8(from_public.stdout).unwrap();
    assert!(stdout.starts_with("alice: https://call.example.com/call?userID=alice&peerID=bob&token="), "{stdout}");
    // Without it: the listen address, a wildcard one as loopback.
    for (listen, base) in [("0.0.0.0:9000", "http://127.0.0.1:9000"), ("10.1.2.3:80", "http://10.1.2.3:80")] {
        let out = switchboard()
            .env("SWITCHBOARD_LISTEN", listen)
            .args(["link", "--user", "alice", "--peer", "bob"])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with(&format!("alice: {base}/call?userID=alice&peerID=bob&token=")), "{stdout}");
    }
    // --base-url still wins.
    let printed = links(&["--user", "alice", "--peer", "bob", "--base-url", "https://other.example"]);
    assert!(printed[0].1.starts_with("https://other.example/call?"), "{printed:?}");
}
