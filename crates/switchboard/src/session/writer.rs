//! The writing half of a socket: drains the session's outbox and control frames.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use tokio::io::AsyncWrite;

use super::handle::{CloseReason, SessionHandle};

/// Writes queued frames until told to close or stop, or the socket fails.
/// Control frames go first; frames that are already queued are written
/// together and flushed once.
pub async fn run<W: AsyncWrite + Unpin>(mut ws: WebSocketWrite<W>, handle: Arc<SessionHandle>) {
    let result: Result<(), WebSocketError> = async {
        loop {
            let work = handle.take_work().await;
            if let Some(payload) = work.pong {
                ws.write_frame(Frame::pong(Payload::Owned(payload))).await?;
            }
            if work.ping {
                ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await?;
            }
            if let Some((code, reason)) = work.close {
                ws.write_frame(Frame::close(code, reason.as_bytes())).await?;
                ws.flush().await?;
                return Ok(());
            }
            if work.stop {
                return Ok(());
            }
            for frame in work.frames {
                write_text(&mut ws, &handle, frame).await?;
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
