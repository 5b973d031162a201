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
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{classify, encode_bench, now_ns, Incoming, Protocol, Target, Ws};
use crate::procstat::CpuSnap;
use crate::report::{new_hist, Report};
use crate::workers;
use crate::{pair_ids, Cli, Common};

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
    /// One histogram per phase.
    hists: Vec<Histogram<u64>>,
    reordered: u64,
}

/// Send-time windows that sort latency samples into phases: phase `i` holds the messages sent
/// in `[bounds[i], bounds[i + 1])`, on [`now_ns`]'s clock. A bound not set yet is `u64::MAX`,
/// so a phase whose end is unknown still takes everything sent since its start.
pub struct Phases {
    bounds: Vec<AtomicU64>,
}

impl Phases {
    /// `n` phases, no bound set yet.
    pub fn new(n: usize) -> Self {
        Self { bounds: (0..=n).map(|_| AtomicU64::new(u64::MAX)).collect() }
    }

    /// Number of phases.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Sets bound `i` (the start of phase `i`, the end of phase `i - 1`).
    pub fn set(&self, i: usize, ns: u64) {
        self.bounds[i].store(ns, Ordering::Release);
    }

    /// The phase a message sent at `ts` belongs to, if any.
    pub fn phase_of(&self, ts: u64) -> Option<usize> {
        (0..self.len()).find(|&i| {
            let lo = self.bounds[i].load(Ordering::Acquire);
            let hi = self.bounds[i + 1].load(Ordering::Acquire);
            lo <= ts && ts < hi
        })
    }
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
    phases: Arc<Phases>,
    stop: CancellationToken,
) -> ReaderOut {
    let mut hists: Vec<Histogram<u64>> = (0..phases.len()).map(|_| new_hist()).collect();
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
                if let Some(i) = phases.phase_of(ts) {
                    let _ = hists[i].record(now.saturating_sub(ts).max(1));
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
    ReaderOut { hists, reordered }
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
    stop: CancellationToken,
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
                _ = stop.cancelled() => break,
                _ = iv.tick() => {}
            }
        } else if let Some(w) = &window {
            tokio::select! {
                _ = stop.cancelled() => break,
                p = w.acquire() => match p {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
            }
        }
        if stop.is_cancelled() {
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

/// Pairs exchanging messages: every socket has a reader and a sender task.
struct Live {
    counters: Arc<Counters>,
    sinks: Vec<Sink>,
    readers: Vec<JoinHandle<ReaderOut>>,
    senders: Vec<JoinHandle<()>>,
    stop_send: CancellationToken,
    stop_read: CancellationToken,
    /// When the senders started.
    start: tokio::time::Instant,
    /// The same moment on [`now_ns`]'s clock.
    start_ns: u64,
}

/// What the readers saw, once the run is over.
struct LiveOut {
    /// One latency histogram per phase.
    hists: Vec<Histogram<u64>>,
    reordered: u64,
}

impl Live {
    /// Opens the pairs and starts sending; samples go to `phases`.
    async fn start(target: &Target, run_id: &str, p: &Params, phases: Arc<Phases>) -> Result<Live> {
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
        let stop_send = CancellationToken::new();
        let stop_read = CancellationToken::new();
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
                phases.clone(),
                stop_read.clone(),
            )));
            senders.push(tokio::spawn(sender(
                sink,
                target.protocol,
                p.size,
                p.pacing,
                n,
                windows[j].clone(),
                counters.clone(),
                stop_send.clone(),
            )));
        }
        Ok(Live { counters, sinks, readers, senders, stop_send, stop_read, start, start_ns })
    }

    /// Stops the senders, waits (bounded) for what they sent, and closes the sockets.
    async fn finish(self) -> Result<LiveOut> {
        self.stop_send.cancel();
        for s in self.senders {
            let _ = s.await;
        }
        // Drain: wait (bounded) until everything sent has arrived.
        let counters = &self.counters;
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while counters.received.load(Ordering::Relaxed) < counters.sent.load(Ordering::Relaxed)
            && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_read.cancel();
        let mut hists: Vec<Histogram<u64>> = Vec::new();
        let mut reordered = 0;
        for r in self.readers {
            let out = r.await?;
            if hists.is_empty() {
                hists = out.hists.iter().map(|_| new_hist()).collect();
            }
            for (h, o) in hists.iter_mut().zip(&out.hists) {
                h.add(o).ok();
            }
            reordered += out.reordered;
        }
        // Close politely (close frame) so servers see normal closes.
        let closes = self.sinks.into_iter().map(|s| async move {
            let _ = s.lock().await.close().await;
        });
        let _ = tokio::time::timeout(Duration::from_secs(3), futures_util::future::join_all(closes)).await;
        Ok(LiveOut { hists, reordered })
    }
}

/// One second ticks on a progress bar until aborted.
fn ticker(pb: &ProgressBar) -> JoinHandle<()> {
    let pb = pb.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        iv.tick().await;
        loop {
            iv.tick().await;
            pb.inc(1);
        }
    })
}

