//! Presence (PROTOCOL.md §2, "Who receives what"): `online` for a user's
//! first connection, `offline` after their last one closes or its lease
//! runs out, to the connections joined to any room the user is a member
//! of; `GET /rooms/:id/online` and `roomJoined.onlineUsers` agree.

use crate::common;

use std::time::{Duration, Instant};

use chat_shared::auth::AuthUser;
use chat_shared::domain::UserId;
use chat_shared::presence::Connection;
use chat_test_support::TestEnv;
use common::{Client, TestStack, assert_timestamp, keys, redis};
use redis::AsyncCommands as _;
use serde_json::{Value, json};

/// `GET /rooms/:id/online` and a fresh `roomJoined.onlineUsers`, which
/// must agree.
async fn online(stack: &TestStack, client: &mut Client, room: &str) -> Vec<Value> {
    let rest = stack.online(&client.user, room).await;
    let joined = client.join(room).await;
    assert_eq!(
        joined["onlineUsers"].as_array().expect("onlineUsers"),
        &rest,
        "REST and roomJoined disagree"
    );
    rest
}

#[tokio::test]
async fn online_with_the_first_connection_offline_after_the_last() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let other_room = stack.group("carol", &["dave"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut alice_idle = Client::connect(&stack, "alice").await; // joined nowhere
    let mut carol = Client::connect(&stack, "carol").await; // bob is not in her room
    alice.join(&room).await;
    carol.join(&other_room).await;
    assert_eq!(online(&stack, &mut alice, &room).await, [json!("alice")]);

    let b1 = Client::connect(&stack, "bob").await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(update["userId"], "bob");
    assert_eq!(update["status"], "online");
    assert_timestamp(&update["timestamp"]);
    assert_eq!(
        update.as_object().map(|o| o.len()),
        Some(3),
        "{{userId, status, timestamp}}"
    );

    // A second connection is not announced; closing one of two is not
    // offline.
    let b2 = Client::connect(&stack, "bob").await;
    b1.close().await;
    alice.assert_quiet(400).await;
    assert_eq!(
        online(&stack, &mut alice, &room).await,
        [json!("alice"), json!("bob")]
    );

    b2.close().await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("bob"), &json!("offline"))
    );
    assert_eq!(online(&stack, &mut alice, &room).await, [json!("alice")]);
    // Only connections joined to a room of bob's heard about him.
    alice_idle.assert_quiet(0).await;
    carol.assert_quiet(0).await;
    for c in [alice, alice_idle, carol] {
        c.close().await;
    }
    stack.stop().await;
}

/// A connection registered the way `$connect` registers one, at a gateway
/// that has no such socket: it will never send a frame or be closed.
async fn ghost(env: &TestEnv, stack: &TestStack, user: &str, connected_at_ms: i64) -> Connection {
    let state = chat_shared::bootstrap::ws_state(&env.config().handlers())
        .await
        .expect("handlers' state");
    let conn = Connection {
        connection_id: format!("ghost{}=", &user[..user.len().min(10)]),
        user: AuthUser {
            id: UserId::from_trusted(user.to_owned()),
            username: user.to_owned(),
            display_name: None,
            avatar: None,
            is_admin: false,
        },
        endpoint: stack.endpoint(),
        connected_at_ms,
    };
    state.realtime.connect(&conn).await.expect("registered");
    conn
}

async fn assert_gone(env: &TestEnv, conn: &Connection) {
    let mut redis = redis(env).await;
    let id = &conn.connection_id;
    let user = conn.user.id.as_str();
    let exists: i64 = redis
        .exists(&[keys(env).conn(id), keys(env).conn_rooms(id)])
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "connection record left behind");
    let lease: Option<f64> = redis
        .zscore(keys(env).leases_of(user), id)
        .await
        .expect("ZSCORE");
    assert_eq!(lease, None, "lease left behind");
    let mine: Option<f64> = redis
        .zscore(keys(env).user_conns(user), id)
        .await
        .expect("ZSCORE");
    assert_eq!(mine, None, "user's connection left behind");
    let online: bool = redis
        .sismember(keys(env).online_of(user), user)
        .await
        .expect("SISMEMBER");
    assert!(!online, "{user} still online");
}

#[tokio::test]
async fn a_connection_killed_without_a_close_goes_offline_when_its_lease_expires() {
    let env = TestEnv::new().await;
    // The stack's own clients keep ordinary leases (and the sweeper runs
    // every second); the ghost gets a 1 s lease.
    let mut stack_env = env.sharing();
    stack_env.set("PRESENCE_TTL_SECONDS", "10");
    let stack = TestStack::all_in_one(&stack_env).await;
    let mut ghost_env = env.sharing();
    ghost_env.set("PRESENCE_TTL_SECONDS", "1");
    let room = stack.direct("alice", "gus").await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice.join(&room).await;

    let started = Instant::now();
    let conn = ghost(
        &ghost_env,
        &stack,
        "gus",
        chrono::Utc::now().timestamp_millis(),
    )
    .await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("gus"), &json!("online"))
    );
    assert_eq!(
        online(&stack, &mut alice, &room).await,
        [json!("alice"), json!("gus")]
    );

    // No frame, no $disconnect: the lease alone takes gus offline.
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("gus"), &json!("offline"))
    );
    // Sooner than the 5 s in which a 410 for a young connection is still
    // retried: it was the lease, not the failed `connected` push.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_gone(&env, &conn).await;
    assert_eq!(online(&stack, &mut alice, &room).await, [json!("alice")]);
    alice.assert_quiet(300).await;
    alice.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_silent_socket_is_announced_offline_and_closed_when_its_lease_runs_out() {
    let env = TestEnv::new().await;
    let mut stack_env = env.sharing();
    stack_env.set("PRESENCE_TTL_SECONDS", "10");
    let stack = TestStack::all_in_one(&stack_env).await;
    // A second gateway whose connections hold 1 s leases.
    let mut short_env = env.sharing();
    short_env.set("PRESENCE_TTL_SECONDS", "1");
    let short = TestStack::gateway(&short_env).await;
    let room = stack.direct("alice", "sam").await;
    let mut alice = Client::connect(&stack, "alice").await;
    alice.join(&room).await;

    let mut sam = Client::connect(&short, "sam").await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("sam"), &json!("online"))
    );
    // sam never sends a frame.
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(
        (&update["userId"], &update["status"]),
        (&json!("sam"), &json!("offline"))
    );
    assert_eq!(online(&stack, &mut alice, &room).await, [json!("alice")]);
    // ...and the sweeper closed the socket at the gateway.
    let close = sam.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000, "{close:?}");
    assert_eq!(
        short.stack.gateway.as_ref().expect("gw").connection_count(),
        0
    );

    // A connection that keeps talking keeps its lease.
    let mut chatty = Client::connect(&short, "sam").await;
    let update = alice.expect("presenceUpdate").await;
    assert_eq!(update["status"], "online");
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        chatty.ping_pong().await;
    }
    alice.assert_quiet(0).await;
    assert_eq!(
        online(&stack, &mut alice, &room).await,
        [json!("alice"), json!("sam")]
    );
    chatty.close().await;
    assert_eq!(alice.expect("presenceUpdate").await["status"], "offline");
    alice.close().await;
    short.stop().await;
    stack.stop().await;
}
