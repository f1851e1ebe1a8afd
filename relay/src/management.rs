//! The API Gateway Management API: `PostToConnection` and `DeleteConnection`
//! through the real `aws-sdk-apigatewaymanagement` client.
//!
//! # Where calls go ([`EndpointPolicy`])
//!
//! An endpoint is read from Redis (the connection's record), so it is data
//! an attacker with Redis access, or a bug, could poison: the relay never
//! calls it blindly.
//! - With `MANAGEMENT_ENDPOINT` set, every call goes there (the
//!   execute-api endpoint, which a custom domain would not be), whatever
//!   the record says.
//! - Otherwise the record's endpoint is used only if it matches
//!   `RELAY_ALLOWED_ENDPOINTS` (URL prefixes, `*` for one DNS label or
//!   port; default `https://*.execute-api.{AWS_REGION}.amazonaws.com/`),
//!   and is a plain URL (no user info, query, fragment or `..`). A refused
//!   endpoint is logged (without the connection id) and the connection is
//!   treated as gone ([`PostOutcome::Refused`]); no request is made.
//!
//! # Clients
//!
//! There is one SDK client per endpoint, built on first use and kept: all
//! of them share one HTTP client (rustls with `ring`, no `aws-lc-sys`) and
//! so one keep-alive connection pool. Credentials follow the scheme:
//! - `http://…` is a local emulator on an internal listener. Its calls are
//!   signed (SigV4) with the configured `GATEWAY_MANAGEMENT_*` key pair,
//!   which the emulator checks. By default they go through the SDK, as in
//!   AWS, so the local stack, the tests and the benchmark run the path AWS
//!   runs (signing, timeouts, error mapping). `RELAY_LOCAL_FAST_PATH=true`
//!   sends them over pipelined HTTP/1.1 connections instead (module
//!   `pipeline`): measured on the local stack, the SDK's orchestrator was a
//!   large share of the relay's CPU, and a general HTTP client most of the
//!   rest.
//! - `https://…` is API Gateway itself: the SDK, with the `aws-config`
//!   default chain (the ECS task role in AWS), loaded once on first use,
//!   with the configured region.
//!
//! The SDK's own retries are off: a post that timed out may still have
//! reached the client, and retrying it would deliver the event twice. The
//! caller decides what deserves another attempt (a `410` for a connection
//! still in `$connect`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::config::timeout::TimeoutConfig;
use aws_sdk_apigatewaymanagement::config::{Credentials, Region, SharedHttpClient};
use aws_sdk_apigatewaymanagement::error::DisplayErrorContext;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use std::sync::Arc;

use crate::pipeline;
use chat_shared::config::ManagementSettings;
use chat_shared::departures::CloseConnection;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::OnceCell;

/// Most time to open a TCP (and TLS) connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most time for one whole call.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// What one `PostToConnection` came to.
#[derive(Debug)]
pub enum PostOutcome {
    /// API Gateway accepted the data for the connection.
    Delivered,
    /// `410 GoneException`: the connection is closed, or still in `$connect`.
    Gone,
    /// The connection's endpoint is not allowed ([`EndpointPolicy`]): no
    /// request was made, and the connection is as good as gone.
    Refused,
    /// Anything else, with its cause chain for the log.
    Failed(String),
}

/// Which endpoints the relay calls, and with which local credentials.
#[derive(Clone)]
pub struct EndpointPolicy {
    /// `MANAGEMENT_ENDPOINT`: when set, every call goes here.
    fixed: Option<String>,
    /// URL prefixes a connection's own endpoint must match.
    allowed: Vec<String>,
    /// The key pair that signs calls to `http://` (emulator) endpoints.
    access_key_id: String,
    secret_access_key: SecretString,
    /// `http://` endpoints over the pipelined client instead of the SDK
    /// (`RELAY_LOCAL_FAST_PATH`).
    local_fast_path: bool,
}

chat_shared::debug_fields!(EndpointPolicy { fixed, allowed });

