//! The AsyncAPI 3.0 description of the WebSocket API (docs/PROTOCOL.md §2),
//! served at `GET /api/v1/asyncapi.json` (no token needed).
//!
//! Kept as close to the code as the OpenAPI description: the shapes that
//! REST and WebSocket share (room, message, profile, error code) are the
//! very `ToSchema` derives the OpenAPI document uses, copied in from it; the
//! frames themselves are described here. Two checks keep it honest:
//! `scripts/asyncapi-check.sh` validates the document with the AsyncAPI
//! project's own parser (in CI), and the end-to-end tests
//! (`chat_test_support::stack`) validate every frame they send and receive
//! against its message schemas, so a field that drifts fails CI.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Map, Value, json};
use utoipa::OpenApi as _;

use super::openapi::ApiDoc;

/// Where the description is served.
pub const ASYNCAPI_PATH: &str = "/api/v1/asyncapi.json";

/// Every frame a client sends: `(type, payload schema, description)`.
fn client_frames() -> Vec<(&'static str, Value, &'static str)> {
    let room_id = json!({"$ref": "#/components/schemas/RoomIdField"});
    vec![
        (
            "joinRoom",
            json!({
                "type": "object",
                "description": "`roomId` or `targetUserId` (not both).",
                "properties": {
                    "roomId": room_id,
                    "targetUserId": {"type": "string", "minLength": 1, "maxLength": 64},
                    "afterSequenceId": {"type": "integer", "minimum": 0,
                        "description": "Recover the messages after this one (at most 100)."}
                },
                "oneOf": [{"required": ["roomId"]}, {"required": ["targetUserId"]}]
            }),
            "Subscribes this connection to a room (a DIRECT room with `targetUserId` is created if needed); answered by `roomJoined`.",
        ),
        (
            "leaveRoom",
            json!({"type": "object", "properties": {"roomId": room_id}, "required": ["roomId"]}),
            "Unsubscribes; answered by `roomLeft` (also when it was not joined).",
        ),
        (
            "sendMessage",
            json!({
                "type": "object",
                "properties": {
                    "roomId": room_id,
                    "content": {"type": "string", "maxLength": 4000,
                        "description": "At most 4,000 characters; not blank except for image and gift with metadata."},
                    "type": {"$ref": "#/components/schemas/MessageType"},
                    "metadata": {"type": ["object", "null"], "description": "At most 8 KiB as JSON."},
                    "clientMessageId": {"type": ["string", "null"], "minLength": 1, "maxLength": 64,
                        "description": "Idempotency key: a repeat stores nothing and echoes the original to the sender."}
                },
                "required": ["roomId", "content"]
            }),
            "Stores the message with the room's next sequence id; every connection joined to the room, and the sender's, gets `message`.",
        ),
        (
            "typing",
            json!({
                "type": "object",
                "properties": {"roomId": room_id, "isTyping": {"type": "boolean"}},
                "required": ["roomId", "isTyping"]
            }),
            "Goes to the other connections joined to the room as `typing` (coalesced: repeats within 2 s are dropped).",
        ),
        (
            "markRead",
            json!({
                "type": "object",
                "properties": {"roomId": room_id, "sequenceId": {"type": "integer", "minimum": 0}},
                "required": ["roomId", "sequenceId"]
            }),
            "Moves the caller's read cursor forward; a `readReceipt` goes to the room when it moved.",
        ),
        (
            "ping",
            json!({"type": "object", "maxProperties": 0}),
            "Answered by `pong`; renews the presence lease. Send one every 30 s.",
        ),
        (
            "authenticate",
            json!({
                "type": "object",
                "properties": {"token": {"type": "string", "minLength": 1,
                    "description": "A fresh token of the same user (same sub)."}},
                "required": ["token"]
            }),
            "Extends the session to the new token's exp without reconnecting; answered by `authenticated`. A refused token gets `error` UNAUTHORIZED and the connection is closed.",
        ),
    ]
}

