//! The WebSocket API's `$disconnect` route as a Lambda: cleans up the connection's subscriptions and presence.
//!
//! A shim over [`chat_shared::ws::handle_disconnect`]; clients are built once per
//! cold start.

#[tokio::main]
async fn main() -> Result<(), chat_shared::lambda::Error> {
    chat_shared::lambda::run_ws(|state, event| async move {
        chat_shared::ws::handle_disconnect(&state, event).await
    })
    .await
}
