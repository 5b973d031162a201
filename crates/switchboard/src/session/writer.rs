//! The writing side of a socket: what the session has to send, encoded as
//! server frames into one buffer and written with one call.
//!
//! fastwebsockets' writer makes one `write` system call per frame and keeps a
//! buffer for the socket's life; encoding a whole batch here (with
//! [`wire::encode`]) makes one call per batch and keeps nothing between
//! batches. `write_some` and `write_all` write through a shared
//! `&TcpStream` (tokio implements `AsyncWrite` only for an owned one).

use bytes::Bytes;
use fastwebsockets::OpCode;
use tokio::net::TcpStream;

use super::outbox::Work;
use super::wire;
use crate::protocol::ServerEvent;

/// What one batch puts on the wire.
#[derive(Debug)]
pub struct Batch {
    /// The encoded frames: pong and ping first, then text frames, oldest first.
    pub bytes: Vec<u8>,
    /// Text frames in it.
    pub texts: usize,
    /// The queued frames' payload bytes (as counted by the outbox; an `ack` is not queued).
    pub text_bytes: usize,
}

/// Encodes `work` as one batch.
pub fn batch(work: &Work) -> Batch {
    let text_bytes: usize = work.frames.iter().map(Bytes::len).sum();
    let headers: usize = work.frames.iter().map(|f| wire::header_len(f.len())).sum();
    let pong = work.pong.as_ref().map_or(0, |p| wire::header_len(p.len()) + p.len());
    let ping = if work.ping { wire::header_len(0) } else { 0 };
    // After the frames: an error event about a message comes before its ack.
    let ack = (work.ack != 0).then(|| ServerEvent::Ack { n: work.ack }.to_bytes());
    let acks = ack.as_ref().map_or(0, |a| wire::header_len(a.len()) + a.len());
    let mut bytes = Vec::with_capacity(pong + ping + headers + text_bytes + acks);
    if let Some(payload) = &work.pong {
        wire::encode(&mut bytes, OpCode::Pong, payload);
    }
    if work.ping {
        wire::encode(&mut bytes, OpCode::Ping, b"");
    }
    for frame in &work.frames {
        wire::encode(&mut bytes, OpCode::Text, frame);
    }
    if let Some(ack) = &ack {
        wire::encode(&mut bytes, OpCode::Text, ack);
    }
    Batch { bytes, texts: work.frames.len() + usize::from(ack.is_some()), text_bytes }
}

/// Writes some of `buf`; how much, it says.
pub async fn write_some(stream: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        stream.writable().await?;
        match stream.try_write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// Writes all of `buf`.
pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match write_some(stream, buf).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::wire::tests::parse;

    #[tokio::test]
    async fn a_batch_reads_back_as_the_frames_it_holds_in_order() {
        let sizes = [0usize, 1, 125, 126, 127, 65535, 65536, 70_000];
        let work = Work {
            pong: Some(Box::from(&b"p"[..])),
            ping: true,
            frames: sizes.iter().map(|&n| Bytes::from(vec![b'a' + (n % 26) as u8; n])).collect(),
            ack: 0,
        };
        let b = batch(&work);
        assert_eq!(b.texts, sizes.len());
        assert_eq!(b.text_bytes, sizes.iter().sum::<usize>());
        assert_eq!(b.bytes.len(), b.bytes.capacity(), "sized exactly up front");
        let got = parse(b.bytes).await;
        assert_eq!(got[0], (OpCode::Pong, b"p".to_vec()));
        assert_eq!(got[1], (OpCode::Ping, Vec::new()));
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(got[2 + i].0, OpCode::Text);
            assert_eq!(got[2 + i].1, vec![b'a' + (n % 26) as u8; n], "frame of {n} bytes");
        }
        assert_eq!(got.len(), 2 + sizes.len());
    }

    #[tokio::test]
    async fn an_ack_goes_after_the_frames_it_may_follow() {
        let work = Work { frames: [Bytes::from_static(b"{\"type\":\"error\"}")].into(), ack: 7, ..Work::default() };
        let b = batch(&work);
        assert_eq!(b.texts, 2);
        assert_eq!(b.text_bytes, work.frames[0].len(), "only queued bytes count for the outbox");
        assert_eq!(b.bytes.len(), b.bytes.capacity(), "sized exactly up front");
        let got = parse(b.bytes).await;
        assert_eq!(got[1], (OpCode::Text, br#"{"type":"ack","n":7}"#.to_vec()));
    }
}
