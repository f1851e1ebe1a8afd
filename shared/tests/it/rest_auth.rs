//! Identity and access over REST (PROTOCOL §1, §3, §4): every route refuses
//! bad tokens with 401, non-members with 403 and unknown rooms with 404;
//! unknown paths are 404, oversized bodies 413 and malformed bodies 400,
//! all in the one error shape; profile claims become the sender's profile;
//! `/health` reports its dependencies and a database that is down turns
//! every route into 503 `UNAVAILABLE`.

#![allow(clippy::unwrap_used)]

use crate::common;

use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode};
use common::{
    API, TestApp, TestEnv, authed_routes, expect_error, expect_status, expired_token, forged_token,
    sign_claims, token_with, unsigned_token,
};
use serde_json::json;

/// Every way a caller can fail to authenticate, as `(what, headers)`.
fn bad_credentials() -> Vec<(&'static str, Vec<(&'static str, HeaderValue)>)> {
    let bearer = |t: String| {
        vec![(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        )]
    };
    let raw = |v: &'static [u8]| vec![("authorization", HeaderValue::from_bytes(v).unwrap())];
    vec![
        ("no Authorization header", vec![]),
        ("wrong signature", bearer(forged_token("mallory"))),
        ("expired", bearer(expired_token("mallory"))),
        ("alg none", bearer(unsigned_token("mallory"))),
        (
            "HS384 with the right secret (algorithm switching)",
            bearer(sign_claims(
                jsonwebtoken::Algorithm::HS384,
                &json!({"sub": "mallory", "exp": chrono::Utc::now().timestamp() + 3600}),
            )),
        ),
        (
            "no exp claim",
            bearer(sign_claims(
                jsonwebtoken::Algorithm::HS256,
                &json!({"sub": "mallory"}),
            )),
        ),
        (
            "no sub claim",
            bearer(sign_claims(
                jsonwebtoken::Algorithm::HS256,
                &json!({"exp": chrono::Utc::now().timestamp() + 3600}),
            )),
        ),
        (
            "sub outside the alphabet",
            bearer(token_with("mal lory", |_| {})),
        ),
        (
            "crit naming an extension (RFC 7515 §4.1.11)",
            bearer({
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                header.crit = Some(vec!["urn:example:ext".to_owned()]);
                jsonwebtoken::encode(
                    &header,
                    &json!({"sub": "mallory", "exp": chrono::Utc::now().timestamp() + 3600}),
                    &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes()),
                )
                .unwrap()
            }),
        ),
        ("not a JWT", bearer("not-a-token".to_owned())),
        ("three garbage segments", bearer("abc.def.ghi".to_owned())),
        ("Basic scheme", raw(b"Basic bWFsbG9yeTpwdw==")),
        ("Bearer without a token", raw(b"Bearer")),
        ("Bearer with only spaces", raw(b"Bearer    ")),
        ("token without a scheme", {
            let t = token_with("mallory", |_| {});
            vec![("authorization", HeaderValue::from_str(&t).unwrap())]
        }),
        ("empty header", raw(b"")),
        ("non-ASCII header", raw(b"Bearer \xff\xfe")),
    ]
}

#[tokio::test]
async fn every_route_refuses_every_bad_token_with_401() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    app.send("alice", &room, "before").await;
    let mut bus = app.subscribe_bus().await;

    for route in authed_routes(&room, "bob") {
        let (method, path, body) = &route;
        for (what, headers) in bad_credentials() {
            let mut headers = headers;
            if body.is_some() {
                headers.push(("content-type", HeaderValue::from_static("application/json")));
            }
            let reply = app
                .call_with_headers(
                    method.clone(),
                    path,
                    &headers,
                    body.as_ref().map(|b| Body::from(b.to_string())),
                )
                .await;
            let message = expect_error(
                &reply,
                StatusCode::UNAUTHORIZED,
                &format!("{method} {path} with {what}"),
            );
            // Nothing about why: no library internals (``unknown variant
            // `none` ``...), no claim names, no expiry.
            assert!(
                [
                    "invalid token",
                    "missing bearer token",
                    "malformed Authorization header"
                ]
                .contains(&message.as_str()),
                "{method} {path} with {what}: {message}"
            );
        }
    }

    // Nothing happened: no message, no room, no receipt, no member change,
    // and the refused caller was never recorded as a user.
    bus.assert_quiet(200).await;
    let page = app.history("alice", &room, "").await;
    assert_eq!(page["count"], 1);
    assert_eq!(
        app.unread("bob", &room).await,
        1,
        "bob's cursor did not move"
    );
    let rooms = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    assert_eq!(
        rooms.body["count"], 1,
        "no room was created: {}",
        rooms.body
    );
    assert_eq!(
        common::member_ids(&rooms.body["rooms"][0]),
        ["alice", "bob"]
    );
    let direct = app
        .post(
            &format!("{API}/direct"),
            &app.token("alice"),
            json!({"targetUserId": "mallory"}),
        )
        .await;
    expect_error(
        &direct,
        StatusCode::NOT_FOUND,
        "a refused caller is not a known user",
    );
}

