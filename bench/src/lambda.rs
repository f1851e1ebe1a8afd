//! Cold starts: a minimal Lambda Runtime API emulator that starts a
//! function binary and times it.
//!
//! The emulator answers the three calls a runtime client makes
//! (`GET /2018-06-01/runtime/invocation/next`, `POST …/{id}/response`,
//! `POST …/{id}/error`, plus `POST /2018-06-01/runtime/init/error`). The
//! first `/next` gets the event; later ones are held open, as Lambda holds
//! them while no event is waiting. A cold start is timed from spawning the
//! process to its first `/next` (initialisation: configuration, clients)
//! and to its first `/response` (the first event handled, including the
//! first connections to PostgreSQL or Redis that event needs).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use crate::summary::{Latency, Summary};

/// What happened in one cold start.
#[derive(Debug, Default)]
struct Observed {
    /// When the event was handed out (the first `/next`).
    first_next: Option<Instant>,
    /// When the answer came, and what it was.
    response: Option<(Instant, String)>,
    /// An error report instead.
    error: Option<String>,
}

#[derive(Clone)]
struct Emulator {
    event: Arc<Value>,
    observed: Arc<Mutex<Observed>>,
    done: Arc<Notify>,
}

impl Emulator {
    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn next(State(emu): State<Emulator>) -> Response {
    let first = {
        let mut observed = emu.lock();
        if observed.first_next.is_none() {
            observed.first_next = Some(Instant::now());
            true
        } else {
            false
        }
    };
    if !first {
        // No second event: hold the request, as Lambda does while idle.
        std::future::pending::<()>().await;
    }
    let mut headers = HeaderMap::new();
    let deadline = chrono::Utc::now().timestamp_millis() + 30_000;
    let pairs = [
        ("lambda-runtime-aws-request-id", "cold-start-1".to_owned()),
        ("lambda-runtime-deadline-ms", deadline.to_string()),
        (
            "lambda-runtime-invoked-function-arn",
            "arn:aws:lambda:us-east-1:123456789012:function:bench".to_owned(),
        ),
        (
            "lambda-runtime-trace-id",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0".to_owned(),
        ),
        ("content-type", "application/json".to_owned()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    (StatusCode::OK, headers, emu.event.to_string()).into_response()
}

async fn response(
    State(emu): State<Emulator>,
    Path(_id): Path<String>,
    body: String,
) -> StatusCode {
    emu.lock().response = Some((Instant::now(), body));
    emu.done.notify_one();
    StatusCode::ACCEPTED
}

async fn error(State(emu): State<Emulator>, body: String) -> StatusCode {
    emu.lock().error = Some(body);
    emu.done.notify_one();
    StatusCode::ACCEPTED
}

/// One measured cold start.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    /// Spawn to first `/next`.
    pub init: Duration,
    /// Spawn to first `/response`.
    pub first_response: Duration,
}

/// Starts `bin` once under a fresh emulator with `event`, and times it.
///
/// # Errors
/// When the binary cannot start, reports an error, or does not answer
/// within 10 s.
pub async fn cold_start(
    bin: &PathBuf,
    function: &str,
    event: Value,
) -> anyhow::Result<(ColdStart, String)> {
    let emu = Emulator {
        event: Arc::new(event),
        observed: Arc::default(),
        done: Arc::new(Notify::new()),
    };
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2018-06-01/runtime/init/error", post(error))
        .with_state(emu.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut command = tokio::process::Command::new(bin);
    command
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env(
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{function}"),
        )
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let spawned = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let finished = tokio::time::timeout(Duration::from_secs(10), emu.done.notified()).await;
    let _ = child.kill().await;
    server.abort();
    if finished.is_err() {
        bail!("{function}: no answer within 10 s");
    }
    let observed = emu.lock();
    if let Some(err) = &observed.error {
        bail!("{function}: the function reported an error: {err}");
    }
    let (Some(first_next), Some((answered, body))) =
        (observed.first_next, observed.response.clone())
    else {
        bail!("{function}: no response");
    };
    Ok((
        ColdStart {
            init: first_next - spawned,
            first_response: answered - spawned,
        },
        body,
    ))
}

/// The JSON line of a function's cold starts.
#[derive(Debug, Clone, Serialize)]
pub struct ColdStartReport {
    /// Always `"cold_start"`.
    pub kind: &'static str,
    /// The function.
    pub function: String,
    /// Cold starts measured.
    pub runs: usize,
    /// Spawn to first `/next`, ms.
    pub init: Summary,
    /// Spawn to first `/response`, ms.
    pub first_response: Summary,
    /// The binary's size on disk, bytes.
    pub size_bytes: u64,
    /// The last response body (to check the event was really handled).
    pub last_response: String,
}

/// Measures `events.len()` cold starts of `bin`, one per event.
///
/// # Errors
/// When any cold start fails.
pub async fn measure(
    bin: &PathBuf,
    function: &str,
    events: Vec<Value>,
) -> anyhow::Result<ColdStartReport> {
    let mut init = Latency::default();
    let mut first = Latency::default();
    let runs = events.len();
    let mut last_response = String::new();
    for event in events {
        let (c, body) = cold_start(bin, function, event).await?;
        init.record(c.init.as_micros() as u64);
        first.record(c.first_response.as_micros() as u64);
        last_response = body;
    }
    let size_bytes = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    Ok(ColdStartReport {
        kind: "cold_start",
        function: function.to_owned(),
        runs,
        init: init.summary(),
        first_response: first.summary(),
        size_bytes,
        last_response: last_response.chars().take(300).collect(),
    })
}

/// Sample events for each function (what API Gateway would send).
pub mod events {
    use serde_json::{Value, json};

    fn context(route: &str, kind: &str, connection_id: &str, domain: &str) -> Value {
        let now = chrono::Utc::now().timestamp_millis();
        // An established connection (a minute old): a connection a few
        // milliseconds old makes its first replies wait for the `connected`
        // greeting, which no relay delivers here.
        let connected_at = now - 60_000;
        json!({
            "routeKey": route,
            "eventType": kind,
            "extendedRequestId": format!("req-{connection_id}"),
            "requestTime": "28/Nov/2026:12:00:00 +0000",
            "messageDirection": "IN",
            "stage": "local",
            "connectedAt": connected_at,
            "requestTimeEpoch": now,
            "identity": {"sourceIp": "127.0.0.1"},
            "requestId": format!("req-{connection_id}"),
            "domainName": domain,
            "connectionId": connection_id,
            "apiId": "bench",
        })
    }

    /// `$connect` with a token in the query string.
    pub fn connect(connection_id: &str, token: &str, domain: &str) -> Value {
        json!({
            "headers": {"host": domain},
            "multiValueHeaders": {"host": [domain]},
            "queryStringParameters": {"token": token},
            "multiValueQueryStringParameters": {"token": [token]},
            "requestContext": context("$connect", "CONNECT", connection_id, domain),
            "isBase64Encoded": false,
        })
    }

    /// `$default` with a `ping` frame.
    pub fn ping(connection_id: &str, domain: &str) -> Value {
        let mut ctx = context("$default", "MESSAGE", connection_id, domain);
        ctx["messageId"] = json!(format!("msg-{connection_id}"));
        json!({
            "requestContext": ctx,
            "body": r#"{"type":"ping","payload":{}}"#,
            "isBase64Encoded": false,
        })
    }

    /// `$disconnect` after a client close.
    pub fn disconnect(connection_id: &str, domain: &str) -> Value {
        let mut ctx = context("$disconnect", "DISCONNECT", connection_id, domain);
        ctx["disconnectStatusCode"] = json!(1000);
        ctx["disconnectReason"] = json!("bye");
        json!({
            "headers": {"host": domain},
            "multiValueHeaders": {"host": [domain]},
            "requestContext": ctx,
            "isBase64Encoded": false,
        })
    }

    /// An HTTP API (payload 2.0) `GET` with a bearer token.
    pub fn http_get(path: &str, token: &str) -> Value {
        let now = chrono::Utc::now().timestamp_millis();
        json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": "",
            "headers": {"host": "bench.execute-api.us-east-1.amazonaws.com", "authorization": format!("Bearer {token}")},
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "bench",
                "domainName": "bench.execute-api.us-east-1.amazonaws.com",
                "domainPrefix": "bench",
                "http": {"method": "GET", "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "chat-bench"},
                "requestId": "req-http",
                "routeKey": "$default",
                "stage": "$default",
                "time": "28/Nov/2026:12:00:00 +0000",
                "timeEpoch": now,
            },
            "isBase64Encoded": false,
        })
    }
}
