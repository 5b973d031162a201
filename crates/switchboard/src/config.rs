//! Settings: built-in defaults, then an optional TOML file, then `SWITCHBOARD_*`
//! environment variables. A bad value is one [`ConfigError`] that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Environment variables read by [`Settings::load`], with their defaults, for `--help`.
pub const ENV_HELP: &str = "\
Environment (defaults in brackets; a TOML file given by --config uses the same names in lower case, without the prefix):
  SWITCHBOARD_LISTEN              address to listen on [127.0.0.1:8080]
  SWITCHBOARD_REDIS_URL           redis://host:port/db; unset = in-memory broker, one instance []
  SWITCHBOARD_CHANNEL_PREFIX      start of every Redis channel and key [switchboard]
  SWITCHBOARD_MAX_MESSAGE_BYTES   largest client message, in bytes [65536]
  SWITCHBOARD_LOG_FORMAT          text | json [text]; RUST_LOG filters [info]
  SWITCHBOARD_ICE_SERVERS         JSON array of RTCIceServer objects sent in the welcome [[]]
  SWITCHBOARD_STATIC_DIR          serve the page files from this folder instead of the embedded copy []
  SWITCHBOARD_OUTBOX_MESSAGES     per-session outbound queue, in messages [256]
  SWITCHBOARD_OUTBOX_BYTES        per-session outbound queue, in bytes [1048576]
  SWITCHBOARD_PRESENCE_TTL_SECS   lifetime of a presence key in Redis [15]
  SWITCHBOARD_REDIS_POOL_SIZE     command lanes to Redis, one pooled connection each [4]
  SWITCHBOARD_SHUTDOWN_GRACE_SECS time allowed for sockets to close on shutdown [10]
  SWITCHBOARD_DRAIN_SECS          on SIGTERM: seconds of 503 on /readyz while serving, then the
                                  same span over which sockets close with 1012; 0 = close at once with 1001 [5]
  SWITCHBOARD_MAX_SOCKETS         open WebSockets per instance; more get HTTP 503 [50000]
  SWITCHBOARD_WORKER_THREADS      runtime worker threads; 0 = one per available core [0]
  SWITCHBOARD_HANDSHAKE_TIMEOUT_SECS  time allowed to send the HTTP request head [10]
  SWITCHBOARD_PING_INTERVAL_SECS  server ping interval; 0 disables pings [20]
  SWITCHBOARD_PONG_TIMEOUT_SECS   a socket silent this long after a ping is closed [20]
  SWITCHBOARD_RATE_PER_SEC        client messages per second per socket (token bucket refill) [50]
  SWITCHBOARD_RATE_BURST          token bucket size; more drops than this within 10 s closes with 1008 [200]
  SWITCHBOARD_CONFIG              TOML file to read (same as --config) []
  SWITCHBOARD_AUTH_SECRET         HS256 key (32+ bytes); set = /ws needs a signed token (see `switchboard link`) []
  SWITCHBOARD_ALLOWED_ORIGINS     extra browser origins allowed to open /ws, comma-separated, or * [] = same origin only
  SWITCHBOARD_TURN_SECRET         TURN REST shared secret (coturn static-auth-secret); needs TURN_URLS []
  SWITCHBOARD_TURN_URLS           comma-separated turn:/turns: URLs for the TURN credentials []
  SWITCHBOARD_TURN_TTL_SECS       lifetime of TURN credentials; fresh ones are pushed at 80% [86400]";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The server's settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Redis URL; `None` selects the in-memory broker.
    pub redis_url: Option<String>,
    /// Start of every Redis channel and key.
    pub channel_prefix: String,
    /// Largest client message, in bytes.
    pub max_message_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// JSON array of ICE servers for the welcome.
    pub ice_servers: Box<RawValue>,
    /// Folder to serve page files from instead of the embedded copy.
    pub static_dir: Option<PathBuf>,
    /// Per-session outbound queue length, in messages.
    pub outbox_messages: usize,
    /// Per-session outbound queue size, in bytes.
    pub outbox_bytes: usize,
    /// Presence key lifetime.
    pub presence_ttl: Duration,
    /// Pooled publish connections.
    pub redis_pool_size: usize,
    /// Time allowed for sockets to close on shutdown.
    pub shutdown_grace: Duration,
    /// Paced drain span on SIGTERM; zero closes at once with 1001.
    pub drain: Duration,
    /// Open WebSockets allowed per instance.
    pub max_sockets: usize,
    /// Runtime worker threads; 0 means one per available core.
    pub worker_threads: usize,
    /// Time allowed to send the HTTP request head.
    pub handshake_timeout: Duration,
    /// Server ping interval; zero disables pings.
    pub ping_interval: Duration,
    /// Silence allowed after a ping before the socket is closed.
    pub pong_timeout: Duration,
    /// Client messages per second per socket.
    pub rate_per_sec: u32,
    /// Token bucket size, and the drops per 10 s that close a socket.
    pub rate_burst: u32,
    /// Signed links: `Some` when `SWITCHBOARD_AUTH_SECRET` is set.
    pub auth: Option<crate::auth::LinkSigner>,
    /// Browser origins allowed to open `/ws`.
    pub allowed_origins: crate::origin::AllowedOrigins,
    /// Ephemeral TURN credentials: `Some` when a TURN secret and URLs are set.
    pub turn: Option<crate::turn::Turn>,
}

