//! Faults: stale connections the Management API answers `410 Gone` for, a
//! relay restart, and a Redis restart (ARCHITECTURE.md "Presence";
//! docs/PROTOCOL-NOTES.md "Faults").

use crate::common;

use chat_shared::auth::AuthUser;
use chat_shared::bus::JoinedTemplate;
use chat_shared::domain::{RoomId, UserId};
use chat_shared::presence::Connection;
use chat_test_support::TestEnv;
use common::{
    Client, PrivateRedis, TestStack, handshake, keys, redis, sequence_ids, token, wait_relays,
};
use redis::AsyncCommands as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A registration in Redis for a connection id the gateway has never had
/// (what a lost `$disconnect` leaves), joined to `room`, that connected
/// `age_ms` ago. Written through the presence layer alone, so nothing is
/// pushed to it until a room event is.
async fn stale_connection(
    env: &TestEnv,
    stack: &TestStack,
    user: &str,
    room: &str,
    age_ms: i64,
) -> Connection {
    let adapters = chat_shared::bootstrap::adapters(&env.config().common)
        .await
        .expect("the adapters");
    let conn = Connection {
        connection_id: "StaleConnAAAAAA=".to_owned(),
        user: AuthUser {
            id: UserId::from_trusted(user.to_owned()),
            username: user.to_owned(),
            display_name: None,
            avatar: None,
            is_admin: false,
        },
        endpoint: stack.endpoint(),
        connected_at_ms: chrono::Utc::now().timestamp_millis() - age_ms,
    };
    let presence = &adapters.presence;
    presence
        .connect(&conn, std::time::Duration::from_secs(90), "unused", None)
        .await
        .expect("registered");
    let room_id = RoomId::parse(room).expect("room id");
    // Joined at once, as if the relay had posted its `roomJoined`.
    let unheard = JoinedTemplate::new("test", room, &conn.connection_id, 0, Default::default())
        .expect("template");
    assert!(
        presence
            .join(&room_id, &conn, 0, &[], "unused", &unheard)
            .await
            .expect("joined")
            .is_some()
    );
    presence
        .activate(room, &conn.connection_id)
        .await
        .expect("activated")
        .expect("subscribed");
    conn
}

