//! A real WebSocket client (tokio-tungstenite) with waiting helpers.

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::DEADLINE;

/// A connected client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What ended a connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    /// The close code, if a close frame arrived.
    pub code: Option<u16>,
    /// The close reason.
    pub reason: String,
}

impl Client {
    /// Opens a WebSocket to `url`.
    pub async fn connect(url: &str) -> Result<Self, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws })
    }

    /// Opens a WebSocket with a prepared request, e.g. one with an `Origin` header.
    pub async fn connect_request(request: tungstenite::handshake::client::Request) -> Result<Self, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Self { ws })
    }

    /// Sends a text frame.
    pub async fn send(&mut self, text: impl Into<String>) {
        self.ws.send(Message::text(text.into())).await.expect("send text");
    }

    /// Sends a text frame; whether the socket took it (a dead one may not).
    pub async fn try_send(&mut self, text: impl Into<String>) -> bool {
        self.ws.send(Message::text(text.into())).await.is_ok()
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.expect("send binary");
    }

    /// Sends one raw frame: a text start (`first`) or a continuation, final or not.
    pub async fn send_fragment(&mut self, data: &[u8], first: bool, fin: bool) {
        let opcode = if first { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
        self.ws.send(Message::Frame(Frame::message(data.to_vec(), opcode, fin))).await.expect("send frame");
    }

    /// Writes bytes straight onto the TCP stream, below the WebSocket layer.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(tcp) => tcp.write_all(bytes).await.expect("raw write"),
            _ => unreachable!("tests use plain TCP"),
        }
    }

    /// Reads raw bytes below the WebSocket layer (so no close reply goes
    /// out) until the server's close frame, and returns its code. Frames
    /// before it are skipped.
    pub async fn read_raw_until_close(&mut self) -> Option<u16> {
        use tokio::io::AsyncReadExt;
        let MaybeTlsStream::Plain(tcp) = self.ws.get_mut() else { unreachable!("tests use plain TCP") };
        let mut buf = Vec::new();
        let mut at = 0;
        loop {
            // Whole frames from `at`: server frames are not masked.
            while buf.len() >= at + 2 {
                let (opcode, short) = (buf[at] & 0x0f, usize::from(buf[at + 1] & 0x7f));
                let (head, len) = match short {
                    126 if buf.len() >= at + 4 => (4, usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]]))),
                    127 if buf.len() >= at + 10 => {
                        (10, u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap()) as usize)
                    }
                    126 | 127 => break,
                    n => (2, n),
                };
                if buf.len() < at + head + len {
                    break;
                }
                if opcode == 0x8 {
                    let payload = &buf[at + head..at + head + len];
                    return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                at += head + len;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(DEADLINE, tcp.read(&mut chunk))
                .await
                .expect("a close frame in time")
                .expect("raw read");
            assert!(n > 0, "the connection ended without a close frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a ping carrying `payload`.
    pub async fn ping(&mut self, payload: &[u8]) {
        self.ws.send(Message::Ping(payload.to_vec().into())).await.expect("send ping");
    }

    /// The next pong's payload, failing on a text frame, a close or the deadline.
    pub async fn recv_pong(&mut self) -> Vec<u8> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next()).await.expect("a pong before the deadline");
            match msg {
                Some(Ok(Message::Pong(payload))) => return payload.to_vec(),
                Some(Ok(Message::Ping(_))) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    }

    /// Sends a ping and waits for its pong; returns the text frames that came
    /// before it. The server answers a ping only after it handled every
    /// frame sent before it.
    pub async fn round_trip(&mut self) -> Vec<String> {
        self.ping(b"round trip").await;
        let mut texts = Vec::new();
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next()).await.expect("a pong before the deadline");
            match msg {
                Some(Ok(Message::Pong(payload))) if &payload[..] == b"round trip" => return texts,
                Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    }

    /// The next text frame, failing on anything else or after the deadline.
    pub async fn recv_text(&mut self) -> String {
        next_text(&mut self.ws).await
    }

    /// The next text frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> serde_json::Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("server sent non-JSON {text:?}: {e}"))
    }

    /// The next text frame as JSON, or how the connection ended.
    pub async fn try_recv_json(&mut self) -> Result<serde_json::Value, Closed> {
        match next(&mut self.ws, "a frame").await {
            Next::Text(text) => Ok(serde_json::from_str(&text).expect("JSON from the server")),
            Next::Closed(closed) => Err(closed),
            Next::Other(other) => panic!("unexpected frame {other:?}"),
        }
    }

    /// Reads until the connection closes; fails if a text frame arrives first.
    pub async fn expect_closed(&mut self) -> Closed {
        match next(&mut self.ws, "close").await {
            Next::Closed(closed) => closed,
            other => panic!("expected close, got {other:?}"),
        }
    }

    /// Sends a normal close frame and waits for the server's answer.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(DEADLINE, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }

    /// Splits into a sending and a receiving half, to do both at once.
    pub fn split(self) -> (ClientTx, ClientRx) {
        let (tx, rx) = self.ws.split();
        (ClientTx(tx), ClientRx(rx))
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_connection(self) {
        drop(self);
    }

    /// Resets the TCP connection (RST, not FIN): whatever the server still
    /// writes to it is lost, as when a phone's network changes.
    pub fn reset_connection(self) {
        if let MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO)).expect("SO_LINGER 0");
        }
        drop(self);
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The sending half of a [`Client`].
pub struct ClientTx(futures_util::stream::SplitSink<Ws, Message>);

/// The receiving half of a [`Client`].
pub struct ClientRx(futures_util::stream::SplitStream<Ws>);

impl ClientTx {
    /// Sends a text frame.
    pub async fn send(&mut self, text: String) {
        self.0.send(Message::text(text)).await.expect("send text");
    }

    /// Sends a ping carrying `payload`.
    pub async fn ping(&mut self, payload: &[u8]) {
        self.0.send(Message::Ping(payload.to_vec().into())).await.expect("send ping");
    }

    /// Joins the halves again.
    pub fn reunite(self, rx: ClientRx) -> Client {
        Client { ws: self.0.reunite(rx.0).expect("halves of one client") }
    }
}

impl ClientRx {
    /// The next text frame.
    pub async fn recv_text(&mut self) -> String {
        next_text(&mut self.0).await
    }
}

/// What the next frame told, pings and pongs skipped.
#[derive(Debug)]
enum Next {
    Text(String),
    Closed(Closed),
    Other(Message),
}

/// The next frame of `ws` that is not a ping or pong, failing after [`DEADLINE`]
/// (`what` says what was awaited). A connection that ends without a close
/// frame is `Closed` without a code.
async fn next<S>(ws: &mut S, what: &str) -> Next
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next()).await;
        match msg.unwrap_or_else(|_| panic!("{what} before the deadline")) {
            Some(Ok(Message::Text(text))) => return Next::Text(text.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                return Next::Closed(Closed {
                    code: frame.as_ref().map(|f| f.code.into()),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                })
            }
            Some(Ok(other)) => return Next::Other(other),
            Some(Err(_)) | None => return Next::Closed(Closed { code: None, reason: String::new() }),
        }
    }
}

/// The next text frame of `ws`, failing on anything else.
async fn next_text<S>(ws: &mut S) -> String
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next(ws, "a frame").await {
        Next::Text(text) => text,
        other => panic!("expected a text frame, got {other:?}"),
    }
}