#[tokio::test]
async fn a_valid_token_passes_on_every_route() {
    // The same requests as above with a good token are not refused: the 401s
    // above come from the tokens, not from the requests.
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let admin = app.admin_token("alice");
    for route in authed_routes(&room, "bob") {
        let reply = app.call_route(&route, Some(&admin)).await;
        assert!(
            reply.status.is_success(),
            "{} {}: {} {}",
            route.0,
            route.1,
            reply.status,
            reply.body
        );
    }
    // Case-insensitive scheme and surrounding spaces are accepted.
    let token = app.token("alice");
    let reply = app
        .call_with_headers(
            Method::GET,
            &format!("{API}/rooms"),
            &[(
                "authorization",
                HeaderValue::from_str(&format!("bearer   {token} ")).unwrap(),
            )],
            None,
        )
        .await;
    expect_status(&reply, StatusCode::OK, "lower-case bearer");
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let mut env = TestEnv::new().await;
    env.set("JWT_ISSUER", "https://issuer.example")
        .set("JWT_AUDIENCE", "chat");
    let app = TestApp::with_env(env).await;
    let path = format!("{API}/rooms");
    let plain = app.token("alice");
    expect_error(
        &app.get(&path, &plain).await,
        StatusCode::UNAUTHORIZED,
        "no iss/aud",
    );
    let wrong = token_with("alice", |c| {
        c.iss = Some("https://other.example".into());
        c.aud = Some("chat".into());
    });
    expect_error(
        &app.get(&path, &wrong).await,
        StatusCode::UNAUTHORIZED,
        "wrong iss",
    );
    let wrong_aud = token_with("alice", |c| {
        c.iss = Some("https://issuer.example".into());
        c.aud = Some("other".into());
    });
    expect_error(
        &app.get(&path, &wrong_aud).await,
        StatusCode::UNAUTHORIZED,
        "wrong aud",
    );
    let good = token_with("alice", |c| {
        c.iss = Some("https://issuer.example".into());
        c.aud = Some("chat".into());
    });
    expect_status(
        &app.get(&path, &good).await,
        StatusCode::OK,
        "right iss and aud",
    );
}

