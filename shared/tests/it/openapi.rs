//! The OpenAPI description (`GET /api/v1/openapi.json`): served without a
//! token, it parses, describes every route of PROTOCOL §4 with its
//! parameters, bodies and responses, and every `$ref` in it resolves.
//! (scripts/schemathesis.sh checks the service against it in CI.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use common::{API, TestApp};
use serde_json::Value;

/// Every route of PROTOCOL §4, as `(method, OpenAPI path)`.
const ROUTES: [(&str, &str); 13] = [
    ("get", "/health"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/chat/rooms"),
    ("post", "/api/v1/chat/rooms"),
    ("get", "/api/v1/chat/rooms/{roomId}/messages"),
    ("post", "/api/v1/chat/rooms/{roomId}/messages"),
    ("get", "/api/v1/chat/rooms/{roomId}/unread"),
    ("post", "/api/v1/chat/rooms/{roomId}/read"),
    ("get", "/api/v1/chat/rooms/{roomId}/online"),
    ("post", "/api/v1/chat/direct"),
    ("delete", "/api/v1/chat/rooms/{roomId}/cleanup"),
    ("post", "/api/v1/chat/rooms/{roomId}/members"),
    ("delete", "/api/v1/chat/rooms/{roomId}/members/{userId}"),
];

async fn document(app: &TestApp) -> Value {
    let reply = app
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert!(
        reply.body.is_object(),
        "the document is JSON: {}",
        reply.body
    );
    reply.body
}

fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_lists_every_route_with_its_shapes() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );

    let mut listed = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            listed.insert((method.clone(), path.clone()));
        }
    }
    let expected: BTreeSet<_> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        listed, expected,
        "the documented routes are exactly PROTOCOL §4's"
    );

    let schemes = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(schemes["type"], "http");
    assert_eq!(schemes["scheme"], "bearer");
    assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));

    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object().expect("responses");
        let statuses: BTreeSet<&str> = responses.keys().map(String::as_str).collect();
        if path.starts_with("/api/v1/chat/") {
            for status in [
                "400", "401", "403", "404", "409", "413", "429", "500", "503",
            ] {
                assert!(statuses.contains(status), "{method} {path} lacks {status}");
                let schema = &responses[status]["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
            assert!(responses["429"]["headers"]["Retry-After"].is_object());
            assert!(
                op.get("security").is_none(),
                "{method} {path} uses the global bearer"
            );
        } else {
            assert_eq!(
                op["security"],
                serde_json::json!([{}]),
                "{path} needs no token"
            );
        }
        assert!(
            statuses.iter().any(|s| s.starts_with('2')),
            "{method} {path} documents its success"
        );
        if path.contains("{roomId}") {
            let params = op["parameters"].as_array().expect("parameters");
            assert!(
                params
                    .iter()
                    .any(|p| p["name"] == "roomId" && p["in"] == "path" && p["required"] == true),
                "{method} {path}: roomId"
            );
        }
        if method == "post" {
            assert!(
                op["requestBody"]["content"]["application/json"]["schema"].is_object(),
                "{method} {path} documents its body"
            );
        }
    }
    let history = &doc["paths"]["/api/v1/chat/rooms/{roomId}/messages"]["get"]["parameters"];
    let names: BTreeSet<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["roomId", "limit", "beforeSequenceId", "afterSequenceId"])
    );

    // The shapes clients see are components, and each `$ref` resolves.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "Message",
        "Room",
        "RoomSummary",
        "Profile",
        "ErrorBody",
        "ErrorCode",
    ] {
        assert!(schemas.contains_key(name), "schema {name}");
    }
    let message = &schemas["Message"]["properties"];
    for field in [
        "id",
        "roomId",
        "senderId",
        "content",
        "type",
        "metadata",
        "sequenceId",
        "clientMessageId",
        "sender",
        "readBy",
        "createdAt",
    ] {
        assert!(message.get(field).is_some(), "Message.{field}");
    }
    // Fields that are always present, null or not, are required: a
    // response that leaves one out does not conform.
    let required = |name: &str| -> Vec<&str> {
        schemas[name]["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}.required"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    for field in ["metadata", "clientMessageId", "readBy", "createdAt"] {
        assert!(required("Message").contains(&field), "Message.{field}");
    }
    for field in [
        "name",
        "callId",
        "user1",
        "user2",
        "lastMessageAt",
        "lastMessageText",
    ] {
        assert!(required("Room").contains(&field), "Room.{field}");
    }
    for field in ["displayName", "avatar"] {
        assert!(required("Profile").contains(&field), "Profile.{field}");
    }
    let codes = &schemas["ErrorCode"]["enum"];
    for code in [
        "BAD_REQUEST",
        "UNAUTHORIZED",
        "FORBIDDEN",
        "NOT_FOUND",
        "CONFLICT",
        "PAYLOAD_TOO_LARGE",
        "RATE_LIMITED",
        "INTERNAL",
        "UNAVAILABLE",
        "SERVICE_UNAVAILABLE",
    ] {
        assert!(
            codes.as_array().unwrap().contains(&Value::from(code)),
            "{code}"
        );
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    if let Ok(dir) = std::env::var("OPENAPI_DUMP") {
        std::fs::write(
            format!("{dir}/openapi.json"),
            serde_json::to_string_pretty(&doc).unwrap(),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn the_document_needs_no_token_and_ignores_a_bad_one() {
    let app = TestApp::spawn().await;
    let reply = app
        .call(Method::GET, "/api/v1/openapi.json", Some("garbage"), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Served beside the chat API, not under it.
    let reply = app
        .get(&format!("{API}/openapi.json"), &app.token("alice"))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}