/// Runs a latency or throughput scenario and builds its report.
pub async fn run(c: &Common, target: &Target, run_id: &str, name: &str, p: Params) -> Result<Report> {
    let phases = Arc::new(Phases::new(1));
    let live = Live::start(target, run_id, &p, phases.clone()).await?;
    let n = 2 * p.pairs;
    let warm_end = live.start + p.warmup;
    let end = warm_end + p.duration;
    let record_from = live.start_ns + p.warmup.as_nanos() as u64;
    phases.set(0, record_from);
    phases.set(1, record_from + p.duration.as_nanos() as u64);

    // Snapshots at the start and end of the measured window.
    let total = (p.warmup + p.duration).as_secs();
    let pb = bar(total, name);
    let ticker = ticker(&pb);
    tokio::time::sleep_until(warm_end).await;
    let counters = live.counters.clone();
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
    let out = live.finish().await?;
    let hist = &out.hists[0];
    let reordered = out.reordered;

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
        .latency("latency", hist)
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

/// Parameters of `latency-under-storm`.
pub struct StormParams {
    /// The live pairs and their pacing; `duration` is unused (the storm decides the length).
    pub live: Params,
    /// Measured quiet time before the storm.
    pub quiet: Duration,
    /// Measured time after every storm socket has its welcome.
    pub after: Duration,
    /// Sockets the storm opens (as pairs, over `--procs` worker processes).
    pub storm_count: usize,
    /// Storm handshakes in flight at once, over all workers.
    pub storm_concurrency: usize,
}

/// `latency-under-storm`: live pairs keep sending at a fixed rate; their latency is measured
/// while quiet, while `storm_count` other sockets connect (opened by worker processes, so the
/// storm's own client work does not run in this process), and for a while after.
pub async fn run_under_storm(cli: &Cli, target: &Target, run_id: &str, sp: StormParams) -> Result<Report> {
    let c = &cli.common;
    let procs = c.procs.max(1);
    let limit = Duration::from_secs(600);
    let (mut workers, mut rx) = workers::spawn_workers(cli, run_id)?;
    let hidden = ProgressBar::hidden();
    workers::collect(&mut rx, procs, &hidden, limit).await?;

    // Phases: 0 quiet, 1 storm, 2 after.
    let phases = Arc::new(Phases::new(3));
    let live = Live::start(target, run_id, &sp.live, phases.clone()).await?;
    let counters = live.counters.clone();
    tokio::time::sleep_until(live.start + sp.live.warmup).await;
    phases.set(0, now_ns());
    tokio::time::sleep(sp.quiet).await;

    let pb = bar(sp.storm_count as u64, "storm");
    let cpu0 = CpuSnap::take(&c.server_pids, c.redis_pid).unwrap_or_default();
    let t0 = Instant::now();
    phases.set(1, now_ns());
    workers::send_all(&mut workers, "go").await?;
    let done = workers::collect(&mut rx, procs, &pb, limit).await;
    phases.set(2, now_ns());
    let storm_secs = t0.elapsed().as_secs_f64();
    let cpu = CpuSnap::take(&c.server_pids, c.redis_pid).unwrap_or_default().since(&cpu0);
    pb.finish_and_clear();
    tokio::time::sleep(sp.after).await;
    phases.set(3, now_ns());
    let out = live.finish().await?;
    workers::close_all(&mut workers).await;
    let mut errors = Vec::new();
    let m = workers::merge_done(done?, &mut errors);

    let sent = counters.sent.load(Ordering::Relaxed);
    let received = counters.received.load(Ordering::Relaxed);
    let mut r = Report::new("latency-under-storm", &c.label);
    r.set("protocol", serde_json::to_value(target.protocol)?)
        .set("instances", target.instances())
        .set("pairs", sp.live.pairs)
        .set("size_bytes", sp.live.size);
    if let Pacing::Rate(rate) = sp.live.pacing {
        r.set("target_rate", rate);
    }
    r.setf("quiet_secs", sp.quiet.as_secs_f64(), 2)
        .setf("after_secs", sp.after.as_secs_f64(), 2)
        .set("storm_sockets", sp.storm_count / 2 * 2)
        .set("storm_concurrency", sp.storm_concurrency)
        .set("storm_ok", m.ok)
        .set("storm_failed", m.failed)
        .setf("storm_secs", storm_secs, 3)
        .setf("storm_upgrades_per_sec", m.ok as f64 / storm_secs, 0)
        .latency("storm_handshake", &m.to_welcome)
        .latency("storm_welcome_after_101", &m.welcome_after_101)
        .latency("quiet_latency", &out.hists[0])
        .latency("storm_latency", &out.hists[1])
        .latency("after_latency", &out.hists[2])
        .set("sent_total", sent)
        .set("received_total", received)
        .set("lost", sent.saturating_sub(received))
        .set("reordered", out.reordered)
        .set("send_errors", counters.send_errors.load(Ordering::Relaxed))
        .set("disconnects", counters.disconnects.load(Ordering::Relaxed))
        .set("server_errors", counters.server_errors.load(Ordering::Relaxed));
    if !c.server_pids.is_empty() {
        r.setf("storm_server_cpu_secs", cpu.server, 2);
        if c.redis_pid.is_some() {
            r.setf("storm_redis_cpu_secs", cpu.redis, 2);
        }
    }
    r.set("errors", serde_json::to_value(&errors)?);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_sort_by_send_time() {
        let p = Phases::new(3);
        assert_eq!(p.len(), 3);
        assert_eq!(p.phase_of(5), None, "nothing is recorded before the first bound is set");
        p.set(0, 100);
        assert_eq!(p.phase_of(99), None);
        assert_eq!(p.phase_of(100), Some(0));
        assert_eq!(p.phase_of(1_000_000), Some(0), "an open phase takes everything after its start");
        p.set(1, 200);
        assert_eq!(p.phase_of(199), Some(0));
        assert_eq!(p.phase_of(200), Some(1));
        p.set(2, 300);
        p.set(3, 400);
        assert_eq!(p.phase_of(250), Some(1));
        assert_eq!(p.phase_of(300), Some(2));
        assert_eq!(p.phase_of(399), Some(2));
        assert_eq!(p.phase_of(400), None, "nothing after the last bound");
    }
}
