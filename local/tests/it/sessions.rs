//! Sessions on open sockets (issue 15), tried as an attacker would, with
//! real sockets against the whole stack:
//!
//! - one user cannot hold more than `MAX_CONNECTIONS_PER_USER` (10)
//!   connections: the eleventh works and closes the user's least recently
//!   active one, with its subscriptions; other users are untouched;
//! - a socket does not outlive its token: past `exp` plus the grace, its
//!   next frame gets `UNAUTHORIZED` "token expired" and a close, and an
//!   idle one is closed by the sweeper;
//! - `authenticate` with a fresh token of the same user extends the
//!   session; a forged, expired or another user's token is refused and
//!   the socket closed;
//! - a revoked token (by `jti`, or every token of a user issued up to a
//!   time) is refused at the handshake and over REST, and closes the
//!   sockets it opened at their next frame.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use chat_shared::auth::DevClaims;
use chat_test_support::{TestEnv, token_with};
use common::{Client, TestStack, handshake, keys, redis, token};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A token of `user` that expires `secs` from now.
fn expiring(user: &str, secs: i64) -> (String, i64) {
    let exp = chrono::Utc::now().timestamp() + secs;
    (token_with(user, |c| c.exp = exp), exp)
}

/// Sleeps until `ms` past the start of second `exp`.
async fn sleep_past(exp: i64, ms: i64) {
    let wait = exp * 1000 + ms - chrono::Utc::now().timestamp_millis();
    if let Ok(wait) = u64::try_from(wait) {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// The next frames must be an `error` `UNAUTHORIZED` with `message` for a
/// `request_type` frame, then a close (1000: what API Gateway's
/// DeleteConnection sends).
async fn expect_refused_and_closed(
    client: &mut Client,
    message: &str,
    request_type: &str,
    what: &str,
) {
    let error = client.expect_error("UNAUTHORIZED").await;
    assert_eq!(error["message"], message, "{what}: {error}");
    assert_eq!(error["requestType"], request_type, "{what}: {error}");
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000, "{what}: {close:?}");
}

#[tokio::test]
async fn the_eleventh_connection_closes_the_least_recently_active() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut bob = Client::connect(&stack, "bob").await;
    let mut alice = Vec::new();
    for _ in 0..10 {
        alice.push(Client::connect(&stack, "alice").await);
    }
    // alice[1] joins the room, then every other one is used after it: it
    // is the least recently active of the ten.
    alice[1].join(&room).await;
    for i in (0..10).filter(|i| *i != 1) {
        alice[i].ping_pong().await;
    }
    let stale = alice[1].connection_id.clone();

    let mut eleventh = Client::connect(&stack, "alice").await;
    eleventh.ping_pong().await;
    let close = alice[1].expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000, "{close:?}");

    // Its registration and subscription went with it, in the same step.
    let mut redis = redis(&env).await;
    let live: i64 = redis::cmd("ZCARD")
        .arg(keys(&env).user_conns("alice"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(live, 10);
    let record: bool = redis::cmd("EXISTS")
        .arg(keys(&env).conn(&stale))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!record, "the closed connection is unregistered");
    let subscribed: bool = redis::cmd("HEXISTS")
        .arg(keys(&env).room_conns(&room))
        .arg(&stale)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!subscribed, "and unsubscribed from its room");

    // The other ten work, alice is still online, and bob is untouched.
    for (i, client) in alice.iter_mut().enumerate() {
        if i != 1 {
            client.ping_pong().await;
        }
    }
    eleventh.ping_pong().await;
    bob.ping_pong().await;
    let online = stack.online("bob", &room).await;
    assert!(online.contains(&json!("alice")), "{online:?}");
    bob.assert_quiet(300).await;

    // Another user has a cap of their own.
    let mut carol = Vec::new();
    for _ in 0..10 {
        carol.push(Client::connect(&stack, "carol").await);
    }
    for client in &mut carol {
        client.ping_pong().await;
    }
    for (i, client) in alice.into_iter().enumerate() {
        if i != 1 {
            client.close().await;
        }
    }
    eleventh.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_socket_is_closed_at_its_first_frame_after_the_token_ran_out() {
    let mut env = TestEnv::new().await;
    env.set("TOKEN_EXPIRY_GRACE_SECONDS", "0");
    let stack = TestStack::all_in_one(&env).await;
    let (short, exp) = expiring("alice", 2);
    let mut alice = Client::connect_url(&stack.ws_url(&short), "alice").await;
    alice.ping_pong().await;
    let mut bob = Client::connect(&stack, "bob").await;

    sleep_past(exp, 200).await;
    alice.send("ping", json!({})).await;
    // The sweeper may have closed the idle socket first (its lease ends at
    // the token's expiry too): then there is no `error`, only the close.
    match alice.next_frame().await {
        Some(Message::Text(text)) => {
            let event: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(event["type"], "error", "{event}");
            assert_eq!(event["payload"]["code"], "UNAUTHORIZED", "{event}");
            assert_eq!(event["payload"]["message"], "token expired", "{event}");
            assert_eq!(event["payload"]["requestType"], "ping", "{event}");
            let close = alice.expect_close().await.expect("a close frame");
            assert_eq!(u16::from(close.code), 1000, "{close:?}");
        }
        Some(Message::Close(frame)) => {
            let frame = frame.expect("a close frame");
            assert_eq!(u16::from(frame.code), 1000, "{frame:?}");
        }
        other => panic!("expected the error or the close, got {other:?}"),
    }
    // Others are untouched.
    bob.ping_pong().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn an_idle_socket_is_closed_once_its_token_ran_out() {
    let mut env = TestEnv::new().await;
    env.set("TOKEN_EXPIRY_GRACE_SECONDS", "1");
    let stack = TestStack::all_in_one(&env).await;
    let (short, exp) = expiring("alice", 2);
    let mut alice = Client::connect_url(&stack.ws_url(&short), "alice").await;
    // Sending nothing: the sweeper closes it (it runs every 5 s here), not
    // the gateway's 10-minute idle timeout. `next_frame` waits up to 10 s.
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000, "{close:?}");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(now >= exp * 1000 + 1000, "not before exp + grace");
    stack.stop().await;
}

