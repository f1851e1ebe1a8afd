//! Route integrations: what the gateway calls for `$connect`, `$default` and
//! `$disconnect`, and how it calls them.
//!
//! An integration is invoked the way a Lambda proxy integration is: the event
//! JSON is built first (see [`crate::event`]) and then deserialized into
//! [`ApiGatewayWebsocketProxyRequest`], exactly as `lambda_runtime` would do
//! with the payload API Gateway sends. A handler that panics is treated like a
//! failed Lambda invocation ("Internal server error"), never as a crash of the
//! gateway.

use std::future::Future;
use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use futures::future::BoxFuture;
use serde_json::Value;

/// One route integration (`$connect`, `$default` or `$disconnect`): takes the
/// event API Gateway would send and returns the integration response.
///
/// Any `Fn(ApiGatewayWebsocketProxyRequest) -> impl Future<Output =
/// ApiGatewayProxyResponse>` is a handler, so closures work directly; the
/// local stack wraps the real Lambda handler functions the same way. A
/// handler that can fail the integration the way a Lambda invocation fails
/// (a function error, a timeout: [`crate::LambdaFunction`]) implements
/// [`RouteHandler::try_call`] too.
pub trait RouteHandler: Send + Sync + 'static {
    /// Runs the integration for one event.
    fn call(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> BoxFuture<'static, ApiGatewayProxyResponse>;

    /// Runs the integration for one event; an `Err` is a failed
    /// integration, which the gateway maps as API Gateway does ("Internal
    /// server error" to a `$default` client, a refused `$connect`). This is
    /// what the gateway calls; by default it is [`RouteHandler::call`],
    /// which never fails.
    fn try_call(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> BoxFuture<'static, Result<ApiGatewayProxyResponse, IntegrationError>> {
        let call = self.call(event);
        Box::pin(async move { Ok(call.await) })
    }
}

/// A failed integration: what went wrong, for the log (the client only
/// ever sees API Gateway's "Internal server error").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IntegrationError(String);

impl IntegrationError {
    /// A failure described by `cause`.
    pub fn new(cause: impl Into<String>) -> Self {
        Self(cause.into())
    }
}

impl<F, Fut> RouteHandler for F
where
    F: Fn(ApiGatewayWebsocketProxyRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ApiGatewayProxyResponse> + Send + 'static,
{
    fn call(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> BoxFuture<'static, ApiGatewayProxyResponse> {
        Box::pin(self(event))
    }
}

/// The three route integrations of the API.
///
/// Custom route keys (a `routeSelectionExpression`) are not emulated: every
/// message goes to `$default`, which is how this project's API is deployed.
#[derive(Clone)]
pub struct Handlers {
    /// `$connect`: a non-2xx `statusCode` refuses the handshake with that status.
    pub connect: Arc<dyn RouteHandler>,
    /// `$default`: a non-empty `body` is sent back to the client (two-way route).
    pub default: Arc<dyn RouteHandler>,
    /// `$disconnect`: called once per connection that passed `$connect`; its response is ignored.
    pub disconnect: Arc<dyn RouteHandler>,
}

impl Handlers {
    /// Bundles three handlers (closures or any other [`RouteHandler`]).
    pub fn new(
        connect: impl RouteHandler,
        default: impl RouteHandler,
        disconnect: impl RouteHandler,
    ) -> Self {
        Self {
            connect: Arc::new(connect),
            default: Arc::new(default),
            disconnect: Arc::new(disconnect),
        }
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

/// Builds an integration response; [`ApiGatewayProxyResponse`] is
/// `#[non_exhaustive]`, so it cannot be written as a struct literal outside
/// its crate.
pub fn integration_response(status_code: i64, body: Option<String>) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = status_code;
    response.body = body.map(Body::Text);
    response
}

/// Invokes `handler` with `event` (the wire JSON). `None` means the
/// integration failed: the event did not deserialize (a bug in this crate),
/// the handler panicked, or it reported a failure ([`IntegrationError`]).
///
/// The handler runs in its own task, so it completes even if the caller is
/// dropped (a client that goes away during `$connect` does not cancel a
/// Lambda invocation either).
pub(crate) async fn invoke(
    handler: &Arc<dyn RouteHandler>,
    route_key: &'static str,
    event: Value,
) -> Option<ApiGatewayProxyResponse> {
    // The event is not logged: it carries the client's token.
    let request: ApiGatewayWebsocketProxyRequest = match serde_json::from_value(event) {
        Ok(request) => request,
        Err(error) => {
            tracing::error!(route_key, %error, "event does not deserialize; this is a gateway bug");
            return None;
        }
    };
    let handler = Arc::clone(handler);
    match tokio::spawn(async move { handler.try_call(request).await }).await {
        Ok(Ok(response)) => Some(response),
        Ok(Err(error)) => {
            tracing::warn!(route_key, %error, "integration failed");
            None
        }
        Err(error) => {
            tracing::error!(route_key, %error, "integration failed");
            None
        }
    }
}

/// The text a route response sends back to the client, if any.
///
/// API Gateway passes the integration's `body` string through unchanged
/// (content handling "passthrough"), so a [`Body::Binary`] is sent as the
/// base64 text a real Lambda's JSON response would carry.
pub(crate) fn response_text(response: &ApiGatewayProxyResponse) -> Option<String> {
    use base64::Engine as _;
    match response.body.as_ref()? {
        Body::Empty => None,
        Body::Text(text) if text.is_empty() => None,
        Body::Text(text) => Some(text.clone()),
        Body::Binary(bytes) if bytes.is_empty() => None,
        Body::Binary(bytes) => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        // `Body` is non-exhaustive; anything new is treated as "no body".
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_bodies_send_nothing() {
        assert_eq!(response_text(&integration_response(200, None)), None);
        assert_eq!(
            response_text(&integration_response(200, Some(String::new()))),
            None
        );
        assert_eq!(
            response_text(&integration_response(200, Some("hi".into()))),
            Some("hi".into())
        );
    }

    #[test]
    fn binary_bodies_are_passed_through_as_base64_text() {
        let mut response = integration_response(200, None);
        response.body = Some(Body::Binary(vec![0, 1, 2]));
        assert_eq!(response_text(&response), Some("AAEC".into()));
    }
}
