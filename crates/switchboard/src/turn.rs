//! Ephemeral TURN credentials in the coturn REST scheme.
//!
//! With `SWITCHBOARD_TURN_SECRET` and `SWITCHBOARD_TURN_URLS` set, every
//! session's `iceServers` (the welcome's, and later `ice-servers` events) holds,
//! after the servers of `SWITCHBOARD_ICE_SERVERS`, one more entry:
//!
//! ```json
//! {"urls":["turn:turn.example.com:3478"],"username":"1700000000:alice","credential":"base64(HMAC-SHA1(secret, username))"}
//! ```
//!
//! The username is `expiry-unix-time:userID`; a TURN server configured with the
//! same secret (coturn: `use-auth-secret`, `static-auth-secret`) accepts it
//! until that time. Before the credentials expire, at 80% of
//! `SWITCHBOARD_TURN_TTL_SECS`, the session pushes fresh ones as
//! `{"type":"ice-servers","iceServers":[...]}`, so long calls can still relay
//! after an ICE restart.

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::value::RawValue;
use sha1::Sha1;

use crate::auth::{unix_secs, Secret};
use crate::pair::UserId;

/// TURN settings: the shared secret, the server URLs and the credentials' lifetime.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Secret shared with the TURN server.
    pub secret: Secret,
    /// `turn:` / `turns:` URLs.
    pub urls: Vec<String>,
    /// How long credentials are valid.
    pub ttl: Duration,
}

/// One RTCIceServer with a REST credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurnServer {
    /// The TURN URLs.
    pub urls: Vec<String>,
    /// `expiry-unix-time:userID`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub credential: String,
}

/// Checks one entry of `SWITCHBOARD_TURN_URLS`.
pub fn valid_url(url: &str) -> bool {
    let rest = url.strip_prefix("turn:").or_else(|| url.strip_prefix("turns:"));
    rest.is_some_and(|r| !r.is_empty() && !r.chars().any(|c| c.is_whitespace() || c.is_control()))
}

/// `base64(HMAC-SHA1(secret, username))`.
pub fn credential(secret: &Secret, username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.expose()).expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl Turn {
    /// Credentials for `user`, issued at `now`.
    pub fn server_for(&self, user: &UserId, now: SystemTime) -> TurnServer {
        let username = format!("{}:{user}", unix_secs(now + self.ttl));
        TurnServer { urls: self.urls.clone(), credential: credential(&self.secret, &username), username }
    }

    /// How often a session pushes fresh credentials: at 80% of their lifetime.
    pub fn refresh_every(&self) -> Duration {
        (self.ttl * 4 / 5).max(Duration::from_millis(500))
    }
}

/// What a session's `iceServers` hold: the configured servers
/// (`SWITCHBOARD_ICE_SERVERS`), and TURN credentials when TURN is on.
#[derive(Debug, Clone)]
pub struct IceServers {
    /// JSON array of RTCIceServer objects, as configured.
    pub configured: Box<RawValue>,
    /// Ephemeral TURN credentials: `Some` when a TURN secret and URLs are set.
    pub turn: Option<Turn>,
}

impl IceServers {
    /// The `iceServers` for `user`: the configured ones, plus fresh TURN credentials if TURN is on.
    pub fn for_user(&self, user: &UserId) -> Box<RawValue> {
        let Some(turn) = &self.turn else {
            return self.configured.clone();
        };
        // The setting was checked to be a JSON array when it was loaded.
        let mut servers: Vec<Box<RawValue>> = serde_json::from_str(self.configured.get()).unwrap_or_default();
        if let Ok(entry) = serde_json::value::to_raw_value(&turn.server_for(user, SystemTime::now())) {
            servers.push(entry);
        }
        serde_json::value::to_raw_value(&servers).unwrap_or_else(|_| self.configured.clone())
    }

    /// How often a session pushes fresh credentials; `None` without TURN.
    pub fn refresh_every(&self) -> Option<Duration> {
        self.turn.as_ref().map(Turn::refresh_every)
    }
}

/// A session's timer for pushing fresh credentials; never fires without TURN.
#[derive(Debug)]
pub struct Refresh {
    /// Boxed: without TURN, a session holds just the empty pointer.
    timer: Option<Box<tokio::time::Interval>>,
}

impl Refresh {
    /// A timer firing every `every` (see [`IceServers::refresh_every`]), first
    /// one period from now; `None` never fires.
    pub fn new(every: Option<Duration>) -> Self {
        let timer = every.map(|every| {
            let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            Box::new(timer)
        });
        Self { timer }
    }

    /// Ready when fresh credentials are due; never without TURN.
    pub fn poll_due(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match &mut self.timer {
            Some(timer) => timer.poll_tick(cx).map(|_| ()),
            None => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coturn_rest_credential() {
        // The HMAC-SHA1 example of RFC 2104's Wikipedia page, and a value from Python's hmac module:
        // base64(hmac.new(b"north", b"1700000000:alice", hashlib.sha1).digest()).
        assert_eq!(
            credential(&Secret::new("key"), "The quick brown fox jumps over the lazy dog"),
            "3nybhbi3iqa8ino29wqQcBydtNk="
        );
        let secret = Secret::new("north");
        assert_eq!(credential(&secret, "1700000000:alice"), "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        let turn = Turn { secret, urls: vec!["turn:t.example:3478".into()], ttl: Duration::from_secs(600) };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_699_999_400);
        let s = turn.server_for(&UserId::parse("alice").unwrap(), now);
        assert_eq!(s.username, "1700000000:alice");
        assert_eq!(s.credential, "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        assert_eq!(turn.refresh_every(), Duration::from_secs(480));
    }

    #[test]
    fn urls() {
        for ok in ["turn:t.example:3478", "turns:t.example:5349?transport=tcp", "turn:[::1]:3478"] {
            assert!(valid_url(ok), "{ok}");
        }
        for bad in ["", "turn:", "stun:t.example", "https://t.example", "turn:a b", "TURN:x"] {
            assert!(!valid_url(bad), "{bad}");
        }
    }

    #[test]
    fn ice_servers_add_turn_credentials_for_the_user() {
        let configured = RawValue::from_string(r#"[{"urls":"stun:s.example"}]"#.into()).unwrap();
        let alice = UserId::parse("alice").unwrap();
        let plain = IceServers { configured: configured.clone(), turn: None };
        assert_eq!(plain.for_user(&alice).get(), configured.get());
        assert_eq!(plain.refresh_every(), None);
        let turn =
            Turn { secret: Secret::new("north"), urls: vec!["turn:t.example".into()], ttl: Duration::from_secs(600) };
        let with_turn = IceServers { configured, turn: Some(turn) };
        let servers: serde_json::Value = serde_json::from_str(with_turn.for_user(&alice).get()).unwrap();
        assert_eq!(servers[0]["urls"], "stun:s.example");
        assert_eq!(servers[1]["urls"][0], "turn:t.example");
        assert!(servers[1]["username"].as_str().unwrap().ends_with(":alice"));
        assert_eq!(with_turn.refresh_every(), Some(Duration::from_secs(480)));
    }

    #[test]
    fn turn_takes_what_it_reads_not_the_settings_nor_the_session() {
        // Settings build an `IceServers`; the session pushes the event. This
        // module stays below both.
        let source = include_str!("turn.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        for module in ["config", "session", "protocol"] {
            assert!(!code.contains(&format!("crate::{module}")), "turn.rs uses crate::{module}");
        }
    }
}
