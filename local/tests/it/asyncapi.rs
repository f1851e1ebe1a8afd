//! The AsyncAPI description of the WebSocket API
//! (`chat_shared::http::asyncapi`): served at `/api/v1/asyncapi.json`,
//! committed as `docs/asyncapi.json` for client teams (and validated there
//! by the AsyncAPI parser, `scripts/asyncapi-check.sh`), complete for the
//! frames the service parses, and strict enough that a drifted frame fails
//! the check every end-to-end test runs on every frame.
//!
//! After changing the document: `UPDATE_ASYNCAPI=1 cargo test -p chat-local
//! --test it asyncapi::` rewrites `docs/asyncapi.json`.

#![allow(clippy::unwrap_used)]

use crate::common;

use chat_shared::http::asyncapi::{ASYNCAPI_PATH, document};
use chat_test_support::TestEnv;
use common::*;
use serde_json::{Value, json};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/asyncapi.json");

#[test]
fn docs_asyncapi_json_is_the_document_the_service_serves() {
    let generated = serde_json::to_string_pretty(&document()).unwrap() + "\n";
    if std::env::var("UPDATE_ASYNCAPI").as_deref() == Ok("1") {
        std::fs::write(COMMITTED, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/asyncapi.json is not the generated document; run \
         UPDATE_ASYNCAPI=1 cargo test -p chat-local --test it asyncapi:: and commit it"
    );
}

#[tokio::test]
async fn served_without_a_token() {
    let env = TestEnv::new().await;
    let stack = TestStack::gateway(&env).await;
    let reply = http(stack.addr(), "GET", ASYNCAPI_PATH, None, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, document());
    assert_eq!(reply.body["asyncapi"], "3.0.0");
}

#[test]
fn every_frame_type_the_service_parses_is_described_both_ways() {
    let doc = document();
    let messages = doc["components"]["messages"].as_object().unwrap();
    let names: Vec<&str> = messages
        .values()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for kind in chat_shared::realtime::RequestKind::ALL.map(|k| k.as_str()) {
        assert!(
            common::frame_schema_exists(kind, true),
            "client frame {kind} is not described"
        );
    }
    for kind in [
        "connected",
        "roomJoined",
        "message",
        "typing",
        "presenceUpdate",
        "readReceipt",
        "roomLeft",
        "pong",
        "authenticated",
        "error",
    ] {
        assert!(
            names.contains(&kind),
            "server event {kind} is not described"
        );
    }
    // Every operation points at a message of the channel.
    for (name, op) in doc["operations"].as_object().unwrap() {
        let target = op["messages"][0]["$ref"].as_str().unwrap();
        let pointer = target.trim_start_matches('#');
        let resolved = doc.pointer(pointer).unwrap_or(&Value::Null);
        assert!(resolved.get("$ref").is_some(), "{name}: {target}");
    }
}

#[test]
fn a_frame_that_drifts_from_the_contract_fails_the_check() {
    let good = json!({"type": "pong", "payload": {"timestamp": "2025-11-06T12:00:00.000Z"}});
    assert_frame_conforms(&good, false, "test");
    for (bad, from_client) in [
        // A renamed field.
        (
            json!({"type": "pong", "payload": {"time": "2025-11-06T12:00:00.000Z"}}),
            false,
        ),
        // A wrong type.
        (
            json!({"type": "presenceUpdate", "payload": {"userId": "u1", "status": "away",
                   "timestamp": "2025-11-06T12:00:00.000Z"}}),
            false,
        ),
        // A message without its sequence id.
        (
            json!({"type": "message", "payload": {"id": "m", "roomId": "r", "senderId": "u",
                   "content": "hi", "type": "text", "metadata": null, "clientMessageId": null,
                   "sender": {"id": "u", "username": "u", "displayName": null, "avatar": null},
                   "readBy": [], "createdAt": "2025-11-06T12:00:00.000Z"}}),
            false,
        ),
        // An unknown frame type.
        (json!({"type": "shout", "payload": {}}), true),
        // A client frame without a required field.
        (
            json!({"type": "markRead", "payload": {"roomId": "r"}}),
            true,
        ),
    ] {
        let caught = std::panic::catch_unwind(|| assert_frame_conforms(&bad, from_client, "test"));
        assert!(caught.is_err(), "accepted: {bad}");
    }
}
