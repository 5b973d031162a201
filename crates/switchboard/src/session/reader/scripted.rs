//! A [`Source`] that hands out bytes from memory in the steps of a script,
//! and [`frames`], which reads it as a session reads its socket.
//!
//! Only with the `fuzzing` feature (and in unit tests): the `frames` fuzz
//! target and `tests/fuzz_seeds.rs` drive the session's own read path with it,
//! `Metered`'s mask check and the dropping of the fastwebsockets reader
//! included. The script decides how the bytes arrive: how many per read, and
//! where a read has to wait.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use super::{Frames, Reader, Source};

/// One step of a [`Scripted`] source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next poll (a peek or a read) returns `Pending`, after waking its waker.
    Stall,
    /// The next read hands out at most this many bytes (at least one).
    Bytes(usize),
}

/// Bytes in memory, handed out as a script says. When the script runs out,
/// a read takes all that is left; after the last byte comes the end of the stream.
#[derive(Debug)]
pub struct Scripted {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    bytes: Vec<u8>,
    /// Bytes handed out so far.
    at: usize,
    steps: VecDeque<Step>,
}

impl Scripted {
    /// `bytes`, handed out in `steps`.
    pub fn new(bytes: Vec<u8>, steps: impl IntoIterator<Item = Step>) -> Self {
        Self { inner: Mutex::new(Inner { bytes, at: 0, steps: steps.into_iter().collect() }) }
    }

    /// How many bytes reads have taken so far.
    pub fn taken(&self) -> usize {
        self.inner().at
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Consumes a [`Step::Stall`] at the head of the script, if there is one.
    fn stall(inner: &mut Inner, cx: &mut Context<'_>) -> bool {
        if inner.steps.front() == Some(&Step::Stall) {
            inner.steps.pop_front();
            cx.waker().wake_by_ref();
            return true;
        }
        false
    }
}

impl Source for Scripted {
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<usize>> {
        let mut inner = self.inner();
        if Self::stall(&mut inner, cx) {
            return Poll::Pending;
        }
        let waiting = &inner.bytes[inner.at..];
        let n = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_take(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.inner();
        if Self::stall(&mut inner, cx) {
            return Poll::Pending;
        }
        let most = match inner.steps.pop_front() {
            Some(Step::Bytes(n)) => n.max(1),
            _ => usize::MAX,
        };
        let at = inner.at;
        let n = (inner.bytes.len() - at).min(buf.remaining()).min(most);
        buf.put_slice(&inner.bytes[at..at + n]);
        inner.at += n;
        Poll::Ready(Ok(()))
    }
}

/// The frames of `source`, read as `session::open` sets a session's reader
/// up: `leftover` first (the bytes read past the upgrade request), frames of
/// `max_message_size` bytes or more refused.
pub fn frames(source: Arc<Scripted>, leftover: &[u8], max_message_size: usize) -> Frames<Scripted> {
    Frames::new(Reader::new(source, Box::from(leftover), max_message_size))
}
