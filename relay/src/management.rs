//! The API Gateway Management API: `PostToConnection` and `DeleteConnection`
//! through the real `aws-sdk-apigatewaymanagement` client.
//!
//! Each connection names its own callback endpoint (the API and stage it
//! came in through), so there is one SDK client per endpoint, built on first
//! use and kept: all of them share one HTTP client (rustls with `ring`, no
//! `aws-lc-sys`) and so one keep-alive connection pool.
//!
//! Credentials follow the endpoint's scheme:
//! - `http://…` is only ever a local emulator on a loopback address (see
//!   `chat_shared::ws::callback_endpoint`). The emulator checks no
//!   signature, so these calls skip the SDK altogether: the same
//!   `POST|DELETE /{stage}/@connections/{id}` requests go over pipelined
//!   HTTP/1.1 connections (module `pipeline`). Measured on the local stack,
//!   the SDK's orchestrator and SigV4 signing were half of the relay's CPU
//!   (~75 µs per post), and a general HTTP client most of the rest.
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
    /// Anything else, with its cause chain for the log.
    Failed(String),
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
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// Clients that sign `https://` endpoints for `region`.
    pub fn new(region: impl Into<String>) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        Self {
            http,
            region: region.into(),
            aws: OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
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
        tokio::time::timeout(OPERATION_TIMEOUT, lanes.call(method, &path, data))
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
                    "local",
                    "local",
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
        if endpoint.starts_with("http://") {
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
        if endpoint.starts_with("http://") {
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

    #[test]
    fn connection_ids_are_percent_encoded() {
        assert_eq!(percent_encode("L0SM9cOFvHcCIhw="), "L0SM9cOFvHcCIhw%3D");
        assert_eq!(percent_encode("a-b_c.d~e/f+"), "a-b_c.d~e%2Ff%2B");
    }
}