/// Every frame the server sends: `(type, payload schema, description)`.
fn server_frames() -> Vec<(&'static str, Value, &'static str)> {
    let timestamp = json!({"$ref": "#/components/schemas/Timestamp"});
    let room_id = json!({"type": "string"});
    vec![
        (
            "connected",
            json!({
                "type": "object",
                "properties": {"userId": {"type": "string"}, "connectionId": {"type": "string"}, "timestamp": timestamp},
                "required": ["userId", "connectionId", "timestamp"]
            }),
            "The first event on a new connection.",
        ),
        (
            "roomJoined",
            json!({
                "type": "object",
                "properties": {
                    "room": {"$ref": "#/components/schemas/Room"},
                    "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"},
                        "description": "Ascending sequenceId: the last 50, or with afterSequenceId those after it (at most 100)."},
                    "unreadCount": {"type": "integer", "minimum": 0},
                    "onlineUsers": {"type": "array", "items": {"type": "string"}},
                    "hasMore": {"type": "boolean"},
                    "recovered": {"type": "boolean",
                        "description": "With afterSequenceId only: false when retention deleted some of the messages after it (reload the room)."}
                },
                "required": ["room", "messages", "unreadCount", "onlineUsers", "hasMore"]
            }),
            "The answer to `joinRoom`.",
        ),
        (
            "message",
            json!({"$ref": "#/components/schemas/Message"}),
            "A message of a joined room (and the sender's own acknowledgement), in ascending sequenceId per room, once each.",
        ),
        (
            "typing",
            json!({
                "type": "object",
                "properties": {"roomId": room_id, "userId": {"type": "string"},
                    "username": {"type": "string"}, "isTyping": {"type": "boolean"}},
                "required": ["roomId", "userId", "username", "isTyping"]
            }),
            "Another member is (or stopped) typing in a joined room.",
        ),
        (
            "presenceUpdate",
            json!({
                "type": "object",
                "properties": {"userId": {"type": "string"},
                    "status": {"type": "string", "enum": ["online", "offline"]}, "timestamp": timestamp},
                "required": ["userId", "status", "timestamp"]
            }),
            "A member of one of your rooms came online (first connection) or went offline (last connection closed or its lease ran out).",
        ),
        (
            "readReceipt",
            json!({
                "type": "object",
                "properties": {"roomId": room_id, "userId": {"type": "string"},
                    "sequenceId": {"type": "integer", "minimum": 0}, "timestamp": timestamp},
                "required": ["roomId", "userId", "sequenceId", "timestamp"]
            }),
            "A member's read cursor moved.",
        ),
        (
            "roomLeft",
            json!({"type": "object", "properties": {"roomId": room_id}, "required": ["roomId"]}),
            "The answer to `leaveRoom`, or: you were removed from the room.",
        ),
        (
            "pong",
            json!({"type": "object", "properties": {"timestamp": timestamp}, "required": ["timestamp"]}),
            "The answer to `ping`.",
        ),
        (
            "authenticated",
            json!({
                "type": "object",
                "properties": {"exp": {"type": "integer",
                    "description": "The accepted token's exp (seconds since the epoch): the session now lasts until then (plus the grace)."}},
                "required": ["exp"]
            }),
            "The answer to `authenticate`.",
        ),
        (
            "error",
            json!({
                "type": "object",
                "properties": {
                    "code": {"$ref": "#/components/schemas/ErrorCode"},
                    "message": {"type": "string"},
                    "requestType": {"type": ["string", "null"]},
                    "clientMessageId": {"type": ["string", "null"]},
                    "retryAfterMs": {"type": "integer", "minimum": 0,
                        "description": "For RATE_LIMITED and SERVICE_UNAVAILABLE: wait at least this long before retrying."}
                },
                "required": ["code", "message", "requestType", "clientMessageId"]
            }),
            "A request failed; the connection stays open. Retry only RATE_LIMITED and SERVICE_UNAVAILABLE; CONFLICT (only for a frame with seq) means it came after a later frame and nothing was done: send it again with a new seq (docs/PROTOCOL.md, \"Retrying\").",
        ),
    ]
}

/// The message name of a frame type in one direction (`typing` exists both
/// ways).
fn message_name(kind: &str, from_client: bool) -> String {
    if kind == "typing" {
        if from_client {
            "typingRequest".to_owned()
        } else {
            "typingEvent".to_owned()
        }
    } else {
        kind.to_owned()
    }
}

fn frame_schema(kind: &str, payload: Value, from_client: bool) -> Value {
    let mut properties = json!({"type": {"const": kind}, "payload": payload});
    if from_client {
        properties["seq"] = json!({"$ref": "#/components/schemas/FrameSeq"});
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": ["type", "payload"]
    })
}

