//! A real WebSocket client (tokio-tungstenite) with waiting helpers.

use futures_util::{SinkExt, StreamExt};
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

    /// The next text frame, failing on anything else or after the deadline.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next()).await.expect("a frame before the deadline");
            match msg {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> serde_json::Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("server sent non-JSON {text:?}: {e}"))
    }

    /// The next text frame as JSON, or how the connection ended.
    pub async fn try_recv_json(&mut self) -> Result<serde_json::Value, Closed> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next()).await.expect("a frame before the deadline");
            match msg {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).expect("JSON from the server")),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return Err(Closed {
                        code: frame.as_ref().map(|f| f.code.into()),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    })
                }
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
                Some(Err(_)) | None => return Err(Closed { code: None, reason: String::new() }),
            }
        }
    }

    /// Reads until the connection closes; fails if a text frame arrives first.
    pub async fn expect_closed(&mut self) -> Closed {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next()).await.expect("close before the deadline");
            match msg {
                Some(Ok(Message::Close(frame))) => {
                    return Closed {
                        code: frame.as_ref().map(|f| f.code.into()),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    };
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("expected close, got {other:?}"),
                Some(Err(_)) | None => return Closed { code: None, reason: String::new() },
            }
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

    /// Joins the halves again.
    pub fn reunite(self, rx: ClientRx) -> Client {
        Client { ws: self.0.reunite(rx.0).expect("halves of one client") }
    }
}

impl ClientRx {
    /// The next text frame.
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.0.next()).await.expect("a frame before the deadline");
            match msg {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}
