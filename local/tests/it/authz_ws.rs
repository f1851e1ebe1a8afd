//! The WebSocket authorization matrix: every client event of PROTOCOL §2
//! sent by a member of the room, a known non-member, an admin who is not a
//! member and a deleted user (a former member whose `users` row was
//! deleted; their valid token re-creates them as a non-member), with the
//! exact answer each gets and, for a refusal, proof that nobody else heard
//! anything. Callers without a usable token (none, expired, forged, or any
//! algorithm-confusion trick) never get a connection: the handshake is
//! refused with 401.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use chat_test_support::{SECRET, TestEnv, base64url, token_with};
use common::{Client, TestStack, admin_token, handshake, token};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Member,
    NonMember,
    Admin,
    Deleted,
}

/// What the sender gets back.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// This event type.
    Event(&'static str),
    /// An `error` with this code.
    Error(&'static str),
    /// Nothing (the next `ping` is answered first).
    Nothing,
}

/// The events, each with what the member's room-mate (bob, joined to the
/// room) must see when it succeeds. `markRead` comes before `sendMessage`:
/// sending moves the sender's cursor, and a receipt needs it to move.
fn events(room: &str) -> Vec<(&'static str, Value, Option<&'static str>)> {
    vec![
        (
            "joinRoom by id",
            json!({"type": "joinRoom", "payload": {"roomId": room}}),
            None,
        ),
        (
            "joinRoom by target user",
            json!({"type": "joinRoom", "payload": {"targetUserId": "bob"}}),
            None,
        ),
        (
            "leaveRoom",
            json!({"type": "leaveRoom", "payload": {"roomId": room}}),
            None,
        ),
        (
            "markRead",
            json!({"type": "markRead", "payload": {"roomId": room, "sequenceId": 1}}),
            Some("readReceipt"),
        ),
        (
            "typing",
            json!({"type": "typing", "payload": {"roomId": room, "isTyping": true}}),
            Some("typing"),
        ),
        (
            "sendMessage",
            json!({"type": "sendMessage", "payload": {"roomId": room, "content": "hi", "clientMessageId": "c1"}}),
            Some("message"),
        ),
        (
            "sendMessage system",
            json!({"type": "sendMessage", "payload": {"roomId": room, "content": "notice", "type": "system"}}),
            Some("message"),
        ),
        ("ping", json!({"type": "ping", "payload": {}}), None),
    ]
}

fn expected(event: &str, role: Role) -> Answer {
    use Answer::*;
    use Role::*;
    match (event, role) {
        ("ping", _) => Event("pong"),
        ("joinRoom by target user", _) => Event("roomJoined"),
        // Unsubscribing is harmless and says nothing about the room.
        ("leaveRoom", _) => Event("roomLeft"),
        ("joinRoom by id", Member) => Event("roomJoined"),
        ("sendMessage", Member) => Event("message"),
        ("typing" | "markRead", Member) => Nothing,
        // Only admins send system messages, and only members send at all.
        ("sendMessage system", _) => Error("FORBIDDEN"),
        ("joinRoom by id" | "sendMessage" | "typing" | "markRead", _) => Error("FORBIDDEN"),
        (other, _) => panic!("no expectation for {other}"),
    }
}

/// Deletes a user's row, as an operator would (there is no API for it).
async fn delete_user(env: &TestEnv, user: &str) {
    let url = secrecy::SecretString::from(env.vars["DATABASE_URL"].clone());
    let pool = chat_shared::store::connect_pool(&url, 1).expect("pool");
    let client = pool.get().await.expect("a connection");
    let deleted = client
        .execute("DELETE FROM users WHERE id = $1", &[&user])
        .await
        .expect("delete the user row");
    assert_eq!(deleted, 1, "{user} existed");
}

#[tokio::test]
async fn every_event_for_every_kind_of_connected_caller() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    stack.register(&["alice", "bob", "eve", "ops"]).await;
    let mut n = 0;
    for role in [Role::Member, Role::NonMember, Role::Admin, Role::Deleted] {
        // A fresh room per role, with bob joined to hear what happens.
        let room = stack.group("alice", &["bob"]).await;
        // From bob, so that alice's read cursor can still move.
        stack.send_rest("bob", &room, "first").await;
        for (what, frame, heard) in events(&room) {
            n += 1;
            let (user, token) = match role {
                Role::Member => ("alice".to_owned(), token("alice")),
                Role::NonMember => ("eve".to_owned(), token("eve")),
                Role::Admin => ("ops".to_owned(), admin_token("ops")),
                Role::Deleted => {
                    // A former member, removed from the room, then deleted.
                    let ghost = format!("ghost-{n}");
                    stack.register(&[&ghost]).await;
                    let added = stack
                        .post(
                            "alice",
                            &format!("/rooms/{room}/members"),
                            json!({"userIds": [ghost]}),
                        )
                        .await;
                    assert_eq!(added.status, 200, "{:?}", added.body);
                    let left = stack
                        .delete(&ghost, &format!("/rooms/{room}/members/{ghost}"))
                        .await;
                    assert_eq!(left.status, 204, "{:?}", left.body);
                    delete_user(&env, &ghost).await;
                    let token = token(&ghost);
                    (ghost, token)
                }
            };
            let context = format!("{what} as {role:?}");
            let mut bob = Client::connect(&stack, "bob").await;
            bob.join(&room).await;
            let before = stack.history("bob", &room).await;
            let mut caller = Client::connect_url(&stack.ws_url(&token), &user).await;
            caller.send_raw(Message::text(frame.to_string())).await;
            let want = expected(what, role);
            match &want {
                Answer::Event(kind) => {
                    let payload = caller.wait_for(kind).await;
                    if *kind == "roomJoined" && what == "joinRoom by id" {
                        assert_eq!(payload["room"]["id"], room, "{context}");
                    }
                }
                Answer::Error(code) => {
                    let error = caller.expect_error(code).await;
                    assert_eq!(error["requestType"], frame["type"], "{context}: {error}");
                }
                Answer::Nothing => {}
            }
            // Nothing else first: the next answer is the pong.
            caller.send("ping", json!({})).await;
            let next = caller.next().await;
            assert_eq!(next["type"], "pong", "{context}: unexpected {next}");

            match (heard, &want) {
                (Some(kind), Answer::Event(_) | Answer::Nothing) => {
                    let payload = bob.wait_for(kind).await;
                    assert_eq!(payload["roomId"], room, "{context}: {payload}");
                }
                (_, Answer::Error(_)) => {
                    // Only the caller's own presence may have reached bob.
                    let heard: Vec<Value> = bob
                        .collect(200)
                        .await
                        .into_iter()
                        .filter(|e| e["type"] != "presenceUpdate")
                        .collect();
                    assert!(heard.is_empty(), "{context}: bob heard {heard:?}");
                    assert_eq!(
                        stack.history("bob", &room).await,
                        before,
                        "{context}: a refused event changed the room"
                    );
                }
                _ => {}
            }
            if role == Role::Deleted {
                let members = stack.get("alice", "/rooms").await.body["rooms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["id"] == room)
                    .map(|r| r["members"].clone())
                    .unwrap();
                assert!(
                    members
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|m| m["id"] != user.as_str()),
                    "{context}: the deleted user is not a member again"
                );
            }
            caller.close().await;
            bob.close().await;
        }
    }
    assert_eq!(n, 4 * events("r").len());
    stack.stop().await;
}

