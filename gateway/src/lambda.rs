//! Lambda integrations: the route handlers of the deployed shape, which
//! invoke a function through the Lambda Invoke API instead of calling a
//! handler in process.
//!
//! [`LambdaClient`] speaks `POST /2015-03-31/functions/{name}/invocations`
//! (a synchronous `RequestResponse` invoke), as served by `cargo lambda
//! watch` and by the AWS Lambda Runtime Interface Emulator; so the function
//! binaries that `sam deploy` ships run locally with their runtime loop,
//! their cold start, their configuration from the environment and their
//! clients kept warm between events. A [`LambdaFunction`] is a
//! [`RouteHandler`](crate::RouteHandler): the gateway's `$connect`,
//! `$default` and `$disconnect` events go to it as JSON, and its answer is
//! the integration response.
//!
//! # Failures, as API Gateway maps them
//!
//! An invocation fails ([`InvokeError`]) when the function reports an error
//! (a panic included: `lambda_runtime` reports it), when it has not answered
//! within the function's timeout, when the Invoke API cannot be reached or
//! answers something else than a result, and when the function is
//! throttled. The gateway then does what API Gateway does with a failed
//! Lambda integration: a `$default` client gets the `{"message": "Internal
//! server error", ...}` frame, a `$connect` handshake is refused with 500.
//! Which invoke answers count as a function error:
//!
//! * an `X-Amz-Function-Error` header (the Lambda service);
//! * a non-2xx status (`cargo lambda watch` answers 500 with the error);
//! * a 2xx payload that is a Lambda error document, `{"errorType",
//!   "errorMessage"}` without a `statusCode` (the Runtime Interface
//!   Emulator).
//!
//! # Concurrency
//!
//! Invocations run concurrently, as Lambda scales out, up to
//! [`FunctionOptions::reserved_concurrency`] per function: the stand-in for
//! reserved concurrency. An invocation over the limit is throttled at once
//! ([`InvokeError::Throttled`], Lambda's `429 TooManyRequestsException`),
//! never queued: that is what an API in front of a throttled function sees.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use axum::body::Bytes;
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::handler::{IntegrationError, RouteHandler, integration_response};

/// Lambda's largest synchronous response payload (6 MB); a larger answer is
/// a failed invocation.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// A client of one Lambda Invoke API endpoint (e.g. `cargo lambda watch`
/// on `http://127.0.0.1:9000`). Cheap to clone; clones share one pool of
/// keep-alive connections.
#[derive(Clone)]
pub struct LambdaClient {
    http: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, without a trailing slash.
    endpoint: Arc<str>,
}

impl fmt::Debug for LambdaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LambdaClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The endpoint given to [`LambdaClient::new`] is not an `http://` URL of
/// a host (and port).
#[derive(Debug, thiserror::Error)]
#[error("the Lambda Invoke API endpoint must look like http://127.0.0.1:9000, got {0:?}")]
pub struct InvalidEndpoint(String);

impl LambdaClient {
    /// A client of the Invoke API at `endpoint`, `http://host[:port]` (a
    /// trailing `/` is allowed; no path, no TLS: it is a local emulator).
    ///
    /// # Errors
    /// When `endpoint` is not such a URL.
    pub fn new(endpoint: &str) -> Result<Self, InvalidEndpoint> {
        let trimmed = endpoint.trim_end_matches('/');
        let uri: Uri = trimmed
            .parse()
            .map_err(|_| InvalidEndpoint(endpoint.to_owned()))?;
        let plain = uri.scheme_str() == Some("http")
            && uri.host().is_some()
            && uri
                .path_and_query()
                .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
        if !plain {
            return Err(InvalidEndpoint(endpoint.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            http,
            endpoint: trimmed.into(),
        })
    }

    /// The function `name` (as the Invoke API knows it: for `cargo lambda
    /// watch`, the binary's name).
    pub fn function(&self, name: &str, options: FunctionOptions) -> LambdaFunction {
        let encoded =
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        LambdaFunction {
            inner: Arc::new(FunctionInner {
                client: self.clone(),
                name: name.to_owned(),
                url: format!(
                    "{}/2015-03-31/functions/{encoded}/invocations",
                    self.endpoint
                ),
                limit: (options.reserved_concurrency > 0)
                    .then(|| Arc::new(Semaphore::new(options.reserved_concurrency))),
                timeout: options.timeout,
                stats: FunctionCounters::default(),
            }),
        }
    }
}

/// How one function is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionOptions {
    /// Most invocations in flight at once (reserved concurrency); more are
    /// throttled. 0: unlimited.
    pub reserved_concurrency: usize,
    /// The function's timeout: an invocation that has not answered by then
    /// fails (Lambda: `Task timed out`). `template.yaml` sets 10 s.
    pub timeout: Duration,
}

