//! Tracing set-up: JSON lines in Lambda, readable text in a terminal.

use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, filter::FilterFn};

use crate::config::LogFormat;

/// The WebSocket library logs every frame it reads, in full, at trace
/// level: `authenticate` frames carry tokens, and other frames carry what
/// users write. Unless the filter names it, its trace events are dropped
/// whatever else the filter lets through; its other events follow the
/// filter like everyone's (a `warn` filter keeps its debug lines out too).
const WEBSOCKET_LIBRARY: &str = "tungstenite";

fn frame_log(meta: &Metadata<'_>) -> bool {
    *meta.level() == Level::TRACE && meta.target().starts_with(WEBSOCKET_LIBRARY)
}

/// The subscriber for `format` and `filter` (an `EnvFilter` string; an
/// invalid one means `info`), writing to `writer`.
fn subscriber<W>(format: LogFormat, filter: &str, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let cap = (!filter.contains(WEBSOCKET_LIBRARY)).then(|| FilterFn::new(|meta| !frame_log(meta)));
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .without_time() // CloudWatch stamps each line
                .finish()
                .with(cap),
        ),
        LogFormat::Pretty => Box::new(builder.compact().finish().with(cap)),
    }
}

/// Installs the global subscriber once; later calls do nothing (tests and
/// the local stack may call it more than once).
pub fn init(format: LogFormat, filter: &str) {
    let _ = subscriber(format, filter, std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The lines a subscriber with `filter` writes for one event of each
    /// level from the WebSocket library and one debug event of the service.
    fn written(filter: &str) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        let make = move || Sink(Arc::clone(&sink));
        tracing::subscriber::with_default(subscriber(LogFormat::Json, filter, make), || {
            tracing::trace!(target: "tungstenite::protocol", "frame payload");
            tracing::debug!(target: "tungstenite::protocol", "close frame");
            tracing::warn!(target: "tungstenite::protocol", "protocol warning");
            tracing::debug!(target: "chat_shared::realtime", "service debug");
        });
        let lines = out.lock().expect("no writer panicked").clone();
        String::from_utf8(lines).expect("log lines are UTF-8")
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("no writer panicked")
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_stay_out_of_trace_logs_unless_asked_for() {
        let all = written("trace");
        assert!(!all.contains("frame payload"), "{all}");
        assert!(
            all.contains("close frame") && all.contains("service debug"),
            "{all}"
        );
        let asked = written("info,tungstenite=trace");
        assert!(asked.contains("frame payload"), "{asked}");
    }

    /// The cap once was the directive `tungstenite=debug`, which raised the
    /// library to debug under a `warn` filter: two lines per closed socket
    /// (62,000 in one benchmark's gateway log).
    #[test]
    fn a_quiet_filter_keeps_the_websocket_library_quiet() {
        let warn = written("warn");
        assert!(!warn.contains("close frame"), "{warn}");
        assert!(warn.contains("protocol warning"), "{warn}");
        assert!(!warn.contains("service debug"), "{warn}");
    }
}