#[tokio::test]
async fn non_members_get_403_on_every_room_route() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "eve"]).await;
    let group = app.group("alice", &["bob"]).await;
    let direct = app.direct("alice", "bob").await;
    let call = app
        .post(
            &format!("{API}/rooms"),
            &app.token("alice"),
            json!({"type": "CALL", "callId": "call-403", "memberIds": ["bob"]}),
        )
        .await;
    expect_status(&call, StatusCode::CREATED, "call");
    let call = call.body["room"]["id"].as_str().unwrap().to_owned();
    let eve = app.token("eve");

    for room in [&group, &direct, &call] {
        app.send("alice", room, "secret").await;
        let mut bus = app.subscribe_bus().await;
        let routes = [
            (Method::GET, format!("{API}/rooms/{room}/messages"), None),
            (
                Method::GET,
                format!("{API}/rooms/{room}/messages?afterSequenceId=0"),
                None,
            ),
            (
                Method::POST,
                format!("{API}/rooms/{room}/messages"),
                Some(json!({"content": "let me in"})),
            ),
            (Method::GET, format!("{API}/rooms/{room}/unread"), None),
            (
                Method::POST,
                format!("{API}/rooms/{room}/read"),
                Some(json!({"sequenceId": 1})),
            ),
            (Method::GET, format!("{API}/rooms/{room}/online"), None),
            (
                Method::POST,
                format!("{API}/rooms/{room}/members"),
                Some(json!({"userIds": ["eve"]})),
            ),
            // Removing someone else without being admin.
            (
                Method::DELETE,
                format!("{API}/rooms/{room}/members/bob"),
                None,
            ),
            // Admin only.
            (Method::DELETE, format!("{API}/rooms/{room}/cleanup"), None),
        ];
        for route in &routes {
            let reply = app.call_route(route, Some(&eve)).await;
            expect_error(
                &reply,
                StatusCode::FORBIDDEN,
                &format!("eve: {} {}", route.0, route.1),
            );
        }
        // Members may not clean up either, nor remove each other.
        let bob = app.token("bob");
        let reply = app
            .delete(&format!("{API}/rooms/{room}/cleanup"), &bob)
            .await;
        expect_error(&reply, StatusCode::FORBIDDEN, "cleanup by a member");
        let reply = app
            .delete(&format!("{API}/rooms/{room}/members/alice"), &bob)
            .await;
        expect_error(&reply, StatusCode::FORBIDDEN, "bob removing alice");

        // Intact: one message, eve not added, alice and bob still members,
        // nothing published.
        bus.assert_quiet(200).await;
        let page = app.history("alice", room, "").await;
        assert_eq!(page["count"], 1, "{page}");
        assert_eq!(page["messages"][0]["content"], "secret");
        assert_eq!(
            common::member_ids(&app.room_entry("alice", room).await),
            ["alice", "bob"]
        );
        assert_eq!(app.unread("bob", room).await, 1);
    }
    let rooms = app.get(&format!("{API}/rooms"), &eve).await;
    assert_eq!(rooms.body, json!({"rooms": [], "count": 0}));
}

