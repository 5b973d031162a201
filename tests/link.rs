//! `switchboard link` as an operator runs it, against the binary serving with
//! debug logs on: the printed links work, and no token reaches the logs.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use switchboard::auth::{LinkSigner, Secret};
use switchboard::pair::UserId;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const SECRET: &str = "link-test secret, at least 32 bytes long";
const DEADLINE: Duration = Duration::from_secs(20);

fn switchboard() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHBOARD_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("SWITCHBOARD_AUTH_SECRET", SECRET);
    cmd
}

/// The server binary, killed if a test fails before it stops it.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the binary on port 0 with every log level on, collecting stdout and stderr.
    fn start() -> Self {
        let mut child = switchboard()
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let out_log = log.clone();
        let out = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap_or_default();
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    if json["fields"]["message"] == "listening" {
                        let _ = addr_tx.send(json["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                    }
                }
                out_log.lock().unwrap().push(line);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err_log = log.clone();
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            err_log.lock().unwrap().extend(text.lines().map(str::to_owned));
        });
        let addr = addr_rx.recv_timeout(DEADLINE).expect("a listening line");
        Self { child, addr, log, readers: vec![out, err] }
    }

    /// Stops the server with SIGTERM and returns everything it printed.
    fn stop(mut self) -> Vec<String> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        assert_eq!(self.child.wait().unwrap().code(), Some(0));
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

async fn http_status(addr: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

async fn next_text<S>(ws: &mut S) -> serde_json::Value
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_links_connect_and_tokens_never_reach_the_logs() {
    let server = Server::start();
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
    assert_ne!(http_status(&server.addr, &path).await, 0);

    // Both links open a session, with the identities the links name.
    let (mut alice, _) = tokio_tungstenite::connect_async(ws_url(&printed[0].1)).await.expect("alice's link");
    let welcome = next_text(&mut alice).await;
    assert_eq!((welcome["userID"].as_str(), welcome["peerID"].as_str()), (Some("alice"), Some("bob")));
    let (mut bob, _) = tokio_tungstenite::connect_async(ws_url(&printed[1].1)).await.expect("bob's link");
    assert_eq!(next_text(&mut bob).await["userID"], "bob");
    assert_eq!(next_text(&mut alice).await["type"], "peer-joined");
    alice.send(Message::text(r#"{"type":"offer","sdp":"x"}"#)).await.unwrap();
    assert_eq!(next_text(&mut bob).await["type"], "offer");

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
        match tokio_tungstenite::connect_async(url).await {
            Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 401),
            other => panic!("expected 401, got {other:?}"),
        }
    }
    match tokio_tungstenite::connect_async(swapped).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    tokens.push(expired);
    tokens.push(forged);
    let _ = alice.close(None).await;
    let _ = bob.close(None).await;

    let log = server.stop();
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
