//! `rolling`: pairs exchange numbered messages at a steady rate while the orchestrator (bench/run)
//! restarts every server instance in turn; counts what was lost, duplicated or reordered.
//!
//! Each user of pair `i` sends `{"type":"bench","seq":k,...}` to its peer every `1/rate` seconds
//! and, when its connection ends for any reason, reconnects to the next instance of its list
//! (retrying while instances restart). Two kinds of client:
//!
//! - plain (the baselines, or switchboard without resume): a message is sent only while
//!   connected and counts as sent once it was written to the socket; what the server drops in
//!   a restart is lost.
//! - `--resume` (switchboard's confirmed sends, docs/protocol.md "Resuming"): every message the
//!   app asks to send counts as sent, connected or not; each takes the next number of the
//!   session, is kept until an `ack` covers it, and after a lost connection the client comes
//!   back with `resume=<token>&after=<seq>&next=<oldest unconfirmed>` and resends what has no
//!   `ack`, as static/switchboard.js does.
//!
//! Coordination: once every pair is up and the warm-up is over, the loadgen prints `ready` on
//! stdout and waits for a line (or end of file) on stdin, sent by whoever restarts the
//! instances when they are done; then it sends for `after` more seconds (and on until it has
//! sent for `min_sending` in all), stops sending, waits
//! (bounded) until everything sent has arrived, and reports. Lost = sent − distinct received,
//! per direction of every pair.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{classify, encode_bench, now_ns, Incoming, Protocol, Target, Ws};
use crate::report::Report;
use crate::{pair_ids, Common};

/// Parameters of a `rolling` run.
pub struct Params {
    /// Pairs (2 users each).
    pub pairs: usize,
    /// Messages per second sent by each user.
    pub rate: f64,
    /// Bytes per JSON message.
    pub size: usize,
    /// Sending before `ready` is printed.
    pub warmup: Duration,
    /// Sending after the orchestrator's go-ahead.
    pub after: Duration,
    /// Sending in all at least this long (so that stacks whose restarts take different times
    /// send for the same time).
    pub min_sending: Duration,
    /// Longest wait for deliveries after sending stopped.
    pub drain: Duration,
    /// Longest wait for the go-ahead on stdin.
    pub max_wait: Duration,
    /// Use switchboard's resume protocol and confirmed sends.
    pub resume: bool,
}

/// Totals over all users, for the drain check.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    received: AtomicU64,
    unacked: AtomicI64,
}

/// Resume state of one user (docs/protocol.md, "Resuming").
struct Resume {
    token: String,
    /// The latest welcome's `resume.seq`, then the `seq` of each `relay` event.
    seq: String,
    /// The number the next new frame takes.
    next: u64,
    /// Sent and not confirmed yet: number and text.
    unacked: VecDeque<(u64, String)>,
}

/// One user: its connection state and what it sent and received.
struct User {
    name: String,
    peer: String,
    /// Index of the instance it is (or was last) connected to.
    at: usize,
    resume: Option<Resume>,
    protocol: Protocol,
    size: usize,
    /// The next application message number.
    next_k: u64,
    /// `sent[k]`: message `k` counts as sent.
    sent: Vec<bool>,
    /// `got[k]`: how many times the peer's message `k` arrived.
    got: Vec<u32>,
    /// One more than the highest `k` received so far.
    high: u64,
    duplicates: u64,
    reordered: u64,
    /// Ticks with no connection to write to (plain clients only: nothing is sent for them).
    skipped: u64,
    send_errors: u64,
    reconnects: u64,
    failed_attempts: u64,
    resent: u64,
    resyncs: u64,
    server_errors: u64,
    /// Resumes whose welcome did not count on from the oldest unconfirmed frame.
    next_mismatches: u64,
    /// Longest time without a connection.
    max_gap: Duration,
}

/// How a connected stretch ended.
enum Ended {
    Lost,
    Stop,
}

fn count_sent(v: &mut Vec<bool>, k: u64) {
    let k = k as usize;
    if v.len() <= k {
        v.resize(k + 1, false);
    }
    v[k] = true;
}

impl User {
    fn resume_query(&self) -> String {
        match &self.resume {
            None => String::new(),
            Some(r) if r.token.is_empty() => "&resume=1".to_string(),
            Some(r) => {
                let first = r.unacked.front().map_or(r.next, |&(n, _)| n);
                format!("&resume={}&after={}&next={first}", r.token, r.seq)
            }
        }
    }