/// A token with this header over valid claims, HMAC-signed as `alg` with
/// `secret`, or unsigned when `alg` is `None`.
fn crafted(header: Value, alg: Option<Algorithm>, secret: &str) -> String {
    let claims = json!({"sub": "mallory", "exp": chrono::Utc::now().timestamp() + 3600});
    let input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let sig = alg.map_or_else(String::new, |alg| {
        jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(secret.as_bytes()),
            alg,
        )
        .unwrap()
    });
    format!("{input}.{sig}")
}

#[tokio::test]
async fn callers_without_a_usable_token_never_connect() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    stack.register(&["alice"]).await;
    let base = format!("ws://{}/ws", stack.addr());
    let expired = token_with("alice", |c| c.exp = chrono::Utc::now().timestamp() - 5);
    let tokens = [
        ("expired (a member's)", expired.clone()),
        (
            "HS384 with the right secret",
            crafted(json!({"alg": "HS384"}), Some(Algorithm::HS384), SECRET),
        ),
        (
            "HS512 with the right secret",
            crafted(json!({"alg": "HS512"}), Some(Algorithm::HS512), SECRET),
        ),
        (
            "RS256 header over HMAC-SHA256",
            crafted(json!({"alg": "RS256"}), Some(Algorithm::HS256), SECRET),
        ),
        (
            "ES256 header over HMAC-SHA256",
            crafted(json!({"alg": "ES256"}), Some(Algorithm::HS256), SECRET),
        ),
        ("alg none", crafted(json!({"alg": "none"}), None, "")),
        (
            "HS256 with an empty signature",
            crafted(json!({"alg": "HS256"}), None, ""),
        ),
        (
            "jku to the attacker's keys",
            crafted(
                json!({"alg": "HS256", "jku": "http://127.0.0.1:1/k"}),
                Some(Algorithm::HS256),
                "attacker",
            ),
        ),
    ];
    let mut attempts = vec![("no token".to_owned(), base.clone(), None)];
    for (what, token) in &tokens {
        attempts.push((
            format!("{what} in ?token="),
            format!("{base}?token={token}"),
            None,
        ));
        attempts.push((
            format!("{what} as a bearer header"),
            base.clone(),
            Some(format!("Bearer {token}")),
        ));
    }
    for (what, url, header) in attempts {
        let mut request = url.as_str().into_client_request().unwrap();
        if let Some(value) = header {
            request
                .headers_mut()
                .insert("Authorization", value.parse().unwrap());
        }
        match handshake(request).await {
            Ok(_) => panic!("{what}: connected"),
            Err((status, body)) => {
                assert_eq!(status, 401, "{what}: {body}");
                assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{what}: {body}");
            }
        }
    }
    // mallory never became a user; the stack still works.
    let reply = stack
        .post("alice", "/direct", json!({"targetUserId": "mallory"}))
        .await;
    assert_eq!(reply.status, 404, "{:?}", reply.body);
    let mut alice = Client::connect(&stack, "alice").await;
    alice.ping_pong().await;
    alice.close().await;
    stack.stop().await;
}

