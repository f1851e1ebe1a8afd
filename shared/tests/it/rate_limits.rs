//! REST rate limits (issue "Reliability and security", part 3): a per-user
//! request rate on every authenticated route and a per-user send rate on
//! `POST /rooms/:roomId/messages`, both answered 429 `RATE_LIMITED` with
//! `Retry-After`, both kept in Redis so they hold across instances.
//!
//! The rates are low (1 a second) so that what a test sends in a quick
//! loop cannot be refilled in time and the outcomes are exact.

use crate::common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;

fn rooms() -> String {
    format!("{API}/rooms")
}

/// The `Retry-After` header of a reply, as seconds.
fn retry_after(reply: &Reply) -> u64 {
    reply
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {:?}", reply.headers))
}

/// Calls `GET /rooms` as `user` until the first 429; returns how many
/// were answered 200 before it, and the 429.
async fn until_refused(app: &TestApp, user: &str, limit: usize) -> (usize, Reply) {
    let token = app.token(user);
    for ok in 0..limit {
        let reply = app.get(&rooms(), &token).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return (ok, reply);
        }
        expect_status(&reply, StatusCode::OK, "GET /rooms within the limit");
    }
    panic!("{user}: no 429 within {limit} requests");
}

/// Which of alice's rate-limit buckets exist: (request, send).
async fn alice_buckets(app: &TestApp) -> (bool, bool) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys = chat_shared::presence::Keys::new(app.redis_prefix());
    redis::pipe()
        .exists(keys.rate_user_rest("alice"))
        .exists(keys.rate_user_send("alice"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS")
}

async fn limited_app(vars: &[(&str, &str)]) -> TestApp {
    let mut env = TestEnv::new().await;
    for (k, v) in vars {
        env.set(k, v);
    }
    TestApp::with_env(env).await
}

#[tokio::test]
async fn a_burst_then_429_with_retry_after_then_recovery() {
    let app = limited_app(&[
        ("REST_RATE_LIMIT_PER_SEC", "1"),
        ("REST_RATE_LIMIT_BURST", "5"),
    ])
    .await;
    let (ok, refused) = until_refused(&app, "alice", 10).await;
    // Five at once, and at most one more refilled while the loop ran.
    assert!((5..=6).contains(&ok), "{ok} requests before the 429");
    let message = expect_error(&refused, StatusCode::TOO_MANY_REQUESTS, "over the rate");
    assert!(message.contains("rate limit"), "{message}");
    // One a second: the next token is at most a second away.
    assert_eq!(retry_after(&refused), 1);
    // Every route is charged, not only GET /rooms.
    let reply = app
        .post(
            &rooms(),
            &app.token("alice"),
            json!({"type": "GROUP", "name": "g"}),
        )
        .await;
    expect_error(&reply, StatusCode::TOO_MANY_REQUESTS, "POST /rooms");
    // A bad token is still 401 first: the limit needs a user.
    let reply = app.get(&rooms(), "garbage").await;
    expect_error(&reply, StatusCode::UNAUTHORIZED, "bad token");
    // After Retry-After, requests go through again.
    tokio::time::sleep(std::time::Duration::from_secs(retry_after(&refused))).await;
    let reply = app.get(&rooms(), &app.token("alice")).await;
    expect_status(&reply, StatusCode::OK, "after Retry-After");
}

#[tokio::test]
async fn the_limit_is_per_user() {
    let app = limited_app(&[
        ("REST_RATE_LIMIT_PER_SEC", "1"),
        ("REST_RATE_LIMIT_BURST", "3"),
    ])
    .await;
    until_refused(&app, "alice", 10).await;
    // Another token of the same user (another device, other claims) is
    // the same user, and the same bucket.
    let other_device = token_with("alice", |c| c.display_name = Some("Alice".into()));
    let reply = app.get(&rooms(), &other_device).await;
    expect_error(&reply, StatusCode::TOO_MANY_REQUESTS, "alice's other token");
    // Someone else is not affected.
    let reply = app.get(&rooms(), &app.token("bob")).await;
    expect_status(&reply, StatusCode::OK, "bob");
}

#[tokio::test]
async fn the_rest_send_has_the_message_rate() {
    let app = limited_app(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "3")]).await;
    app.register(&["alice", "bob"]).await;
    let room = app.direct("alice", "bob").await;
    let mut bus = app.subscribe_bus().await;
    let mut stored = 0;
    let refused = loop {
        let reply = app
            .send_body("alice", &room, json!({"content": format!("m{stored}")}))
            .await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            break reply;
        }
        expect_status(&reply, StatusCode::CREATED, "a send within the rate");
        bus.next().await;
        stored += 1;
        assert!(stored <= 4, "no 429 after {stored} sends");
    };
    assert!((3..=4).contains(&stored), "{stored} sends before the 429");
    expect_error(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "a send over the rate",
    );
    assert_eq!(retry_after(&refused), 1);
    // Nothing was stored or broadcast for the refused send.
    bus.assert_quiet(300).await;
    assert_eq!(
        app.all_sequence_ids("alice", &room).await,
        (1..=stored as i64).collect::<Vec<_>>()
    );
    // Other routes are not charged to the send rate (the request rate is
    // off here), and bob's sends are his own.
    let reply = app.get(&rooms(), &app.token("alice")).await;
    expect_status(&reply, StatusCode::OK, "GET /rooms");
    let reply = app.send_body("bob", &room, json!({"content": "hi"})).await;
    expect_status(&reply, StatusCode::CREATED, "bob's send");
}

