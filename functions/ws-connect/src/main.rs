//! The WebSocket API's `$connect` route as a Lambda: authenticates the handshake, registers the connection and its presence lease.
//!
//! A shim over [`chat_shared::ws::handle_connect`]; clients are built once per
//! cold start.

#[tokio::main]
async fn main() -> Result<(), chat_shared::lambda::Error> {
    chat_shared::lambda::run_ws(|state, event| async move {
        chat_shared::ws::handle_connect(&state, event).await
    })
    .await
}
