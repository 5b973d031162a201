//! A client that resumes as `switchboard.js` does (docs/protocol.md,
//! "Resuming"), for the tests of issue #14: it numbers what it sends, keeps
//! each message until an `ack` covers it, and after any lost connection
//! comes back (to the next of its URLs) with its token, its last `seq` and
//! the number of its oldest unconfirmed message, then resends what has no
//! `ack`. Every message it sends is `{"type":"n","n":k,…}`, and it records
//! the peer's `k`s in the order they arrive, so a test can assert zero loss,
//! zero duplicates and zero reordering.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard::auth::{ResumeKey, Secret};
use switchboard::config::Settings;
use tokio::sync::watch;

use crate::{Client, DEADLINE};

/// How far a side may run ahead of what its peer has received, and of what
/// it has received itself. The history (64 entries) holds both directions, so
/// both bounds count: when a side's client stops reading at its peer's
/// message `g`, the peer has sent fewer than `g + WINDOW` (the first bound),
/// and the side itself more than `g - WINDOW` then (its peer, having sent
/// `g`, can't have sent a window more than it got from the side) and fewer than `g + WINDOW` since (the
/// second bound). Fewer than `3 × WINDOW` entries, plus a join per resume,
/// follow its `seq`: well inside the history, so no cut or restart outruns
/// it. (With the first bound alone, a side that sends while its reading
/// lags filled the history with its own messages, and its resume got a
/// correct `resync`, about once in seven runs.)
pub const WINDOW: usize = 16;

/// The resume secret every instance of a test shares.
pub const SECRET: &str = "a resume secret for tests, 32+ bytes long";

/// Turns resume on (30 s, with [`SECRET`]) in `s`, with a rate limit no
/// sender reaches: the tests' sides send as fast as they may.
pub fn resume_on(s: &mut Settings) {
    s.resume = Duration::from_secs(30);
    s.resume_key = Some(ResumeKey::new(&Secret::new(SECRET)));
    s.rate_per_sec = 100_000;
    s.rate_burst = 100_000;
}

/// The instances a side may connect to, as a load balancer knows them.
pub type Urls = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`Urls`] of a fixed list.
pub fn urls(list: Vec<String>) -> Urls {
    std::sync::Arc::new(std::sync::Mutex::new(list))
}

/// One side of a pair that resumes.
pub struct Side {
    user: String,
    peer: String,
    /// `/ws` URLs to connect to, taken in turn at each reconnect (shared, so
    /// that a test can change them, as a load balancer's list changes).
    urls: Urls,
    at: usize,
    token: String,
    seq: String,
    /// The number the next new message takes.
    next: u64,
    /// Sent and not confirmed yet: number and text.
    unacked: VecDeque<(u64, String)>,
    /// The peer's `k`s, in arrival order.
    pub got: Vec<u64>,
    /// `resync` events seen.
    pub resyncs: usize,
    /// Error events seen.
    pub errors: Vec<Value>,
    /// Connections lost and resumed.
    pub resumed: usize,
    /// Messages resent after a resume.
    pub resent: usize,
}

impl Side {
    /// Connects `user` (to `peer`) with `resume=1` to the first of `urls`
    /// (`ws://host:port/ws`), and reads the welcome.
    pub async fn connect(user: &str, peer: &str, urls: Urls) -> (Self, Client) {
        let first = urls.lock().unwrap()[0].clone();
        let url = format!("{first}?userID={user}&peerID={peer}&resume=1");
        let mut client = Client::connect(&url).await.expect("upgrade");
        let welcome = client.recv_json().await;
        let (token, seq, next) = resume_of(&welcome);
        assert_eq!(next, 1, "a fresh session numbers from 1: {welcome}");
        let side = Self {
            user: user.into(),
            peer: peer.into(),
            urls,
            at: 0,
            token,
            seq,
            next,
            unacked: VecDeque::new(),
            got: Vec::new(),
            resyncs: 0,
            errors: Vec::new(),
            resumed: 0,
            resent: 0,
        };
        (side, client)
    }

    /// Sends the app's message `k` (numbered, kept until confirmed). A send
    /// on a dead socket is not an error: the message waits for the resume.
    pub async fn send(&mut self, client: &mut Client, k: u64) {
        let text = self.number(k);
        let _ = client.try_send(text).await;
    }

    /// Numbers the app's message `k` and keeps it until confirmed; returns
    /// its text, to send now or (while the side is down) at the resume.
    fn number(&mut self, k: u64) -> String {
        let text = json!({"type": "n", "n": k, "pad": "x".repeat(200)}).to_string();
        self.unacked.push_back((self.next, text.clone()));
        self.next += 1;
        text
    }

