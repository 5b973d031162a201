//! The `switchboard` binary: parse the command line, load settings, serve
//! (or, with `link`, print signed call links).

use std::process::ExitCode;

use clap::Parser;
use switchboard::app::StopRequest;
use switchboard::cli::{Cli, Command, LinkArgs};
use switchboard::config::{self, Settings};

/// jemalloc, with background threads that give freed pages back to the
/// system: glibc's malloc kept about 200 MB after 19,000 half-open
/// connections had gone, jemalloc about 18 MB (docs/operations.md, "Memory").
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Misspelt variables: warned about, then ignored.
    let warnings = config::unknown_env_vars(std::env::vars_os().filter_map(|(key, _)| key.into_string().ok()));
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            for warning in &warnings {
                eprintln!("switchboard: warning: {warning}");
            }
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Link(args)) = &cli.command {
        for warning in &warnings {
            eprintln!("switchboard: warning: {warning}");
        }
        return print_links(&settings, args);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if settings.worker_threads > 0 {
        runtime.worker_threads(settings.worker_threads);
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(serve(settings, &warnings)),
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until a shutdown signal.
async fn serve(settings: Settings, warnings: &[String]) -> ExitCode {
    switchboard::telemetry::init(settings.log_format);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let listener = match switchboard::app::bind(settings.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switchboard: cannot listen on {} (SWITCHBOARD_LISTEN): {e}", settings.listen);
            return ExitCode::from(1);
        }
    };
    // Signals are watched from here on, so a SIGTERM right after the `open`
    // line starts a shutdown instead of killing the process.
    let requests = shutdown_requests();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("open {}/", settings.public_url_or(addr));
    }
    match switchboard::app::run(listener, settings, requests).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard link`: one line per user, `ID: URL`.
fn print_links(settings: &Settings, args: &LinkArgs) -> ExitCode {
    let Some(signer) = &settings.auth else {
        eprintln!("switchboard: SWITCHBOARD_AUTH_SECRET is not set, so links can't be signed");
        return ExitCode::from(2);
    };
    let base_url = args.base_url.clone().unwrap_or_else(|| settings.public_url_or(settings.listen));
    let now = std::time::SystemTime::now();
    match switchboard::auth::call_links(signer, &base_url, &args.user, &args.peer, args.ttl, now) {
        Ok(links) => {
            for link in links {
                println!("{}: {}", link.user, link.url);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard: {e}");
            ExitCode::from(2)
        }
    }
}

/// One item per SIGINT or SIGTERM: the first starts the shutdown, a second
/// closes every socket at once.
#[cfg(unix)]
fn shutdown_requests() -> impl futures_util::Stream<Item = StopRequest> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind| signal(kind).map_err(|e| eprintln!("switchboard: cannot watch signals: {e}")).ok();
    let signals = (listen(SignalKind::interrupt()), listen(SignalKind::terminate()));
    futures_util::stream::unfold(signals, |(mut int, mut term)| async move {
        let int_fut = async {
            match &mut int {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let term_fut = async {
            match &mut term {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let request = tokio::select! {
            _ = int_fut => StopRequest::Interrupt,
            _ = term_fut => StopRequest::Terminate,
        };
        Some((request, (int, term)))
    })
}

/// One item per Ctrl-C.
#[cfg(not(unix))]
fn shutdown_requests() -> impl futures_util::Stream<Item = StopRequest> + Send + 'static {
    futures_util::stream::unfold((), |()| async {
        let _ = tokio::signal::ctrl_c().await;
        Some((StopRequest::Interrupt, ()))
    })
}