#[tokio::test]
async fn a_refused_send_charges_no_bucket() {
    // The send is refused by the send rate; the request rate must not be
    // charged for it (all or nothing), so GET /rooms keeps its tokens.
    let app = limited_app(&[
        ("RATE_LIMIT_PER_SEC", "1"),
        ("RATE_LIMIT_BURST", "1"),
        ("REST_RATE_LIMIT_PER_SEC", "1"),
        ("REST_RATE_LIMIT_BURST", "4"),
    ])
    .await;
    app.register(&["alice", "bob"]).await; // one request each
    let room = app.direct("alice", "bob").await; // alice: two
    let reply = app
        .send_body("alice", &room, json!({"content": "one"}))
        .await;
    expect_status(&reply, StatusCode::CREATED, "the first send"); // three
    for _ in 0..5 {
        let reply = app
            .send_body("alice", &room, json!({"content": "two"}))
            .await;
        expect_error(&reply, StatusCode::TOO_MANY_REQUESTS, "over the send rate");
    }
    let reply = app.get(&rooms(), &app.token("alice")).await;
    expect_status(&reply, StatusCode::OK, "the fourth request");
    assert_eq!(app.all_sequence_ids("bob", &room).await, vec![1]);
}

#[tokio::test]
async fn zero_turns_the_limits_off() {
    let app = limited_app(&[
        ("RATE_LIMIT_PER_SEC", "0"),
        ("RATE_LIMIT_BURST", "1"),
        ("REST_RATE_LIMIT_PER_SEC", "0"),
        ("REST_RATE_LIMIT_BURST", "1"),
    ])
    .await;
    app.register(&["alice", "bob"]).await;
    let room = app.direct("alice", "bob").await;
    for i in 0..30 {
        app.send("alice", &room, &format!("m{i}")).await;
    }
    // Off means not even a Redis key.
    assert_eq!(alice_buckets(&app).await, (false, false));
}

#[tokio::test]
async fn the_limit_holds_across_instances() {
    // Two instances of the service (two Lambda instances) over one Redis.
    let mut env = TestEnv::new().await;
    env.set("REST_RATE_LIMIT_PER_SEC", "1")
        .set("REST_RATE_LIMIT_BURST", "4");
    let second = TestApp::with_env(env.sharing()).await;
    let first = TestApp::with_env(env).await;
    let token = first.token("alice");
    // Alternate between the instances: together they allow the burst once.
    let mut ok = 0;
    let refused = loop {
        let app = if ok % 2 == 0 { &first } else { &second };
        let reply = app.get(&rooms(), &token).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            break reply;
        }
        expect_status(&reply, StatusCode::OK, "within the shared burst");
        ok += 1;
        assert!(ok <= 5, "no 429 after {ok} requests on two instances");
    };
    assert!((4..=5).contains(&ok), "{ok} requests before the 429");
    expect_error(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "over the shared rate",
    );
    for app in [&first, &second] {
        let reply = app.get(&rooms(), &token).await;
        expect_error(&reply, StatusCode::TOO_MANY_REQUESTS, "either instance");
    }
    // One bucket in Redis, whichever instance answers.
    assert_eq!(alice_buckets(&first).await, (true, false));
}
