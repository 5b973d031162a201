//! WebSocket client side: URL templates, source-address spreading, the two wire dialects
//! (switchboard's raw JSON frames and Socket.IO over Engine.IO v4), and bench message encoding.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A client WebSocket over a plain TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

/// Which wire dialect the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// switchboard / raw WebSocket: each text frame is one JSON object.
    Raw,
    /// Socket.IO v4 over the websocket transport: `42["signal",{...}]`.
    Socketio,
}

/// Nanoseconds since a process-wide epoch (monotonic clock); used for send timestamps.
/// Both ends of every pair live in the same process, so one-way latency is exact.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Where and how to connect.
pub struct Target {
    template: String,
    /// One resolved address per entry of `ports`.
    addrs: Vec<SocketAddr>,
    ports: Vec<u16>,
    /// Source IPs the client sockets are bound to, round-robin.
    sources: Vec<Ipv4Addr>,
    next_source: AtomicUsize,
    /// The wire dialect.
    pub protocol: Protocol,
    /// Limit for TCP connect + upgrade + welcome.
    pub timeout: Duration,
    /// Read buffer per socket (tungstenite allocates it eagerly).
    pub read_buffer: usize,
}

impl Target {
    /// Builds a target; `sources` is the number of loopback source addresses starting at 127.0.0.2.
    pub fn new(template: &str, ports: &[u16], protocol: Protocol, sources: u8, timeout: Duration) -> Result<Self> {
        if ports.is_empty() {
            bail!("--ports must name at least one port");
        }
        let mut addrs = Vec::new();
        for &port in ports {
            let url = fill(template, port, "u", "p");
            let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
            let host = uri.host().ok_or_else(|| anyhow!("URL {url} has no host"))?;
            let ip: IpAddr = if host == "localhost" {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                host.trim_matches(['[', ']'])
                    .parse()
                    .with_context(|| format!("host {host} must be a loopback IP literal"))?
            };
            if !ip.is_loopback() {
                bail!("refusing non-loopback target {ip}: benchmarks run on loopback only");
            }
            addrs.push(SocketAddr::new(ip, uri.port_u16().unwrap_or(80)));
        }
        let sources = if addrs[0].is_ipv4() {
            (0..sources.max(1)).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i)).collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            template: template.to_string(),
            addrs,
            ports: ports.to_vec(),
            sources,
            next_source: AtomicUsize::new(0),
            protocol,
            timeout,
            read_buffer: 4096,
        })
    }

    /// Number of server instances (ports).
    pub fn instances(&self) -> usize {
        self.ports.len()
    }

    /// Connects `user` (talking to `peer`) to instance `instance % instances`, and waits for the
    /// welcome. Returns the socket positioned right after the welcome.
    pub async fn connect(&self, instance: usize, user: &str, peer: &str) -> Result<Ws> {
        Ok(self.connect_timed(instance, user, peer).await?.0)
    }

    /// As [`Target::connect`], and also returns how long the welcome took after the upgrade.
    pub async fn connect_timed(&self, instance: usize, user: &str, peer: &str) -> Result<(Ws, Opened)> {
        let (ws, opened, _welcome) = self.connect_query(instance, user, peer, "").await?;
        Ok((ws, opened))
    }

    /// As [`Target::connect_timed`], with `query` (`&name=value...`) appended to the URL, and
    /// also returns the welcome frame's text.
    pub async fn connect_query(
        &self,
        instance: usize,
        user: &str,
        peer: &str,
        query: &str,
    ) -> Result<(Ws, Opened, String)> {
        let url = fill(&self.template, self.ports[instance % self.addrs.len()], user, peer) + query;
        tokio::time::timeout(self.timeout, self.connect_inner(instance, url))
            .await
            .map_err(|_| anyhow!("timed out after {:?} (connect/upgrade/welcome)", self.timeout))?
    }

    async fn connect_inner(&self, instance: usize, url: String) -> Result<(Ws, Opened, String)> {
        let i = instance % self.addrs.len();
        let dst = self.addrs[i];
        let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if !self.sources.is_empty() {
            let k = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            socket.bind(SocketAddr::new(IpAddr::V4(self.sources[k]), 0)).context("bind source address")?;
        }
        let stream = socket.connect(dst).await.context("tcp connect")?;
        stream.set_nodelay(true)?;
        let config = WebSocketConfig::default().read_buffer_size(self.read_buffer).write_buffer_size(0);
        let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("websocket upgrade")?;
        // tungstenite returns as soon as it has parsed the 101 response.
        let upgraded = Instant::now();
        if self.protocol == Protocol::Socketio {
            // Engine.IO open packet, then CONNECT to the default namespace.
            let open = next_text(&mut ws).await?;
            if !open.starts_with('0') {
                bail!("expected engine.io open packet, got {open:.80}");
            }
            ws.send(Message::text("40")).await?;
        }
        loop {
            let text = next_text(&mut ws).await?;
            match classify(self.protocol, &text) {
                Incoming::Welcome => {
                    let welcome_after_101_us = upgraded.elapsed().as_micros() as u64;
                    return Ok((ws, Opened { welcome_after_101_us }, text));
                }
                Incoming::Ping => ws.send(Message::text("3")).await?,
                Incoming::Error => bail!("server error before welcome: {text:.200}"),
                _ => {}
            }
        }
    }
}

