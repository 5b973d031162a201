//! The writing half of a socket: drains the outbox and control frames.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use super::handle::{CloseReason, SessionHandle};

/// Frames the reader asks the writer to send ahead of the outbox.
#[derive(Debug)]
pub enum Control {
    /// Answer a ping.
    Pong(Vec<u8>),
    /// Send a ping.
    Ping,
    /// Send a close frame and stop.
    Close(u16, &'static str),
}

/// Writes queued frames until told to close or the socket fails. Frames that
/// are already queued are written together and flushed once.
pub async fn run<W: AsyncWrite + Unpin>(
    mut ws: WebSocketWrite<W>,
    mut outbox: mpsc::Receiver<Bytes>,
    mut control: mpsc::Receiver<Control>,
    handle: Arc<SessionHandle>,
) {
    let result: Result<(), WebSocketError> = async {
        loop {
            tokio::select! {
                biased;
                ctrl = control.recv() => match ctrl {
                    Some(Control::Pong(payload)) => ws.write_frame(Frame::pong(Payload::Owned(payload))).await?,
                    Some(Control::Ping) => ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await?,
                    Some(Control::Close(code, reason)) => {
                        ws.write_frame(Frame::close(code, reason.as_bytes())).await?;
                        ws.flush().await?;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                frame = outbox.recv() => {
                    let Some(frame) = frame else { return Ok(()) };
                    write_text(&mut ws, &handle, frame).await?;
                    while let Ok(frame) = outbox.try_recv() {
                        write_text(&mut ws, &handle, frame).await?;
                    }
                }
            }
            ws.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, session = handle.id, "socket write failed");
        handle.close(CloseReason::GONE);
    }
}

async fn write_text<W: AsyncWrite + Unpin>(
    ws: &mut WebSocketWrite<W>,
    handle: &SessionHandle,
    frame: Bytes,
) -> Result<(), WebSocketError> {
    let len = frame.len();
    ws.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
    handle.sent(len);
    crate::metrics::message_out(len);
    Ok(())
}
