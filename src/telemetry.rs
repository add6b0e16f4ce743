//! Operational logging on stderr (JSON or text, filtered by `RUST_LOG`) and
//! the one timestamp format every log and record uses.

use time::OffsetDateTime;
use time::macros::format_description;
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

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-24T06:49:26.123Z`.
pub fn now_rfc3339() -> String {
    thread_local! {
        /// The last millisecond formatted on this thread, and its text:
        /// under load many lines share one.
        static LAST: std::cell::RefCell<(i128, String)> =
            const { std::cell::RefCell::new((i128::MIN, String::new())) };
    }
    let now = OffsetDateTime::now_utc();
    let ms = now.unix_timestamp_nanos() / 1_000_000;
    LAST.with_borrow_mut(|(at, text)| {
        if *at != ms {
            let fmt = format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            *text = now
                .format(&fmt)
                .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into());
            *at = ms;
        }
        text.clone()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let ts = super::now_rfc3339();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.');
    }
}