/// Strings that break naive SQL, escaping or normalization.
const HOSTILE: [&str; 6] = [
    "'; DROP TABLE messages; --",
    "\" OR \"\"=\" \\\\ %_ $1",
    "e\u{301} vs \u{e9}",
    "😀👍🏽🇫🇷 \u{10FFFF}",
    "\u{202E}rtl\u{202C} \u{200B}\u{FEFF}x",
    "line\nbreak\r\ttab",
];

#[tokio::test]
async fn hostile_text_travels_verbatim_over_websocket() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let hostile_token = token_with("alice", |c| {
        c.username = Some(HOSTILE[0].to_owned());
        c.display_name = Some(HOSTILE[3].to_owned());
    });
    let mut alice = Client::connect_url(&stack.ws_url(&hostile_token), "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    for (i, text) in HOSTILE.iter().enumerate() {
        let client_id = format!("{i}{text}");
        let metadata = json!({*text: [text, {"k": text}]});
        alice
            .send(
                "sendMessage",
                json!({"roomId": room, "content": text, "metadata": metadata, "clientMessageId": client_id}),
            )
            .await;
        let mine = alice.wait_for("message").await;
        let theirs = bob.wait_for("message").await;
        for msg in [&mine, &theirs] {
            assert_eq!(msg["content"], *text);
            assert_eq!(msg["metadata"], metadata);
            assert_eq!(msg["clientMessageId"], client_id);
            assert_eq!(msg["sender"]["username"], HOSTILE[0]);
            assert_eq!(msg["sender"]["displayName"], HOSTILE[3]);
        }
        // Alternating, since a repeat of the same typing state is coalesced.
        let is_typing = i % 2 == 0;
        alice
            .send("typing", json!({"roomId": room, "isTyping": is_typing}))
            .await;
        let typing = bob.wait_for("typing").await;
        assert_eq!(typing["username"], HOSTILE[0]);
        assert_eq!(typing["isTyping"], is_typing);
    }
    let history = stack.history("bob", &room).await;
    let contents: Vec<&str> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, HOSTILE);
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}
