//! Settings: built-in defaults, then an optional TOML file, then `SWITCHBOARD_*`
//! environment variables. A bad value is one [`ConfigError`] that names where
//! it came from.
//!
//! [`SETTINGS`] is the one list of keys, defaults and help texts: the defaults
//! are loaded from it, `--help` prints it, unknown keys are checked against it,
//! and a test compares it with README.md's table.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Source, Value};
use serde_json::value::RawValue;

use crate::turn::{IceServers, Turn};

/// How a setting's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text, checked by the code that uses it.
    Text,
    /// A whole number from `min` to `max`. Every one has an upper bound: an
    /// unbounded drain, thread count or TTL is a mistake, not a setting.
    Whole {
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
}

/// One setting: its key, default and help text.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key in a TOML file; the environment variable is `SWITCHBOARD_` and the key in upper case.
    pub key: &'static str,
    /// The built-in default; `None` is unset.
    pub default: Option<&'static str>,
    /// How the value is read.
    pub kind: Kind,
    /// One line for `--help`.
    pub help: &'static str,
}

const fn text(key: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
    Setting { key, default, kind: Kind::Text, help }
}

const fn whole(key: &'static str, default: &'static str, min: u64, max: u64, help: &'static str) -> Setting {
    Setting { key, default: Some(default), kind: Kind::Whole { min, max }, help }
}

/// Every setting. Adding a row here makes the key known to the file check, the
/// environment check and `--help`; README.md's table must list it too.
pub const SETTINGS: &[Setting] = &[
    text("listen", Some("127.0.0.1:8080"), "address to listen on; port 0 picks a free port"),
    text(
        "metrics_listen",
        None,
        "serve /metrics on this address only, e.g. 127.0.0.1:9090, and 404 on LISTEN; unset = /metrics on LISTEN",
    ),
    text(
        "public_url",
        None,
        "where users reach the server, e.g. https://call.example.com: the start of `switchboard link` URLs \
         and of the \"open\" line at start, and the origin /ws accepts; unset = http:// and the listen address",
    ),
    text(
        "redis_url",
        None,
        "redis:// or rediss:// URL (user:password@ for ACL users); in sentinel and cluster modes a \
         comma-separated list (the Sentinels, or seed nodes); unset = in-memory broker, one instance only",
    ),
    text("redis_mode", Some("standalone"), "standalone | sentinel | cluster"),
    text("redis_sentinel_master", None, "sentinel mode: the name of the Sentinels' master set"),
    text(
        "redis_master_username",
        None,
        "sentinel mode: ACL user for the master and replicas (the URLs' user:password@ is then the Sentinels' \
         login only); needs REDIS_MASTER_PASSWORD",
    ),
    text(
        "redis_master_password",
        None,
        "sentinel mode: password for the master and replicas (of REDIS_MASTER_USERNAME, or of the default user); \
         unset = the Sentinel URL's login is used for the master too",
    ),
    text("redis_ca_file", None, "PEM file of the CA that signed Redis's TLS certificate; unset = the system's roots"),
    text("channel_prefix", Some("switchboard"), "start of every Redis channel and key"),
    whole("max_message_bytes", "65536", 1, 16 << 20, "largest client message, in bytes"),
    text("log_format", Some("text"), "text | json"),
    text("ice_servers", Some("[]"), "JSON array of RTCIceServer objects sent in the welcome"),
    text("static_dir", None, "serve the page files from this folder instead of the embedded copy"),
    whole("outbox_messages", "256", 1, 65536, "per-session outbound queue, in messages"),
    whole("outbox_bytes", "1048576", 1, 256 << 20, "per-session outbound queue, in bytes"),
    whole("presence_ttl_secs", "15", 3, 3600, "lifetime of a presence key in Redis"),
    whole("redis_pool_size", "4", 1, 64, "command lanes to Redis, one connection each"),
    whole("shutdown_grace_secs", "10", 0, 3600, "time allowed for sockets to close on shutdown"),
    whole(
        "drain_secs",
        "5",
        0,
        3600,
        "on SIGTERM: seconds of 503 on /readyz while serving, then the same span over which sockets close \
         with 1012; 0 = close at once with 1001",
    ),
    whole("max_sockets", "50000", 1, 1_000_000, "open WebSockets per instance; more get HTTP 503"),
    whole("worker_threads", "0", 0, 256, "runtime worker threads; 0 = one per available core"),
    whole(
        "max_http_connections",
        "1024",
        1,
        65536,
        "connections still sending an HTTP request or idle between requests (not WebSockets); more get 503",
    ),
    whole("handshake_timeout_secs", "10", 1, 300, "time allowed to send the HTTP request head"),
    whole("max_request_head_bytes", "16384", 8192, 262_144, "largest HTTP request head; larger ones get 431"),
    whole("frame_timeout_secs", "5", 1, 300, "time a WebSocket frame may take from its first byte to its last"),
    whole("ping_interval_secs", "20", 0, 3600, "server ping interval; 0 disables pings"),
    whole("pong_timeout_secs", "20", 0, 3600, "a socket silent this long after a ping is closed"),
    whole("rate_per_sec", "50", 1, 100_000, "client messages per second per socket (token bucket refill)"),
    whole("rate_burst", "200", 1, 1_000_000, "token bucket size; more drops than this within 10 s closes with 1008"),
    text("auth_secret", None, "HS256 key (32+ bytes); set = /ws needs a signed token (see `switchboard link`)"),
    whole(
        "resume_secs",
        "30",
        0,
        3600,
        "how long a pair's last 64 relayed messages are kept for clients that reconnect with `resume` \
         (docs/protocol.md); 0 = off: no history, no resume",
    ),
    text(
        "resume_secret",
        None,
        "key (32+ bytes, the same on every replica) of resume tokens; unset = AUTH_SECRET's, or else a random \
         one: kept in Redis for all replicas to share, or in the process with the in-memory broker",
    ),
    text(
        "allowed_origins",
        None,
        "extra browser origins allowed to open /ws, comma-separated, or *; unset = same origin only",
    ),
    text("turn_secret", None, "TURN REST shared secret (coturn static-auth-secret); needs TURN_URLS"),
    text("turn_urls", None, "comma-separated turn:/turns: URLs for the TURN credentials"),
    whole("turn_ttl_secs", "86400", 2, 30 * 86400, "lifetime of TURN credentials; fresh ones are pushed at 80%"),
];

