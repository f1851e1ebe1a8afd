//! Running the WebSocket handlers under `lambda_runtime` (feature
//! `lambda`): what every `functions/ws-*` binary's `main` does.

use std::future::Future;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use lambda_runtime::{LambdaEvent, service_fn};

use crate::config::HandlerConfig;
use crate::ws::WsState;
use crate::{bootstrap, telemetry};

/// The error type Lambda binaries return from `main`.
pub type Error = lambda_runtime::Error;

/// Reads the configuration, builds the clients once, and serves `handler`
/// for every invocation of this cold start.
///
/// # Errors
/// A bad configuration or an unreachable Redis at start-up, or a runtime
/// failure.
pub async fn run_ws<F, Fut>(handler: F) -> Result<(), Error>
where
    F: Fn(WsState, ApiGatewayWebsocketProxyRequest) -> Fut,
    Fut: Future<Output = ApiGatewayProxyResponse>,
{
    let config = HandlerConfig::from_env()?;
    telemetry::init(config.common.log_format, &config.common.log_filter);
    let state = bootstrap::ws_state(&config).await?;
    lambda_runtime::run(service_fn(
        |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| {
            let response = handler(state.clone(), event.payload);
            async move { Ok::<_, Error>(response.await) }
        },
    ))
    .await
}
