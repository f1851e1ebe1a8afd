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
//!
//! It also counts the round trips this process makes to PostgreSQL and
//! Redis and the WebSocket requests it handles by type, so a benchmark can
//! show what one `sendMessage` costs in round trips (one statement, two
//! Redis calls): [`record_pg_round_trip`] is called by the store's client
//! wrapper for every statement (and every prepare that missed the cache),
//! and [`CountedRedis`] wraps every Redis connection the service uses.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::domain::RequestKind;
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
pub const ERROR_CODES: [ErrorCode; 10] = [
    ErrorCode::BadRequest,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::NotFound,
    ErrorCode::Conflict,
    ErrorCode::PayloadTooLarge,
    ErrorCode::RateLimited,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
    ErrorCode::ServiceUnavailable,
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

/// Statements (and cache-missing prepares) sent to PostgreSQL.
static PG_ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
/// Requests sent to Redis (a pipeline or a script is one).
static REDIS_ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
/// Redis commands sent (each command of a pipeline counts).
static REDIS_COMMANDS: AtomicU64 = AtomicU64::new(0);

/// Counts one round trip to PostgreSQL.
pub fn record_pg_round_trip() {
    PG_ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
}

/// Counts one round trip to Redis carrying `commands` commands.
pub fn record_redis_round_trip(commands: usize) {
    REDIS_ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
    REDIS_COMMANDS.fetch_add(commands as u64, Ordering::Relaxed);
}

/// The round-trip counters since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundTrips {
    /// Statements sent to PostgreSQL.
    pub pg: u64,
    /// Requests sent to Redis.
    pub redis: u64,
    /// Commands in those requests.
    pub redis_commands: u64,
}

/// Reads the round-trip counters.
pub fn round_trips() -> RoundTrips {
    RoundTrips {
        pg: PG_ROUND_TRIPS.load(Ordering::Relaxed),
        redis: REDIS_ROUND_TRIPS.load(Ordering::Relaxed),
        redis_commands: REDIS_COMMANDS.load(Ordering::Relaxed),
    }
}

/// The WebSocket request types counted by [`record_ws_request`]: every
/// [`RequestKind`], then `other` for anything else (bad frames).
pub const WS_REQUEST_TYPES: [&str; RequestKind::ALL.len() + 1] = {
    let mut names = ["other"; RequestKind::ALL.len() + 1];
    let mut i = 0;
    while i < RequestKind::ALL.len() {
        names[i] = RequestKind::ALL[i].as_str();
        i += 1;
    }
    names
};

static WS_REQUESTS: [AtomicU64; WS_REQUEST_TYPES.len()] =
    [const { AtomicU64::new(0) }; WS_REQUEST_TYPES.len()];

/// Counts one `$default` request of `kind` (`None`: not a known request).
pub fn record_ws_request(kind: Option<RequestKind>) {
    let i = kind
        .and_then(|k| RequestKind::ALL.iter().position(|t| *t == k))
        .unwrap_or(RequestKind::ALL.len());
    WS_REQUESTS[i].fetch_add(1, Ordering::Relaxed);
}

/// `$default` requests by type since the process started.
pub fn ws_requests() -> Vec<(&'static str, u64)> {
    WS_REQUEST_TYPES
        .iter()
        .zip(&WS_REQUESTS)
        .map(|(t, c)| (*t, c.load(Ordering::Relaxed)))
        .collect()
}

/// Why a request was shed with `RATE_LIMITED` (realtime `Admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The wait for a place would have been over `WS_MAX_QUEUE_WAIT_MS`, or
    /// was.
    QueueWait,
    /// The admission queue was full (`WS_MAX_QUEUED` requests or
    /// `WS_MAX_QUEUED_BYTES` bytes).
    QueueFull,
    /// The relays' delivery lag was over half of `WS_MAX_DELIVERY_LAG_MS`
    /// and the user sent at least their fair share.
    DeliveryLag,
    /// The user's (or connection's) share of the admission queue was full
    /// (`WS_MAX_QUEUED_PER_USER`, `WS_MAX_QUEUED_BYTES_PER_USER`,
    /// `WS_MAX_QUEUED_PER_CONNECTION`).
    UserShare,
}

