//! The command line of the `switchboard` binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Horizontally scalable WebRTC signaling relay.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, after_help = crate::config::env_help())]
pub struct Cli {
    /// TOML file with settings; environment variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG", hide_env_values = true, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do; without a command the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands other than serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the two signed call links of a pair, signed with SWITCHBOARD_AUTH_SECRET.
    Link(LinkArgs),
}

/// Arguments of `switchboard link`.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The user the first link is for.
    #[arg(long, value_name = "ID")]
    pub user: String,
    /// The other user of the call.
    #[arg(long, value_name = "ID")]
    pub peer: String,
    /// How long the links stay valid, e.g. 30m, 1h, 2days.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Where users reach the server, e.g. `https://call.example.com`
    /// [default: SWITCHBOARD_PUBLIC_URL, else http:// and SWITCHBOARD_LISTEN].
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
}