#[tokio::test]
async fn authenticate_with_a_fresh_token_extends_the_session() {
    let mut env = TestEnv::new().await;
    env.set("TOKEN_EXPIRY_GRACE_SECONDS", "0");
    let stack = TestStack::all_in_one(&env).await;
    let (short, exp) = expiring("alice", 2);
    let mut alice = Client::connect_url(&stack.ws_url(&short), "alice").await;
    let (fresh, fresh_exp) = expiring("alice", 3600);
    alice.send("authenticate", json!({"token": fresh})).await;
    let authenticated = alice.expect("authenticated").await;
    assert_eq!(authenticated, json!({"exp": fresh_exp}));
    let mut redis = redis(&env).await;
    let stored: i64 = redis::cmd("HGET")
        .arg(keys(&env).conn(&alice.connection_id))
        .arg("exp")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stored, fresh_exp);

    // Past the first token's expiry, and past a sweep (every 5 s): the
    // socket is still open and served, frames and events alike.
    sleep_past(exp, 6_000).await;
    alice.ping_pong().await;
    let room = stack.direct("alice", "bob").await;
    alice.join(&room).await;
    stack.send_rest("bob", &room, "still there?").await;
    let message = alice.wait_for("message").await;
    assert_eq!(message["content"], "still there?");
    alice.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn authenticate_refuses_forged_expired_and_foreign_tokens_and_closes() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    stack.register(&["bob"]).await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &DevClaims::new("alice", 3600),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    let expired = token_with("alice", |c| c.exp = chrono::Utc::now().timestamp() - 5);
    let unsigned = {
        let claims = token("alice").split('.').nth(1).unwrap().to_owned();
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
    };
    for (what, bad) in [
        ("forged", forged),
        ("expired", expired),
        ("alg none", unsigned),
        ("another user's", token("bob")),
        ("not a JWT", "junk".to_owned()),
    ] {
        let mut alice = Client::connect(&stack, "alice").await;
        alice.send("authenticate", json!({"token": bad})).await;
        expect_refused_and_closed(&mut alice, "invalid token", "authenticate", what).await;
    }
    // A frame without a token is a plain BAD_REQUEST: the socket stays.
    let mut alice = Client::connect(&stack, "alice").await;
    alice.send_invalid("authenticate", json!({})).await;
    alice.expect_error("BAD_REQUEST").await;
    alice.ping_pong().await;
    // The refused ones left no registration behind; the good one remains.
    let mut redis = redis(&env).await;
    let live: i64 = redis::cmd("ZCARD")
        .arg(keys(&env).user_conns("alice"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(live, 1);
    alice.close().await;
    stack.stop().await;
}

/// A token with these claims, signed with the test secret.
fn signed(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(chat_test_support::SECRET.as_bytes()),
    )
    .unwrap()
}

