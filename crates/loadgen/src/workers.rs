//! `idle`, `connect` and `storm`, spread over worker processes.
//!
//! A process may hold only so many files (RLIMIT_NOFILE; 20,000 on the reference machine), so
//! socket-heavy scenarios run in `--procs` child processes of this same binary. Pair `i` belongs
//! to worker `i * procs / pairs`, so both users of a pair are always in one process. Children
//! report JSON events on stdout (`progress`, `ready`, `done`) and take commands on stdin
//! (`go`, `close`); the parent samples `/proc` of the servers between those steps.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use hdrhistogram::Histogram;

use crate::client::{classify, Incoming, Protocol, Target, Ws};
use crate::kernel::{self, KernelSnap};
use crate::messaging::bar;
use crate::procstat::{self, CpuSnap};
use crate::report::{new_hist, Report};
use crate::{pair_ids, Cli, Scenario};

/// Events a worker prints, one JSON object per line.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "ev", rename_all = "lowercase")]
pub enum Event {
    Progress {
        n: u64,
    },
    Ready {
        opened: u64,
        failed: u64,
        /// Per-socket time from the 101 response to the welcome, microseconds.
        welcome_after_101_us: Vec<u64>,
        errors: Vec<String>,
    },
    Done {
        ok: u64,
        failed: u64,
        retries: u64,
        /// Per-socket time to welcome, microseconds.
        samples_us: Vec<u64>,
        /// Per-socket time from the 101 response to the welcome, microseconds.
        welcome_after_101_us: Vec<u64>,
        errors: Vec<String>,
    },
}

fn emit(ev: &Event) {
    println!("{}", serde_json::to_string(ev).expect("events serialize to JSON"));
}

/// Keeps an open socket alive: drains it and answers Engine.IO pings.
fn hold(mut ws: Ws, protocol: Protocol) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if protocol == Protocol::Socketio
                    && classify(protocol, t.as_str()) == Incoming::Ping
                    && ws.send(Message::text("3")).await.is_err()
                {
                    break;
                }
            }
        }
    })
}

/// The pair range `[lo, hi)` of worker `index` out of `procs`.
fn slice(pairs: usize, index: usize, procs: usize) -> (usize, usize) {
    (pairs * index / procs, pairs * (index + 1) / procs)
}

/// Worker `index`'s share of a concurrency limit: the shares add up to `concurrency` exactly
/// (a plain `concurrency / procs` would open 198 at a time for 200 over 3 workers), and each
/// worker gets at least 1.
fn share(concurrency: usize, index: usize, procs: usize) -> usize {
    let (lo, hi) = slice(concurrency, index, procs);
    (hi - lo).max(1)
}

/// Errors, keeping only the first few messages.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: StdMutex<Vec<String>>,
}

impl Errors {
    fn add(&self, e: &anyhow::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first.lock().expect("not poisoned");
        if f.len() < 5 {
            f.push(format!("{e:#}"));
        }
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.first.lock().expect("not poisoned"))
    }
}

/// One socket to open: (instance, user, peer).
type Spec = (usize, String, String);

fn specs(run_id: &str, lo: usize, hi: usize) -> Vec<Spec> {
    let mut v = Vec::with_capacity(2 * (hi - lo));
    for i in lo..hi {
        let (a, b) = pair_ids(run_id, i);
        v.push((i, a.clone(), b.clone()));
        v.push((i + 1, b, a));
    }
    v
}

/// Prints `progress` events every 250 ms from a counter.
fn progress_ticker(n: Arc<AtomicU64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(250));
        loop {
            iv.tick().await;
            emit(&Event::Progress { n: n.load(Ordering::Relaxed) });
        }
    })
}

/// What [`open_all`] opened.
struct OpenedAll {
    held: Vec<JoinHandle<()>>,
    /// Per socket: time to welcome (from `since` or the socket's own start), microseconds.
    samples_us: Vec<u64>,
    /// Per socket: time from the 101 response to the welcome, microseconds.
    welcome_after_101_us: Vec<u64>,
    retried: u64,
    errors: Errors,
}