impl EndpointPolicy {
    /// `MANAGEMENT_ENDPOINT`, `RELAY_ALLOWED_ENDPOINTS` (default: the
    /// fixed endpoint when set, else execute-api in `aws_region`) and the
    /// `GATEWAY_MANAGEMENT_*` key pair.
    pub fn new(settings: &ManagementSettings, aws_region: &str) -> Self {
        let fixed = settings.endpoint.clone();
        let allowed = match (&settings.allowed_endpoints, &fixed) {
            (Some(list), _) => list.clone(),
            (None, Some(fixed)) => vec![fixed.clone()],
            (None, None) => vec![format!("https://*.execute-api.{aws_region}.amazonaws.com/")],
        };
        Self {
            fixed,
            allowed,
            access_key_id: settings.access_key_id.clone(),
            secret_access_key: settings.secret_access_key.clone(),
            local_fast_path: settings.local_fast_path,
        }
    }

    /// Whether `http://` endpoints use the pipelined client rather than the
    /// SDK.
    pub fn local_fast_path(&self) -> bool {
        self.local_fast_path
    }

    /// The same policy, also allowing `endpoint` (a local stack allows its
    /// own gateway's).
    #[must_use]
    pub fn allowing(mut self, endpoint: impl Into<String>) -> Self {
        self.allowed.push(endpoint.into());
        self
    }

    /// Where a call for a connection recorded with `endpoint` goes, or
    /// `None` when it must not be made.
    pub fn resolve<'a>(&'a self, endpoint: &'a str) -> Option<&'a str> {
        if let Some(fixed) = &self.fixed {
            return Some(fixed);
        }
        (plain_url(endpoint) && self.allowed.iter().any(|p| prefix_matches(p, endpoint)))
            .then_some(endpoint)
    }
}

/// `http(s)://authority/path` with nothing an attacker could use to change
/// where the request goes: no user info, query, fragment, backslash,
/// whitespace or `..`.
fn plain_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && !rest.contains("..")
        && rest.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'-' | b'_' | b':' | b'/' | b'[' | b']' | b'~' | b'%'
                )
        })
}