#[tokio::test]
async fn a_410_removes_a_stale_connection_and_announces_offline() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["zed"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice.join(&room).await;
    let conn = stale_connection(&env, &stack, "zed", &room, 60_000).await;
    let id = conn.connection_id.clone();
    let mut redis = redis(&env).await;
    let subscribed: bool = redis
        .hexists(keys(&env).room_conns(&room), &id)
        .await
        .expect("HEXISTS");
    assert!(subscribed);
    assert_eq!(
        stack.online("alice", &room).await,
        [json!("alice"), json!("zed")]
    );

    // The relay pushes the message to the stale connection, gets 410 from
    // the gateway, and removes it: zed was only online through it.
    alice.say(&room, "anyone there?").await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("zed"), &json!("offline"))
    );
    let left: i64 = redis
        .exists(&[
            keys(&env).conn(&id),
            keys(&env).conn_rooms(&id),
            keys(&env).user_conns("zed"),
        ])
        .await
        .expect("EXISTS");
    assert_eq!(left, 0, "the connection's keys are gone");
    let subscribed: bool = redis
        .hexists(keys(&env).room_conns(&room), &id)
        .await
        .expect("HEXISTS");
    assert!(!subscribed, "its subscription is gone");
    let lease: Option<f64> = redis
        .zscore(keys(&env).leases_of("zed"), &id)
        .await
        .expect("ZSCORE");
    assert_eq!(lease, None);
    assert_eq!(stack.online("alice", &room).await, [json!("alice")]);

    // The room goes on as before.
    alice.say(&room, "still here").await;
    alice.assert_quiet(300).await;
    alice.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn brand_new_connections_are_not_removed_by_early_410s() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice.join(&room).await;
    let mut redis = redis(&env).await;
    // `connected` is published during `$connect`, before the gateway lets
    // anyone post to the socket, so its first pushes are answered 410.
    // Each connection must still get it, and stay registered.
    for round in 0..5 {
        let mut bob = Client::connect(&stack, "bob").await;
        let registered: bool = redis
            .exists(keys(&env).conn(&bob.connection_id))
            .await
            .expect("EXISTS");
        assert!(registered, "round {round}: connection removed");
        let update = alice.expect("presenceUpdate").await;
        assert_eq!(update["status"], "online", "round {round}");
        bob.join(&room).await;
        let sent = alice.say(&room, &format!("round {round}")).await;
        assert_eq!(bob.expect("message").await["id"], sent["id"]);
        bob.close().await;
        let update = alice.expect("presenceUpdate").await;
        assert_eq!(update["status"], "offline", "round {round}");
    }
    alice.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_a_relay_restart() {
    let env = TestEnv::new().await;
    let a = TestStack::gateway(&env).await;
    let b = TestStack::gateway(&env).await;
    let relay = TestStack::relay(&env).await;
    wait_relays(&env, 1).await;
    let room = a.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect(&b, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    alice.say(&room, "1").await;
    assert_eq!(bob.expect("message").await["sequenceId"], 1);

    relay.stop().await;
    wait_relays(&env, 0).await;
    // Sent while no relay runs: stored, delivered later.
    alice
        .send("sendMessage", json!({"roomId": room, "content": "2"}))
        .await;
    alice.ping_pong().await; // handled (replies are in order)
    let relay = TestStack::relay(&env).await;
    wait_relays(&env, 1).await;

    alice
        .send("sendMessage", json!({"roomId": room, "content": "3"}))
        .await;
    for c in [&mut alice, &mut bob] {
        let got = c.collect_until("message", 2).await;
        assert_eq!(sequence_ids(&got), [2, 3], "{}: {got:?}", c.user);
    }
    bob.send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    assert_eq!(alice.expect("typing").await["userId"], "bob");
    // New connections are greeted again.
    let carol = Client::connect(&b, "carol").await;
    alice.assert_quiet(300).await;
    bob.assert_quiet(0).await;
    for c in [alice, bob, carol] {
        c.close().await;
    }
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_clients_are_told_to_reconnect_and_lose_nothing() {
    let mut private = PrivateRedis::start().await;
    let mut env = TestEnv::new().await;
    // A single Redis of its own, also in the cluster run (a cluster's
    // primary failing over is tests/cluster_failover.rs).
    env.set("REDIS_URL", &private.url());
    env.set("REDIS_CLUSTER", "false");
    let stack = TestStack::all_in_one(&env).await;
    wait_relays(&env, 1).await;
    let room = stack.group("alice", &["bob"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    alice.say(&room, "before").await;
    assert_eq!(bob.expect("message").await["sequenceId"], 1);

    private.kill().await;
    // While Redis is down the service answers promptly: each frame gets a
    // retryable `error` (SERVICE_UNAVAILABLE with a retry hint, never
    // INTERNAL) and the socket stays open; a handshake is refused with 503.
    let prompt = std::time::Duration::from_secs(2);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        alice.send("ping", json!({})).await;
        let error = alice.expect_error("SERVICE_UNAVAILABLE").await;
        assert_eq!(error["requestType"], "ping");
        assert_eq!(error["retryAfterMs"], 1000, "{error}");
        assert!(started.elapsed() < prompt, "{:?}", started.elapsed());
    }
    let started = std::time::Instant::now();
    let url = stack.ws_url(&token("carol"));
    let refused = handshake(url.into_client_request().expect("url")).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(503));
    assert!(started.elapsed() < prompt, "{:?}", started.elapsed());
    let started = std::time::Instant::now();
    let rest = stack.get("alice", &format!("/rooms/{room}/online")).await;
    assert_eq!(rest.status, 503, "{:?}", rest.body);
    assert_eq!(rest.body["error"]["code"], "UNAVAILABLE");
    assert_eq!(rest.header("retry-after"), Some("1"));
    assert!(started.elapsed() < prompt, "{:?}", started.elapsed());
    let health = stack.health().await;
    assert_eq!(health.status, 503);
    assert_eq!(health.body["redis"], "down");

    // Redis comes back empty: connections, subscriptions and presence are
    // gone; rooms and messages (PostgreSQL) are not.
    private.restart().await;
    wait_relays(&env, 1).await;

    // The next frame of each old connection is told to reconnect, and the
    // socket is closed, so clients that ignore `error` reconnect too.
    for c in [&mut alice, &mut bob] {
        c.send("ping", json!({})).await;
        let error = c.expect_error("UNAUTHORIZED").await;
        assert_eq!(error["requestType"], "ping");
        let close = c.expect_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1000, "{}: {close:?}", c.user);
    }

    // Reconnecting and rejoining with afterSequenceId: nothing lost, and
    // delivery and presence work again.
    let mut alice = Client::connect(&stack, "alice").await;
    let rejoined = alice.join_after(&room, 1).await;
    assert_eq!(rejoined["recovered"], true);
    assert_eq!(rejoined["messages"], json!([]));
    let missed = alice.say(&room, "while bob was away").await;
    let mut bob = Client::connect(&stack, "bob").await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("bob"), &json!("online"))
    );
    let rejoined = bob.join_after(&room, 1).await;
    assert_eq!(rejoined["recovered"], true);
    assert_eq!(rejoined["messages"][0]["id"], missed["id"]);
    let live = alice.say(&room, "after").await;
    assert_eq!(bob.expect("message").await["id"], live["id"]);
    bob.send("typing", json!({"roomId": room, "isTyping": true}))
        .await;
    assert_eq!(alice.expect("typing").await["userId"], "bob");
    assert_eq!(
        stack.online("alice", &room).await,
        [json!("alice"), json!("bob")]
    );
    alice.assert_quiet(300).await;
    bob.assert_quiet(0).await;
    alice.close().await;
    bob.close().await;
    stack.stop().await;
    private.kill().await;
}
