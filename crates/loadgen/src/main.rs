//! `switchboard-loadgen`: a load generator for switchboard and for WebSocket signaling peers
//! (Socket.IO + redis-adapter, ws + ioredis) with the same pair semantics.
//!
//! Scenarios: `idle` (server RSS and kernel memory per connection), `latency` (one-way latency
//! at a fixed rate), `throughput` (windowed max rate and server CPU per message), `connect`
//! (upgrades/s), `storm` (mass reconnect) and `latency-under-storm` (live pairs' latency while
//! other sockets connect) and `rolling` (loss, duplicates and reordering while the orchestrator
//! restarts every instance in turn). Every run prints a readable table on stderr and one JSON line on
//! stdout. Only loopback targets are accepted.

mod client;
mod kernel;
mod messaging;
mod procstat;
mod report;
mod rolling;
mod workers;

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use client::{Protocol, Target};

/// Load generator for switchboard and comparable signaling servers (loopback only).
#[derive(Parser, Debug, Clone)]
#[command(name = "switchboard-loadgen", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options shared by all scenarios.
#[derive(Args, Debug, Clone)]
struct Common {
    /// URL template; `{port}`, `{u}` (user ID) and `{p}` (peer ID) are filled in.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:{port}/ws?userID={u}&peerID={p}")]
    url: String,
    /// Server ports. The two users of pair i go to ports[i % n] and ports[(i+1) % n], so with two
    /// ports every pair spans both instances.
    #[arg(long, global = true, value_delimiter = ',', default_value = "8080")]
    ports: Vec<u16>,
    /// Wire dialect of the server.
    #[arg(long, global = true, value_enum, default_value = "raw")]
    protocol: Protocol,
    /// Number of loopback source addresses (127.0.0.2, 127.0.0.3, ...) to bind client sockets to.
    #[arg(long, global = true, default_value_t = 8)]
    sources: u8,
    /// Server PIDs whose RSS / CPU time are read from /proc (comma separated).
    #[arg(long = "server-pids", global = true, value_delimiter = ',')]
    server_pids: Vec<i32>,
    /// Redis PID, for the Redis share of CPU time.
    #[arg(long, global = true)]
    redis_pid: Option<i32>,
    /// Label put into the report (e.g. `switchboard`, `socketio`, `ws-ioredis`).
    #[arg(long, global = true, default_value = "target")]
    label: String,
    /// Worker processes for idle/connect/storm (each process may open only so many files).
    #[arg(long, global = true, default_value_t = 1)]
    procs: usize,
    /// Timeout for one connect + upgrade + welcome, in seconds.
    #[arg(long, global = true, default_value_t = 15)]
    timeout_secs: u64,
    /// Tokio worker threads of this process.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// Prefix of generated user IDs (random by default).
    #[arg(long, global = true)]
    run_id: Option<String>,
    /// Internal: index of this worker process.
    #[arg(long, global = true, hide = true)]
    worker_index: Option<usize>,
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// Open N pairs (2N sockets) and report server RSS and kernel memory per connection.
    Idle {
        /// Number of pairs.
        #[arg(long)]
        pairs: usize,
        /// Connections being opened at once (over all worker processes).
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Wait this long after the last open before reading RSS, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        settle_ms: u64,
        /// After reading RSS, keep the sockets open this long and report the server and Redis
        /// CPU they cost while idle (keepalives, presence refreshes), in seconds.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
    },
    /// P pairs send S-byte messages at a total rate R; report one-way latency.
    Latency {
        /// Number of pairs; both users of each pair send.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Size of each JSON message in bytes.
        #[arg(long, default_value_t = 300)]
        size: usize,
        /// Total messages per second over all sockets.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Measured duration in seconds.
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Unmeasured warm-up in seconds.
        #[arg(long, default_value_t = 2)]
        warmup_secs: u64,
    },
    /// P pairs, each direction keeping W messages in flight; report rate and server CPU.
    Throughput {
        /// Number of pairs.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Size of each JSON message in bytes.
        #[arg(long, default_value_t = 300)]
        size: usize,
        /// Messages in flight per direction of each pair.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Measured duration in seconds.
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Unmeasured warm-up in seconds.
        #[arg(long, default_value_t = 2)]
        warmup_secs: u64,
    },
    /// Open COUNT sockets (COUNT/2 pairs) with bounded concurrency; report upgrades per second.
    Connect {
        /// Number of sockets.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Handshakes in flight at once (over all worker processes).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Open K pairs, drop all 2K sockets at once and reconnect them all; report time to welcome.
    Storm {
        /// Number of pairs.
        #[arg(long)]
        pairs: usize,
        /// Concurrency of the initial open (the reconnect itself is unbounded).
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Wait this long after the first open and after the reconnect before reading server
        /// RSS, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        settle_ms: u64,
    },
    /// P live pairs send at a fixed rate; report their latency while quiet, while K other
    /// sockets connect (in `--procs` worker processes), and after.
    LatencyUnderStorm {
        /// Live pairs; both users of each pair send.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Size of each JSON message in bytes.
        #[arg(long, default_value_t = 300)]
        size: usize,
        /// Total messages per second over all live sockets.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Unmeasured warm-up in seconds.
        #[arg(long, default_value_t = 2)]
        warmup_secs: u64,
        /// Measured quiet time before the storm, in seconds.
        #[arg(long, default_value_t = 5)]
        quiet_secs: u64,
        /// Measured time after the storm's last welcome, in seconds.
        #[arg(long, default_value_t = 2)]
        after_secs: u64,
        /// Sockets the storm opens (as pairs of other users).
        #[arg(long, default_value_t = 8_000)]
        storm_count: usize,
        /// Storm handshakes in flight at once (over all worker processes).
        #[arg(long, default_value_t = 200)]
        storm_concurrency: usize,
    },
    /// P pairs send numbered messages at a steady rate and reconnect on any close while the
    /// orchestrator restarts the instances: prints `ready` on stdout once every pair is up, waits
    /// for a line on stdin (the restarts are done), then reports loss, duplicates, reordering.
    Rolling {
        /// Number of pairs; both users of each pair send.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Messages per second sent by each user.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Size of each JSON message in bytes.
        #[arg(long, default_value_t = 300)]
        size: usize,
        /// Sending before `ready` is printed, in seconds.
        #[arg(long, default_value_t = 2)]
        warmup_secs: u64,
        /// Sending after the line on stdin, in seconds.
        #[arg(long, default_value_t = 2)]
        after_secs: u64,
        /// Keep sending until this long after the start in all, in seconds (so that stacks
        /// whose restarts take different times send for the same time).
        #[arg(long, default_value_t = 0)]
        min_sending_secs: u64,
        /// Longest wait for deliveries after sending stopped, in seconds.
        #[arg(long, default_value_t = 5)]
        drain_secs: u64,
        /// Longest wait for the line on stdin, in seconds.
        #[arg(long, default_value_t = 120)]
        max_wait_secs: u64,
        /// Use switchboard's resume protocol and confirmed sends (docs/protocol.md, "Resuming").
        #[arg(long)]
        resume: bool,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Idle { .. } => "idle",
            Scenario::Latency { .. } => "latency",
            Scenario::Throughput { .. } => "throughput",
            Scenario::Connect { .. } => "connect",
            Scenario::Storm { .. } => "storm",
            Scenario::LatencyUnderStorm { .. } => "latency-under-storm",
            Scenario::Rolling { .. } => "rolling",
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Raise our soft open-files limit to the hard limit (sockets are files).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.common.threads.max(1)).enable_all().build()?;
    rt.block_on(run(cli, nofile))
}

async fn run(cli: Cli, nofile: u64) -> Result<()> {
    let c = &cli.common;
    let mut target = Target::new(&c.url, &c.ports, c.protocol, c.sources, Duration::from_secs(c.timeout_secs))?;
    let run_id = c.run_id.clone().unwrap_or_else(random_run_id);
    if let Some(index) = c.worker_index {
        return workers::child(&cli, &target, &run_id, index).await;
    }
    let mut report = match &cli.scenario {
        Scenario::Latency { pairs, size, rate, duration_secs, warmup_secs } => {
            target.read_buffer = 16 * 1024;
            let p = messaging::Params {
                pairs: *pairs,
                size: *size,
                pacing: messaging::Pacing::Rate(*rate),
                duration: Duration::from_secs(*duration_secs),
                warmup: Duration::from_secs(*warmup_secs),
            };
            messaging::run(c, &target, &run_id, "latency", p).await?
        }
        Scenario::Throughput { pairs, size, window, duration_secs, warmup_secs } => {
            target.read_buffer = 64 * 1024;
            let p = messaging::Params {
                pairs: *pairs,
                size: *size,
                pacing: messaging::Pacing::Window(*window),
                duration: Duration::from_secs(*duration_secs),
                warmup: Duration::from_secs(*warmup_secs),
            };
            messaging::run(c, &target, &run_id, "throughput", p).await?
        }
        Scenario::LatencyUnderStorm {
            pairs,
            size,
            rate,
            warmup_secs,
            quiet_secs,
            after_secs,
            storm_count,
            storm_concurrency,
        } => {
            target.read_buffer = 16 * 1024;
            let sp = messaging::StormParams {
                live: messaging::Params {
                    pairs: *pairs,
                    size: *size,
                    pacing: messaging::Pacing::Rate(*rate),
                    duration: Duration::ZERO,
                    warmup: Duration::from_secs(*warmup_secs),
                },
                quiet: Duration::from_secs(*quiet_secs),
                after: Duration::from_secs(*after_secs),
                storm_count: *storm_count,
                storm_concurrency: *storm_concurrency,
            };
            messaging::run_under_storm(&cli, &target, &run_id, sp).await?
        }
        Scenario::Rolling {
            pairs,
            rate,
            size,
            warmup_secs,
            after_secs,
            min_sending_secs,
            drain_secs,
            max_wait_secs,
            resume,
        } => {
            let p = rolling::Params {
                pairs: *pairs,
                rate: *rate,
                size: *size,
                warmup: Duration::from_secs(*warmup_secs),
                after: Duration::from_secs(*after_secs),
                min_sending: Duration::from_secs(*min_sending_secs),
                drain: Duration::from_secs(*drain_secs),
                max_wait: Duration::from_secs(*max_wait_secs),
                resume: *resume,
            };
            rolling::run(c, target, &run_id, p).await?
        }
        _ => workers::parent(&cli, &run_id).await?,
    };
    report.set("loadgen_nofile_limit", nofile);
    report.emit();
    Ok(())
}

fn random_run_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let tag: String = (0..5).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect();
    format!("r{tag}")
}

/// User IDs of pair `i`: (`{run}{i}a`, `{run}{i}b`).
pub fn pair_ids(run: &str, i: usize) -> (String, String) {
    (format!("{run}{i}a"), format!("{run}{i}b"))
}