impl Default for FunctionOptions {
    /// 10 in flight, 10 s: the template's timeout.
    fn default() -> Self {
        Self {
            reserved_concurrency: 10,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The function reported an error (`errorType`, `errorMessage`); a
    /// panic is reported this way by `lambda_runtime`.
    #[error("function error {error_type}: {message}")]
    Function {
        /// `errorType`, e.g. `&str` for a panic with a literal message.
        error_type: String,
        /// `errorMessage`.
        message: String,
    },
    /// The function did not answer within its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Over the function's reserved concurrency (Lambda answers 429
    /// `TooManyRequestsException`).
    #[error("throttled (TooManyRequestsException): over the reserved concurrency")]
    Throttled,
    /// The Invoke API could not be reached.
    #[error("the Lambda Invoke API is unreachable: {0}")]
    Unreachable(String),
    /// The Invoke API answered, but not with a result or a function error
    /// (e.g. 404: no such function).
    #[error("the Lambda Invoke API answered {status}: {body}")]
    Service {
        /// Its status.
        status: StatusCode,
        /// The start of its body.
        body: String,
    },
    /// The payload is over [`MAX_PAYLOAD_BYTES`], or the function's answer
    /// is not what the integration expects.
    #[error("bad payload: {0}")]
    Payload(String),
}

/// One function behind the Invoke API. Cheap to clone: clones share the
/// concurrency limit and the counters.
#[derive(Clone)]
pub struct LambdaFunction {
    inner: Arc<FunctionInner>,
}

struct FunctionInner {
    client: LambdaClient,
    name: String,
    url: String,
    limit: Option<Arc<Semaphore>>,
    timeout: Duration,
    stats: FunctionCounters,
}

#[derive(Default)]
struct FunctionCounters {
    invocations: AtomicU64,
    errors: AtomicU64,
    throttles: AtomicU64,
    /// Sum of the durations of completed invocations, microseconds.
    duration_us: AtomicU64,
}

/// A function's counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InvocationStats {
    /// Invocations sent (throttled ones not included).
    pub invocations: u64,
    /// Of those, failed ones (function errors, timeouts, bad answers).
    pub errors: u64,
    /// Invocations refused over the reserved concurrency.
    pub throttles: u64,
    /// Total time spent in invocations (sent to answered), microseconds.
    pub duration_us: u64,
}

impl fmt::Debug for LambdaFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LambdaFunction")
            .field("name", &self.inner.name)
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl LambdaFunction {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The counters since start.
    pub fn stats(&self) -> InvocationStats {
        let stats = &self.inner.stats;
        InvocationStats {
            invocations: stats.invocations.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            throttles: stats.throttles.load(Ordering::Relaxed),
            duration_us: stats.duration_us.load(Ordering::Relaxed),
        }
    }

    /// Invokes the function synchronously with `payload` (JSON) and returns
    /// its result payload.
    ///
    /// # Errors
    /// See [`InvokeError`].
    pub async fn invoke(&self, payload: Vec<u8>) -> Result<Bytes, InvokeError> {
        let inner = &self.inner;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(InvokeError::Payload(format!(
                "request payload of {} bytes is over Lambda's {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let _permit = match &inner.limit {
            Some(limit) => match Arc::clone(limit).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    inner.stats.throttles.fetch_add(1, Ordering::Relaxed);
                    return Err(InvokeError::Throttled);
                }
            },
            None => None,
        };
        inner.stats.invocations.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(inner.timeout, self.send(payload)).await {
            Ok(result) => result,
            Err(_) => Err(InvokeError::Timeout(inner.timeout)),
        };
        inner.stats.duration_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if result.is_err() {
            inner.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn send(&self, payload: Vec<u8>) -> Result<Bytes, InvokeError> {
        let inner = &self.inner;
        let request = Request::builder()
            .method(Method::POST)
            .uri(&inner.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-amz-invocation-type", "RequestResponse")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|error| InvokeError::Unreachable(error.to_string()))?;
        let response = inner
            .client
            .http
            .request(request)
            .await
            .map_err(|error| InvokeError::Unreachable(error_chain(&error)))?;
        let status = response.status();
        let function_error = response.headers().get("x-amz-function-error").cloned();
        let body = Limited::new(response.into_body(), MAX_PAYLOAD_BYTES)
            .collect()
            .await
            .map_err(|error| InvokeError::Payload(format!("reading the result: {error}")))?
            .to_bytes();
        classify(status, function_error.as_ref(), body)
    }
}

/// What an Invoke API answer means.
fn classify(
    status: StatusCode,
    function_error: Option<&HeaderValue>,
    body: Bytes,
) -> Result<Bytes, InvokeError> {
    let error_document = || -> Option<(String, String)> {
        let value: Value = serde_json::from_slice(&body).ok()?;
        let object = value.as_object()?;
        if object.contains_key("statusCode") {
            return None;
        }
        let message = object.get("errorMessage")?;
        let kind = object.get("errorType")?;
        Some((
            kind.as_str().unwrap_or_default().to_owned(),
            message
                .as_str()
                .map_or_else(|| message.to_string(), str::to_owned),
        ))
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(InvokeError::Throttled);
    }
    if let Some(kind) = function_error {
        let (error_type, message) = error_document().unwrap_or_else(|| {
            (
                String::from_utf8_lossy(kind.as_bytes()).into_owned(),
                snippet(&body),
            )
        });
        return Err(InvokeError::Function {
            error_type,
            message,
        });
    }
    match (status.is_success(), error_document()) {
        (true, None) => Ok(body),
        (_, Some((error_type, message))) => Err(InvokeError::Function {
            error_type,
            message,
        }),
        (false, None) => Err(InvokeError::Service {
            status,
            body: snippet(&body),
        }),
    }
}

/// The first 300 characters of a body, for a log line.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(300).collect()
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl RouteHandler for LambdaFunction {
    /// The integration response, or, when the invocation failed, the 500
    /// `{"message": "Internal server error"}` API Gateway answers.
    fn call(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> BoxFuture<'static, ApiGatewayProxyResponse> {
        let call = self.try_call(event);
        Box::pin(async move {
            call.await.unwrap_or_else(|_| {
                integration_response(500, Some(r#"{"message": "Internal server error"}"#.into()))
            })
        })
    }

    fn try_call(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> BoxFuture<'static, Result<ApiGatewayProxyResponse, IntegrationError>> {
        let function = self.clone();
        Box::pin(async move {
            let name = function.name().to_owned();
            let fail = |error: InvokeError| {
                tracing::warn!(function = %name, %error, "Lambda integration failed");
                IntegrationError::new(format!("{name}: {error}"))
            };
            let payload = serde_json::to_vec(&event)
                .map_err(|error| fail(InvokeError::Payload(error.to_string())))?;
            let result = function.invoke(payload).await.map_err(&fail)?;
            serde_json::from_slice::<ApiGatewayProxyResponse>(&result).map_err(|error| {
                fail(InvokeError::Payload(format!(
                    "not a Lambda proxy integration response ({error}): {}",
                    snippet(&result)
                )))
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_plain_http_urls() {
        assert!(LambdaClient::new("http://127.0.0.1:9000").is_ok());
        assert!(LambdaClient::new("http://127.0.0.1:9000/").is_ok());
        assert!(LambdaClient::new("http://localhost").is_ok());
        for bad in [
            "127.0.0.1:9000",
            "https://lambda.us-east-1.amazonaws.com",
            "http://127.0.0.1:9000/functions",
            "",
        ] {
            assert!(LambdaClient::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_event_a_function_receives_reads_back_as_the_gateway_built_it() {
        use crate::event::{self, ConnectionMeta, MessageBody};
        let config = crate::GatewayConfig::default();
        let meta = ConnectionMeta {
            connection_id: "L0SM9cOFvHcCIhw=".into(),
            connected_at: chrono::Utc::now(),
            domain_name: "127.0.0.1:3100".into(),
            source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            user_agent: Some("test".into()),
        };
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:3000"));
        let now = chrono::Utc::now();
        for wire in [
            event::connect_event(&config, &meta, &headers, Some("token=t"), now),
            event::message_event(&config, &meta, MessageBody::Text("{}"), now).0,
            event::disconnect_event(&config, &meta, 1000, "bye", now),
        ] {
            // What the gateway hands the integration, what LambdaFunction
            // sends, and what lambda_runtime deserializes from it.
            let request: ApiGatewayWebsocketProxyRequest = serde_json::from_value(wire).unwrap();
            let sent = serde_json::to_vec(&request).unwrap();
            let received: ApiGatewayWebsocketProxyRequest = serde_json::from_slice(&sent).unwrap();
            assert_eq!(received, request);
        }
    }

    #[test]
    fn function_names_are_encoded_into_the_path() {
        let client = LambdaClient::new("http://127.0.0.1:9000/").unwrap();
        let function = client.function("ws-message", FunctionOptions::default());
        assert_eq!(
            function.inner.url,
            "http://127.0.0.1:9000/2015-03-31/functions/ws%2Dmessage/invocations"
        );
    }

    #[test]
    fn answers_are_classified_like_the_lambda_service() {
        let ok = classify(
            StatusCode::OK,
            None,
            Bytes::from_static(b"{\"statusCode\":200}"),
        );
        assert_eq!(ok.unwrap(), Bytes::from_static(b"{\"statusCode\":200}"));

        // The Lambda service: 200 with X-Amz-Function-Error.
        let unhandled = HeaderValue::from_static("Unhandled");
        let error = classify(
            StatusCode::OK,
            Some(&unhandled),
            Bytes::from_static(b"{\"errorType\":\"&str\",\"errorMessage\":\"boom\"}"),
        );
        assert!(
            matches!(&error, Err(InvokeError::Function { error_type, message }) if error_type == "&str" && message == "boom"),
            "{error:?}"
        );
        // cargo lambda watch: 500 with the error document.
        let error = classify(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            Bytes::from_static(b"{\"errorType\":\"Panic\",\"errorMessage\":\"x\"}"),
        );
        assert!(
            matches!(error, Err(InvokeError::Function { .. })),
            "{error:?}"
        );
        // The Runtime Interface Emulator: 200 with the error document.
        let error = classify(
            StatusCode::OK,
            None,
            Bytes::from_static(b"{\"errorType\":\"Panic\",\"errorMessage\":\"x\"}"),
        );
        assert!(
            matches!(error, Err(InvokeError::Function { .. })),
            "{error:?}"
        );
        // A proxy response that happens to carry such keys is a result.
        assert!(
            classify(
                StatusCode::OK,
                None,
                Bytes::from_static(
                    b"{\"statusCode\":200,\"errorType\":\"a\",\"errorMessage\":\"b\"}"
                ),
            )
            .is_ok()
        );
        let error = classify(
            StatusCode::NOT_FOUND,
            None,
            Bytes::from_static(b"no such function"),
        );
        assert!(
            matches!(&error, Err(InvokeError::Service { status, .. }) if *status == StatusCode::NOT_FOUND),
            "{error:?}"
        );
        let error = classify(StatusCode::TOO_MANY_REQUESTS, None, Bytes::new());
        assert!(matches!(error, Err(InvokeError::Throttled)), "{error:?}");
    }
}
