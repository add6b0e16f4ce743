//! Operational logging on stderr (JSON or text, filtered by `RUST_LOG`) and
//! the one timestamp format every log and record uses.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the stderr subscriber. Safe to call twice (tests, `demo`): the
/// second call is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