#[tokio::test]
async fn unknown_rooms_are_404_on_every_room_route() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let token = app.token("alice");
    let admin = app.admin_token("alice");
    let room = "room_01JNOSUCHROOM0000000000000";
    let routes = [
        (Method::GET, format!("{API}/rooms/{room}/messages"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/messages"),
            Some(json!({"content": "hi"})),
        ),
        (Method::GET, format!("{API}/rooms/{room}/unread"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/read"),
            Some(json!({"sequenceId": 1})),
        ),
        (Method::GET, format!("{API}/rooms/{room}/online"), None),
        (
            Method::POST,
            format!("{API}/rooms/{room}/members"),
            Some(json!({"userIds": ["bob"]})),
        ),
        (
            Method::DELETE,
            format!("{API}/rooms/{room}/members/alice"),
            None,
        ),
    ];
    for route in &routes {
        for t in [&token, &admin] {
            let reply = app.call_route(route, Some(t)).await;
            expect_error(
                &reply,
                StatusCode::NOT_FOUND,
                &format!("{} {}", route.0, route.1),
            );
        }
    }
    let reply = app
        .delete(&format!("{API}/rooms/{room}/members/bob"), &admin)
        .await;
    expect_error(
        &reply,
        StatusCode::NOT_FOUND,
        "admin removing from an unknown room",
    );
    let reply = app
        .delete(&format!("{API}/rooms/{room}/cleanup"), &admin)
        .await;
    expect_error(
        &reply,
        StatusCode::NOT_FOUND,
        "admin cleanup of an unknown room",
    );
    // Admin rights are checked before the room (as the baseline does).
    let reply = app
        .delete(&format!("{API}/rooms/{room}/cleanup"), &token)
        .await;
    expect_error(
        &reply,
        StatusCode::FORBIDDEN,
        "non-admin cleanup of an unknown room",
    );
    // A SQL-looking id is just an unknown room.
    let reply = app
        .get(&format!("{API}/rooms/x'%20OR%20'1'='1/messages"), &token)
        .await;
    expect_error(&reply, StatusCode::NOT_FOUND, "SQL in the room id");
    // A room id over 128 characters is refused before any lookup.
    let long = "r".repeat(129);
    let reply = app
        .get(&format!("{API}/rooms/{long}/messages"), &token)
        .await;
    expect_error(&reply, StatusCode::BAD_REQUEST, "129-char room id");
    // Room ids PostgreSQL cannot hold, or that are not UTF-8, are refused too.
    for bad in ["a%00b", "%FF%FE"] {
        let reply = app
            .get(&format!("{API}/rooms/{bad}/messages"), &token)
            .await;
        expect_error(&reply, StatusCode::BAD_REQUEST, &format!("room id {bad}"));
    }
    let rooms = app.get(&format!("{API}/rooms"), &token).await;
    assert_eq!(rooms.body["count"], 0, "nothing was created");
}

#[tokio::test]
async fn unknown_paths_and_methods_are_404() {
    let app = TestApp::spawn().await;
    app.register(&["alice"]).await;
    let room = app.group("alice", &[]).await;
    let token = app.token("alice");
    let cases = [
        (Method::GET, "/".to_owned()),
        (Method::GET, "/nope".to_owned()),
        (Method::GET, "/api/v1/chat".to_owned()),
        (Method::GET, format!("{API}/nope")),
        (Method::GET, format!("{API}/rooms/{room}")),
        (Method::GET, format!("{API}/rooms/{room}/nope")),
        (
            Method::GET,
            format!("{API}/rooms/{room}/members/alice/extra"),
        ),
        (Method::GET, "/api/v2/chat/rooms".to_owned()),
        (Method::PUT, format!("{API}/rooms")),
        (Method::DELETE, format!("{API}/rooms")),
        (Method::GET, format!("{API}/direct")),
        (Method::PATCH, format!("{API}/rooms/{room}/messages")),
        (Method::GET, format!("{API}/rooms/{room}/cleanup")),
        (Method::POST, "/health".to_owned()),
    ];
    for (method, path) in &cases {
        let reply = app.call(method.clone(), path, Some(&token), None).await;
        expect_error(&reply, StatusCode::NOT_FOUND, &format!("{method} {path}"));
    }
    let reply = app.call(Method::GET, "/nope", None, None).await;
    expect_error(
        &reply,
        StatusCode::NOT_FOUND,
        "unknown path without a token",
    );
}

#[tokio::test]
async fn bodies_over_256_kib_are_413_on_every_body_route() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let mut bus = app.subscribe_bus().await;
    let token = app.token("alice");
    const LIMIT: usize = 256 * 1024;
    // A JSON object of exactly `size` bytes: {"content":"xxx..."}.
    let body_of = |size: usize| {
        let framing = r#"{"content":""}"#.len();
        format!(r#"{{"content":"{}"}}"#, "x".repeat(size - framing))
    };
    assert_eq!(body_of(LIMIT).len(), LIMIT);
    let paths = [
        format!("{API}/rooms"),
        format!("{API}/rooms/{room}/messages"),
        format!("{API}/rooms/{room}/read"),
        format!("{API}/rooms/{room}/members"),
        format!("{API}/direct"),
    ];
    for path in &paths {
        let reply = app.post_raw(path, &token, body_of(LIMIT + 1)).await;
        expect_error(
            &reply,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("{path}: 256 KiB + 1"),
        );
        // Exactly the limit is read (and then refused for what it says).
        let reply = app.post_raw(path, &token, body_of(LIMIT)).await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("{path}: exactly 256 KiB"),
        );
    }
    let reply = app.post_raw(&paths[1], &token, vec![b' '; 4 * LIMIT]).await;
    expect_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "1 MiB of spaces");
    bus.assert_quiet(200).await;
    assert_eq!(app.history("alice", &room, "").await["count"], 0);
    assert_eq!(
        app.get(&format!("{API}/rooms"), &token).await.body["count"],
        1
    );
}