/// The environment variables' prefix.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// Variables with the prefix that are not settings.
const OTHER_VARS: &[&str] = &["SWITCHBOARD_CONFIG"];

/// The row of `key`.
pub fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// `SWITCHBOARD_` and `key` in upper case.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// The candidate closest to `name`, if any is close enough to be a likely misspelling.
fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn did_you_mean(nearest: Option<impl std::fmt::Display>) -> String {
    match nearest {
        Some(name) => format!("did you mean {name}?"),
        None => "`switchboard --help` lists them".to_owned(),
    }
}

/// Warnings for `SWITCHBOARD_*` variables among `vars` that are no setting:
/// one line each, with the nearest valid name.
pub fn unknown_env_vars<K: AsRef<str>>(vars: impl IntoIterator<Item = K>) -> Vec<String> {
    // Names without the prefix, which every one shares (and which would make them all look alike).
    let known: Vec<String> = SETTINGS
        .iter()
        .map(|s| s.key.to_ascii_uppercase())
        .chain(OTHER_VARS.iter().map(|v| v[ENV_PREFIX.len()..].to_owned()))
        .collect();
    vars.into_iter()
        .filter_map(|var| {
            let var = var.as_ref();
            let upper = var.to_ascii_uppercase();
            let name = upper.strip_prefix(ENV_PREFIX)?;
            if known.iter().any(|k| k == name) {
                return None;
            }
            let hint =
                did_you_mean(nearest(name, known.iter().map(String::as_str)).map(|k| format!("{ENV_PREFIX}{k}")));
            Some(format!("unknown variable {var} is ignored; {hint}"))
        })
        .collect()
}

/// Width of `--help`'s settings list.
const HELP_WIDTH: usize = 100;

/// Appends `words` to `out`, wrapping at [`HELP_WIDTH`] to lines indented by
/// `indent`; `out`'s last line is at `column`. A word never breaks.
fn wrap<'a>(out: &mut String, words: impl IntoIterator<Item = &'a str>, indent: usize, mut column: usize) {
    for (i, word) in words.into_iter().enumerate() {
        if i > 0 && column + 1 + word.len() > HELP_WIDTH {
            let _ = write!(out, "\n{:indent$}", "");
            column = indent;
        } else if i > 0 {
            out.push(' ');
            column += 1;
        }
        out.push_str(word);
        column += word.len();
    }
}

/// `min` to `max` as `--help` and README.md show it, e.g. `1–65536`.
pub fn range_text(min: u64, max: u64) -> String {
    format!("{min}–{max}")
}

/// The settings for `--help`: one aligned row per setting, with its default.
pub fn env_help() -> String {
    let mut rows: Vec<(String, String, Option<&str>)> = SETTINGS
        .iter()
        .map(|s| {
            let help = match s.kind {
                Kind::Whole { min, max } => format!("{} [range: {}]", s.help, range_text(min, max)),
                Kind::Text => s.help.to_owned(),
            };
            (env_name(s.key), help, s.default)
        })
        .collect();
    rows.push(("RUST_LOG".into(), "log filter, e.g. info,switchboard=debug".into(), Some("info")));
    let name_width = rows.iter().map(|(n, ..)| n.len()).max().unwrap_or(0);
    let indent = 2 + name_width + 2;
    let mut out = String::new();
    let intro = "Settings, from environment variables. A TOML file (--config) uses the same names in lower case \
                 without the prefix, e.g. max_message_bytes = 32768; the environment overrides it.";
    wrap(&mut out, intro.split_whitespace(), 0, 0);
    out.push('\n');
    for (name, help, default) in rows {
        let _ = write!(out, "\n  {name:name_width$}  ");
        let default = default.map(|d| format!("[default: {d}]"));
        wrap(&mut out, help.split_whitespace().chain(default.as_deref()), indent, indent);
    }
    out
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Where `/metrics` is served instead of `listen`, if set.
    pub metrics_listen: Option<SocketAddr>,
    /// Where users reach the server (`http(s)://host[:port][/path]`, without a trailing slash).
    pub public_url: Option<String>,
    /// Redis URL (a comma-separated list in sentinel and cluster modes);
    /// `None` selects the in-memory broker. May hold a password: its `Debug`
    /// shows neither it nor the rest of the URL.
    pub redis_url: Option<RedisUrl>,
    /// How `redis_url` is read.
    pub redis_mode: RedisMode,
    /// Sentinel mode: the master set's name.
    pub redis_sentinel_master: Option<String>,
    /// Sentinel mode: the login of the master and replicas, when not the
    /// Sentinel URLs' (its `Debug` hides the password).
    pub redis_master_login: Option<Login>,
    /// The CA that signed Redis's TLS certificates, if not the system's roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Start of every Redis channel and key.
    pub channel_prefix: String,
    /// Largest client message, in bytes.
    pub max_message_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// The configured ICE servers, and TURN credentials when TURN is on.
    pub ice_servers: IceServers,
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
    /// HTTP connections that are not WebSockets (yet) allowed at once.
    pub max_http_connections: usize,
    /// Time allowed to send the HTTP request head.
    pub handshake_timeout: Duration,
    /// Largest HTTP request head, in bytes.
    pub max_request_head_bytes: usize,
    /// Time a WebSocket frame may take from its first byte to its last.
    pub frame_timeout: Duration,
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
    /// How long a pair's history outlives its last message; zero: no history.
    pub resume: Duration,
    /// The key of resume tokens; `Some` when `resume` is not zero.
    pub resume_key: Option<crate::auth::ResumeKey>,
    /// Browser origins allowed to open `/ws`.
    pub allowed_origins: crate::origin::AllowedOrigins,
}

