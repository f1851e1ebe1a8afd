//! Integration tests: a real gateway on `127.0.0.1:0`, real WebSocket
//! clients (tokio-tungstenite) and real HTTP for the Management API.

#![allow(clippy::unwrap_used)]

mod dispatch;
mod edge;
mod events;
mod helpers;
mod lambda;
mod lifecycle;
mod limits;
mod management;
