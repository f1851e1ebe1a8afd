//! The REST authorization matrix: every route of PROTOCOL §4 called by each
//! kind of caller, with the exact status each must get, and proof that a
//! refused call changed nothing.
//!
//! Callers: a member of the room (alice), a known non-member (eve), an admin
//! who is not a member (ops), no token, an expired token of a member, and a
//! valid token of a deleted user (a former member whose `users` row was
//! deleted: the token re-creates the user, as any first authentication
//! does, so they are a non-member: 403 on room routes).
//!
//! Also here: JWT algorithm confusion (other HMAC sizes with the right
//! secret, an RS256/ES256 header over an HMAC signature, `none`, empty
//! signatures, tampered payloads, `kid`/`jku`/`jwk` headers that must not
//! choose the key), and SQL metacharacters and unicode in every text field,
//! stored and returned verbatim.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use axum::http::{Method, StatusCode};
use common::{API, SECRET, TestApp, expect_error, expired_token, token_with};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Member,
    NonMember,
    Admin,
    Anonymous,
    Expired,
    Deleted,
}

const ROLES: [Role; 6] = [
    Role::Member,
    Role::NonMember,
    Role::Admin,
    Role::Anonymous,
    Role::Expired,
    Role::Deleted,
];

/// One route as a caller uses it: method, path (with `{room}` and `{self}`
/// placeholders) and body.
struct Route {
    name: &'static str,
    method: Method,
    path: &'static str,
    body: Option<Value>,
}

fn routes() -> Vec<Route> {
    let r = |name, method, path, body| Route {
        name,
        method,
        path,
        body,
    };
    vec![
        r("list rooms", Method::GET, "/api/v1/chat/rooms", None),
        r(
            "create room",
            Method::POST,
            "/api/v1/chat/rooms",
            Some(json!({"type": "GROUP", "name": "new", "memberIds": ["bob"]})),
        ),
        r(
            "history",
            Method::GET,
            "/api/v1/chat/rooms/{room}/messages",
            None,
        ),
        r(
            "send",
            Method::POST,
            "/api/v1/chat/rooms/{room}/messages",
            Some(json!({"content": "hello"})),
        ),
        r(
            "unread",
            Method::GET,
            "/api/v1/chat/rooms/{room}/unread",
            None,
        ),
        r(
            "mark read",
            Method::POST,
            "/api/v1/chat/rooms/{room}/read",
            Some(json!({"sequenceId": 1})),
        ),
        r(
            "online",
            Method::GET,
            "/api/v1/chat/rooms/{room}/online",
            None,
        ),
        r(
            "direct",
            Method::POST,
            "/api/v1/chat/direct",
            Some(json!({"targetUserId": "bob"})),
        ),
        r(
            "cleanup",
            Method::DELETE,
            "/api/v1/chat/rooms/{room}/cleanup",
            None,
        ),
        r(
            "add members",
            Method::POST,
            "/api/v1/chat/rooms/{room}/members",
            Some(json!({"userIds": ["carol"]})),
        ),
        r(
            "remove another member",
            Method::DELETE,
            "/api/v1/chat/rooms/{room}/members/bob",
            None,
        ),
        r(
            "remove yourself",
            Method::DELETE,
            "/api/v1/chat/rooms/{room}/members/{self}",
            None,
        ),
        r("health", Method::GET, "/health", None),
        r("openapi", Method::GET, "/api/v1/openapi.json", None),
    ]
}

/// The status each caller gets on each route.
fn expected(route: &str, role: Role) -> u16 {
    use Role::*;
    match (route, role) {
        ("health" | "openapi", _) => 200,
        (_, Anonymous | Expired) => 401,
        ("list rooms", _) => 200,
        ("create room", _) => 201,
        ("direct", _) => 200,
        ("send", Member) => 201,
        ("history" | "unread" | "mark read" | "online" | "add members", Member) => 200,
        ("history" | "send" | "unread" | "mark read" | "online" | "add members", _) => 403,
        ("cleanup", Admin) => 200,
        ("cleanup", _) => 403,
        ("remove another member", Admin) => 204,
        ("remove another member", _) => 403,
        ("remove yourself", Member) => 204,
        // Not a member, so there is nothing to remove.
        ("remove yourself", _) => 404,
        (other, _) => panic!("no expectation for {other}"),
    }
}

/// The room, as its members see it: what a refused call must not change.
async fn room_state(app: &TestApp, room: &str) -> Value {
    let entry = app.room_entry("alice", room).await;
    let page = app.history("alice", room, "limit=100").await;
    json!({
        "members": common::member_ids(&entry),
        "lastSequenceId": entry["lastSequenceId"],
        "messages": page["messages"],
        "bobUnread": app.unread("bob", room).await,
    })
}