impl Settings {
    /// Whether channel and key names carry a cluster hash tag (see [`crate::pair::Names`]).
    pub fn tagged_names(&self) -> bool {
        self.redis_url.is_some() && self.redis_mode == RedisMode::Cluster
    }
}

/// How the Redis broker reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server.
    Standalone,
    /// The master that Sentinels name.
    Sentinel,
    /// A Redis Cluster, with sharded pub/sub.
    Cluster,
}

/// A configuration value that can't be used; the message names where it came from.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

/// The merged values, read by key (each key must have a row in [`SETTINGS`]),
/// and the file they may come from.
struct Values {
    map: HashMap<String, Value>,
    file: Option<PathBuf>,
}

impl Values {
    fn raw(&self, key: &str) -> Option<&Value> {
        debug_assert!(setting(key).is_some(), "{key} has no row in SETTINGS");
        self.map.get(key)
    }

    /// Where the value of `key` came from: the variable, or the key in the file.
    fn name(&self, key: &str) -> String {
        let origin = self.raw(key).and_then(Value::origin);
        match (origin, &self.file) {
            (Some(origin), Some(file)) if origin != "the environment" => format!("{key} in {}", file.display()),
            _ => env_name(key),
        }
    }

    fn bad(&self, key: &str, why: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!("{} {why}", self.name(key)))
    }

    /// The text of `key`; `None` when unset or blank.
    fn text(&self, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.raw(key) else { return Ok(None) };
        let text = value.clone().into_string().map_err(|_| self.bad(key, "must be one value, not a list or table"))?;
        Ok(Some(text).filter(|t| !t.trim().is_empty()))
    }

    /// The text of `key`, or `""`.
    fn text_or_empty(&self, key: &str) -> Result<String, ConfigError> {
        Ok(self.text(key)?.unwrap_or_default())
    }

    /// The whole number of `key`, within its row's range and `T`'s.
    fn whole<T: TryFrom<u64>>(&self, key: &str) -> Result<T, ConfigError> {
        let Some(Setting { kind: Kind::Whole { min, max }, .. }) = setting(key) else {
            unreachable!("{key} is not a whole-number setting");
        };
        let text = self.text(key)?.unwrap_or_default();
        let text = text.trim();
        let digits = text.strip_prefix('-').unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(key, format!("must be a whole number, not {text:?}")));
        }
        let range = || format!("must be between {min} and {max}, not {text}");
        let n: u64 = text.parse().map_err(|_| self.bad(key, range()))?;
        if n < *min || n > *max {
            return Err(self.bad(key, range()));
        }
        T::try_from(n).map_err(|_| self.bad(key, format!("is too large: {text}")))
    }

    fn secs(&self, key: &str) -> Result<Duration, ConfigError> {
        self.whole(key).map(Duration::from_secs)
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    /// Unknown `SWITCHBOARD_*` variables are not an error: see [`unknown_env_vars`].
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
        for s in SETTINGS {
            if let Some(default) = s.default {
                builder = builder.set_default(s.key, default).map_err(|e| ConfigError(e.to_string()))?;
            }
        }
        if let Some(path) = file {
            let source = File::from(path).format(FileFormat::Toml).required(true);
            let keys = source.collect().map_err(|e| ConfigError(e.to_string()))?;
            let mut unknown: Vec<&String> = keys.keys().filter(|k| setting(k).is_none()).collect();
            unknown.sort();
            if let Some(key) = unknown.first() {
                let hint = did_you_mean(nearest(key, SETTINGS.iter().map(|s| s.key)));
                return Err(ConfigError(format!("unknown key {key} in {}; {hint}", path.display())));
            }
            builder = builder.add_source(source);
        }
        let merged = builder.add_source(env).build().map_err(|e| ConfigError(e.to_string()))?;
        // `collect` keeps each value's origin (file or environment), for the messages.
        let values = merged.collect().map_err(|e| ConfigError(e.to_string()))?;
        Values { map: values.into_iter().collect(), file: file.map(Path::to_path_buf) }.settings()
    }

    /// Where users reach the server: `public_url`, or `http://` and `addr`
    /// (a wildcard address becomes loopback), without a trailing slash.
    pub fn public_url_or(&self, addr: SocketAddr) -> String {
        if let Some(url) = &self.public_url {
            return url.clone();
        }
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, addr.port()))
    }
}

