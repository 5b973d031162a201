//! The `switchboard` binary as a user runs it, its output collected line by line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::DEADLINE;

/// The `switchboard` binary built next to this test (`SWITCHBOARD_BIN` overrides).
///
/// `cargo test --workspace` builds it; alone, `cargo test -p switchboard-tests`
/// runs the binary of the last `cargo build -p switchboard`.
pub fn switchboard_bin() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("SWITCHBOARD_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|deps| deps.parent()).unwrap().join("switchboard");
    assert!(path.exists(), "{} is missing: build it with `cargo build -p switchboard`", path.display());
    path
}

/// The binary, with none of this process's `SWITCHBOARD_*`, `RUST_LOG` or `NO_COLOR` variables.
pub fn command() -> Command {
    let mut command = Command::new(switchboard_bin());
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("SWITCHBOARD_") || name == "RUST_LOG" || name == "NO_COLOR" {
            command.env_remove(key);
        }
    }
    command
}

/// Lines a process printed, on stdout and stderr, as they come.
#[derive(Clone, Default)]
pub struct Output(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Output {
    /// Collects the lines of `from` on a thread; `TEST_LOG=1` also echoes them.
    pub fn collect(&self, from: impl Read + Send + 'static) -> JoinHandle<()> {
        let output = self.clone();
        let echo = std::env::var_os("TEST_LOG").is_some();
        std::thread::spawn(move || {
            // Read errors (a terminal's EIO after the child exits) end the output.
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[switchboard] {line}");
                }
                let (lines, added) = &*output.0;
                lines.lock().unwrap().push(line);
                added.notify_all();
            }
        })
    }

    /// The first line that `check` accepts, waiting up to [`DEADLINE`] for it.
    pub fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let (lines, added) = &*self.0;
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(line) = guard.iter().find(|l| check(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}; output so far:\n{}", guard.join("\n"));
            guard = added.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }
}

/// The address in a `listening` log line, JSON or text.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        if json["fields"]["message"] == "listening" {
            return json["fields"]["addr"].as_str()?.parse().ok();
        }
        return None;
    }
    if !line.split_whitespace().any(|word| word == "listening") {
        return None;
    }
    line.split_whitespace().find_map(|word| word.strip_prefix("addr=")?.parse().ok())
}

/// A running `switchboard` process; killed on drop.
pub struct Process {
    /// The child process.
    pub child: Child,
    /// The address it logged.
    pub addr: SocketAddr,
    output: Output,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts the binary on port 0 with JSON logs and `env`, and waits for its `listening` line.
    pub fn spawn(env: &[(&str, &str)]) -> Self {
        let mut command = command();
        command.env("SWITCHBOARD_LOG_FORMAT", "json").envs(env.iter().copied());
        Self::start(command)
    }

    /// Starts `command` on port 0 (its stdout and stderr piped) and waits for its `listening` line.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Output::default();
        let readers = vec![output.collect(child.stdout.take().unwrap()), output.collect(child.stderr.take().unwrap())];
        let line = output.wait_for("a listening line", |l| listening_addr(l).is_some());
        let addr = listening_addr(&line).unwrap();
        Self { child, addr, output, readers }
    }

    /// What it printed so far.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// `ws://` URL of `/ws` for `user` and `peer`.
    pub fn ws_url(&self, user: &str, peer: &str) -> String {
        format!("ws://{}/ws?userID={user}&peerID={peer}", self.addr)
    }

    /// SIGTERM: the process drains and stops.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// SIGINT, as Ctrl-C sends it.
    pub fn sigint(&self) {
        self.signal("-INT");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill").args([which, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns how, and every line it printed.
    pub fn wait(mut self) -> (ExitStatus, Vec<String>) {
        let status = self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        (status, self.output.lines())
    }

    /// SIGKILL: the process dies without closing anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
