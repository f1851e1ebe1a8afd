//! `chat-local chat`: a small interactive WebSocket client, so two
//! terminals can chat through the local stack without writing code.
//!
//! Lines typed are sent to the current room; lines starting with `/` are
//! commands (`/help` lists them). Every event received is printed as one
//! line of JSON, prefixed with its type.

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

const HELP: &str = "commands: /dm USER (open and join the direct room with USER), /join ROOM, \
/leave, /read SEQ, /typing, /ping, /history, /quit; any other line is sent to the current room";

/// Connects to `url` (which carries the token) and runs until stdin closes
/// or `/quit`.
///
/// # Errors
/// When the handshake is refused or the connection fails.
pub async fn run(url: &str) -> anyhow::Result<()> {
    let (socket, _) = connect_async(url)
        .await
        .with_context(|| format!("connecting to {}", url.split('?').next().unwrap_or(url)))?;
    let (mut tx, mut rx) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut room: Option<String> = None;
    let mut last_seq: i64 = 0;
    eprintln!("{HELP}");
    loop {
        tokio::select! {
            incoming = rx.next() => {
                let Some(frame) = incoming else { break };
                match frame.context("connection failed")? {
                    Message::Text(text) => {
                        let event: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        let kind = event["type"].as_str().unwrap_or("?").to_owned();
                        let payload = &event["payload"];
                        if kind == "roomJoined" {
                            room = payload["room"]["id"].as_str().map(str::to_owned);
                            last_seq = payload["room"]["lastSequenceId"].as_i64().unwrap_or(0);
                        }
                        if kind == "message" {
                            last_seq = last_seq.max(payload["sequenceId"].as_i64().unwrap_or(0));
                        }
                        println!("{kind:>14} {payload}");
                    }
                    Message::Close(frame) => {
                        println!("{:>14} {frame:?}", "closed");
                        break;
                    }
                    _ => {}
                }
            }
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let line = line.trim();
                let frame = match line.split_once(' ').unwrap_or((line, "")) {
                    ("", _) => continue,
                    ("/quit", _) => break,
                    ("/help", _) => { eprintln!("{HELP}"); continue; }
                    ("/dm", user) => json!({"type": "joinRoom", "payload": {"targetUserId": user.trim()}}),
                    ("/join", id) => json!({"type": "joinRoom", "payload": {"roomId": id.trim()}}),
                    ("/history", _) => json!({"type": "joinRoom", "payload": {"roomId": room, "afterSequenceId": 0}}),
                    ("/leave", _) => json!({"type": "leaveRoom", "payload": {"roomId": room}}),
                    ("/read", seq) => {
                        let seq = seq.trim().parse::<i64>().unwrap_or(last_seq);
                        json!({"type": "markRead", "payload": {"roomId": room, "sequenceId": seq}})
                    }
                    ("/typing", _) => json!({"type": "typing", "payload": {"roomId": room, "isTyping": true}}),
                    ("/ping", _) => json!({"type": "ping", "payload": {}}),
                    _ if line.starts_with('/') => { eprintln!("unknown command; {HELP}"); continue; }
                    _ => json!({"type": "sendMessage", "payload": {"roomId": room, "content": line}}),
                };
                tx.send(Message::text(frame.to_string())).await.context("sending")?;
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}
