//! The WebSocket API's `$default` route as a Lambda: dispatches every client event of PROTOCOL.md §2; replies through the route response.
//!
//! A shim over [`chat_shared::ws::handle_default`]; clients are built once per
//! cold start.

#[tokio::main]
async fn main() -> Result<(), chat_shared::lambda::Error> {
    chat_shared::lambda::run_ws(|state, event| async move {
        #[cfg(feature = "test-panic")]
        test_panic::trigger(&event);
        chat_shared::ws::handle_default(&state, event).await
    })
    .await
}

/// The test-only panic of feature `test-panic` (see Cargo.toml): never in a
/// deployed binary.
#[cfg(feature = "test-panic")]
mod test_panic {
    use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;

    /// The exact body that panics.
    const TRIGGER: &str = r#"{"type":"__testPanic"}"#;

    /// Panics when the message is the trigger; `lambda_runtime` then reports
    /// the invocation as failed, and the process serves the next one.
    pub fn trigger(event: &ApiGatewayWebsocketProxyRequest) {
        if event.body.as_deref() == Some(TRIGGER) {
            panic!("test-panic: the $default handler panicked on purpose");
        }
    }
}