/// The handshake with `token` is refused with 401 "invalid token", and so
/// is a REST call.
async fn assert_refused_everywhere(stack: &TestStack, token: &str, what: &str) {
    let request = stack.ws_url(token).into_client_request().unwrap();
    match handshake(request).await {
        Ok(_) => panic!("{what}: the handshake was accepted"),
        Err((status, body)) => {
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["error"]["message"], "invalid token", "{what}: {body}");
        }
    }
    let reply = stack.call("GET", "/rooms", token, None).await;
    assert_eq!(reply.status, 401, "{what}: {:?}", reply.body);
    assert_eq!(reply.body["error"]["message"], "invalid token", "{what}");
}

#[tokio::test]
async fn revoked_tokens_are_refused_and_close_the_sockets_they_opened() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let now = chrono::Utc::now().timestamp();
    let mut redis = redis(&env).await;
    let mut bob = Client::connect(&stack, "bob").await;

    // By jti: that token alone.
    let first = signed(&json!({"sub": "alice", "exp": now + 3600, "jti": "j-1"}));
    let second = signed(&json!({"sub": "alice", "exp": now + 3600, "jti": "j-2"}));
    let mut one = Client::connect_url(&stack.ws_url(&first), "alice").await;
    let mut two = Client::connect_url(&stack.ws_url(&second), "alice").await;
    let _: () = redis::cmd("SET")
        .arg(keys(&env).revoked_jti("j-1"))
        .arg("1")
        .arg("EXAT")
        .arg(now + 3600)
        .query_async(&mut redis)
        .await
        .unwrap();
    one.send("ping", json!({})).await;
    expect_refused_and_closed(&mut one, "token revoked", "ping", "revoked jti").await;
    assert_refused_everywhere(&stack, &first, "revoked jti").await;
    two.ping_pong().await;

    // By user: every token issued up to the time, and any without `iat`.
    let old = signed(&json!({"sub": "carol", "exp": now + 3600, "iat": now - 60}));
    let mut carol = Client::connect_url(&stack.ws_url(&old), "carol").await;
    carol.ping_pong().await;
    let _: () = redis::cmd("SET")
        .arg(keys(&env).revoked_user("carol"))
        .arg(now)
        .query_async(&mut redis)
        .await
        .unwrap();
    carol
        .send("typing", json!({"roomId": "r", "isTyping": true}))
        .await;
    expect_refused_and_closed(&mut carol, "token revoked", "typing", "revoked user").await;
    assert_refused_everywhere(&stack, &old, "issued before the revocation").await;
    assert_refused_everywhere(&stack, &token("carol"), "no iat").await;
    let fresh = signed(&json!({"sub": "carol", "exp": now + 3600, "iat": now + 1}));
    let mut carol = Client::connect_url(&stack.ws_url(&fresh), "carol").await;
    carol.ping_pong().await;
    // A revoked token cannot renew a session either.
    carol.send("authenticate", json!({"token": old})).await;
    expect_refused_and_closed(&mut carol, "invalid token", "authenticate", "renewal").await;

    // Nobody else noticed.
    bob.ping_pong().await;
    two.ping_pong().await;
    bob.close().await;
    two.close().await;
    stack.stop().await;
}
