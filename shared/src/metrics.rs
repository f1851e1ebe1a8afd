//! Process-wide counters of the errors the service answers with, and a
//! small writer of the Prometheus text exposition format.
//!
//! Errors are counted where they are produced: the REST error response
//! (`IntoResponse for Error`), the WebSocket `error` event
//! (`Realtime::message`) and a refused handshake (`ws::handle_connect`).
//! The counters are plain relaxed atomics in a `static`, so counting costs
//! one `fetch_add` and needs no state threaded through the handlers; in a
//! Lambda nobody reads them, in the local stack `GET /metrics` and the
//! operator console do.
//!
//! [`Exposition`] writes the text format (version 0.0.4) by hand: the few
//! metric families here do not justify a client library.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ErrorCode;

/// Where an error was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// A REST response in the error shape.
    Rest,
    /// A WebSocket `error` event.
    WebSocket,
    /// A refused WebSocket handshake (`$connect` answered non-2xx).
    Handshake,
}

impl ErrorSource {
    /// Every source, in exposition order.
    pub const ALL: [Self; 3] = [Self::Rest, Self::WebSocket, Self::Handshake];

    /// The `source` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rest => "rest",
            Self::WebSocket => "ws",
            Self::Handshake => "handshake",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Rest => 0,
            Self::WebSocket => 1,
            Self::Handshake => 2,
        }
    }
}

/// Every error code, in exposition order.
pub const ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::BadRequest,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::NotFound,
    ErrorCode::Conflict,
    ErrorCode::PayloadTooLarge,
    ErrorCode::RateLimited,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
];

fn code_index(code: ErrorCode) -> usize {
    ERROR_CODES.iter().position(|c| *c == code).unwrap_or(0)
}

const SOURCES: usize = ErrorSource::ALL.len();

/// One counter per (source, code).
static ERRORS: [AtomicU64; SOURCES * ERROR_CODES.len()] =
    [const { AtomicU64::new(0) }; SOURCES * ERROR_CODES.len()];

/// Counts one error answered from `source` with `code`.
pub fn record_error(source: ErrorSource, code: ErrorCode) {
    ERRORS[source.index() * ERROR_CODES.len() + code_index(code)].fetch_add(1, Ordering::Relaxed);
}

/// One row of [`error_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCount {
    /// Where it was answered.
    pub source: ErrorSource,
    /// The protocol code.
    pub code: ErrorCode,
    /// How many since the process started.
    pub count: u64,
}

/// Every (source, code) counter since the process started, zeros included
/// (a scraper sees every series from the first scrape).
pub fn error_counts() -> Vec<ErrorCount> {
    ErrorSource::ALL
        .iter()
        .flat_map(|&source| {
            ERROR_CODES.iter().map(move |&code| ErrorCount {
                source,
                code,
                count: ERRORS[source.index() * ERROR_CODES.len() + code_index(code)]
                    .load(Ordering::Relaxed),
            })
        })
        .collect()
}

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The kind of a metric family (`# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// `_sum` and `_count` samples.
    Summary,
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family; `labels` are (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let escaped = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{label}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, value: f64) -> &mut Self {
        self.family(name, help, kind).sample(name, &[], value)
    }

    /// `chat_errors_total{source, code}`: the counters of this module.
    pub fn errors(&mut self) -> &mut Self {
        self.family(
            "chat_errors_total",
            "Errors answered to clients, by where (rest, ws, handshake) and protocol code.",
            Kind::Counter,
        );
        for row in error_counts() {
            self.sample(
                "chat_errors_total",
                &[("source", row.source.as_str()), ("code", row.code.as_str())],
                row.count as f64,
            );
        }
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_source_and_code() {
        let before = |source, code| {
            error_counts()
                .into_iter()
                .find(|r| r.source == source && r.code == code)
                .map(|r| r.count)
                .unwrap_or_default()
        };
        let rest = before(ErrorSource::Rest, ErrorCode::Conflict);
        let ws = before(ErrorSource::WebSocket, ErrorCode::Conflict);
        record_error(ErrorSource::Rest, ErrorCode::Conflict);
        record_error(ErrorSource::Rest, ErrorCode::Conflict);
        // Other tests of this process may count too: at least ours.
        assert!(before(ErrorSource::Rest, ErrorCode::Conflict) >= rest + 2);
        assert!(before(ErrorSource::WebSocket, ErrorCode::Conflict) >= ws);
        assert_eq!(error_counts().len(), 27);
    }

    #[test]
    fn writes_the_text_format() {
        let mut out = Exposition::new();
        out.single("up_things", "Things.", Kind::Gauge, 3.0)
            .family("hits_total", "Hits\nby path.", Kind::Counter)
            .sample("hits_total", &[("path", "a\"b\\c")], 1.5);
        assert_eq!(
            out.finish(),
            "# HELP up_things Things.\n# TYPE up_things gauge\nup_things 3\n\
             # HELP hits_total Hits\\nby path.\n# TYPE hits_total counter\n\
             hits_total{path=\"a\\\"b\\\\c\"} 1.5\n"
        );
    }
}
