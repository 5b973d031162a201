//! One pub/sub connection of switchboard's own, which carries subscribe
//! commands only.
//!
//! Why not redis-rs's `aio::PubSub` (used before): it keeps a second copy of
//! every subscribed channel name (its subscription tracker), which cost each
//! idle socket's share of memory; its `subscribe` awaits each confirmation,
//! so a subscriber that uses it stops delivering for a round trip per new
//! pair; and it can't speak sharded pub/sub across a cluster's failovers
//! (see `docs/operations.md`, "Redis Cluster"). Here the RESP2 framing is
//! redis-protocol's codec, which hands out each payload as a slice of the
//! read buffer without copying, and commands are packed by redis-rs.
//!
//! The connection is split into a [`Reader`] and a [`Writer`] so that one
//! task can wait on both at once: writing never holds up reading.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis_protocol::codec::Resp2;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::tls::Tls;
use super::BrokerError;

/// Idle time before the kernel's first keepalive probe on a subscriber
/// connection, and the time between probes. The subscriber's own `PING`
/// finds a silent Redis sooner; keepalive finds a peer that vanished
/// (a NAT that forgot the flow) even when nothing is being sent.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// A byte stream to Redis (TCP, or TLS over TCP).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Where a subscriber connects, and as whom. Its `Debug` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to speak TLS (`rediss://`).
    pub tls: bool,
    /// ACL user, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", if self.tls { "rediss" } else { "redis" }, self.host, self.port)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl Endpoint {
    /// The endpoint of a parsed `redis://` or `rediss://` URL.
    pub fn from_info(info: &redis::ConnectionInfo) -> Result<Self, BrokerError> {
        let (host, port, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port, false),
            redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, true),
            _ => return Err(BrokerError::Connect("only redis:// and rediss:// addresses are supported".into())),
        };
        let settings = info.redis_settings();
        Ok(Self {
            host,
            port,
            tls,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
        })
    }

    /// The same credentials and TLS, at another address (a cluster node, a
    /// Sentinel's master).
    pub fn at(&self, host: &str, port: u16) -> Self {
        Self { host: host.to_owned(), port, ..self.clone() }
    }
}

/// What the subscriber hears on its connection.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A publication (`message` or `smessage`) on a channel.
    Message {
        /// The channel's name.
        channel: Bytes,
        /// The published bytes, a slice of the read buffer.
        payload: Bytes,
    },
    /// A (sharded) subscribe confirmation for one channel.
    Subscribed(Bytes),
    /// A (sharded) unsubscribe for one channel: a confirmation, or in a
    /// cluster, Redis dropping the subscription by itself.
    Unsubscribed(Bytes),
    /// The answer to a `PING`.
    Pong,
    /// An error reply to the oldest command not yet answered.
    Error(String),
    /// A reply the subscriber never asks for.
    Other,
}

impl Event {
    fn from_frame(frame: BytesFrame) -> Self {
        match frame {
            BytesFrame::Array(parts) => Self::from_parts(parts),
            BytesFrame::SimpleString(s) if s.eq_ignore_ascii_case(b"pong") => Self::Pong,
            BytesFrame::Error(e) => Self::Error(e.to_string()),
            _ => Self::Other,
        }
    }

    fn from_parts(parts: Vec<BytesFrame>) -> Self {
        let mut parts = parts.into_iter();
        let Some(BytesFrame::BulkString(kind)) = parts.next() else { return Self::Other };
        let name = match parts.next() {
            Some(BytesFrame::BulkString(name)) => name,
            _ => Bytes::new(),
        };
        match &kind[..] {
            b"message" | b"smessage" => match parts.next() {
                Some(BytesFrame::BulkString(payload)) => Self::Message { channel: name, payload },
                _ => Self::Other,
            },
            b"subscribe" | b"ssubscribe" => Self::Subscribed(name),
            b"unsubscribe" | b"sunsubscribe" => Self::Unsubscribed(name),
            b"pong" => Self::Pong,
            _ => Self::Other,
        }
    }
}

/// The reading side of a subscriber connection.
pub struct Reader(FramedRead<ReadHalf<Box<dyn Stream>>, Resp2>);

impl Reader {
    /// The next thing Redis said; `None` when the connection closed.
    /// Cancel-safe: a partly read frame stays in the buffer.
    pub async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        match self.0.next().await? {
            Ok(frame) => Some(Ok(Event::from_frame(frame))),
            Err(e) => Some(Err(BrokerError::Command(format!("unreadable reply: {e}")))),
        }
    }
}

/// The writing side: commands are packed into a buffer, which the task
/// writes out whenever the socket takes it.
pub struct Writer {
    half: WriteHalf<Box<dyn Stream>>,
    out: Vec<u8>,
}

impl Writer {
    /// Queues `cmd` to be written.
    pub fn queue(&mut self, cmd: &redis::Cmd) {
        cmd.write_packed_command(&mut self.out);
    }