#[tokio::test]
async fn malformed_bodies_are_400_on_every_body_route() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol"]).await;
    let room = app.group("alice", &["bob"]).await;
    app.send("bob", &room, "one").await;
    let mut bus = app.subscribe_bus().await;
    let token = app.token("alice");
    let paths = [
        format!("{API}/rooms"),
        format!("{API}/rooms/{room}/messages"),
        format!("{API}/rooms/{room}/read"),
        format!("{API}/rooms/{room}/members"),
        format!("{API}/direct"),
    ];
    let bodies: [&[u8]; 14] = [
        b"",
        b"{",
        b"{\"content\": \"hi\"",
        b"{'content': 'hi'}",
        b"content=hi",
        b"null",
        b"42",
        b"\"a string\"",
        b"[]",
        b"[{\"content\": \"hi\"}]",
        b"true",
        b"{\"content\": \"hi\"} trailing",
        b"\xff\xfe{}",
        b"{\"content\": \"\\ud800\"}",
    ];
    for path in &paths {
        for body in bodies {
            let reply = app.post_raw(path, &token, body.to_vec()).await;
            expect_error(
                &reply,
                StatusCode::BAD_REQUEST,
                &format!("{path} with {:?}", String::from_utf8_lossy(body)),
            );
        }
        // An object without the route's fields.
        let reply = app.post(path, &token, json!({})).await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("{path} with {{}}"),
        );
    }
    bus.assert_quiet(200).await;
    let page = app.history("alice", &room, "").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["unreadCount"], 1, "alice's cursor did not move");
    let rooms = app.get(&format!("{API}/rooms"), &token).await;
    assert_eq!(rooms.body["count"], 1, "no room created");
    assert_eq!(
        common::member_ids(&rooms.body["rooms"][0]),
        ["alice", "bob"]
    );
}

#[tokio::test]
async fn profile_claims_become_the_sender_and_refresh() {
    let app = TestApp::spawn().await;
    app.register(&["bob"]).await;
    let v1 = token_with("alice", |c| {
        c.username = Some("alice_w".into());
        c.display_name = Some("Alice Wonder 🌸".into());
        c.avatar = Some("https://cdn.example/a1.png".into());
    });
    let direct = app
        .post(
            &format!("{API}/direct"),
            &v1,
            json!({"targetUserId": "bob"}),
        )
        .await;
    expect_status(&direct, StatusCode::OK, "direct");
    let room = direct.body["room"]["id"].as_str().unwrap().to_owned();
    let sent = app
        .post(
            &format!("{API}/rooms/{room}/messages"),
            &v1,
            json!({"content": "hi"}),
        )
        .await;
    expect_status(&sent, StatusCode::CREATED, "send");
    let profile_v1 = json!({
        "id": "alice", "username": "alice_w", "displayName": "Alice Wonder 🌸",
        "avatar": "https://cdn.example/a1.png"
    });
    assert_eq!(sent.body["message"]["sender"], profile_v1);
    assert_eq!(sent.body["message"]["senderId"], "alice");
    // bob (no profile claims) has the defaults: username = sub.
    let bob_profile = json!({"id": "bob", "username": "bob", "displayName": null, "avatar": null});
    let page = app.history("bob", &room, "").await;
    assert_eq!(page["messages"][0]["sender"], profile_v1);
    let entry = app.room_entry("bob", &room).await;
    let side = |id: &str| {
        if entry["user1"]["id"] == id {
            entry["user1"].clone()
        } else {
            entry["user2"].clone()
        }
    };
    assert_eq!(side("alice"), profile_v1);
    assert_eq!(side("bob"), bob_profile);

    // A later token with new claims refreshes the profile everywhere, old
    // messages included ("the sender's profile as it is now").
    let v2 = token_with("alice", |c| {
        c.display_name = Some("Alice W.".into());
        c.avatar = Some("https://cdn.example/a2.png".into());
    });
    let rooms = app.get(&format!("{API}/rooms"), &v2).await;
    expect_status(&rooms, StatusCode::OK, "rooms with v2");
    let profile_v2 = json!({
        "id": "alice", "username": "alice", "displayName": "Alice W.",
        "avatar": "https://cdn.example/a2.png"
    });
    let page = app.history("bob", &room, "").await;
    assert_eq!(page["messages"][0]["sender"], profile_v2);
    let entry = app.room_entry("bob", &room).await;
    assert!(
        entry["members"].as_array().unwrap().contains(&profile_v2),
        "{entry}"
    );
    assert_eq!(entry["messages"][0]["sender"], profile_v2);
    let sent = app
        .post(
            &format!("{API}/rooms/{room}/messages"),
            &v2,
            json!({"content": "again"}),
        )
        .await;
    assert_eq!(sent.body["message"]["sender"], profile_v2);

    // Profile claims that are not storable text are ignored, not refused.
    let odd = token_with("alice", |c| {
        c.display_name = Some(String::new());
        c.avatar = Some("bad\u{0}avatar".into());
    });
    let rooms = app.get(&format!("{API}/rooms"), &odd).await;
    expect_status(&rooms, StatusCode::OK, "odd claims");
    let page = app.history("bob", &room, "").await;
    assert_eq!(
        page["messages"][0]["sender"],
        json!({"id": "alice", "username": "alice", "displayName": null, "avatar": null})
    );
}