/// Opens all `specs` with bounded concurrency, timing each from `since` (or from its own
/// start when `since` is `None`). Failed attempts are retried up to `retries` times.
async fn open_all(
    target: &Target,
    specs: Vec<Spec>,
    concurrency: usize,
    since: Option<Instant>,
    retries: u32,
) -> OpenedAll {
    let progress = Arc::new(AtomicU64::new(0));
    let ticker = progress_ticker(progress.clone());
    let errors = Errors::default();
    let retried = AtomicU64::new(0);
    let results: Vec<Option<(Ws, u64, u64)>> = futures_util::stream::iter(specs)
        .map(|(inst, u, p)| {
            let progress = progress.clone();
            let errors = &errors;
            let retried = &retried;
            async move {
                let t = since.unwrap_or_else(Instant::now);
                let mut attempt = 0;
                loop {
                    match target.connect_timed(inst, &u, &p).await {
                        Ok((ws, opened)) => {
                            progress.fetch_add(1, Ordering::Relaxed);
                            return Some((ws, t.elapsed().as_micros() as u64, opened.welcome_after_101_us));
                        }
                        Err(_) if attempt < retries => {
                            attempt += 1;
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                        }
                        Err(e) => {
                            errors.add(&e.context(u.clone()));
                            return None;
                        }
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    ticker.abort();
    let mut out = OpenedAll {
        held: Vec::with_capacity(results.len()),
        samples_us: Vec::with_capacity(results.len()),
        welcome_after_101_us: Vec::with_capacity(results.len()),
        retried: retried.load(Ordering::Relaxed),
        errors,
    };
    for (ws, us, w) in results.into_iter().flatten() {
        out.held.push(hold(ws, target.protocol));
        out.samples_us.push(us);
        out.welcome_after_101_us.push(w);
    }
    out
}

/// Worker process: runs its slice, talking to the parent over stdin/stdout.
pub async fn child(cli: &Cli, target: &Target, run_id: &str, index: usize) -> Result<()> {
    let procs = cli.common.procs.max(1);
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut held: Vec<JoinHandle<()>> = Vec::new();
    let mut my_specs = Vec::new();
    match &cli.scenario {
        Scenario::Idle { pairs, concurrency, .. } | Scenario::Storm { pairs, concurrency, .. } => {
            let (lo, hi) = slice(*pairs, index, procs);
            my_specs = specs(run_id, lo, hi);
            let o = open_all(target, my_specs.clone(), share(*concurrency, index, procs), None, 0).await;
            held = o.held;
            emit(&Event::Ready {
                opened: held.len() as u64,
                failed: o.errors.count.load(Ordering::Relaxed),
                welcome_after_101_us: o.welcome_after_101_us,
                errors: o.errors.take(),
            });
        }
        Scenario::Connect { .. } | Scenario::LatencyUnderStorm { .. } => {
            emit(&Event::Ready { opened: 0, failed: 0, welcome_after_101_us: vec![], errors: vec![] })
        }
        _ => bail!("worker processes serve idle, connect, storm and latency-under-storm only"),
    }
    while let Some(line) = stdin.next_line().await? {
        match line.trim() {
            "go" => {
                let o = match &cli.scenario {
                    Scenario::Connect { count, concurrency } => {
                        let (lo, hi) = slice(count / 2, index, procs);
                        open_all(target, specs(run_id, lo, hi), share(*concurrency, index, procs), None, 0).await
                    }
                    Scenario::LatencyUnderStorm { storm_count, storm_concurrency, .. } => {
                        // Other users than the live pairs': the run ID gets a suffix.
                        let (lo, hi) = slice(storm_count / 2, index, procs);
                        let storm_specs = specs(&format!("{run_id}s"), lo, hi);
                        open_all(target, storm_specs, share(*storm_concurrency, index, procs), None, 0).await
                    }
                    Scenario::Storm { .. } => {
                        // Drop every socket at once (TCP FIN, no close frame), then reconnect all.
                        let t = Instant::now();
                        for h in held.drain(..) {
                            h.abort();
                        }
                        let n = my_specs.len();
                        open_all(target, std::mem::take(&mut my_specs), n, Some(t), 5).await
                    }
                    _ => bail!("nothing to do on go"),
                };
                held.extend(o.held);
                emit(&Event::Done {
                    ok: o.samples_us.len() as u64,
                    failed: o.errors.count.load(Ordering::Relaxed),
                    retries: o.retried,
                    samples_us: o.samples_us,
                    welcome_after_101_us: o.welcome_after_101_us,
                    errors: o.errors.take(),
                });
            }
            "close" => break,
            _ => {}
        }
    }
    for h in held {
        h.abort();
    }
    Ok(())
}

/// A worker process of this binary.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// Sends one command line (`go`, `close`) to every worker.
pub async fn send_all(workers: &mut [Worker], cmd: &str) -> Result<()> {
    for w in workers.iter_mut() {
        w.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        w.stdin.flush().await?;
    }
    Ok(())
}

/// Collects one `ready` or `done` event per worker, driving the progress bar meanwhile.
pub async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(usize, Event)>,
    procs: usize,
    pb: &indicatif::ProgressBar,
    deadline: Duration,
) -> Result<Vec<Event>> {
    let mut progress = vec![0u64; procs];
    let mut out: Vec<Option<Event>> = (0..procs).map(|_| None).collect();
    let until = tokio::time::Instant::now() + deadline;
    while out.iter().any(Option::is_none) {
        let (i, ev) = tokio::time::timeout_at(until, rx.recv())
            .await
            .map_err(|_| anyhow!("workers did not finish within {deadline:?}"))?
            .ok_or_else(|| anyhow!("a worker process exited early"))?;
        match ev {
            Event::Progress { n } => {
                progress[i] = n;
                pb.set_position(progress.iter().sum());
            }
            other => out[i] = Some(other),
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Events from the workers, tagged with the worker's index.
pub type EventRx = mpsc::UnboundedReceiver<(usize, Event)>;

/// Starts `--procs` workers of this binary with this process's arguments and `run_id`.
pub fn spawn_workers(cli: &Cli, run_id: &str) -> Result<(Vec<Worker>, EventRx)> {
    let procs = cli.common.procs.max(1);
    let exe = std::env::current_exe()?;
    let mut args: Vec<String> = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--run-id" {
            skip = true;
            continue;
        }
        if a.starts_with("--run-id=") {
            continue;
        }
        args.push(a);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for i in 0..procs {
        let mut child = Command::new(&exe)
            .args(&args)
            .args(["--worker-index", &i.to_string(), "--run-id", run_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn worker")?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take().expect("piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                    if tx.send((i, ev)).is_err() {
                        break;
                    }
                }
            }
        });
        workers.push(Worker { child, stdin });
    }
    Ok((workers, rx))
}

/// Tells the workers to close and waits (bounded) for them to exit.
pub async fn close_all(workers: &mut [Worker]) {
    let _ = send_all(workers, "close").await;
    for w in workers.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(30), w.child.wait()).await;
    }
}

/// Parent: spawns the workers, samples the servers, and builds the report.
pub async fn parent(cli: &Cli, run_id: &str) -> Result<Report> {
    let c = &cli.common;
    let procs = c.procs.max(1);
    let pids = &c.server_pids;
    let rss0 = procstat::rss_kib(pids).unwrap_or(0);
    let redis_rss0 = c.redis_pid.map(|p| procstat::rss_kib(&[p]).unwrap_or(0));
    let kernel0 = KernelSnap::take();
    let (mut workers, mut rx) = spawn_workers(cli, run_id)?;
    let limit = Duration::from_secs(600);
    let (total, what) = match &cli.scenario {
        Scenario::Idle { pairs, .. } | Scenario::Storm { pairs, .. } => (2 * pairs, "open"),
        Scenario::Connect { count, .. } => (count / 2 * 2, "connect"),
        _ => bail!("not a worker scenario"),
    };
    let pb = bar(total as u64, what);
    let t_open = Instant::now();
    let ready = collect(&mut rx, procs, &pb, limit).await?;
    let open_secs = t_open.elapsed().as_secs_f64();
    let (mut opened, mut failed, mut errors) = (0, 0, Vec::new());
    let mut open_welcome = new_hist();
    for ev in ready {
        if let Event::Ready { opened: o, failed: f, welcome_after_101_us, errors: e } = ev {
            opened += o;
            failed += f;
            errors.extend(e);
            record_us(&mut open_welcome, &welcome_after_101_us);
        }
    }
    let mut r = Report::new(cli.scenario.name(), &c.label);
    r.set("protocol", serde_json::to_value(c.protocol)?).set("instances", c.ports.len()).set("procs", procs);
    match &cli.scenario {
        Scenario::Idle { pairs, concurrency, settle_ms, hold_secs } => {
            pb.finish_and_clear();
            tokio::time::sleep(Duration::from_millis(*settle_ms)).await;
            let rss1 = procstat::rss_kib(pids).unwrap_or(0);
            let kernel1 = KernelSnap::take();
            r.set("pairs", *pairs)
                .set("concurrency", *concurrency)
                .set("settle_ms", *settle_ms)
                .set("sockets_opened", opened)
                .set("sockets_failed", failed)
                .setf("open_secs", open_secs, 2)
                .latency("open_welcome_after_101", &open_welcome);
            if let Some(d) = kernel::delta(&kernel0, &kernel1, kernel::page_size()) {
                kernel_fields(&mut r, &d, opened);
            }
            if !pids.is_empty() {
                let per = rss1.saturating_sub(rss0) as f64 / opened.max(1) as f64;
                r.set("server_rss_before_kib", rss0).set("server_rss_after_kib", rss1).setf(
                    "server_rss_per_conn_kib",
                    per,
                    2,
                );
                let limits: Vec<Option<u64>> = pids.iter().map(|&p| procstat::nofile_limit(p)).collect();
                r.set("server_nofile_limits", serde_json::to_value(limits)?);
            }
            if *hold_secs > 0 && !pids.is_empty() {
                let cpu0 = CpuSnap::take(pids, c.redis_pid).unwrap_or_default();
                tokio::time::sleep(Duration::from_secs(*hold_secs)).await;
                let cpu = CpuSnap::take(pids, c.redis_pid).unwrap_or_default().since(&cpu0);
                // The same RSS reading once more, settle + hold after the last open.
                let rss2 = procstat::rss_kib(pids).unwrap_or(0);
                r.setf(
                    "server_rss_per_conn_kib_after_hold",
                    rss2.saturating_sub(rss0) as f64 / opened.max(1) as f64,
                    2,
                );
                let per_10k_per_sec = |s: f64| s / *hold_secs as f64 / (opened.max(1) as f64 / 1e4);
                r.set("hold_secs", *hold_secs).setf(
                    "idle_server_cpu_ms_per_sec_per_10k_conns",
                    1000.0 * per_10k_per_sec(cpu.server),
                    2,
                );
                if c.redis_pid.is_some() {
                    r.setf("idle_redis_cpu_ms_per_sec_per_10k_conns", 1000.0 * per_10k_per_sec(cpu.redis), 2);
                }
            }
            if let (Some(p), Some(before)) = (c.redis_pid, redis_rss0) {
                let after = procstat::rss_kib(&[p]).unwrap_or(0);
                r.set("redis_rss_delta_kib", after.saturating_sub(before)).setf(
                    "redis_rss_per_conn_kib",
                    after.saturating_sub(before) as f64 / opened.max(1) as f64,
                    3,
                );
            }
        }
        Scenario::Connect { count, concurrency } => {
            let own = worker_pids(&workers);
            let cpu0 = CpuSnap::take(pids, c.redis_pid).unwrap_or_default();
            let own0 = procstat::cpu_secs(&own).unwrap_or(0.0);
            let t0 = Instant::now();
            send_all(&mut workers, "go").await?;
            let done = collect(&mut rx, procs, &pb, limit).await?;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = CpuSnap::take(pids, c.redis_pid).unwrap_or_default().since(&cpu0);
            let own_cpu = procstat::cpu_secs(&own).unwrap_or(0.0) - own0;
            pb.finish_and_clear();
            let m = merge_done(done, &mut errors);
            let ok = m.ok;
            r.set("sockets", *count)
                .set("concurrency", *concurrency)
                .set("ok", ok)
                .set("failed", m.failed)
                .setf("secs", secs, 3)
                .setf("upgrades_per_sec", ok as f64 / secs, 0)
                .latency("handshake", &m.to_welcome)
                .latency("welcome_after_101", &m.welcome_after_101)
                .setf("loadgen_cpu_secs", own_cpu, 2);
            if !pids.is_empty() && ok > 0 {
                r.setf("server_cpu_secs", cpu.server, 2).setf(
                    "server_cpu_ms_per_upgrade",
                    1000.0 * cpu.server / ok as f64,
                    4,
                );
            }
        }
        Scenario::Storm { pairs, concurrency, settle_ms } => {
            pb.finish_and_clear();
            r.set("pairs", *pairs)
                .set("concurrency", *concurrency)
                .set("sockets_opened", opened)
                .set("sockets_failed_initial", failed);
            // Server RSS per connection (over the RSS before any socket) after the first open,
            // at its peak during the reconnect, and settle_ms after the last welcome.
            tokio::time::sleep(Duration::from_millis(*settle_ms)).await;
            let rss_open = procstat::rss_kib(pids).unwrap_or(0);
            let peak = Arc::new(AtomicU64::new(rss_open));
            let sampler = {
                let (peak, pids) = (peak.clone(), pids.clone());
                tokio::spawn(async move {
                    let mut iv = tokio::time::interval(Duration::from_millis(100));
                    loop {
                        iv.tick().await;
                        peak.fetch_max(procstat::rss_kib(&pids).unwrap_or(0), Ordering::Relaxed);
                    }
                })
            };
            let pb = bar(opened, "reconnect");
            let t0 = Instant::now();
            send_all(&mut workers, "go").await?;
            let done = collect(&mut rx, procs, &pb, limit).await;
            let secs = t0.elapsed().as_secs_f64();
            pb.finish_and_clear();
            let m = merge_done(done?, &mut errors);
            tokio::time::sleep(Duration::from_millis(*settle_ms)).await;
            sampler.abort();
            let rss_after = procstat::rss_kib(pids).unwrap_or(0);
            r.set("reconnected", m.ok)
                .set("failed", m.failed)
                .set("retries", m.retries)
                .setf("secs_until_all_welcomed", secs, 3)
                .latency("welcome_after", &m.to_welcome)
                .latency("welcome_after_101", &m.welcome_after_101);
            if !pids.is_empty() {
                let per = |kib: u64| kib.saturating_sub(rss0) as f64 / opened.max(1) as f64;
                r.set("settle_ms", *settle_ms)
                    .setf("server_rss_per_conn_kib_after_open", per(rss_open), 2)
                    .setf("server_rss_per_conn_kib_peak_during_reconnect", per(peak.load(Ordering::Relaxed)), 2)
                    .setf("server_rss_per_conn_kib_after_reconnect", per(rss_after), 2);
            }
        }
        _ => {}
    }
    r.set("errors", serde_json::to_value(&errors)?);
    close_all(&mut workers).await;
    Ok(r)
}

/// Kernel memory fields of the idle report. Both ends of every connection are on this machine
/// (loopback): the delta holds the load generator's client sockets as well as the server's. Both
/// ends are idle TCP sockets with empty queues, registered with epoll, so each end is charged
/// alike and the server's share is taken as half.
fn kernel_fields(r: &mut Report, d: &kernel::KernelDelta, conns: u64) {
    let per_conn_kib = |bytes: i64| bytes as f64 / 1024.0 / conns.max(1) as f64;
    r.set("kernel_tcp_inuse_delta", d.tcp_inuse)
        .set("kernel_tcp_mem_delta_bytes", d.tcp_mem_bytes)
        .setf("kernel_tcp_mem_per_conn_both_ends_kib", per_conn_kib(d.tcp_mem_bytes), 3)
        .setf("kernel_tcp_mem_per_server_socket_kib", per_conn_kib(d.tcp_mem_bytes) / 2.0, 3);
    if let Some((total, per_cache)) = &d.slab_bytes {
        let caches: serde_json::Map<String, serde_json::Value> = per_cache
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!((per_conn_kib(*v) * 1000.0).round() / 1000.0)))
            .collect();
        r.set("kernel_slab_delta_bytes", *total)
            .setf("kernel_slab_per_conn_both_ends_kib", per_conn_kib(*total), 3)
            .set("kernel_slab_per_conn_both_ends_by_cache_kib", serde_json::Value::Object(caches))
            .setf("kernel_slab_per_server_socket_kib", per_conn_kib(*total) / 2.0, 3)
            .setf("kernel_per_server_socket_kib", per_conn_kib(*total + d.tcp_mem_bytes) / 2.0, 3);
    }
}

