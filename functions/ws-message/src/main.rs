//! The WebSocket API's `$default` route as a Lambda: dispatches every client event of PROTOCOL.md §2; replies through the route response.
//!
//! A shim over [`chat_shared::ws::handle_default`]; clients are built once per
//! cold start.

#[tokio::main]
async fn main() -> Result<(), chat_shared::lambda::Error> {
    chat_shared::lambda::run_ws(|state, event| async move {
        chat_shared::ws::handle_default(&state, event).await
    })
    .await
}
