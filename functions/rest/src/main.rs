//! The REST API of PROTOCOL.md §4 as a Lambda behind an API Gateway HTTP API
//! (payload format 2.0).
//!
//! A shim: configuration, telemetry and clients are built once per cold
//! start; the router is the shared crate's, unchanged.

use chat_shared::config::HandlerConfig;
use chat_shared::{bootstrap, http, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let config = HandlerConfig::from_env()?;
    telemetry::init(config.common.log_format, &config.common.log_filter);
    let state = bootstrap::app_state(&config).await?;
    lambda_http::run(http::app(state)).await
}