    /// Takes the welcome's `resume` fields; checks that the numbering goes on where it should.
    fn on_welcome(&mut self, welcome: &str) -> Result<()> {
        let Some(r) = self.resume.as_mut() else { return Ok(()) };
        let first = r.unacked.front().map_or(r.next, |&(n, _)| n);
        let v: Value = serde_json::from_str(welcome).context("welcome is not JSON")?;
        let res = &v["resume"];
        let (Some(token), Some(seq), Some(next)) = (res["token"].as_str(), res["seq"].as_str(), res["next"].as_u64())
        else {
            anyhow::bail!("the welcome has no resume fields (is SWITCHBOARD_RESUME_SECS set?): {welcome:.300}");
        };
        if next != first {
            self.next_mismatches += 1;
        }
        r.token = token.to_string();
        r.seq = seq.to_string();
        Ok(())
    }

    fn record(&mut self, k: u64, shared: &Shared) {
        let i = k as usize;
        if self.got.len() <= i {
            self.got.resize(i + 1, 0);
        }
        self.got[i] += 1;
        if self.got[i] > 1 {
            self.duplicates += 1;
            return;
        }
        shared.received.fetch_add(1, Ordering::Relaxed);
        if k < self.high {
            self.reordered += 1;
        } else {
            self.high = k + 1;
        }
    }

    /// Handles one text frame; returns false when the server ended the session in-band.
    async fn on_text(&mut self, text: &str, ws: &mut Ws, shared: &Shared) -> bool {
        if self.resume.is_some() {
            let Ok(v) = serde_json::from_str::<Value>(text) else { return true };
            match v["type"].as_str() {
                Some("relay") => {
                    if let (Some(seq), Some(r)) = (v["seq"].as_str(), self.resume.as_mut()) {
                        r.seq = seq.to_string();
                    }
                    if v["data"]["type"] == "bench" {
                        if let Some(k) = v["data"]["seq"].as_u64() {
                            self.record(k, shared);
                        }
                    }
                }
                Some("ack") => {
                    if let (Some(n), Some(r)) = (v["n"].as_u64(), self.resume.as_mut()) {
                        while r.unacked.front().is_some_and(|&(m, _)| m <= n) {
                            r.unacked.pop_front();
                            shared.unacked.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Some("resync") => self.resyncs += 1,
                Some("error") => self.server_errors += 1,
                _ => {}
            }
            return true;
        }
        if self.protocol == Protocol::Socketio && (text == "1" || text.starts_with("41")) {
            // Engine.IO close or Socket.IO namespace disconnect.
            return false;
        }
        match classify(self.protocol, text) {
            Incoming::Bench { seq, .. } => self.record(seq, shared),
            Incoming::Ping => {
                let _ = ws.send(Message::text("3")).await;
            }
            Incoming::Error => self.server_errors += 1,
            Incoming::Welcome | Incoming::Other => {}
        }
        true
    }

    /// One tick of the app: a new message, sent now if connected.
    async fn tick(&mut self, ws: Option<&mut Ws>, shared: &Shared) {
        let k = self.next_k;
        self.next_k += 1;
        let text = encode_bench(self.protocol, k, now_ns(), self.size);
        if let Some(r) = self.resume.as_mut() {
            count_sent(&mut self.sent, k);
            shared.sent.fetch_add(1, Ordering::Relaxed);
            r.unacked.push_back((r.next, text.clone()));
            r.next += 1;
            shared.unacked.fetch_add(1, Ordering::Relaxed);
            if let Some(ws) = ws {
                // A failed write is seen by the reader; the frame waits for the resume.
                let _ = ws.send(Message::text(text)).await;
            }
            return;
        }
        match ws {
            Some(ws) => {
                if ws.send(Message::text(text)).await.is_ok() {
                    count_sent(&mut self.sent, k);
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.send_errors += 1;
                }
            }
            None => self.skipped += 1,
        }
    }

    /// After a (re)connect: resend every unconfirmed frame, in order.
    async fn resend(&mut self, ws: &mut Ws) {
        let Some(r) = self.resume.as_ref() else { return };
        for (_, text) in &r.unacked {
            self.resent += 1;
            if ws.send(Message::text(text.clone())).await.is_err() {
                break;
            }
        }
    }
}

/// Runs one user until `stop_read`.
async fn run_user(
    mut u: User,
    first: Ws,
    target: Arc<Target>,
    period: Duration,
    shared: Arc<Shared>,
    stop_send: CancellationToken,
    stop_read: CancellationToken,
) -> User {
    let offset = period.mul_f64(rand::random::<f64>());
    let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    iv.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ws = Some(first);
    loop {
        if let Some(mut sock) = ws.take() {
            let ended = loop {
                tokio::select! {
                    _ = stop_read.cancelled() => break Ended::Stop,
                    m = sock.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if !u.on_text(t.as_str(), &mut sock, &shared).await {
                                break Ended::Lost;
                            }
                        }
                        Some(Ok(Message::Close(_))) => {
                            // Let tungstenite send the close reply (the server publishes what it
                            // read before it), then the stream ends.
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                while sock.next().await.is_some() {}
                            })
                            .await;
                            break Ended::Lost;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break Ended::Lost,
                    },
                    _ = iv.tick(), if !stop_send.is_cancelled() => {
                        if !stop_send.is_cancelled() {
                            u.tick(Some(&mut sock), &shared).await;
                        }
                    }
                }
            };
            match ended {
                Ended::Stop => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), sock.close(None)).await;
                    return u;
                }
                Ended::Lost => {}
            }
        }
        // Reconnect to the next instance, and on to the one after while they restart; the app
        // keeps ticking meanwhile.
        let down = Instant::now();
        let n = target.instances();
        loop {
            u.at = (u.at + 1) % n;
            let (at, name, peer, query) = (u.at, u.name.clone(), u.peer.clone(), u.resume_query());
            let attempt = async {
                let r = target.connect_query(at, &name, &peer, &query).await;
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r
            };
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    _ = stop_read.cancelled() => break None,
                    r = &mut attempt => break Some(r),
                    _ = iv.tick(), if !stop_send.is_cancelled() => {
                        if !stop_send.is_cancelled() {
                            u.tick(None, &shared).await;
                        }
                    }
                }
            };
            match result {
                None => return u,
                Some(Ok((mut sock, _opened, welcome))) => {
                    if u.on_welcome(&welcome).is_err() {
                        u.failed_attempts += 1;
                        continue;
                    }
                    u.reconnects += 1;
                    u.max_gap = u.max_gap.max(down.elapsed());
                    u.resend(&mut sock).await;
                    ws = Some(sock);
                    break;
                }
                Some(Err(_)) => u.failed_attempts += 1,
            }
        }
    }
}