impl ShedReason {
    /// Every reason, in the order of the counters.
    pub const ALL: [Self; 4] = [
        Self::QueueWait,
        Self::QueueFull,
        Self::DeliveryLag,
        Self::UserShare,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueWait => "queue_wait",
            Self::QueueFull => "queue_full",
            Self::DeliveryLag => "delivery_lag",
            Self::UserShare => "user_share",
        }
    }
}

static SHED: [AtomicU64; ShedReason::ALL.len()] =
    [const { AtomicU64::new(0) }; ShedReason::ALL.len()];

/// Counts one request shed for `reason`.
pub fn record_shed(reason: ShedReason) {
    SHED[reason as usize].fetch_add(1, Ordering::Relaxed);
}

/// Requests shed since the process started, by reason.
pub fn shed_counts() -> Vec<(ShedReason, u64)> {
    ShedReason::ALL
        .iter()
        .zip(&SHED)
        .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
        .collect()
}

/// A Redis connection that counts its round trips (see the module docs).
/// Cheap to build around a clone of a `ConnectionManager`.
#[derive(Clone)]
pub struct CountedRedis<C>(pub C);

impl<C: ConnectionLike + Send> ConnectionLike for CountedRedis<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        record_redis_round_trip(1);
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        record_redis_round_trip(pipeline.len());
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
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

    /// `chat_pg_round_trips_total`, `chat_redis_round_trips_total`,
    /// `chat_redis_commands_total`, `chat_ws_requests_total{type}` and
    /// `chat_shed_total{reason}`.
    pub fn round_trips(&mut self) -> &mut Self {
        let r = round_trips();
        self.single(
            "chat_pg_round_trips_total",
            "Statements (and cache-missing prepares) sent to PostgreSQL by this process.",
            Kind::Counter,
            r.pg as f64,
        )
        .single(
            "chat_redis_round_trips_total",
            "Requests sent to Redis by this process (a pipeline or a script is one).",
            Kind::Counter,
            r.redis as f64,
        )
        .single(
            "chat_redis_commands_total",
            "Redis commands sent by this process (each command of a pipeline counts).",
            Kind::Counter,
            r.redis_commands as f64,
        )
        .family(
            "chat_ws_requests_total",
            "WebSocket client messages handled ($default), by type.",
            Kind::Counter,
        );
        for (kind, count) in ws_requests() {
            self.sample("chat_ws_requests_total", &[("type", kind)], count as f64);
        }
        self.family(
            "chat_shed_total",
            "Requests refused with RATE_LIMITED to shed load, by which bound fired.",
            Kind::Counter,
        );
        for (reason, count) in shed_counts() {
            self.sample(
                "chat_shed_total",
                &[("reason", reason.as_str())],
                count as f64,
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
        assert_eq!(error_counts().len(), 3 * ERROR_CODES.len());
    }

    #[test]
    fn counts_round_trips_and_requests() {
        let before = round_trips();
        record_pg_round_trip();
        record_redis_round_trip(3);
        let after = round_trips();
        assert!(after.pg > before.pg);
        assert!(after.redis > before.redis);
        assert!(after.redis_commands >= before.redis_commands + 3);
        let sends =
            |v: Vec<(&str, u64)>| v.iter().find(|(t, _)| *t == "sendMessage").map(|(_, c)| *c);
        let was = sends(ws_requests()).unwrap_or_default();
        record_ws_request(Some(RequestKind::SendMessage));
        record_ws_request(None);
        assert!(sends(ws_requests()).unwrap_or_default() > was);
        let mut out = Exposition::new();
        out.round_trips();
        let text = out.finish();
        assert!(
            text.contains("chat_ws_requests_total{type=\"other\"}"),
            "{text}"
        );
        assert!(text.contains("chat_pg_round_trips_total "), "{text}");
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
