//! The `switchboard` binary as a user runs it: port 0, bad settings, signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
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
fn spawn_on_port_0() -> (Child, String) {
    let mut child = switchboard()
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

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_0() {
    let (mut child, addr) = spawn_on_port_0();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?userID=alice&peerID=bob")).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("\"welcome\""));

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let close = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("a close frame");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}