/// `http(s)://host[:port][/path]`, without query, fragment or spaces.
fn valid_public_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && !url.contains(['?', '#'])
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl Values {
    fn settings(self) -> Result<Settings, ConfigError> {
        let listen_text = self.text_or_empty("listen")?;
        let listen = listen_text.parse().map_err(|_| {
            self.bad("listen", format!("must be a socket address such as 127.0.0.1:8080, not {listen_text:?}"))
        })?;
        let metrics_listen = match self.text("metrics_listen")? {
            Some(text) => Some(text.trim().parse().map_err(|_| {
                self.bad("metrics_listen", format!("must be a socket address such as 127.0.0.1:9090, not {text:?}"))
            })?),
            None => None,
        };
        let public_url = self.text("public_url")?.map(|u| u.trim().trim_end_matches('/').to_owned());
        if let Some(url) = &public_url {
            if !valid_public_url(url) {
                return Err(self.bad(
                    "public_url",
                    format!("must be an http:// or https:// URL such as https://call.example.com, not {url:?}"),
                ));
            }
        }
        let redis_url = self.text("redis_url")?.map(RedisUrl::new);
        let redis_mode = match self.text_or_empty("redis_mode")?.as_str() {
            "standalone" => RedisMode::Standalone,
            "sentinel" => RedisMode::Sentinel,
            "cluster" => RedisMode::Cluster,
            other => {
                return Err(self.bad("redis_mode", format!("must be standalone, sentinel or cluster, not {other:?}")))
            }
        };
        if let Some(url) = &redis_url {
            let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
            // The URL is not repeated: it may hold a password.
            for (i, one) in urls.iter().enumerate() {
                if redis::parse_redis_url(one).is_none() {
                    return Err(self.bad(
                        "redis_url",
                        format!("URL {} of {} is not a redis:// or rediss:// URL", i + 1, urls.len()),
                    ));
                }
            }
            if urls.len() > 1 && redis_mode == RedisMode::Standalone {
                return Err(
                    self.bad("redis_url", "must be one URL in standalone mode (set SWITCHBOARD_REDIS_MODE for more)")
                );
            }
        }
        let redis_sentinel_master = self.text("redis_sentinel_master")?;
        if redis_mode == RedisMode::Sentinel && redis_url.is_some() && redis_sentinel_master.is_none() {
            return Err(self.bad("redis_sentinel_master", "must name the master set in sentinel mode"));
        }
        // The passwords are not repeated in errors.
        let master_username = self.text("redis_master_username")?;
        let master_password = self.text("redis_master_password")?;
        if redis_mode != RedisMode::Sentinel {
            let given = [("redis_master_username", &master_username), ("redis_master_password", &master_password)];
            if let Some((key, _)) = given.iter().find(|(_, v)| v.is_some()) {
                return Err(self.bad(key, "is for sentinel mode only (put the login in SWITCHBOARD_REDIS_URL)"));
            }
        }
        let redis_master_login = match (master_username, master_password) {
            (Some(_), None) => return Err(self.bad("redis_master_username", "needs SWITCHBOARD_REDIS_MASTER_PASSWORD")),
            (username, Some(password)) => Some(Login::new(username, password)),
            (None, None) => None,
        };
        let channel_prefix = self.text_or_empty("channel_prefix")?;
        if channel_prefix.is_empty() || channel_prefix.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(self.bad("channel_prefix", "must be non-empty, without spaces"));
        }
        if redis_mode == RedisMode::Cluster && channel_prefix.contains(['{', '}']) {
            // The names' own hash tag must be the first one (crate::pair::Names).
            return Err(self.bad("channel_prefix", "must not contain { or } in cluster mode"));
        }
        let max_message_bytes = self.whole("max_message_bytes")?;
        let log_format = match self.text_or_empty("log_format")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(self.bad("log_format", format!("must be text or json, not {other:?}"))),
        };
        let configured = RawValue::from_string(self.text_or_empty("ice_servers")?.trim().to_owned())
            .ok()
            .filter(|v| v.get().starts_with('['))
            .ok_or_else(|| self.bad("ice_servers", "must be a JSON array of RTCIceServer objects"))?;
        let outbox_messages = self.whole("outbox_messages")?;
        let outbox_bytes = self.whole("outbox_bytes")?;
        if outbox_bytes < max_message_bytes {
            return Err(self.bad(
                "outbox_bytes",
                format!("must hold one message of the largest size, SWITCHBOARD_MAX_MESSAGE_BYTES={max_message_bytes}"),
            ));
        }
        let ping_interval = self.secs("ping_interval_secs")?;
        let pong_timeout = self.secs("pong_timeout_secs")?;
        if !ping_interval.is_zero() && pong_timeout.is_zero() {
            return Err(self.bad("pong_timeout_secs", "must be at least 1 while pings are on"));
        }
        let auth_secret = self.text("auth_secret")?;
        let auth = match &auth_secret {
            Some(secret) if secret.len() < crate::auth::MIN_SECRET_BYTES => {
                return Err(
                    self.bad("auth_secret", "must be at least 32 bytes, e.g. the output of `openssl rand -hex 32`")
                )
            }
            Some(secret) => Some(crate::auth::LinkSigner::new(&crate::auth::Secret::new(secret))),
            None => None,
        };
        let resume = self.secs("resume_secs")?;
        let resume_key = match (self.text("resume_secret")?, auth_secret) {
            _ if resume.is_zero() => None,
            (Some(secret), _) if secret.len() < crate::auth::MIN_SECRET_BYTES => {
                return Err(
                    self.bad("resume_secret", "must be at least 32 bytes, e.g. the output of `openssl rand -hex 32`")
                )
            }
            (Some(secret), _) | (None, Some(secret)) => {
                Some(crate::auth::ResumeKey::new(&crate::auth::Secret::new(&secret)))
            }
            (None, None) if redis_url.is_none() => Some(crate::auth::ResumeKey::random()),
            // Replicas share a random key through Redis (see `app::share_resume_key`).
            (None, None) => Some(crate::auth::ResumeKey::shared()),
        };
        let allowed_origins = crate::origin::AllowedOrigins::parse(&self.text_or_empty("allowed_origins")?)
            .map_err(|why| self.bad("allowed_origins", format!("must list origins: {why}")))?
            .with_public_url(public_url.as_deref());
        let turn_urls: Vec<String> = self
            .text_or_empty("turn_urls")?
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(url) = turn_urls.iter().find(|u| !crate::turn::valid_url(u)) {
            return Err(self.bad("turn_urls", format!("must be turn: or turns: URLs, not {url:?}")));
        }
        let turn_ttl = self.secs("turn_ttl_secs")?;
        let turn = match (self.text("turn_secret")?, turn_urls.is_empty()) {
            (Some(secret), false) => {
                Some(Turn { secret: crate::auth::Secret::new(&secret), urls: turn_urls, ttl: turn_ttl })
            }
            (None, true) => None,
            (Some(_), true) => {
                return Err(self.bad("turn_urls", "must list the TURN servers when SWITCHBOARD_TURN_SECRET is set"))
            }
            (None, false) => return Err(self.bad("turn_secret", "must be set when SWITCHBOARD_TURN_URLS is given")),
        };
        Ok(Settings {
            listen,
            metrics_listen,
            public_url,
            redis_url,
            redis_mode,
            redis_sentinel_master,
            redis_master_login,
            redis_ca_file: self.text("redis_ca_file")?.map(PathBuf::from),
            channel_prefix,
            max_message_bytes,
            log_format,
            ice_servers: IceServers { configured, turn },
            static_dir: self.text("static_dir")?.map(PathBuf::from),
            outbox_messages,
            outbox_bytes,
            presence_ttl: self.secs("presence_ttl_secs")?,
            redis_pool_size: self.whole("redis_pool_size")?,
            shutdown_grace: self.secs("shutdown_grace_secs")?,
            drain: self.secs("drain_secs")?,
            max_sockets: self.whole("max_sockets")?,
            worker_threads: self.whole("worker_threads")?,
            max_http_connections: self.whole("max_http_connections")?,
            handshake_timeout: self.secs("handshake_timeout_secs")?,
            max_request_head_bytes: self.whole("max_request_head_bytes")?,
            frame_timeout: self.secs("frame_timeout_secs")?,
            ping_interval,
            pong_timeout,
            rate_per_sec: self.whole("rate_per_sec")?,
            rate_burst: self.whole("rate_burst")?,
            auth,
            resume,
            resume_key,
            allowed_origins,
        })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::load_with_env(None, &[]).expect("the built-in defaults are valid")
    }
}

