//! The `switchboard` binary as a user runs it: port 0, bad settings, signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn switchboard() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHBOARD_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Starts the binary on port 0 and returns it with the address it logged.
fn spawn_on_port_0(env: &[(&str, &str)]) -> (Child, String) {
    let mut child = switchboard()
        .envs(env.iter().copied())
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("a listening line").unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if json["fields"]["message"] == "listening" {
            break json["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[test]
fn worker_threads_follow_the_setting_or_the_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (setting, expected) in [(Some("1"), 1), (Some("3"), 3), (None, cores)] {
        let mut cmd = switchboard();
        if let Some(n) = setting {
            cmd.env("SWITCHBOARD_WORKER_THREADS", n);
        }
        let mut child = cmd
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let listening = BufReader::new(stdout)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(&line.unwrap()).expect("JSON log lines"))
            .find(|json| json["fields"]["message"] == "listening")
            .expect("a listening line");
        assert_eq!(listening["fields"]["workers"], expected, "SWITCHBOARD_WORKER_THREADS={setting:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn bad_settings_exit_non_zero_with_one_line_naming_the_key() {
    for (key, value) in [
        ("SWITCHBOARD_LISTEN", "not-an-address"),
        ("SWITCHBOARD_MAX_MESSAGE_BYTES", "-5"),
        ("SWITCHBOARD_REDIS_URL", "mysql://nope"),
        ("SWITCHBOARD_LOG_FORMAT", "yaml"),
    ] {
        let out = switchboard().env(key, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    let out = switchboard().args(["--config", "/nonexistent/switchboard.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_options() {
    let out = switchboard().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for option in [
        "--config",
        "SWITCHBOARD_LISTEN",
        "SWITCHBOARD_REDIS_URL",
        "SWITCHBOARD_CHANNEL_PREFIX",
        "SWITCHBOARD_MAX_MESSAGE_BYTES",
        "SWITCHBOARD_LOG_FORMAT",
    ] {
        assert!(help.contains(option), "--help lacks {option}");
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

async fn http_status(addr: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn paced_drain_turns_unready_keeps_serving_then_closes_with_1012_spread_out() {
    const PAIRS: usize = 10;
    let (mut child, addr) = spawn_on_port_0(&[("SWITCHBOARD_DRAIN_SECS", "2")]);
    let mut sockets = Vec::new();
    for i in 0..PAIRS {
        for (user, peer) in [(format!("u{i}"), format!("v{i}")), (format!("v{i}"), format!("u{i}"))] {
            let url = format!("ws://{addr}/ws?userID={user}&peerID={peer}");
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            assert!(ws.next().await.unwrap().unwrap().to_text().unwrap().contains("welcome"));
            sockets.push(ws);
        }
    }
    // u_i saw v_i join.
    for ws in sockets.iter_mut().step_by(2) {
        assert!(ws.next().await.unwrap().unwrap().to_text().unwrap().contains("peer-joined"));
    }
    assert_eq!(http_status(&addr, "/readyz").await, 200);
    sigterm(&child);
    // Readiness drops at once, while the server still serves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http_status(&addr, "/readyz").await != 503 {
        assert!(tokio::time::Instant::now() < deadline, "readyz never turned 503");
    }
    assert_eq!(http_status(&addr, "/healthz").await, 200, "still serving during the drain");
    sockets[0].send(Message::text(r#"{"type":"offer","during":"drain"}"#)).await.unwrap();
    let relayed = sockets[1].next().await.unwrap().unwrap();
    assert_eq!(relayed.to_text().unwrap(), r#"{"type":"offer","during":"drain"}"#, "existing sockets still relay");
    // New sockets are sent elsewhere.
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?userID=late&peerID=comer")).await;
    assert!(refused.err().unwrap().to_string().contains("503"));

    let closes = sockets.into_iter().map(|mut ws| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("closed in time") {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 1012);
                    return std::time::Instant::now();
                }
                Some(Ok(Message::Text(text))) => {
                    assert!(!text.contains("peer-left"), "a drain is not the peer leaving: {text}");
                }
                Some(Ok(Message::Ping(_))) => continue,
                other => panic!("expected close 1012, got {other:?}"),
            }
        }
    });
    let closed_at = futures_util::future::join_all(closes).await;
    // Twenty random moments over 2 s are not all within 200 ms of each other.
    let first = *closed_at.iter().min().unwrap();
    let last = *closed_at.iter().max().unwrap();
    assert!(last - first >= Duration::from_millis(200), "closes came all at once: {:?}", last - first);
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn sigterm_without_drain_closes_sockets_with_1001_and_exits_0() {
    let (mut child, addr) = spawn_on_port_0(&[("SWITCHBOARD_DRAIN_SECS", "0")]);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?userID=alice&peerID=bob")).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("\"welcome\""));

    sigterm(&child);
    let close = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("a close frame");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}