/// Builds the document.
pub fn document() -> Value {
    let mut messages = Map::new();
    let mut channel_messages = Map::new();
    let mut operations = Map::new();
    for (from_client, frames) in [(true, client_frames()), (false, server_frames())] {
        for (kind, payload, description) in frames {
            let name = message_name(kind, from_client);
            messages.insert(
                name.clone(),
                json!({
                    "name": kind,
                    "title": kind,
                    "summary": description,
                    "payload": frame_schema(kind, payload, from_client),
                }),
            );
            channel_messages.insert(
                name.clone(),
                json!({"$ref": format!("#/components/messages/{name}")}),
            );
            let (action, verb) = if from_client {
                ("receive", "receive")
            } else {
                ("send", "send")
            };
            operations.insert(
                format!("{verb}_{name}"),
                json!({
                    "action": action,
                    "channel": {"$ref": "#/channels/connection"},
                    "summary": description,
                    "messages": [{"$ref": format!("#/channels/connection/messages/{name}")}],
                }),
            );
        }
    }
    let mut schemas = Map::new();
    let openapi = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    if let Some(shared) = openapi
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for name in [
            "Room",
            "Message",
            "Profile",
            "MessageType",
            "RoomType",
            "ErrorCode",
        ] {
            if let Some(schema) = shared.get(name) {
                schemas.insert(name.to_owned(), schema.clone());
            }
        }
        // And what those reference, transitively.
        loop {
            let missing: Vec<(String, Value)> = shared
                .iter()
                .filter(|(name, _)| {
                    !schemas.contains_key(*name) && schemas.values().any(|s| references(s, name))
                })
                .map(|(name, schema)| (name.clone(), schema.clone()))
                .collect();
            if missing.is_empty() {
                break;
            }
            schemas.extend(missing);
        }
    }
    schemas.insert(
        "Timestamp".to_owned(),
        json!({"type": "string", "format": "date-time",
               "description": "RFC 3339, UTC, with milliseconds: 2025-11-06T12:00:00.000Z"}),
    );
    schemas.insert(
        "FrameSeq".to_owned(),
        json!({"type": "integer", "minimum": 1, "maximum": crate::realtime::MAX_SEQ,
               "description": "Optional, on any client frame: the connection's frame counter (1, 2, 3 ... on each new connection). Frames that carry it are handled in seq order, even when API Gateway invokes several at once: a frame waits for every lower seq (a missing one is given up after 2 s), one that comes after a higher seq was handled is refused with CONFLICT and nothing is done (send it again with a new seq). Frames without it are handled in no promised order (docs/PROTOCOL.md, \"Order of a sender's frames\")."}),
    );
    schemas.insert(
        "RoomIdField".to_owned(),
        json!({"type": "string", "minLength": 1, "maxLength": 128}),
    );
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Chat & presence WebSocket API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The WebSocket half of docs/PROTOCOL.md (section 2). Every frame, both ways, is one JSON text message {\"type\": ..., \"payload\": {...}} of at most 128 KiB; API Gateway carries frames of up to 32 KiB, so send one message per frame within that.\n\nClose codes: 1000 when the server ends a connection on purpose (after an UNAUTHORIZED error: the token ran out or was revoked, an authenticate was refused; without one: the user's connection cap, or the presence lease ran out); 1001 for the idle timeout (10 min), the 2-hour lifetime and shutdown; 1003 for a binary frame; 1008 for a client that stops reading; 1009 for a message over 128 KiB or a frame over 32 KiB. There are no 4xxx codes: API Gateway's DeleteConnection always closes with 1000, so the reason travels in the error event before the close. After any close, reconnect with backoff and rejoin each room with afterSequenceId.",
            "x-close-codes": {
                "1000": "ended on purpose by the server (see the error event before it, if any)",
                "1001": "going away: idle timeout, the 2-hour lifetime, shutdown",
                "1003": "a binary frame (every message is JSON text)",
                "1008": "slow consumer: more than 1 MiB waited for a client that does not read",
                "1009": "message too big (over 128 KiB), or a single frame over 32 KiB"
            }
        },
        "defaultContentType": "application/json",
        "servers": {
            "aws": {
                "host": "{apiId}.execute-api.{region}.amazonaws.com",
                "pathname": "/{stage}",
                "protocol": "wss",
                "description": "API Gateway (the stack output WebSocketUrl)",
                "variables": {
                    "apiId": {"description": "The WebSocket API's id"},
                    "region": {"default": "eu-west-1"},
                    "stage": {"default": "prod"}
                }
            },
            "local": {
                "host": "127.0.0.1:3000",
                "pathname": "/ws",
                "protocol": "ws",
                "description": "The local stack (chat-local serve)"
            }
        },
        "channels": {
            "connection": {
                "address": "/",
                "title": "One client connection",
                "description": "Authenticated at the handshake: ?token=<JWT>, or Authorization: Bearer <JWT> on the upgrade request; a missing or bad token refuses the handshake with HTTP 401.",
                "messages": channel_messages,
                "bindings": {
                    "ws": {
                        "bindingVersion": "0.1.0",
                        "query": {
                            "type": "object",
                            "properties": {"token": {"type": "string", "description": "The JWT (docs/PROTOCOL.md section 1)."}}
                        }
                    }
                }
            }
        },
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas}
    })
}

fn references(schema: &Value, name: &str) -> bool {
    let target = format!("#/components/schemas/{name}");
    match schema {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (k == "$ref" && v == &Value::String(target.clone())) || references(v, name)
        }),
        Value::Array(items) => items.iter().any(|v| references(v, name)),
        _ => false,
    }
}

static DOCUMENT: LazyLock<String> = LazyLock::new(|| document().to_string());

/// `GET /api/v1/asyncapi.json`.
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

/// The schema of one frame (`{"type", "payload"}`) in one direction, with
/// the document's components alongside so its references resolve: what the
/// end-to-end tests validate frames against. `None` for an unknown type.
pub fn frame_validation_schema(kind: &str, from_client: bool) -> Option<Value> {
    let doc = document();
    let name = message_name(kind, from_client);
    let mut schema = doc
        .pointer(&format!("/components/messages/{name}/payload"))?
        .clone();
    if let Value::Object(map) = &mut schema {
        map.insert("components".to_owned(), doc["components"].clone());
    }
    Some(schema)
}