/// `SWITCHBOARD_REDIS_URL`, read as a `str`. It may hold a password, so its
/// `Debug` (and so `Settings`'s) shows only how many URLs it lists.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL (or comma-separated URLs) `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
}

impl std::ops::Deref for RedisUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls = self.0.split(',').filter(|u| !u.trim().is_empty()).count();
        write!(f, "RedisUrl(<{urls} URL(s), redacted>)")
    }
}

/// A user (or none: the default user, `requirepass`) and password. Neither
/// `Debug` nor anything else shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// ACL user; `None` logs in with the password alone.
    pub username: Option<String>,
    password: String,
}

impl Login {
    /// `password` for `username`, or for the default user.
    pub fn new(username: Option<String>, password: String) -> Self {
        Self { username, password }
    }

    /// The password, for the connection that logs in with it only.
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("username", &self.username).field("password", &"<redacted>").finish()
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
        assert_eq!(s.ice_servers.configured.get(), "[]");
        assert!(s.auth.is_none() && s.ice_servers.turn.is_none() && s.public_url.is_none());
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
        let turn = s.ice_servers.turn.as_ref().unwrap();
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
            ("SWITCHBOARD_METRICS_LISTEN", "localhost"),
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
            ("SWITCHBOARD_PUBLIC_URL", "call.example.com"),
            ("SWITCHBOARD_OUTBOX_BYTES", "100"),
            ("SWITCHBOARD_PONG_TIMEOUT_SECS", "0"),
        ] {
            let err = Settings::load_with_env(None, &[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    /// Sentinel mode's master login: read, checked, and never shown (not in
    /// `Debug`, not in an error).
    #[test]
    fn the_master_login_is_for_sentinel_mode_and_never_shown() {
        let sentinel = [
            ("SWITCHBOARD_REDIS_URL", "redis://watcher:sentinel-pw@10.0.0.1:26379"),
            ("SWITCHBOARD_REDIS_MODE", "sentinel"),
            ("SWITCHBOARD_REDIS_SENTINEL_MASTER", "m"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| [&sentinel[..], extra].concat();
        let s = Settings::load_with_env(None, &sentinel).unwrap();
        assert_eq!(s.redis_master_login, None);
        let s = Settings::load_with_env(
            None,
            &with(&[
                ("SWITCHBOARD_REDIS_MASTER_USERNAME", "switchboard"),
                ("SWITCHBOARD_REDIS_MASTER_PASSWORD", "m-s3cret"),
            ]),
        )
        .unwrap();
        let login = s.redis_master_login.as_ref().unwrap();
        assert_eq!(*login, Login::new(Some("switchboard".into()), "m-s3cret".into()));
        assert!(!format!("{s:?}").contains("m-s3cret"), "{s:?}");
        let s = Settings::load_with_env(None, &with(&[("SWITCHBOARD_REDIS_MASTER_PASSWORD", "m-s3cret")])).unwrap();
        assert_eq!(s.redis_master_login.unwrap().username, None);

        let err = Settings::load_with_env(None, &with(&[("SWITCHBOARD_REDIS_MASTER_USERNAME", "switchboard")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SWITCHBOARD_REDIS_MASTER_USERNAME needs SWITCHBOARD_REDIS_MASTER_PASSWORD"), "{err}");
        for mode in ["standalone", "cluster"] {
            let err = Settings::load_with_env(
                None,
                &[
                    ("SWITCHBOARD_REDIS_URL", "redis://10.0.0.1:6379"),
                    ("SWITCHBOARD_REDIS_MODE", mode),
                    ("SWITCHBOARD_REDIS_MASTER_PASSWORD", "m-s3cret"),
                ],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("SWITCHBOARD_REDIS_MASTER_PASSWORD is for sentinel mode only"), "{err}");
            assert!(!err.contains("m-s3cret"), "{err}");
        }
    }

    /// `| `SWITCHBOARD_X` | `default` | ... |` rows of the first table after `heading` in `doc`.
    fn doc_table(doc: &str, heading: &str) -> Vec<(String, Option<String>)> {
        let section = doc.split_once(heading).unwrap_or_else(|| panic!("no {heading:?}")).1;
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix("`SWITCHBOARD_")?.strip_suffix('`')?;
                let default = cells.get(2)?;
                let default = match default.strip_prefix('`').and_then(|d| d.split_once('`')) {
                    Some((value, _)) => Some(value.to_owned()),
                    None => {
                        assert!(default.starts_with("unset"), "default of {name}: {default:?}");
                        None
                    }
                };
                Some((format!("SWITCHBOARD_{name}"), default))
            })
            .collect()
    }

    fn repo_file(path: &str) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::read_to_string(root.join(path)).unwrap()
    }

    #[test]
    fn readme_table_lists_every_setting_with_its_default() {
        let readme = doc_table(&repo_file("README.md"), "## Configuration");
        let code: Vec<(String, Option<String>)> =
            SETTINGS.iter().map(|s| (env_name(s.key), s.default.map(str::to_owned))).collect();
        for row in &code {
            assert!(readme.contains(row), "README.md's settings table lacks or differs on {row:?}");
        }
        for row in &readme {
            assert!(code.contains(row), "README.md lists {row:?}, which config::SETTINGS lacks or differs on");
        }
        // The operations guide lists the same variables (its defaults note the image's).
        let ops: Vec<String> = doc_table(&repo_file("docs/operations.md"), "## Configuration")
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| !OTHER_VARS.contains(&name.as_str()))
            .collect();
        let names: Vec<String> = code.into_iter().map(|(name, _)| name).collect();
        for name in &names {
            assert!(ops.contains(name), "docs/operations.md lacks {name}");
        }
        for name in &ops {
            assert!(names.contains(name), "docs/operations.md lists {name}, which config::SETTINGS lacks");
        }
    }

    #[test]
    fn defaults_come_from_the_table() {
        let s = Settings::default();
        for row in SETTINGS {
            let value = row.default.map(str::to_owned);
            let shown = match row.key {
                "listen" => Some(s.listen.to_string()),
                "max_message_bytes" => Some(s.max_message_bytes.to_string()),
                "channel_prefix" => Some(s.channel_prefix.clone()),
                "ice_servers" => Some(s.ice_servers.configured.get().to_owned()),
                "drain_secs" => Some(s.drain.as_secs().to_string()),
                "rate_burst" => Some(s.rate_burst.to_string()),
                _ => continue,
            };
            assert_eq!(shown, value, "{}", row.key);
        }
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("switchboard.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    #[test]
    fn unknown_keys_in_the_file_are_an_error_naming_the_nearest_key() {
        let file = temp_file("unknown", "max_mesage_bytes = 100\n");
        let err = Settings::load_with_env(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key max_mesage_bytes"), "{err}");
        assert!(err.contains("did you mean max_message_bytes?"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        // Far from every key: no guess, a pointer to the list.
        let file = temp_file("far", "listen = \"127.0.0.1:1\"\n[server]\nport = 1\n");
        let err = Settings::load_with_env(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key server") && err.contains("--help"), "{err}");
        // SWITCHBOARD_CONFIG is a variable, not a key of the file.
        let file = temp_file("config", "config = \"x.toml\"\n");
        assert!(Settings::load_with_env(Some(&file), &[]).is_err());
        let file = temp_file("ok", "max_message_bytes = 100\noutbox_bytes = 100\n");
        assert_eq!(Settings::load_with_env(Some(&file), &[]).unwrap().max_message_bytes, 100);
    }

    #[test]
    fn unknown_variables_are_warnings_naming_the_nearest_variable() {
        let warnings = unknown_env_vars([
            "SWITCHBOARD_MAX_MSG_BYTES",
            "SWITCHBOARD_LISTEN",
            "SWITCHBOARD_CONFIG",
            "SWITCHBOARD_ZZZ",
            "PATH",
            "switchboard_redis_ulr",
        ]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert_eq!(
            warnings[0],
            "unknown variable SWITCHBOARD_MAX_MSG_BYTES is ignored; did you mean SWITCHBOARD_MAX_MESSAGE_BYTES?"
        );
        assert!(warnings[1].starts_with("unknown variable SWITCHBOARD_ZZZ") && warnings[1].contains("--help"));
        assert!(warnings[2].contains("did you mean SWITCHBOARD_REDIS_URL?"), "{}", warnings[2]);
        // The variable is ignored, as before: the server starts with the default.
        let s = Settings::load_with_env(None, &[("SWITCHBOARD_MAX_MSG_BYTES", "100")]).unwrap();
        assert_eq!(s.max_message_bytes, 65536);
    }

    #[test]
    fn numbers_say_whole_number_or_range_and_name_the_key_once() {
        let err = |key: &str, value: &str| Settings::load_with_env(None, &[(key, value)]).unwrap_err().to_string();
        let e = err("SWITCHBOARD_MAX_MESSAGE_BYTES", "abc");
        assert_eq!(e, r#"configuration error: SWITCHBOARD_MAX_MESSAGE_BYTES must be a whole number, not "abc""#);
        for value in ["1.5", "", "12kb", "--1"] {
            assert!(err("SWITCHBOARD_MAX_MESSAGE_BYTES", value).contains("must be a whole number"), "{value}");
        }
        let e = err("SWITCHBOARD_MAX_MESSAGE_BYTES", "-1");
        assert_eq!(e, "configuration error: SWITCHBOARD_MAX_MESSAGE_BYTES must be between 1 and 16777216, not -1");
        let e = err("SWITCHBOARD_PRESENCE_TTL_SECS", "99999999999999999999999");
        assert!(e.ends_with("must be between 3 and 3600, not 99999999999999999999999"), "{e}");
        assert_eq!(
            err("SWITCHBOARD_PRESENCE_TTL_SECS", "-3"),
            "configuration error: SWITCHBOARD_PRESENCE_TTL_SECS must be between 3 and 3600, not -3"
        );
        assert!(err("SWITCHBOARD_RATE_BURST", "5000000000").ends_with("must be between 1 and 1000000, not 5000000000"));
        // From the file, the message names the key in the file.
        let file = temp_file("whole", "max_sockets = \"many\"\n");
        let e = Settings::load_with_env(Some(&file), &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(r#"configuration error: max_sockets in {} must be a whole number, not "many""#, file.display())
        );
        let file = temp_file("float", "max_sockets = 1.5\n");
        let e = Settings::load_with_env(Some(&file), &[]).unwrap_err().to_string();
        assert!(e.contains("max_sockets in") && e.contains("whole number"), "{e}");
        for e in [e, err("SWITCHBOARD_MAX_MESSAGE_BYTES", "abc")] {
            assert_eq!(e.matches("max_sockets").count() + e.matches("MAX_MESSAGE_BYTES").count(), 1, "{e}");
        }
    }

    #[test]
    fn every_number_has_an_upper_bound_and_values_past_it_are_refused() {
        // Issue 16: SWITCHBOARD_DRAIN_SECS=2^64-1 never exited, WORKER_THREADS=100000
        // started that many threads, and huge TTLs made every `SET ... EX` fail.
        let wholes: Vec<_> = SETTINGS
            .iter()
            .filter_map(|s| match s.kind {
                Kind::Whole { min, max } => Some((s.key, min, max)),
                Kind::Text => None,
            })
            .collect();
        assert!(wholes.len() >= 15, "{wholes:?}");
        // Room for the largest message in the largest queue, so each maximum loads on its own.
        let roomy = ("SWITCHBOARD_OUTBOX_BYTES", "268435456");
        for (key, min, max) in wholes {
            let var = env_name(key);
            assert!(max < u64::from(u32::MAX), "{key}: {max} is no sane bound");
            for value in [max + 1, u64::MAX] {
                let value = value.to_string();
                let err = Settings::load_with_env(None, &[roomy, (&var, &value)]).unwrap_err().to_string();
                assert_eq!(err, format!("configuration error: {var} must be between {min} and {max}, not {value}"));
            }
            let mut vars = vec![(var.as_str(), max.to_string())];
            if key != "outbox_bytes" {
                vars.push((roomy.0, roomy.1.to_owned()));
            }
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Settings::load_with_env(None, &vars).unwrap_or_else(|e| panic!("{key}={max}: {e}"));
        }
        let s = Settings::load_with_env(None, &[("SWITCHBOARD_DRAIN_SECS", "3600")]).unwrap();
        assert_eq!(s.drain, Duration::from_secs(3600));
    }

    #[test]
    fn resume_is_on_by_default_with_a_key_from_a_secret_from_redis_or_random() {
        let redis = ("SWITCHBOARD_REDIS_URL", "redis://127.0.0.1:6379");
        let shared = Settings::load_with_env(None, &[redis]).unwrap();
        assert_eq!(shared.resume, Duration::from_secs(30), "on by default");
        let key = shared.resume_key.expect("a key, learned from Redis");
        assert!(key.is_shared() && !key.is_known(), "replicas share one through Redis");
        let off = Settings::load_with_env(None, &[redis, ("SWITCHBOARD_RESUME_SECS", "0")]).unwrap();
        assert!(off.resume.is_zero() && off.resume_key.is_none());
        let short = Settings::load_with_env(None, &[redis, ("SWITCHBOARD_RESUME_SECRET", "short")]);
        assert!(short.unwrap_err().to_string().to_ascii_uppercase().contains("RESUME_SECRET"));
        let secret = "0123456789abcdef0123456789abcdef";
        for key in ["SWITCHBOARD_RESUME_SECRET", "SWITCHBOARD_AUTH_SECRET"] {
            let s = Settings::load_with_env(None, &[redis, (key, secret)]).unwrap();
            let resume_key = s.resume_key.expect(key);
            assert!(!resume_key.is_shared() && resume_key.is_known(), "{key}");
        }
        let memory = Settings::load_with_env(None, &[]).unwrap().resume_key.expect("memory");
        assert!(!memory.is_shared() && memory.is_known(), "one process: a random key will do");
    }

    #[test]
    fn debug_never_shows_the_redis_url_or_its_password() {
        let url = "redis://switchboard:hunter2-pw@10.0.0.5:6379";
        let s = Settings::load_with_env(None, &[("SWITCHBOARD_REDIS_URL", url)]).unwrap();
        assert_eq!(s.redis_url.as_deref(), Some(url), "the URL itself is intact");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("10.0.0.5"), "{shown}");
        assert!(shown.contains("RedisUrl(<1 URL(s), redacted>)"), "{shown}");
    }

    #[test]
    fn readme_and_help_show_each_range() {
        let readme = repo_file("README.md");
        let help = env_help().split_whitespace().collect::<Vec<_>>().join(" ");
        for s in SETTINGS {
            let Kind::Whole { min, max } = s.kind else { continue };
            let name = env_name(s.key);
            let row = readme.lines().find(|l| l.starts_with(&format!("| `{name}` |"))).expect(&name);
            let range = range_text(min, max);
            assert!(row.ends_with(&format!(" Range {range}. |")), "README.md's row of {name} lacks its range {range}");
            assert!(help.contains(&format!("{} [range: {range}]", s.help)), "--help lacks the range of {name}");
        }
    }

    #[test]
    fn help_is_generated_from_the_table_and_aligned() {
        let help = env_help();
        let rows: Vec<&str> = help.lines().filter(|l| l.starts_with("  ")).collect();
        let is_name = |rest: &str| rest.starts_with("SWITCHBOARD_") || rest.starts_with("RUST_LOG");
        let column = rows[0].find("address").unwrap();
        for row in &rows {
            assert!(row.len() <= HELP_WIDTH, "too long: {row:?}");
            let rest = row.trim_start();
            let text_at = if is_name(rest) {
                let after_name = row.len() - rest.len() + rest.find(' ').unwrap();
                after_name + row[after_name..].len() - row[after_name..].trim_start().len()
            } else {
                row.len() - rest.len()
            };
            assert_eq!(text_at, column, "misaligned: {row:?}");
        }
        for s in SETTINGS {
            let name = env_name(s.key);
            let start = rows.iter().position(|r| r.trim_start().starts_with(&format!("{name} "))).expect(&name);
            let end =
                rows[start + 1..].iter().position(|r| is_name(r.trim_start())).map_or(rows.len(), |i| start + 1 + i);
            let text = rows[start..end].iter().map(|r| r.trim()).collect::<Vec<_>>().join(" ");
            match s.default {
                Some(default) => assert!(text.ends_with(&format!(" [default: {default}]")), "{text}"),
                None => assert!(!text.contains("[default"), "{text}"),
            }
        }
    }

    #[test]
    fn public_url() {
        let s = Settings::load_with_env(None, &[("SWITCHBOARD_PUBLIC_URL", "https://call.example.com/")]).unwrap();
        assert_eq!(s.public_url.as_deref(), Some("https://call.example.com"));
        assert_eq!(s.public_url_or("0.0.0.0:1".parse().unwrap()), "https://call.example.com");
        let s = Settings::default();
        assert_eq!(s.public_url_or("0.0.0.0:8080".parse().unwrap()), "http://127.0.0.1:8080");
        assert_eq!(s.public_url_or("[::]:8080".parse().unwrap()), "http://[::1]:8080");
        assert_eq!(s.public_url_or("10.0.0.1:80".parse().unwrap()), "http://10.0.0.1:80");
        for bad in ["call.example.com", "ftp://x", "https://", "https://x/?a=1", "https://a b"] {
            let err = Settings::load_with_env(None, &[("SWITCHBOARD_PUBLIC_URL", bad)]).unwrap_err().to_string();
            assert!(err.contains("SWITCHBOARD_PUBLIC_URL must be an http:// or https:// URL"), "{bad}: {err}");
        }
    }
}
