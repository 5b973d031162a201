//! Tracing setup: text or JSON lines on stdout, filtered by `RUST_LOG`.
//!
//! Text lines are coloured only on a terminal, and never with `NO_COLOR` set
//! (<https://no-color.org>): a file or a pipe gets plain text.

use std::ffi::OsString;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Later calls are ignored, so tests may call it freely.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether to colour: on a terminal, unless `NO_COLOR` is set to something.
fn colour(terminal: bool, no_color: Option<OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "NO_COLOR set but empty does not count");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