async fn sql(app: &TestApp) -> tokio_postgres::Client {
    let url = app.env.vars["DATABASE_URL"].clone().into();
    let (client, _conn) = chat_shared::pg_tls::connect(&url).await.expect("connect");
    client
}

/// A former member of `room` whose `users` row is gone: they were added,
/// removed themselves, and were deleted in SQL (there is no deletion API).
async fn deleted_user(app: &TestApp, room: &str, n: usize) -> String {
    let ghost = format!("ghost-{n}");
    app.register(&[&ghost]).await;
    let added = app
        .post(
            &format!("{API}/rooms/{room}/members"),
            &app.token("alice"),
            json!({"userIds": [ghost]}),
        )
        .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    let left = app
        .delete(
            &format!("{API}/rooms/{room}/members/{ghost}"),
            &app.token(&ghost),
        )
        .await;
    assert_eq!(left.status, StatusCode::NO_CONTENT, "{}", left.body);
    let deleted = sql(app)
        .await
        .execute("DELETE FROM users WHERE id = $1", &[&ghost])
        .await
        .expect("delete the user row");
    assert_eq!(deleted, 1);
    ghost
}

#[tokio::test]
async fn every_route_for_every_kind_of_caller() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol", "eve", "ops"]).await;
    let mut checked = 0;
    for (i, route) in routes().iter().enumerate() {
        for (j, role) in ROLES.into_iter().enumerate() {
            // A fresh room per cell: some calls change it.
            let room = app.group("alice", &["bob"]).await;
            app.send("alice", &room, "first").await;
            let (user, token): (String, Option<String>) = match role {
                Role::Member => ("alice".into(), Some(app.token("alice"))),
                Role::NonMember => ("eve".into(), Some(app.token("eve"))),
                Role::Admin => ("ops".into(), Some(app.admin_token("ops"))),
                Role::Anonymous => ("nobody".into(), None),
                Role::Expired => ("alice".into(), Some(expired_token("alice"))),
                Role::Deleted => {
                    let ghost = deleted_user(&app, &room, i * 10 + j).await;
                    let token = app.token(&ghost);
                    (ghost, Some(token))
                }
            };
            let path = route.path.replace("{room}", &room).replace("{self}", &user);
            let before = room_state(&app, &room).await;
            let reply = app
                .call(
                    route.method.clone(),
                    &path,
                    token.as_deref(),
                    route
                        .body
                        .as_ref()
                        .map(|b| axum::body::Body::from(b.to_string())),
                )
                .await;
            let want = expected(route.name, role);
            let context = format!("{} ({} {path}) as {role:?}", route.name, route.method);
            if want >= 400 {
                expect_error(&reply, StatusCode::from_u16(want).unwrap(), &context);
                assert_eq!(
                    room_state(&app, &room).await,
                    before,
                    "{context}: a refused call changed the room"
                );
            } else {
                assert_eq!(reply.status.as_u16(), want, "{context}: {}", reply.body);
            }
            if role == Role::Deleted && route.path.starts_with("/api/v1/chat") {
                // The valid token made the user known again, as a non-member.
                let row = sql(&app)
                    .await
                    .query_opt("SELECT username FROM users WHERE id = $1", &[&user])
                    .await
                    .unwrap();
                assert_eq!(
                    row.map(|r| r.get::<_, String>(0)).as_deref(),
                    Some(user.as_str()),
                    "{context}: the deleted user is known again"
                );
                let members = common::member_ids(&app.room_entry("alice", &room).await);
                assert!(!members.contains(&user), "{context}: {members:?}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes().len() * ROLES.len());
}

// ---------------------------------------------------------------------------
// JWT algorithm confusion

fn b64(bytes: &[u8]) -> String {
    common::base64url(bytes)
}

/// A token with exactly this header and these claims, signed over
/// `header.payload` with HMAC-`alg` and `secret` (or with `signature` as
/// given).
fn craft(header: &Value, claims: &Value, signature: Signature) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match signature {
        Signature::Hmac(alg, secret) => jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(secret.as_bytes()),
            alg,
        )
        .expect("sign"),
        Signature::Empty => String::new(),
        Signature::Raw(s) => s.to_owned(),
    };
    format!("{signing_input}.{sig}")
}

enum Signature {
    Hmac(Algorithm, &'static str),
    Empty,
    Raw(&'static str),
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": chrono::Utc::now().timestamp() + 3600, "role": "admin"})
}

/// Every token an attacker might try, each of which must be refused.
pub fn confused_tokens() -> Vec<(&'static str, String)> {
    use Signature::*;
    let c = claims("mallory");
    let hs = |alg: &str| json!({"alg": alg, "typ": "JWT"});
    let good = token_with("mallory", |_| {});
    let (good_head, good_rest) = good.split_once('.').unwrap();
    let (_, good_sig) = good_rest.split_once('.').unwrap();
    vec![
        (
            "HS384 with the right secret",
            craft(&hs("HS384"), &c, Hmac(Algorithm::HS384, SECRET)),
        ),
        (
            "HS512 with the right secret",
            craft(&hs("HS512"), &c, Hmac(Algorithm::HS512, SECRET)),
        ),
        (
            "RS256 header over an HMAC-SHA256 signature",
            craft(&hs("RS256"), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        (
            "ES256 header over an HMAC-SHA256 signature",
            craft(&hs("ES256"), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        (
            "PS256 header over an HMAC-SHA256 signature",
            craft(&hs("PS256"), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        (
            "EdDSA header over an HMAC-SHA256 signature",
            craft(&hs("EdDSA"), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        ("alg none", craft(&hs("none"), &c, Empty)),
        ("alg None", craft(&hs("None"), &c, Empty)),
        ("alg NONE", craft(&hs("NONE"), &c, Empty)),
        (
            "alg nOnE with a signature",
            craft(&hs("nOnE"), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        (
            "HS256 with an empty signature",
            craft(&hs("HS256"), &c, Empty),
        ),
        (
            "HS256 with a garbage signature",
            craft(&hs("HS256"), &c, Raw("AAAA")),
        ),
        (
            "HS256 signed with another secret",
            craft(&hs("HS256"), &c, Hmac(Algorithm::HS256, "guess")),
        ),
        (
            "HS256 signed with an empty secret",
            craft(&hs("HS256"), &c, Hmac(Algorithm::HS256, "")),
        ),
        (
            "no alg",
            craft(&json!({"typ": "JWT"}), &c, Hmac(Algorithm::HS256, SECRET)),
        ),
        (
            "alg as a list",
            craft(
                &json!({"alg": ["HS256"]}),
                &c,
                Hmac(Algorithm::HS256, SECRET),
            ),
        ),
        (
            "jku pointing at the attacker's keys, signed with the attacker's secret",
            craft(
                &json!({"alg": "HS256", "jku": "http://127.0.0.1:1/jwks.json", "kid": "k1"}),
                &c,
                Hmac(Algorithm::HS256, "attacker"),
            ),
        ),
        (
            "an embedded jwk with the attacker's secret",
            craft(
                &json!({"alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"attacker")}}),
                &c,
                Hmac(Algorithm::HS256, "attacker"),
            ),
        ),
        (
            "kid naming a file, signed with that file's content",
            craft(
                &json!({"alg": "HS256", "kid": "../../../../dev/null"}),
                &c,
                Hmac(Algorithm::HS256, ""),
            ),
        ),
        (
            "a member's valid signature over a tampered payload",
            format!("{good_head}.{}.{good_sig}", b64(c.to_string().as_bytes())),
        ),
        (
            "exp as a string",
            craft(
                &hs("HS256"),
                &json!({"sub": "mallory", "exp": "9999999999"}),
                Hmac(Algorithm::HS256, SECRET),
            ),
        ),
        ("two dots only", "..".to_owned()),
        ("four segments", format!("{good}.AAAA")),
    ]
}

#[tokio::test]
async fn algorithm_confusion_is_refused_and_key_headers_are_ignored() {
    let app = TestApp::spawn().await;
    app.register(&["alice"]).await;
    let path = format!("{API}/rooms");
    for (what, token) in confused_tokens() {
        let reply = app.get(&path, &token).await;
        expect_error(&reply, StatusCode::UNAUTHORIZED, what);
    }
    // Nobody was recorded as a user (mallory never authenticated).
    let known = sql(&app)
        .await
        .query_opt("SELECT 1 FROM users WHERE id = 'mallory'", &[])
        .await
        .unwrap();
    assert!(known.is_none(), "a refused token created a user");

    // kid / jku / x5u headers do not choose the key: with the right secret
    // the token is good whatever they say.
    for header in [
        json!({"alg": "HS256", "typ": "JWT", "kid": "' OR '1'='1"}),
        json!({"alg": "HS256", "jku": "http://127.0.0.1:1/jwks.json", "x5u": "http://127.0.0.1:1/c.pem"}),
    ] {
        let token = craft(
            &header,
            &json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 60}),
            Signature::Hmac(Algorithm::HS256, SECRET),
        );
        let reply = app.get(&path, &token).await;
        assert_eq!(reply.status, StatusCode::OK, "{header}: {}", reply.body);
    }
}

// ---------------------------------------------------------------------------
// SQL metacharacters and unicode, stored and returned verbatim

/// Strings that break naive SQL, escaping, normalization or byte counting.
/// (U+0000 is the one character refused everywhere: PostgreSQL cannot store
/// it; see rest_messages.)
pub const HOSTILE: [&str; 10] = [
    "'; DROP TABLE users; --",
    "Robert'); DELETE FROM messages WHERE ('1'='1",
    "\" OR \"\"=\" \\\\ \\' %_ $1 :name ?",
    "e\u{301} vs \u{e9}",
    "😀👍🏽🇫🇷 \u{10FFFF}",
    "\u{202E}txet desrever\u{202C} \u{200B}\u{200D}\u{FEFF}x",
    "line\nbreak\r\ttab\u{85}\u{2028}",
    "中文 العربية עברית",
    "<script>alert(1)</script>&amp;",
    "}{][\"\\u0000 literally",
];

#[tokio::test]
async fn hostile_text_in_every_field_is_stored_and_returned_verbatim() {
    let app = TestApp::spawn().await;
    app.register(&["bob"]).await;
    for (i, text) in HOSTILE.iter().enumerate() {
        let user = format!("u{i}");
        // Profile claims.
        let token = token_with(&user, |c| {
            c.username = Some((*text).to_owned());
            c.display_name = Some(format!("{text} (display)"));
            c.avatar = Some(format!("https://x.test/{text}"));
        });
        // GROUP name.
        let created = app
            .post(
                &format!("{API}/rooms"),
                &token,
                json!({"type": "GROUP", "name": text, "memberIds": ["bob"]}),
            )
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{text:?}: {}",
            created.body
        );
        assert_eq!(created.body["room"]["name"], *text);
        let room = created.body["room"]["id"].as_str().unwrap().to_owned();
        // CALL id (and its idempotent repeat finds the same room).
        let call_id = format!("call {text}");
        let call = json!({"type": "CALL", "callId": call_id, "memberIds": ["bob"]});
        let first = app
            .post(&format!("{API}/rooms"), &token, call.clone())
            .await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{text:?}: {}",
            first.body
        );
        assert_eq!(first.body["room"]["callId"], call_id);
        let again = app.post(&format!("{API}/rooms"), &token, call).await;
        assert_eq!(again.status, StatusCode::OK, "{text:?}: {}", again.body);
        assert_eq!(again.body["room"]["id"], first.body["room"]["id"]);
        // Content, metadata keys and values, clientMessageId.
        let client_id: String = format!("c{i}-{text}").chars().take(64).collect();
        let metadata = json!({*text: text, "nested": {"k": [text, {*text: *text}]}});
        let body = json!({"content": text, "metadata": metadata, "clientMessageId": client_id});
        let sent = app
            .post(
                &format!("{API}/rooms/{room}/messages"),
                &token,
                body.clone(),
            )
            .await;
        assert_eq!(sent.status, StatusCode::CREATED, "{text:?}: {}", sent.body);
        let repeat = app
            .post(&format!("{API}/rooms/{room}/messages"), &token, body)
            .await;
        assert_eq!(
            repeat.status,
            StatusCode::OK,
            "{text:?}: the key matched verbatim"
        );
        assert_eq!(repeat.body["message"]["id"], sent.body["message"]["id"]);

        // Read back by another member: every field exactly as sent.
        let page = app.history("bob", &room, "").await;
        assert_eq!(page["count"], 1, "{page}");
        let msg = &page["messages"][0];
        assert_eq!(msg["content"], *text);
        assert_eq!(msg["metadata"], metadata);
        assert_eq!(msg["clientMessageId"], client_id);
        assert_eq!(msg["sender"]["username"], *text);
        assert_eq!(msg["sender"]["displayName"], format!("{text} (display)"));
        assert_eq!(msg["sender"]["avatar"], format!("https://x.test/{text}"));
        let entry = app.room_entry("bob", &room).await;
        assert_eq!(entry["name"], *text);
        assert_eq!(entry["lastMessageText"], *text);

        // The same text as a room id in a path is just an unknown room; as a
        // user id it is refused by format.
        let encoded = percent_encode(text);
        let reply = app
            .get(&format!("{API}/rooms/{encoded}/messages"), &token)
            .await;
        expect_error(&reply, StatusCode::NOT_FOUND, &format!("room id {text:?}"));
        let reply = app
            .delete(&format!("{API}/rooms/{room}/members/{encoded}"), &token)
            .await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("user id {text:?}"),
        );
        let reply = app
            .post(
                &format!("{API}/direct"),
                &token,
                json!({"targetUserId": text}),
            )
            .await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("targetUserId {text:?}"),
        );
    }
    // The tables are all still there, with everything in them.
    let client = sql(&app).await;
    let count: i64 = client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, HOSTILE.len() as i64);
    let users: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, HOSTILE.len() as i64 + 1);
}

/// Percent-encodes everything but unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