/// Whether `url` starts with `pattern` at a path boundary; `*` in the
/// pattern stands for one or more letters, digits or `-` (a DNS label, a
/// port). `http://127.0.0.1:3101/local` allows `…/local` and `…/local/x`,
/// not `…/localx` nor `http://127.0.0.1:31011/…`.
fn prefix_matches(pattern: &str, url: &str) -> bool {
    let pattern = pattern.trim_end_matches('/');
    let (p, u) = (pattern.as_bytes(), url.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < p.len() {
        if p[i] == b'*' {
            let start = j;
            while j < u.len() && (u[j].is_ascii_alphanumeric() || u[j] == b'-') {
                j += 1;
            }
            if j == start {
                return false;
            }
            i += 1;
        } else if j < u.len() && p[i].eq_ignore_ascii_case(&u[j]) {
            i += 1;
            j += 1;
        } else {
            return false;
        }
    }
    j == u.len() || u[j] == b'/' || p.last() == Some(&b'/')
}

/// Management API clients, one per callback endpoint.
pub struct Management {
    /// One HTTP client (and connection pool) for every endpoint.
    http: SharedHttpClient,
    /// The region `https://` endpoints are signed for.
    region: String,
    /// The default credentials chain, loaded on the first `https://`
    /// endpoint (a local stack never needs it).
    aws: OnceCell<aws_config::SdkConfig>,
    /// Built clients by endpoint: endpoints are few (one per API stage) and
    /// a client is immutable, so nothing here goes stale.
    clients: Mutex<HashMap<String, Client>>,
    /// Pipelined connections to `http://` (local emulator) endpoints, by
    /// `host:port`.
    local: Mutex<HashMap<String, Arc<pipeline::Endpoint>>>,
    /// Which endpoints may be called, and the local key pair.
    policy: EndpointPolicy,
}

chat_shared::debug_fields!(Management { region });

/// The sweep (the relay's, the maintenance job's) closes swept
/// connections with [`Management::delete`].
impl CloseConnection for Management {
    async fn close(&self, endpoint: &str, connection_id: &str) -> Result<(), String> {
        self.delete(endpoint, connection_id).await
    }
}

impl Management {
    /// Clients that sign `https://` endpoints for `region`, and call only
    /// what `policy` allows.
    pub fn new(region: impl Into<String>, policy: EndpointPolicy) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        Self {
            http,
            region: region.into(),
            aws: OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            policy,
        }
    }

    /// Where to call for a connection recorded with `endpoint`; logs a
    /// refusal (never the connection id: ids are capabilities on an
    /// emulator without credentials, and personal data in logs).
    fn route<'a>(&'a self, endpoint: &'a str) -> Option<&'a str> {
        let routed = self.policy.resolve(endpoint);
        if routed.is_none() {
            let shown: String = endpoint.chars().take(120).collect();
            tracing::warn!(
                endpoint = %shown.escape_debug(),
                "refused a Management API endpoint outside RELAY_ALLOWED_ENDPOINTS; \
                 treating the connection as gone"
            );
        }
        routed
    }

    /// SigV4 headers for a call to a local emulator.
    fn sign_local(&self, method: &str, url: &str, data: &[u8]) -> Vec<(String, String)> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let identity = Credentials::new(
            &self.policy.access_key_id,
            self.policy.secret_access_key.expose_secret(),
            None,
            None,
            "chat-relay-local",
        )
        .into();
        let Ok(params) = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("execute-api")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
        else {
            return Vec::new();
        };
        let params = params.into();
        let signed =
            SignableRequest::new(method, url, std::iter::empty(), SignableBody::Bytes(data))
                .and_then(|request| sign(request, &params));
        match signed {
            Ok(output) => output
                .output()
                .headers()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            // Unsigned, the emulator answers 403, which is logged.
            Err(_) => Vec::new(),
        }
    }

    /// One Management API call to a local emulator: the status and body.
    async fn local_call(
        &self,
        method: &str,
        endpoint: &str,
        connection_id: &str,
        data: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let rest = endpoint.trim_start_matches("http://").trim_end_matches('/');
        let (authority, stage) = rest.split_once('/').unwrap_or((rest, ""));
        let path = if stage.is_empty() {
            format!("/@connections/{}", percent_encode(connection_id))
        } else {
            format!("/{stage}/@connections/{}", percent_encode(connection_id))
        };
        let url = format!("http://{authority}{path}");
        let signature = self.sign_local(method, &url, data);
        let lanes = {
            let mut local = self
                .local
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(
                local
                    .entry(authority.to_owned())
                    .or_insert_with(|| Arc::new(pipeline::Endpoint::new(authority))),
            )
        };
        tokio::time::timeout(
            OPERATION_TIMEOUT,
            lanes.call(method, &path, &signature, data),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
    }

    fn timeouts() -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build()
    }

    /// The client for `endpoint`, built on first use.
    async fn client(&self, endpoint: &str) -> Client {
        if let Some(client) = self.cached(endpoint) {
            return client;
        }
        let config = if endpoint.starts_with("https://") {
            let aws = self
                .aws
                .get_or_init(|| async {
                    aws_config::defaults(BehaviorVersion::latest())
                        .region(Region::new(self.region.clone()))
                        .http_client(self.http.clone())
                        .timeout_config(Self::timeouts())
                        .load()
                        .await
                })
                .await;
            aws_sdk_apigatewaymanagement::config::Builder::from(aws)
        } else {
            aws_sdk_apigatewaymanagement::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(self.region.clone()))
                .credentials_provider(Credentials::new(
                    &self.policy.access_key_id,
                    self.policy.secret_access_key.expose_secret(),
                    None,
                    None,
                    "chat-relay-local-emulator",
                ))
        }
        .endpoint_url(endpoint)
        .http_client(self.http.clone())
        .timeout_config(Self::timeouts())
        .retry_config(RetryConfig::disabled())
        .build();
        let client = Client::from_conf(config);
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.entry(endpoint.to_owned()).or_insert(client).clone()
    }

    fn cached(&self, endpoint: &str) -> Option<Client> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(endpoint)
            .cloned()
    }

    /// Sends `data` to one connection.
    pub async fn post(&self, endpoint: &str, connection_id: &str, data: &[u8]) -> PostOutcome {
        let Some(endpoint) = self.route(endpoint) else {
            return PostOutcome::Refused;
        };
        if self.policy.local_fast_path && endpoint.starts_with("http://") {
            return match self.local_call("POST", endpoint, connection_id, data).await {
                Ok((200..=299, _)) => PostOutcome::Delivered,
                Ok((410, _)) => PostOutcome::Gone,
                Ok((status, body)) => {
                    PostOutcome::Failed(format!("{status}: {}", String::from_utf8_lossy(&body)))
                }
                Err(cause) => PostOutcome::Failed(cause),
            };
        }
        let client = self.client(endpoint).await;
        match client
            .post_to_connection()
            .connection_id(connection_id)
            .data(Blob::new(data))
            .send()
            .await
        {
            Ok(_) => PostOutcome::Delivered,
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_gone_exception()) =>
            {
                PostOutcome::Gone
            }
            Err(err) => PostOutcome::Failed(DisplayErrorContext(err).to_string()),
        }
    }

    /// Closes a connection at API Gateway; `Ok` also when it was gone.
    ///
    /// # Errors
    /// The cause chain of any other failure, for the log.
    pub async fn delete(&self, endpoint: &str, connection_id: &str) -> Result<(), String> {
        // Nothing to close at an endpoint that is not allowed: the caller
        // removes the connection as if it were gone.
        let Some(endpoint) = self.route(endpoint) else {
            return Ok(());
        };
        if self.policy.local_fast_path && endpoint.starts_with("http://") {
            return match self
                .local_call("DELETE", endpoint, connection_id, &[])
                .await?
            {
                (200..=299 | 410, _) => Ok(()),
                (status, body) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
            };
        }
        let client = self.client(endpoint).await;
        match client
            .delete_connection()
            .connection_id(connection_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_gone_exception()) =>
            {
                Ok(())
            }
            Err(err) => Err(DisplayErrorContext(err).to_string()),
        }
    }
}