/// Timing of one successful open.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    /// From the parsed `101 Switching Protocols` response to the parsed `welcome` event, in
    /// microseconds. For Socket.IO this includes the Engine.IO open packet and the client's
    /// namespace CONNECT (`40`), one more round trip before the server can emit its welcome.
    pub welcome_after_101_us: u64,
}

/// Reads the next text frame (skipping control frames).
async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => bail!("closed by server: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended before welcome"),
        }
    }
}

/// Fills `{port}`, `{u}` and `{p}` in a URL template.
pub fn fill(template: &str, port: u16, user: &str, peer: &str) -> String {
    template.replace("{port}", &port.to_string()).replace("{u}", user).replace("{p}", peer)
}

/// What one incoming text frame is, as far as the load generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The server's first event.
    Welcome,
    /// A bench message relayed from the peer.
    Bench {
        /// Sequence number within the sending socket.
        seq: u64,
        /// Send timestamp, [`now_ns`].
        ts: u64,
    },
    /// Engine.IO ping (Socket.IO only); must be answered with `3`.
    Ping,
    /// A server error event.
    Error,
    /// Anything else (peer-joined, peer-left, ...).
    Other,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, rename = "type", default)]
    ty: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
}

fn classify_object(p: &Peek<'_>) -> Incoming {
    match p.ty.as_deref() {
        Some("welcome") => Incoming::Welcome,
        Some("error") => Incoming::Error,
        Some("bench") => match (p.seq, p.ts) {
            (Some(seq), Some(ts)) => Incoming::Bench { seq, ts },
            _ => Incoming::Other,
        },
        _ => Incoming::Other,
    }
}

/// Classifies one text frame.
pub fn classify(protocol: Protocol, text: &str) -> Incoming {
    match protocol {
        Protocol::Raw => match serde_json::from_str::<Peek<'_>>(text) {
            Ok(p) => classify_object(&p),
            Err(_) => Incoming::Other,
        },
        Protocol::Socketio => {
            if text == "2" {
                return Incoming::Ping;
            }
            let Some(body) = text.strip_prefix("42") else {
                return Incoming::Other;
            };
            match serde_json::from_str::<(Cow<'_, str>, Peek<'_>)>(body) {
                Ok((event, p)) => match event.as_ref() {
                    "welcome" => Incoming::Welcome,
                    "error" => Incoming::Error,
                    _ => classify_object(&p),
                },
                Err(_) => Incoming::Other,
            }
        }
    }
}

/// Encodes a bench message whose JSON object is exactly `size` bytes (or the minimum needed).
pub fn encode_bench(protocol: Protocol, seq: u64, ts: u64, size: usize) -> String {
    let head = format!("{{\"type\":\"bench\",\"seq\":{seq},\"ts\":{ts},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = String::with_capacity(size + 16);
    if protocol == Protocol::Socketio {
        out.push_str("42[\"signal\",");
    }
    out.push_str(&head);
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str("\"}");
    if protocol == Protocol::Socketio {
        out.push(']');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_message_has_exact_size_and_round_trips() {
        for size in [300usize, 4096] {
            let m = encode_bench(Protocol::Raw, 12345, 987654321, size);
            assert_eq!(m.len(), size);
            assert_eq!(classify(Protocol::Raw, &m), Incoming::Bench { seq: 12345, ts: 987654321 });
            let s = encode_bench(Protocol::Socketio, 7, 8, size);
            assert_eq!(s.len(), size + "42[\"signal\",]".len());
            assert_eq!(classify(Protocol::Socketio, &s), Incoming::Bench { seq: 7, ts: 8 });
        }
    }

    #[test]
    fn classifies_server_events() {
        let w = r#"{"type":"welcome","userID":"a","peerID":"b","polite":false,"peerOnline":false,"iceServers":[]}"#;
        assert_eq!(classify(Protocol::Raw, w), Incoming::Welcome);
        assert_eq!(classify(Protocol::Raw, r#"{"type":"peer-joined","peerID":"b"}"#), Incoming::Other);
        assert_eq!(classify(Protocol::Raw, r#"{"type":"error","code":"invalid_json"}"#), Incoming::Error);
        assert_eq!(classify(Protocol::Socketio, r#"42["welcome",{"type":"welcome"}]"#), Incoming::Welcome);
        assert_eq!(classify(Protocol::Socketio, "2"), Incoming::Ping);
        assert_eq!(classify(Protocol::Socketio, r#"40{"sid":"x"}"#), Incoming::Other);
    }

    #[test]
    fn fills_template_and_rejects_non_loopback() {
        assert_eq!(
            fill("ws://127.0.0.1:{port}/ws?userID={u}&peerID={p}", 9, "a", "b"),
            "ws://127.0.0.1:9/ws?userID=a&peerID=b"
        );
        let t = Target::new("ws://10.0.0.1:{port}/ws", &[1], Protocol::Raw, 1, Duration::from_secs(1));
        assert!(t.is_err());
    }
}
