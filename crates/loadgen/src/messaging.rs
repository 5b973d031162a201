//! `latency` and `throughput`: pairs exchange sequenced, timestamped JSON messages.
//!
//! Socket `2i` and `2i+1` are the two users of pair `i`; each one sends to the other. Every
//! message carries `seq` (per sending socket) and `ts` (send time on this process's monotonic
//! clock), so the receiver computes one-way latency and detects loss and reordering.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{classify, encode_bench, now_ns, Incoming, Protocol, Target, Ws};
use crate::procstat::CpuSnap;
use crate::report::{new_hist, Report};
use crate::{pair_ids, Common};

/// How senders are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pacing {
    /// Total messages per second over all sockets, evenly spread.
    Rate(u64),
    /// Messages in flight per sending socket.
    Window(usize),
}

/// Parameters of a messaging run.
pub struct Params {
    /// Pairs (2 sockets each).
    pub pairs: usize,
    /// Bytes per JSON message.
    pub size: usize,
    /// Pacing.
    pub pacing: Pacing,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
}

type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    send_errors: AtomicU64,
    disconnects: AtomicU64,
    server_errors: AtomicU64,
}

struct ReaderOut {
    hist: Histogram<u64>,
    reordered: u64,
}

/// Progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Opens `pairs` pairs (both users), 64 at a time; returns sockets ordered `2i`, `2i+1`.
async fn open_pairs(target: &Target, run_id: &str, pairs: usize) -> Result<Vec<Ws>> {
    let pb = bar(pairs as u64, "open pairs");
    let mut opened: Vec<(usize, Ws, Ws)> = futures_util::stream::iter(0..pairs)
        .map(|i| {
            let pb = pb.clone();
            async move {
                let (a, b) = pair_ids(run_id, i);
                let wa = target.connect(i, &a, &b).await.with_context(|| format!("open {a}"))?;
                let wb = target.connect(i + 1, &b, &a).await.with_context(|| format!("open {b}"))?;
                pb.inc(1);
                anyhow::Ok((i, wa, wb))
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    pb.finish_and_clear();
    opened.sort_by_key(|(i, _, _)| *i);
    Ok(opened.into_iter().flat_map(|(_, a, b)| [a, b]).collect())
}

#[allow(clippy::too_many_arguments)]
async fn reader(
    mut stream: SplitStream<Ws>,
    sink: Sink,
    protocol: Protocol,
    peer_window: Option<Arc<Semaphore>>,
    counters: Arc<Counters>,
    record_from: u64,
    record_until: u64,
    stop: CancellationToken,
) -> ReaderOut {
    let mut hist = new_hist();
    let mut expected = 0u64;
    let mut reordered = 0u64;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = stream.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                if !stop.is_cancelled() {
                    counters.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            Some(Ok(_)) => continue,
        };
        match classify(protocol, text.as_str()) {
            Incoming::Bench { seq, ts } => {
                let now = now_ns();
                counters.received.fetch_add(1, Ordering::Relaxed);
                if let Some(w) = &peer_window {
                    w.add_permits(1);
                }
                if ts >= record_from && ts < record_until {
                    let _ = hist.record(now.saturating_sub(ts).max(1));
                }
                if seq >= expected {
                    expected = seq + 1;
                } else {
                    reordered += 1;
                }
            }
            Incoming::Ping => {
                let _ = sink.lock().await.send(Message::text("3")).await;
            }
            Incoming::Error => {
                counters.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            Incoming::Welcome | Incoming::Other => {}
        }
    }
    ReaderOut { hist, reordered }
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    sink: Sink,
    protocol: Protocol,
    size: usize,
    pacing: Pacing,
    senders: usize,
    window: Option<Arc<Semaphore>>,
    counters: Arc<Counters>,
    end: tokio::time::Instant,
) {
    let mut seq = 0u64;
    let mut interval = match pacing {
        Pacing::Rate(rate) => {
            let period = Duration::from_secs_f64(senders as f64 / rate.max(1) as f64);
            let offset = period.mul_f64(rand::random::<f64>());
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            iv.set_missed_tick_behavior(MissedTickBehavior::Skip);
            Some(iv)
        }
        Pacing::Window(_) => None,
    };
    loop {
        if let Some(iv) = interval.as_mut() {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                _ = iv.tick() => {}
            }
        } else if let Some(w) = &window {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                p = w.acquire() => match p {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
            }
        }
        if tokio::time::Instant::now() >= end {
            break;
        }
        let msg = encode_bench(protocol, seq, now_ns(), size);
        if sink.lock().await.send(Message::text(msg)).await.is_err() {
            counters.send_errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        counters.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
}

/// Runs a latency or throughput scenario and builds its report.
pub async fn run(c: &Common, target: &Target, run_id: &str, name: &str, p: Params) -> Result<Report> {
    let sockets = open_pairs(target, run_id, p.pairs).await?;
    let n = sockets.len();
    let counters = Arc::new(Counters::default());
    let windows: Vec<Option<Arc<Semaphore>>> = (0..n)
        .map(|_| match p.pacing {
            Pacing::Window(w) => Some(Arc::new(Semaphore::new(w))),
            Pacing::Rate(_) => None,
        })
        .collect();
    let start = tokio::time::Instant::now();
    let start_ns = now_ns();
    let warm_end = start + p.warmup;
    let end = warm_end + p.duration;
    let record_from = start_ns + p.warmup.as_nanos() as u64;
    let record_until = record_from + p.duration.as_nanos() as u64;
    let stop = CancellationToken::new();

    let mut sinks = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    for (j, ws) in sockets.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let sink: Sink = Arc::new(Mutex::new(sink));
        sinks.push(sink.clone());
        readers.push(tokio::spawn(reader(
            stream,
            sink.clone(),
            target.protocol,
            windows[j ^ 1].clone(),
            counters.clone(),
            record_from,
            record_until,
            stop.clone(),
        )));
        senders.push(tokio::spawn(sender(
            sink,
            target.protocol,
            p.size,
            p.pacing,
            n,
            windows[j].clone(),
            counters.clone(),
            end,
        )));
    }

    // Snapshots at the start and end of the measured window.
    let total = (p.warmup + p.duration).as_secs();
    let pb = bar(total, name);
    let ticker = {
        let pb = pb.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            iv.tick().await;
            loop {
                iv.tick().await;
                pb.inc(1);
            }
        })
    };
    tokio::time::sleep_until(warm_end).await;
    let cpu0 = CpuSnap::take(&c.server_pids, c.redis_pid).unwrap_or_default();
    let me = [std::process::id() as i32];
    let own0 = crate::procstat::cpu_secs(&me).unwrap_or(0.0);
    let recv0 = counters.received.load(Ordering::Relaxed);
    let sent0 = counters.sent.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep_until(end).await;
    let cpu1 = CpuSnap::take(&c.server_pids, c.redis_pid).unwrap_or_default();
    let own1 = crate::procstat::cpu_secs(&me).unwrap_or(0.0);
    let recv1 = counters.received.load(Ordering::Relaxed);
    let sent1 = counters.sent.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    ticker.abort();
    pb.finish_and_clear();

    for s in senders {
        let _ = s.await;
    }
    // Drain: wait (bounded) until everything sent has arrived.
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while counters.received.load(Ordering::Relaxed) < counters.sent.load(Ordering::Relaxed)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let mut hist = new_hist();
    let mut reordered = 0;
    for r in readers {
        let out = r.await?;
        hist.add(&out.hist).ok();
        reordered += out.reordered;
    }
    // Close politely (close frame) so servers see normal closes.
    let closes = sinks.into_iter().map(|s| async move {
        let _ = s.lock().await.close().await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(3), futures_util::future::join_all(closes)).await;

    let sent = counters.sent.load(Ordering::Relaxed);
    let received = counters.received.load(Ordering::Relaxed);
    let delivered = recv1 - recv0;
    let cpu = cpu1.since(&cpu0);
    let mut r = Report::new(name, &c.label);
    r.set("protocol", serde_json::to_value(target.protocol)?)
        .set("instances", target.instances())
        .set("pairs", p.pairs)
        .set("sockets", n)
        .set("size_bytes", p.size);
    match p.pacing {
        Pacing::Rate(rate) => r.set("target_rate", rate),
        Pacing::Window(w) => r.set("window_per_socket", w),
    };
    r.setf("measured_secs", secs, 2)
        .setf("offered_msgs_per_sec", (sent1 - sent0) as f64 / secs, 0)
        .setf("delivered_msgs_per_sec", delivered as f64 / secs, 0)
        .set("sent_total", sent)
        .set("received_total", received)
        .set("lost", sent.saturating_sub(received))
        .set("reordered", reordered)
        .set("send_errors", counters.send_errors.load(Ordering::Relaxed))
        .set("disconnects", counters.disconnects.load(Ordering::Relaxed))
        .set("server_errors", counters.server_errors.load(Ordering::Relaxed))
        .set("loss_and_reorder_zero", sent == received && reordered == 0)
        .latency("latency", &hist)
        .setf("loadgen_cpu_secs", own1 - own0, 2);
    if !c.server_pids.is_empty() && delivered > 0 {
        let per100k = |cpu_s: f64| cpu_s / (delivered as f64 / 100_000.0);
        r.setf("server_cpu_secs", cpu.server, 2).setf("server_cpu_secs_per_100k_msgs", per100k(cpu.server), 3).setf(
            "msgs_per_server_cpu_sec",
            delivered as f64 / cpu.server,
            0,
        );
        if c.redis_pid.is_some() {
            r.setf("redis_cpu_secs", cpu.redis, 2).setf("redis_cpu_secs_per_100k_msgs", per100k(cpu.redis), 3).setf(
                "msgs_per_server_plus_redis_cpu_sec",
                delivered as f64 / (cpu.server + cpu.redis),
                0,
            );
        }
    }
    Ok(r)
}
