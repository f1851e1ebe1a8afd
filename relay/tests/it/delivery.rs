//! Who receives what (PROTOCOL.md §2, "Who receives what").

use chat_shared::bus::Target;
use serde_json::json;

use crate::common::Stack;

#[tokio::test]
async fn a_room_message_reaches_every_joined_connection_once_and_the_senders_unjoined_one() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let a2 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let b2 = stack.connect("bob").await;
    let c1 = stack.connect("carol").await;
    let room = stack.group("alice", &["bob", "carol"]).await;
    for conn in [&a1, &b1, &b2] {
        stack.join(conn, &room).await;
    }

    // a2 has not joined: it still gets its own messages (the acknowledgement).
    stack.send(&a2, &room, "hello").await;
    stack.send(&a2, &room, "again").await;

    for conn in [&a1, &a2, &b1, &b2] {
        stack.gateway.wait_sequence(conn, 2).await;
        assert_eq!(stack.gateway.sequences(conn), [1, 2], "{conn}");
    }
    let first = &stack.gateway.events(&b1, "message")[0];
    assert_eq!(first["payload"]["content"], "hello");
    assert_eq!(first["payload"]["senderId"], "alice");
    // Carol is a member but has not joined the room with this connection.
    assert!(stack.gateway.events(&c1, "message").is_empty());
    // Everyone got `connected` from $connect.
    for conn in [&a1, &a2, &b1, &b2, &c1] {
        let connected = stack.gateway.wait_events(conn, "connected", 1).await;
        assert_eq!(connected[0]["payload"]["connectionId"], conn.as_str());
    }
}

#[tokio::test]
async fn posts_carry_the_event_bytes_to_the_connections_own_endpoint() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let room = stack.group("alice", &[]).await;
    stack.join(&a1, &room).await;
    let event = r#"{"type":"custom","payload":{"x":[1,2.50,"é"]}}"#;
    stack
        .adapters
        .bus
        .publish(
            Target::Connection {
                connection_id: a1.clone(),
            },
            event.to_owned(),
        )
        .await
        .unwrap();
    let got = stack.gateway.wait_events(&a1, "custom", 1).await;
    assert_eq!(got.len(), 1);
    assert!(
        stack.gateway.posts(&a1).iter().any(|p| p == event),
        "byte for byte"
    );
    // The SDK addressed `/{stage}/@connections/{percent-encoded id}`.
    let paths = stack.gateway.paths();
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("/local/") && p.contains("connections/") && p.ends_with("%3D")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn typing_skips_the_typists_connections() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let a2 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    for conn in [&a1, &a2, &b1] {
        stack.join(conn, &room).await;
    }
    stack
        .frame(
            &a1,
            json!({"type": "typing", "payload": {"roomId": room, "isTyping": true}}),
        )
        .await;
    // A message after it, to every connection: the room's order means any
    // `typing` would have come first.
    stack.send(&b1, &room, "barrier").await;
    for conn in [&a1, &a2, &b1] {
        stack.gateway.wait_sequence(conn, 1).await;
    }
    let typing = stack.gateway.events(&b1, "typing");
    assert_eq!(typing.len(), 1);
    assert_eq!(typing[0]["payload"]["userId"], "alice");
    assert_eq!(typing[0]["payload"]["isTyping"], true);
    assert!(stack.gateway.events(&a1, "typing").is_empty());
    assert!(stack.gateway.events(&a2, "typing").is_empty());
    assert_eq!(
        stack.gateway.sequences(&b1),
        [1],
        "the sender gets its message once"
    );
}

#[tokio::test]
async fn exclude_leaves_connections_out_and_include_adds_them() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let b2 = stack.connect("bob").await;
    let c1 = stack.connect("carol").await;
    let room = stack.group("alice", &["bob", "carol"]).await;
    for conn in [&a1, &b1, &b2] {
        stack.join(conn, &room).await;
    }
    let bus = &stack.adapters.bus;
    bus.publish_excluding(
        Target::Room {
            room_id: room.clone(),
        },
        r#"{"type":"custom","payload":{"n":1}}"#.to_owned(),
        vec![b1.clone()],
        Vec::new(),
    )
    .await
    .unwrap();
    // `include` adds a connection that has not joined (once, even if named twice).
    let mut envelope = bus
        .room_event(
            &room,
            r#"{"type":"custom","payload":{"n":2}}"#.to_owned(),
            vec![c1.clone(), c1.clone(), a1.clone()],
        )
        .unwrap();
    envelope.exclude_users = vec!["bob".to_owned()];
    bus.publish_envelope(&envelope).await.unwrap();
    stack.send(&a1, &room, "barrier").await;
    for conn in [&a1, &b1, &b2] {
        stack.gateway.wait_sequence(conn, 1).await;
    }
    let payloads = |conn: &str| -> Vec<i64> {
        stack
            .gateway
            .events(conn, "custom")
            .iter()
            .map(|e| e["payload"]["n"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(payloads(&a1), [1, 2]);
    assert_eq!(payloads(&b1), Vec::<i64>::new());
    assert_eq!(payloads(&b2), [1]);
    stack.gateway.wait_events(&c1, "custom", 1).await;
    assert_eq!(payloads(&c1), [2]);
}

#[tokio::test]
async fn user_targets_reach_every_connection_of_the_user() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let a2 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    stack
        .adapters
        .bus
        .publish(
            Target::User {
                user_id: "alice".into(),
            },
            r#"{"type":"custom","payload":{}}"#.into(),
        )
        .await
        .unwrap();
    stack.gateway.wait_events(&a1, "custom", 1).await;
    stack.gateway.wait_events(&a2, "custom", 1).await;
    // Bob is connected too (his `connected` arrived) but got nothing else.
    stack.gateway.wait_events(&b1, "connected", 1).await;
    assert!(stack.gateway.events(&b1, "custom").is_empty());
}

#[tokio::test]
async fn presence_reaches_a_connection_in_several_of_the_users_rooms_once() {
    let stack = Stack::start().await;
    let b0 = stack.connect("bob").await;
    let a1 = stack.connect("alice").await;
    let first = stack.group("alice", &["bob"]).await;
    let second = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &first).await;
    stack.join(&a1, &second).await;
    // Bob's only connection closes, a new one opens, and closes too: each
    // announcement goes to both of his rooms, where a1 is joined.
    stack.realtime.disconnect(&b0).await.unwrap();
    let b1 = stack.connect("bob").await;
    stack.realtime.disconnect(&b1).await.unwrap();
    // Online and offline for one user share an ordering key, so once the
    // second offline has arrived every earlier one has too.
    let statuses =
        crate::common::wait_for("bob offline, online, offline", crate::common::WAIT, || {
            let statuses: Vec<String> = stack
                .gateway
                .events(&a1, "presenceUpdate")
                .iter()
                .filter(|e| e["payload"]["userId"] == "bob")
                .map(|e| e["payload"]["status"].as_str().unwrap().to_owned())
                .collect();
            (statuses.iter().filter(|s| *s == "offline").count() >= 2).then_some(statuses)
        })
        .await;
    assert_eq!(
        statuses,
        ["offline", "online", "offline"],
        "each once, though a1 is in two of bob's rooms"
    );
}
