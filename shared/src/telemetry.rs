//! Tracing set-up: JSON lines in Lambda, readable text in a terminal.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The WebSocket library logs every frame it reads, in full, at trace
/// level: `authenticate` frames carry tokens, and other frames carry what
/// users write. Its logs stop at debug unless the filter names it.
const QUIET_FRAMES: &str = "tungstenite=debug";

/// The filter directives to install for `filter`.
fn directives(filter: &str) -> String {
    if filter.contains("tungstenite") {
        filter.to_owned()
    } else {
        format!("{filter},{QUIET_FRAMES}")
    }
}

/// Installs the global subscriber once; later calls do nothing (tests and
/// the local stack may call it more than once).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(directives(filter))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET_FRAMES}")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .without_time() // CloudWatch stamps each line
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_stay_out_of_trace_logs_unless_asked_for() {
        assert_eq!(directives("trace"), "trace,tungstenite=debug");
        assert_eq!(
            directives("info,tungstenite=trace"),
            "info,tungstenite=trace"
        );
        assert!(EnvFilter::try_new(directives("trace")).is_ok());
    }
}