    /// Handles one event from the server.
    pub fn on_event(&mut self, event: Value, seen: &watch::Sender<usize>) {
        match event["type"].as_str() {
            Some("relay") => {
                if let Some(seq) = event["seq"].as_str() {
                    self.seq = seq.to_owned();
                }
                let k = event["data"]["n"].as_u64().unwrap_or_else(|| panic!("a numbered message: {event}"));
                self.got.push(k);
                seen.send_replace(self.got.len());
            }
            Some("ack") => {
                let n = event["n"].as_u64().unwrap_or_else(|| panic!("an ack with n: {event}"));
                while self.unacked.front().is_some_and(|&(m, _)| m <= n) {
                    self.unacked.pop_front();
                }
            }
            Some("resync") => self.resyncs += 1,
            Some("error") => self.errors.push(event),
            Some("peer-joined" | "peer-left" | "ice-servers") => {}
            _ => panic!("{}: unexpected event {event}", self.user),
        }
    }

    /// Whether every message sent so far was confirmed.
    pub fn all_confirmed(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Comes back on the next URL (retrying while instances restart),
    /// checks that the server counts on from the oldest unconfirmed
    /// message, and resends everything unconfirmed.
    pub async fn resume(&mut self) -> Client {
        let first = self.unacked.front().map_or(self.next, |&(n, _)| n);
        let started = tokio::time::Instant::now();
        let (mut client, welcome) = loop {
            let base = {
                let urls = self.urls.lock().unwrap();
                self.at = (self.at + 1) % urls.len();
                urls[self.at].clone()
            };
            let url = format!(
                "{base}?userID={}&peerID={}&resume={}&after={}&next={first}",
                self.user, self.peer, self.token, self.seq
            );
            if let Ok(mut client) = Client::connect(&url).await {
                if let Ok(welcome) = client.try_recv_json().await {
                    break (client, welcome);
                }
            }
            // An instance restarting, or all of them between two restarts.
            assert!(started.elapsed() < DEADLINE, "{}: no instance took the resume", self.user);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let (token, seq, next) = resume_of(&welcome);
        assert_eq!(next, first, "the server counts on from the oldest unconfirmed message: {welcome}");
        (self.token, self.seq) = (token, seq);
        self.resumed += 1;
        for (_, text) in &self.unacked {
            self.resent += 1;
            let _ = client.try_send(text.clone()).await;
        }
        client
    }
}

/// The welcome's `resume`: token, `seq` and `next`.
pub fn resume_of(welcome: &Value) -> (String, String, u64) {
    let resume = &welcome["resume"];
    let token = resume["token"].as_str().unwrap_or_else(|| panic!("a resume token: {welcome}"));
    let seq = resume["seq"].as_str().unwrap_or_else(|| panic!("a resume seq: {welcome}"));
    let next = resume["next"].as_u64().unwrap_or_else(|| panic!("a resume next: {welcome}"));
    (token.to_owned(), seq.to_owned(), next)
}

/// When a side cuts its own connection (a TCP reset), if at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    /// Reset the socket after this many messages were sent.
    pub cut_after: Option<usize>,
    /// Send at most one message per this long: traffic that lasts through
    /// a slow fault (a rolling restart).
    pub pace: Option<Duration>,
}

/// Runs one side: sends `total` messages (`k` = 1..=`total`), at most
/// [`WINDOW`] ahead of what the peer has received (`peer_seen`) and of what
/// it has received itself, until every
/// one is confirmed and the peer's `total` arrived. Any lost connection is
/// resumed; `plan` may cut one on purpose.
pub async fn run(
    mut side: Side,
    mut client: Client,
    total: usize,
    mut peer_seen: watch::Receiver<usize>,
    seen: watch::Sender<usize>,
    plan: Plan,
) -> Side {
    let mut sent = 0;
    let mut pace = plan.pace.map(tokio::time::interval);
    loop {
        if sent == total && side.got.len() >= total && side.all_confirmed() {
            return side;
        }
        let may_send = sent < total && sent < side.got.len() + WINDOW;
        // What woke the side: an event (or the connection's end), or room to send.
        let event = tokio::select! {
            event = client.try_recv_json() => Some(event),
            ready = async {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                peer_seen.wait_for(|&peer| sent < peer + WINDOW).await.map(drop)
            }, if may_send => {
                ready.expect("the peer's side runs");
                None
            }
        };
        match event {
            Some(Ok(event)) => side.on_event(event, &seen),
            Some(Err(_closed)) => client = side.resume().await,
            None => {
                sent += 1;
                side.send(&mut client, sent as u64).await;
                if plan.cut_after == Some(sent) {
                    client.reset_connection();
                    client = side.resume().await;
                }
            }
        }
    }
}

/// Runs both sides at once (each on its own task) until each has sent
/// `total` messages, had them confirmed, and received the other's; returns
/// both sides.
pub async fn exchange(alice: (Side, Client), bob: (Side, Client), total: usize, plans: [Plan; 2]) -> (Side, Side) {
    exchange_with(alice, bob, total, plans, 0, async {}).await
}

/// [`exchange`], with `fault` run once each side has received `at` of the
/// other's messages (a replica killed, say): traffic goes on meanwhile.
pub async fn exchange_with(
    alice: (Side, Client),
    bob: (Side, Client),
    total: usize,
    plans: [Plan; 2],
    at: usize,
    fault: impl std::future::Future<Output = ()>,
) -> (Side, Side) {
    let (a_seen, a_seen_rx) = watch::channel(0);
    let (b_seen, b_seen_rx) = watch::channel(0);
    let (mut a_count, mut b_count) = (a_seen_rx.clone(), b_seen_rx.clone());
    let a = tokio::spawn(run(alice.0, alice.1, total, b_seen_rx, a_seen, plans[0]));
    let b = tokio::spawn(run(bob.0, bob.1, total, a_seen_rx, b_seen, plans[1]));
    for count in [&mut a_count, &mut b_count] {
        tokio::time::timeout(DEADLINE, count.wait_for(|&n| n >= at))
            .await
            .expect("messages flow before the fault")
            .expect("both sides run");
    }
    fault.await;
    let deadline = DEADLINE * 3;
    let a = tokio::time::timeout(deadline, a).await.expect("alice's side finishes").expect("alice's side");
    let b = tokio::time::timeout(deadline, b).await.expect("bob's side finishes").expect("bob's side");
    (a, b)
}

/// Asserts that `side` got `1..=total` exactly once each, in order.
pub fn assert_exactly_once_in_order(side: &Side, total: usize) {
    let expected: Vec<u64> = (1..=total as u64).collect();
    if side.got != expected {
        let dups = side.got.len() as i64 - total as i64;
        let first_bad = side.got.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "{} got {} messages for {total} ({dups:+}), first out of place at {first_bad:?}: {:?}",
            side.user,
            side.got.len(),
            &side.got[first_bad.unwrap_or(0).saturating_sub(3)..side.got.len().min(first_bad.unwrap_or(0) + 5)]
        );
    }
}

