//! The command line of the `switchboard` binary.

use std::path::PathBuf;

use clap::Parser;

/// Horizontally scalable WebRTC signaling relay.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, after_help = crate::config::ENV_HELP)]
pub struct Cli {
    /// TOML file with settings; environment variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}