#[tokio::test]
async fn health_reports_both_dependencies_without_auth() {
    let app = TestApp::spawn().await;
    let reply = app.call(Method::GET, "/health", None, None).await;
    expect_status(&reply, StatusCode::OK, "health");
    assert_eq!(
        reply.body,
        json!({"status": "ok", "postgres": "ok", "redis": "ok"})
    );
    // A token, even a bad one, changes nothing.
    let reply = app
        .call(Method::GET, "/health", Some("garbage"), None)
        .await;
    assert_eq!(
        reply.body,
        json!({"status": "ok", "postgres": "ok", "redis": "ok"})
    );
}

#[tokio::test]
async fn a_database_that_is_down_is_503_everywhere() {
    let mut env = TestEnv::new().await;
    env.set("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x");
    let app = TestApp::with_env(env).await;
    let health = app.call(Method::GET, "/health", None, None).await;
    assert_eq!(
        health.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        health.body
    );
    assert_eq!(
        health.body,
        json!({"status": "down", "postgres": "down", "redis": "ok"})
    );

    let token = app.admin_token("alice");
    for route in authed_routes("room_01JANYROOM00000000000000000", "bob") {
        let reply = app.call_route(&route, Some(&token)).await;
        let context = format!("{} {}", route.0, route.1);
        let message = expect_error(&reply, StatusCode::SERVICE_UNAVAILABLE, &context);
        assert_eq!(
            reply
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "{context}: Retry-After"
        );
        for leak in ["127.0.0.1", "refused", "postgres", "tokio"] {
            assert!(
                !message.to_lowercase().contains(leak),
                "{context}: message leaks {leak}: {message}"
            );
        }
    }
    // A bad token is still 401 (auth comes before the database).
    let reply = app
        .call(Method::GET, &format!("{API}/rooms"), Some("garbage"), None)
        .await;
    expect_error(
        &reply,
        StatusCode::UNAUTHORIZED,
        "bad token while the database is down",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_429_and_retry_after() {
    // One PostgreSQL connection, and no waiting allowed beyond it.
    let mut env = TestEnv::new().await;
    env.set("PG_POOL_MAX", "1").set("PG_MAX_WAITING", "0");
    let app = std::sync::Arc::new(TestApp::with_env(env).await);
    app.register(&["alice"]).await;
    // Hold the only connection, so the next request waits for it.
    let held = app.adapters.store.pool().get().await.expect("a connection");
    let waiting = {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move { app.get(&format!("{API}/rooms"), &app.token("alice")).await })
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while app.adapters.store.waiting() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first request waits for the pool");
    // While one request waits, the next is refused at once, whatever the route.
    for route in authed_routes("room_01JANYROOM00000000000000000", "alice") {
        let reply = app.call_route(&route, Some(&app.token("alice"))).await;
        let context = format!("{} {}", route.0, route.1);
        expect_error(&reply, StatusCode::TOO_MANY_REQUESTS, &context);
        assert_eq!(
            reply
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "{context}: Retry-After"
        );
    }
    // Once the connection is free, the waiting request completes.
    drop(held);
    let reply = waiting.await.expect("task");
    expect_status(&reply, StatusCode::OK, "the waiting request");
    let reply = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    expect_status(&reply, StatusCode::OK, "after the load");
}