/// A side driven one step at a time (a property test's schedule), its
/// connection up or down. What it sends while down waits in its `unacked`,
/// as `switchboard.js` queues it, and goes out at the next resume.
pub struct Driven {
    /// The side.
    pub side: Side,
    /// The connection, while up.
    client: Option<Client>,
    /// Messages sent so far: `k` = 1..=`sent`.
    pub sent: usize,
    /// Connections that ended without a step cutting or closing them (the
    /// side comes back at its next resume).
    pub dropped: usize,
    seen: watch::Sender<usize>,
}

impl Driven {
    /// A side just connected, with its connection.
    pub fn new((side, client): (Side, Client)) -> Self {
        Self { side, client: Some(client), sent: 0, dropped: 0, seen: watch::Sender::new(0) }
    }

    /// Sends its next `count` messages (queues them, while down).
    pub async fn send(&mut self, count: usize) {
        for _ in 0..count {
            self.sent += 1;
            let text = self.side.number(self.sent as u64);
            if let Some(client) = &mut self.client {
                let _ = client.try_send(text).await;
            }
        }
    }

    /// Resets its connection (a TCP reset), if up; it stays down.
    pub fn cut(&mut self) {
        if let Some(client) = self.client.take() {
            client.reset_connection();
        }
    }

    /// Closes its connection normally, if up; it stays down.
    pub async fn close(&mut self) {
        if let Some(client) = self.client.take() {
            client.close().await;
        }
    }

    /// Comes back (resending what has no `ack`), if down.
    pub async fn resume(&mut self) {
        if self.client.is_none() {
            self.client = Some(self.side.resume().await);
        }
    }

    /// Handles what arrives, until nothing has for `quiet` (or the
    /// connection ended, which leaves the side down).
    pub async fn read(&mut self, quiet: Duration) {
        while let Some(client) = &mut self.client {
            match tokio::time::timeout(quiet, client.try_recv_json()).await {
                Err(_quiet) => return,
                Ok(Ok(event)) => self.side.on_event(event, &self.seen),
                Ok(Err(_closed)) => {
                    self.client = None;
                    self.dropped += 1;
                }
            }
        }
    }

    /// Comes back if down, then reads until `from_peer` of the peer's
    /// messages arrived and all of its own were confirmed (coming back
    /// after any lost connection), failing after half of [`DEADLINE`] (so
    /// before a read's own deadline, with what the side has).
    pub async fn settle(&mut self, from_peer: usize) {
        let within = DEADLINE / 2;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.resume().await;
            if self.side.got.len() >= from_peer && self.side.all_confirmed() {
                return;
            }
            let client = self.client.as_mut().expect("up after a resume");
            match tokio::time::timeout_at(deadline, client.try_recv_json()).await {
                Ok(Ok(event)) => self.side.on_event(event, &self.seen),
                Ok(Err(_closed)) => {
                    self.client = None;
                    self.dropped += 1;
                }
                Err(_) => panic!(
                    "{}: after {within:?}, {} of the peer's {from_peer} messages ({:?}), {} of its own {} unconfirmed",
                    self.side.user,
                    self.side.got.len(),
                    self.side.got,
                    self.side.unacked.len(),
                    self.sent
                ),
            }
        }
    }
}