/// Waits for a line (or end of file) on stdin, at most `limit`. The read runs on a thread of
/// its own: a read still blocked when the limit passes must not keep the process from exiting
/// (tokio's blocking pool would wait for it).
async fn wait_go(limit: Duration) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    tokio::time::timeout(limit, rx).await.is_ok()
}

impl User {
    /// A user at instance `at` that has not connected yet.
    fn new(name: String, peer: String, at: usize, protocol: Protocol, size: usize, resume: bool) -> Self {
        User {
            name,
            peer,
            at,
            resume: resume.then(|| Resume {
                token: String::new(),
                seq: String::new(),
                next: 1,
                unacked: VecDeque::new(),
            }),
            protocol,
            size,
            next_k: 0,
            sent: Vec::new(),
            got: Vec::new(),
            high: 0,
            duplicates: 0,
            reordered: 0,
            skipped: 0,
            send_errors: 0,
            reconnects: 0,
            failed_attempts: 0,
            resent: 0,
            resyncs: 0,
            server_errors: 0,
            next_mismatches: 0,
            max_gap: Duration::ZERO,
        }
    }
}

/// Runs the scenario and builds its report.
pub async fn run(c: &Common, target: Target, run_id: &str, p: Params) -> Result<Report> {
    if p.resume && target.protocol != Protocol::Raw {
        anyhow::bail!("--resume needs --protocol raw (switchboard)");
    }
    let target = Arc::new(target);
    let n = target.instances();
    let shared = Arc::new(Shared::default());
    let new_user =
        |name: String, peer: String, at: usize| User::new(name, peer, at % n, target.protocol, p.size, p.resume);
    // Open every user; pair i's users go to instances i and i + 1.
    let mut opened = Vec::with_capacity(2 * p.pairs);
    for i in 0..p.pairs {
        let (a, b) = pair_ids(run_id, i);
        for (j, (me, peer)) in [(a.clone(), b.clone()), (b, a)].into_iter().enumerate() {
            let mut u = new_user(me, peer, i + j);
            let (ws, _, welcome) = target
                .connect_query(u.at, &u.name, &u.peer, &u.resume_query())
                .await
                .with_context(|| format!("open {}", u.name))?;
            u.on_welcome(&welcome)?;
            opened.push((u, ws));
        }
    }
    let period = Duration::from_secs_f64(1.0 / p.rate.max(0.001));
    let stop_send = CancellationToken::new();
    let stop_read = CancellationToken::new();
    let t0 = Instant::now();
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|(u, ws)| {
            tokio::spawn(run_user(u, ws, target.clone(), period, shared.clone(), stop_send.clone(), stop_read.clone()))
        })
        .collect();
    tokio::time::sleep(p.warmup).await;
    println!("ready");
    eprintln!("rolling: {} pairs up and sending; waiting for a line on stdin", p.pairs);
    let go = wait_go(p.max_wait).await;
    tokio::time::sleep(p.after).await;
    tokio::time::sleep_until((t0 + p.min_sending).into()).await;
    stop_send.cancel();
    let sending_secs = t0.elapsed().as_secs_f64();
    let drain_start = Instant::now();
    while (shared.received.load(Ordering::Relaxed) < shared.sent.load(Ordering::Relaxed)
        || shared.unacked.load(Ordering::Relaxed) > 0)
        && drain_start.elapsed() < p.drain
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_secs = drain_start.elapsed().as_secs_f64();
    stop_read.cancel();
    let mut users = Vec::with_capacity(tasks.len());
    for t in tasks {
        users.push(t.await?);
    }

    // Per direction: what one user sent against what its peer received.
    let (mut sent, mut received, mut lost) = (0u64, 0u64, 0u64);
    for pair in users.chunks(2) {
        for (from, to) in [(&pair[0], &pair[1]), (&pair[1], &pair[0])] {
            for (k, &s) in from.sent.iter().enumerate() {
                let got = to.got.get(k).copied().unwrap_or(0) > 0;
                sent += u64::from(s);
                received += u64::from(s && got);
                lost += u64::from(s && !got);
            }
        }
    }
    let sum = |f: fn(&User) -> u64| users.iter().map(f).sum::<u64>();
    let unacked: usize = users.iter().map(|u| u.resume.as_ref().map_or(0, |r| r.unacked.len())).sum();
    let max_gap = users.iter().map(|u| u.max_gap).max().unwrap_or_default();
    let mut r = Report::new("rolling", &c.label);
    r.set("protocol", serde_json::to_value(target.protocol)?)
        .set("instances", n)
        .set("pairs", p.pairs)
        .setf("rate_per_user", p.rate, 2)
        .set("size_bytes", p.size)
        .set("resume", p.resume)
        .set("go_received", go)
        .setf("sending_secs", sending_secs, 2)
        .setf("drain_secs", drained_secs, 2)
        .set("sent_total", sent)
        .set("received_total", received)
        .set("lost", lost)
        .set("duplicates", sum(|u| u.duplicates))
        .set("reordered", sum(|u| u.reordered))
        .set("received_unsent", sum(|u| u.got.iter().filter(|&&g| g > 0).count() as u64) - received)
        .set("skipped_while_disconnected", sum(|u| u.skipped))
        .set("send_errors", sum(|u| u.send_errors))
        .set("reconnects", sum(|u| u.reconnects))
        .set("failed_connect_attempts", sum(|u| u.failed_attempts))
        .setf("max_disconnected_ms", max_gap.as_secs_f64() * 1000.0, 1)
        .set("server_errors", sum(|u| u.server_errors));
    if p.resume {
        r.set("resent", sum(|u| u.resent))
            .set("resyncs", sum(|u| u.resyncs))
            .set("resume_next_mismatches", sum(|u| u.next_mismatches))
            .set("unconfirmed_at_end", unacked);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_and_reordering_once_each() {
        let shared = Shared::default();
        let mut u = User::new("a".into(), "b".into(), 0, Protocol::Raw, 100, false);
        for k in [0, 1, 3, 2, 3, 4] {
            u.record(k, &shared);
        }
        assert_eq!(shared.received.load(Ordering::Relaxed), 5);
        assert_eq!((u.duplicates, u.reordered, u.high), (1, 1, 5));
    }

    #[test]
    fn resume_query_names_the_oldest_unconfirmed_frame() {
        let mut u = User::new("a".into(), "b".into(), 0, Protocol::Raw, 100, true);
        assert_eq!(u.resume_query(), "&resume=1");
        let welcome = r#"{"type":"welcome","resume":{"token":"t.k","seq":"5-0","next":1}}"#;
        u.on_welcome(welcome).unwrap();
        assert_eq!(u.resume_query(), "&resume=t.k&after=5-0&next=1");
        let r = u.resume.as_mut().unwrap();
        r.unacked.push_back((4, String::new()));
        r.next = 6;
        assert_eq!(u.resume_query(), "&resume=t.k&after=5-0&next=4");
        u.resume.as_mut().unwrap().unacked.clear();
        assert_eq!(u.resume_query(), "&resume=t.k&after=5-0&next=6");
        assert!(User::new("a".into(), "b".into(), 0, Protocol::Raw, 1, false).resume_query().is_empty());
    }
}
