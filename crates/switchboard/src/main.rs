//! The `switchboard` binary: parse the command line, load settings, serve
//! (or, with `link`, print signed call links).

use std::process::ExitCode;

use clap::Parser;
use switchboard::cli::{Cli, Command, LinkArgs};
use switchboard::config::{self, Settings};

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
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switchboard: cannot listen on {} (SWITCHBOARD_LISTEN): {e}", settings.listen);
            return ExitCode::from(1);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("open {}/", settings.public_url_or(addr));
    }
    match switchboard::app::run(listener, settings, shutdown_signal()).await {
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