/// A configuration value that can't be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

#[derive(Debug, Deserialize)]
struct Raw {
    listen: String,
    redis_url: Option<String>,
    channel_prefix: String,
    max_message_bytes: usize,
    log_format: String,
    ice_servers: String,
    static_dir: Option<String>,
    outbox_messages: usize,
    outbox_bytes: usize,
    presence_ttl_secs: u64,
    redis_pool_size: usize,
    shutdown_grace_secs: u64,
    drain_secs: u64,
    max_sockets: usize,
    worker_threads: usize,
    handshake_timeout_secs: u64,
    ping_interval_secs: u64,
    pong_timeout_secs: u64,
    rate_per_sec: u32,
    rate_burst: u32,
    auth_secret: Option<String>,
    allowed_origins: String,
    turn_secret: Option<String>,
    turn_urls: String,
    turn_ttl_secs: u64,
}

fn env_name(key: &str) -> String {
    format!("SWITCHBOARD_{}", key.to_ascii_uppercase())
}

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{} ({key}): {why}", env_name(key)))
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Environment::with_prefix("SWITCHBOARD").prefix_separator("_"))
    }

    /// Loads defaults, then `file`, then the given variables instead of the
    /// process environment (for tests).
    pub fn load_with_env(file: Option<&Path>, vars: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let map = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::load_from(file, Environment::with_prefix("SWITCHBOARD").prefix_separator("_").source(Some(map)))
    }

    fn load_from(file: Option<&Path>, env: Environment) -> Result<Self, ConfigError> {
        let mut builder = Config::builder();
        for (key, value) in [
            ("listen", "127.0.0.1:8080"),
            ("channel_prefix", "switchboard"),
            ("max_message_bytes", "65536"),
            ("log_format", "text"),
            ("ice_servers", "[]"),
            ("outbox_messages", "256"),
            ("outbox_bytes", "1048576"),
            ("presence_ttl_secs", "15"),
            ("redis_pool_size", "4"),
            ("shutdown_grace_secs", "10"),
            ("drain_secs", "5"),
            ("max_sockets", "50000"),
            ("worker_threads", "0"),
            ("handshake_timeout_secs", "10"),
            ("ping_interval_secs", "20"),
            ("pong_timeout_secs", "20"),
            ("rate_per_sec", "50"),
            ("rate_burst", "200"),
            ("allowed_origins", ""),
            ("turn_urls", ""),
            ("turn_ttl_secs", "86400"),
        ] {
            builder = builder.set_default(key, value).map_err(|e| ConfigError(e.to_string()))?;
        }
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let raw: Raw = builder.add_source(env).build().and_then(Config::try_deserialize).map_err(|e| match &e {
            config::ConfigError::Type { key: Some(key), .. } => bad(key, &e),
            _ => ConfigError(e.to_string()),
        })?;
        raw.validate()
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl Raw {
    fn validate(self) -> Result<Settings, ConfigError> {
        let listen = self
            .listen
            .parse()
            .map_err(|e| bad("listen", format!("{:?} is not a socket address: {e}", self.listen)))?;
        let redis_url = non_empty(self.redis_url);
        if let Some(url) = &redis_url {
            redis::parse_redis_url(url).ok_or_else(|| bad("redis_url", format!("{url:?} is not a redis:// URL")))?;
        }
        if self.channel_prefix.is_empty()
            || self.channel_prefix.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("channel_prefix", "must be non-empty, without spaces"));
        }
        if !(1..=16 << 20).contains(&self.max_message_bytes) {
            return Err(bad("max_message_bytes", "must be between 1 and 16777216"));
        }
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(bad("log_format", format!("{other:?} is not text or json"))),
        };
        let ice_servers = RawValue::from_string(self.ice_servers.trim().to_owned())
            .ok()
            .filter(|v| v.get().starts_with('['))
            .ok_or_else(|| bad("ice_servers", "must be a JSON array of RTCIceServer objects"))?;
        if self.outbox_messages == 0 || self.outbox_bytes < self.max_message_bytes {
            return Err(bad("outbox_bytes", "queues must hold at least one message of the largest size"));
        }
        if self.presence_ttl_secs < 3 {
            return Err(bad("presence_ttl_secs", "must be at least 3"));
        }
        if self.redis_pool_size == 0 {
            return Err(bad("redis_pool_size", "must be at least 1"));
        }
        if self.max_sockets == 0 {
            return Err(bad("max_sockets", "must be at least 1"));
        }
        if self.handshake_timeout_secs == 0 {
            return Err(bad("handshake_timeout_secs", "must be at least 1"));
        }
        if self.ping_interval_secs > 0 && self.pong_timeout_secs == 0 {
            return Err(bad("pong_timeout_secs", "must be at least 1 while pings are on"));
        }
        if self.rate_per_sec == 0 || self.rate_burst == 0 {
            return Err(bad("rate_per_sec", "rate and burst must be at least 1"));
        }
        let auth = match non_empty(self.auth_secret) {
            Some(secret) if secret.len() < crate::auth::MIN_SECRET_BYTES => {
                return Err(bad("auth_secret", "must be at least 32 bytes, e.g. the output of `openssl rand -hex 32`"))
            }
            Some(secret) => Some(crate::auth::LinkSigner::new(&crate::auth::Secret::new(&secret))),
            None => None,
        };
        let allowed_origins =
            crate::origin::AllowedOrigins::parse(&self.allowed_origins).map_err(|why| bad("allowed_origins", why))?;
        let turn_urls: Vec<String> =
            self.turn_urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        if let Some(url) = turn_urls.iter().find(|u| !crate::turn::valid_url(u)) {
            return Err(bad("turn_urls", format!("{url:?} is not a turn: or turns: URL")));
        }
        if !(2..=30 * 86400).contains(&self.turn_ttl_secs) {
            return Err(bad("turn_ttl_secs", "must be between 2 and 2592000"));
        }
        let turn = match (non_empty(self.turn_secret), turn_urls.is_empty()) {
            (Some(secret), false) => Some(crate::turn::Turn {
                secret: crate::auth::Secret::new(&secret),
                urls: turn_urls,
                ttl: Duration::from_secs(self.turn_ttl_secs),
            }),
            (None, true) => None,
            (Some(_), true) => {
                return Err(bad("turn_urls", "must list the TURN servers when SWITCHBOARD_TURN_SECRET is set"))
            }
            (None, false) => return Err(bad("turn_secret", "must be set when SWITCHBOARD_TURN_URLS is given")),
        };
        Ok(Settings {
            listen,
            redis_url,
            channel_prefix: self.channel_prefix,
            max_message_bytes: self.max_message_bytes,
            log_format,
            ice_servers,
            static_dir: non_empty(self.static_dir).map(PathBuf::from),
            outbox_messages: self.outbox_messages,
            outbox_bytes: self.outbox_bytes,
            presence_ttl: Duration::from_secs(self.presence_ttl_secs),
            redis_pool_size: self.redis_pool_size,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            drain: Duration::from_secs(self.drain_secs),
            max_sockets: self.max_sockets,
            worker_threads: self.worker_threads,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            ping_interval: Duration::from_secs(self.ping_interval_secs),
            pong_timeout: Duration::from_secs(self.pong_timeout_secs),
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            auth,
            allowed_origins,
            turn,
        })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::load_with_env(None, &[]).expect("the built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.redis_url, None);
        assert_eq!(s.channel_prefix, "switchboard");
        assert_eq!(s.max_message_bytes, 65536);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.ice_servers.get(), "[]");
        assert!(s.auth.is_none() && s.turn.is_none());
        assert_eq!(s.allowed_origins, crate::origin::AllowedOrigins::default());
        assert_eq!(s.worker_threads, 0, "one per core");
        let s = Settings::load_with_env(None, &[("SWITCHBOARD_WORKER_THREADS", "1")]).unwrap();
        assert_eq!(s.worker_threads, 1);
    }

    #[test]
    fn security_settings() {
        let key = "k".repeat(32);
        let s = Settings::load_with_env(
            None,
            &[
                ("SWITCHBOARD_AUTH_SECRET", &key),
                ("SWITCHBOARD_ALLOWED_ORIGINS", "https://app.example.com, http://localhost:3000"),
                ("SWITCHBOARD_TURN_SECRET", "north"),
                ("SWITCHBOARD_TURN_URLS", "turn:t.example:3478, turns:t.example:5349"),
                ("SWITCHBOARD_TURN_TTL_SECS", "600"),
            ],
        )
        .unwrap();
        assert!(s.auth.is_some());
        assert_eq!(s.allowed_origins.listed(), ["https://app.example.com", "http://localhost:3000"]);
        let turn = s.turn.as_ref().unwrap();
        assert_eq!(turn.urls, ["turn:t.example:3478", "turns:t.example:5349"]);
        assert_eq!(turn.ttl, Duration::from_secs(600));
        let printed = format!("{s:?}");
        assert!(!printed.contains(&key) && !printed.contains("north"), "{printed}");
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switchboard.toml");
        std::fs::write(&file, "listen = \"0.0.0.0:9000\"\nchannel_prefix = \"fromfile\"\nmax_message_bytes = 1000\n")
            .unwrap();
        let s = Settings::load_with_env(Some(&file), &[("SWITCHBOARD_CHANNEL_PREFIX", "fromenv")]).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(s.channel_prefix, "fromenv");
        assert_eq!(s.max_message_bytes, 1000);
        let s = Settings::load_with_env(
            None,
            &[("SWITCHBOARD_REDIS_URL", "redis://127.0.0.1:7000"), ("SWITCHBOARD_LOG_FORMAT", "json")],
        )
        .unwrap();
        assert_eq!(s.redis_url.as_deref(), Some("redis://127.0.0.1:7000"));
        assert_eq!(s.log_format, LogFormat::Json);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("SWITCHBOARD_LISTEN", "nowhere"),
            ("SWITCHBOARD_REDIS_URL", "http://x"),
            ("SWITCHBOARD_MAX_MESSAGE_BYTES", "lots"),
            ("SWITCHBOARD_MAX_MESSAGE_BYTES", "0"),
            ("SWITCHBOARD_LOG_FORMAT", "xml"),
            ("SWITCHBOARD_ICE_SERVERS", "{\"urls\":1}"),
            ("SWITCHBOARD_CHANNEL_PREFIX", "a b"),
            ("SWITCHBOARD_AUTH_SECRET", "too short"),
            ("SWITCHBOARD_ALLOWED_ORIGINS", "https://x/path"),
            ("SWITCHBOARD_TURN_URLS", "stun:x"),
            ("SWITCHBOARD_TURN_URLS", "turn:x"),
            ("SWITCHBOARD_TURN_SECRET", "s3cret"),
            ("SWITCHBOARD_TURN_TTL_SECS", "1"),
        ] {
            let err = Settings::load_with_env(None, &[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