fn worker_pids(workers: &[Worker]) -> Vec<i32> {
    workers.iter().filter_map(|w| w.child.id()).map(|p| p as i32).collect()
}

/// Records microsecond samples into a nanosecond histogram.
fn record_us(hist: &mut Histogram<u64>, samples_us: &[u64]) {
    for &us in samples_us {
        let _ = hist.record((us * 1000).max(1));
    }
}

/// The workers' `done` events, added up.
pub struct Merged {
    /// Sockets welcomed.
    pub ok: u64,
    /// Sockets that failed for good.
    pub failed: u64,
    /// Retried attempts.
    pub retries: u64,
    /// Time to welcome per socket.
    pub to_welcome: Histogram<u64>,
    /// Time from the 101 response to the welcome per socket.
    pub welcome_after_101: Histogram<u64>,
}

/// Adds up `done` events; their error messages go to `errors`.
pub fn merge_done(done: Vec<Event>, errors: &mut Vec<String>) -> Merged {
    let mut m = Merged { ok: 0, failed: 0, retries: 0, to_welcome: new_hist(), welcome_after_101: new_hist() };
    for ev in done {
        if let Event::Done { ok, failed, retries, samples_us, welcome_after_101_us, errors: e } = ev {
            m.ok += ok;
            m.failed += failed;
            m.retries += retries;
            errors.extend(e);
            record_us(&mut m.to_welcome, &samples_us);
            record_us(&mut m.welcome_after_101, &welcome_after_101_us);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_all_pairs_once() {
        let pairs = 1001;
        let procs = 3;
        let mut covered = 0;
        let mut prev_hi = 0;
        for i in 0..procs {
            let (lo, hi) = slice(pairs, i, procs);
            assert_eq!(lo, prev_hi);
            covered += hi - lo;
            prev_hi = hi;
        }
        assert_eq!(covered, pairs);
        let s = specs("r", 4, 6);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], (4, "r4a".into(), "r4b".into()));
        assert_eq!(s[1], (5, "r4b".into(), "r4a".into()));
    }

    #[test]
    fn concurrency_shares_add_up() {
        for (concurrency, procs) in [(200, 3), (200, 2), (64, 2), (7, 3), (1, 3), (10_000, 7)] {
            let shares: Vec<usize> = (0..procs).map(|i| share(concurrency, i, procs)).collect();
            assert!(shares.iter().all(|&s| s >= 1), "{shares:?}");
            if concurrency >= procs {
                assert_eq!(shares.iter().sum::<usize>(), concurrency, "{concurrency} over {procs}: {shares:?}");
            }
        }
    }

    #[test]
    fn merges_done_events() {
        let done = vec![
            Event::Done {
                ok: 2,
                failed: 1,
                retries: 3,
                samples_us: vec![1000, 3000],
                welcome_after_101_us: vec![10, 30],
                errors: vec!["x".into()],
            },
            Event::Done {
                ok: 1,
                failed: 0,
                retries: 0,
                samples_us: vec![2000],
                welcome_after_101_us: vec![20],
                errors: vec![],
            },
        ];
        let mut errors = Vec::new();
        let m = merge_done(done, &mut errors);
        assert_eq!((m.ok, m.failed, m.retries), (3, 1, 3));
        assert_eq!(errors, vec!["x".to_string()]);
        assert_eq!(m.to_welcome.len(), 3);
        assert_eq!(m.welcome_after_101.len(), 3);
        assert!(m.welcome_after_101.equivalent(m.welcome_after_101.value_at_quantile(0.5), 20_000));
    }

    #[test]
    fn events_round_trip() {
        let line = serde_json::to_string(&Event::Progress { n: 3 }).unwrap();
        assert_eq!(line, r#"{"ev":"progress","n":3}"#);
        assert!(matches!(serde_json::from_str::<Event>(&line).unwrap(), Event::Progress { n: 3 }));
    }
}