/// Percent-encodes a connection id for a URL path, as the SDK does (API
/// Gateway ids end in `=`).
fn percent_encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 4);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(fixed: Option<&str>, allowed: &[&str]) -> EndpointPolicy {
        EndpointPolicy {
            fixed: fixed.map(str::to_owned),
            allowed: allowed.iter().map(|s| (*s).to_owned()).collect(),
            access_key_id: "k".into(),
            secret_access_key: "s".to_owned().into(),
            local_fast_path: false,
        }
    }

    #[test]
    fn only_allowed_plain_endpoints_are_called() {
        let aws = policy(None, &["https://*.execute-api.eu-west-1.amazonaws.com/"]);
        let ok = "https://abc123.execute-api.eu-west-1.amazonaws.com/prod";
        assert_eq!(aws.resolve(ok), Some(ok));
        for bad in [
            "https://evil.com/x.execute-api.eu-west-1.amazonaws.com/prod",
            "https://a.b.execute-api.eu-west-1.amazonaws.com/prod",
            "https://abc.execute-api.eu-west-1.amazonaws.com.evil.com/prod",
            "https://abc.execute-api.us-east-1.amazonaws.com/prod",
            "http://abc.execute-api.eu-west-1.amazonaws.com/prod",
            "https://user@abc.execute-api.eu-west-1.amazonaws.com/prod",
            "http://127.0.0.1:3799/internal/admin?x=/local",
        ] {
            assert_eq!(aws.resolve(bad), None, "{bad}");
        }
        let local = policy(None, &["http://127.0.0.1:3101/local"]);
        assert!(local.resolve("http://127.0.0.1:3101/local").is_some());
        for bad in [
            "http://127.0.0.1:31011/local",
            "http://127.0.0.1:3101/localx",
            "http://127.0.0.1:3101/local/../admin",
            "http://127.0.0.1:3799/internal/admin?x=",
        ] {
            assert_eq!(local.resolve(bad), None, "{bad}");
        }
        let ports = policy(None, &["http://127.0.0.1:*/local"]);
        assert!(ports.resolve("http://127.0.0.1:4101/local").is_some());
        assert!(ports.resolve("http://127.0.0.1:4101/admin").is_none());
    }

    #[test]
    fn a_fixed_endpoint_wins_over_any_record() {
        let fixed = policy(
            Some("https://abc.execute-api.eu-west-1.amazonaws.com/prod"),
            &["https://abc.execute-api.eu-west-1.amazonaws.com/prod"],
        );
        assert_eq!(
            fixed.resolve("https://chat.example.com/prod"),
            Some("https://abc.execute-api.eu-west-1.amazonaws.com/prod")
        );
    }

    #[test]
    fn connection_ids_are_percent_encoded() {
        assert_eq!(percent_encode("L0SM9cOFvHcCIhw="), "L0SM9cOFvHcCIhw%3D");
        assert_eq!(percent_encode("a-b_c.d~e/f+"), "a-b_c.d~e%2Ff%2B");
    }
}