    /// Whether queued bytes are waiting to be written.
    pub fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes some of what is queued. Cancel-safe: when it is cancelled,
    /// nothing was written.
    pub async fn write_some(&mut self) -> std::io::Result<()> {
        let n = self.half.write(&self.out).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.out.drain(..n);
        if self.out.is_empty() && self.out.capacity() > 64 * 1024 {
            // A large resubscribe went out: don't keep its buffer.
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.pending() {
            self.write_some().await?;
        }
        self.half.flush().await
    }
}

/// A TCP connection to `endpoint`, with TCP keepalive, in TLS for `rediss://`.
/// Used by the subscriber and the command lanes alike.
pub async fn connect(endpoint: &Endpoint, tls: Option<&Tls>) -> Result<Box<dyn Stream>, BrokerError> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| BrokerError::Connect(format!("{endpoint}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(KEEPALIVE).with_retries(3);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    match (endpoint.tls, tls) {
        (false, _) => Ok(Box::new(tcp)),
        (true, Some(tls)) => Ok(Box::new(tls.connect(&endpoint.to_string(), &endpoint.host, tcp).await?)),
        (true, None) => Err(BrokerError::Connect(format!("{endpoint}: TLS is not set up"))),
    }
}

/// Connects to `endpoint` and authenticates, all within `timeout`.
pub async fn open(endpoint: &Endpoint, tls: Option<&Tls>, timeout: Duration) -> Result<(Reader, Writer), BrokerError> {
    let opened = tokio::time::timeout(timeout, async {
        let stream = connect(endpoint, tls).await?;
        let (read, write) = tokio::io::split(stream);
        let mut reader = Reader(FramedRead::new(read, Resp2::default()));
        let mut writer = Writer { half: write, out: Vec::new() };
        if let Some(password) = &endpoint.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &endpoint.username {
                auth.arg(user);
            }
            auth.arg(password);
            writer.queue(&auth);
            writer.flush().await.map_err(|e| BrokerError::Connect(format!("{endpoint}: {e}")))?;
            match reader.next().await {
                Some(Ok(Event::Other)) => {}
                Some(Ok(Event::Error(e))) => return Err(BrokerError::Refused(format!("{endpoint}: AUTH: {e}"))),
                Some(Err(e)) => return Err(e),
                _ => return Err(BrokerError::Connect(format!("{endpoint}: closed during AUTH"))),
            }
        }
        Ok((reader, writer))
    })
    .await;
    opened.unwrap_or_else(|_| Err(BrokerError::Connect(format!("{endpoint}: no answer within {timeout:?}"))))
}

/// Asks the server at `endpoint` for its `ROLE` on a fresh connection, and
/// fails unless it is a master.
pub async fn check_role(
    endpoint: &Endpoint,
    reader: &mut Reader,
    writer: &mut Writer,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let asked = tokio::time::timeout(timeout, async {
        writer.queue(&redis::cmd("ROLE"));
        writer.flush().await.map_err(|e| BrokerError::Connect(format!("{endpoint}: {e}")))?;
        match reader.0.next().await {
            Some(Ok(BytesFrame::Array(parts))) => match parts.first() {
                Some(BytesFrame::BulkString(role)) if &role[..] == b"master" => Ok(()),
                _ => Err(BrokerError::Connect(format!("{endpoint} is not a master (yet)"))),
            },
            Some(Ok(BytesFrame::Error(e))) => Err(BrokerError::Refused(format!("{endpoint}: ROLE: {e}"))),
            _ => Err(BrokerError::Connect(format!("{endpoint}: no answer to ROLE"))),
        }
    });
    asked
        .await
        .unwrap_or_else(|_| Err(BrokerError::Connect(format!("{endpoint}: no answer to ROLE within {timeout:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn replies_are_read_as_events() {
        let message = BytesFrame::Array(vec![bulk("message"), bulk("c"), bulk("hi")]);
        assert_eq!(
            Event::from_frame(message),
            Event::Message { channel: Bytes::from_static(b"c"), payload: Bytes::from_static(b"hi") }
        );
        let sharded = BytesFrame::Array(vec![bulk("smessage"), bulk("c"), bulk("hi")]);
        assert!(matches!(Event::from_frame(sharded), Event::Message { .. }));
        let sub = BytesFrame::Array(vec![bulk("ssubscribe"), bulk("c"), BytesFrame::Integer(1)]);
        assert_eq!(Event::from_frame(sub), Event::Subscribed(Bytes::from_static(b"c")));
        let unsub = BytesFrame::Array(vec![bulk("unsubscribe"), BytesFrame::Null, BytesFrame::Integer(0)]);
        assert_eq!(Event::from_frame(unsub), Event::Unsubscribed(Bytes::new()));
        assert_eq!(Event::from_frame(BytesFrame::Array(vec![bulk("pong"), bulk("")])), Event::Pong);
        assert_eq!(Event::from_frame(BytesFrame::SimpleString(Bytes::from_static(b"PONG"))), Event::Pong);
        let refused = BytesFrame::Error("NOAUTH Authentication required.".into());
        assert_eq!(Event::from_frame(refused), Event::Error("NOAUTH Authentication required.".into()));
        assert_eq!(Event::from_frame(BytesFrame::SimpleString(Bytes::from_static(b"OK"))), Event::Other);
    }

    #[test]
    fn an_endpoint_never_shows_its_password() {
        let info = redis::IntoConnectionInfo::into_connection_info("redis://user:secret@127.0.0.1:7000").unwrap();
        let endpoint = Endpoint::from_info(&info).unwrap();
        assert_eq!(endpoint.password.as_deref(), Some("secret"));
        assert_eq!(format!("{endpoint:?} {endpoint}"), "redis://127.0.0.1:7000 redis://127.0.0.1:7000");
    }
}
