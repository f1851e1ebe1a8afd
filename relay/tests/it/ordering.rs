//! A room's `message` events: every connection gets each once, in
//! increasing `sequenceId`, without gaps.

use chat_shared::bus::{Control, Target, event_json};
use chat_shared::domain::{NewMessage, RoomId};
use chat_shared::model::Message;
use chat_shared::store::Stored;
use serde_json::json;

use crate::common::{Stack, WAIT, auth_user, wait_for_async};

/// Stores a message without publishing it (as if its envelope were late).
async fn store_only(stack: &Stack, user: &str, room: &str, content: &str) -> Message {
    let payload = json!({"content": content});
    let message = NewMessage::parse(payload.as_object().unwrap(), false).unwrap();
    match stack
        .adapters
        .store
        .store_message(&RoomId::parse(room).unwrap(), &auth_user(user).id, &message)
        .await
        .unwrap()
    {
        Stored::New(m) => m,
        Stored::Duplicate(_) => panic!("not a repeat"),
    }
}

/// Publishes a stored message's envelope, as `sendMessage` would.
async fn publish(stack: &Stack, room: &str, message: &Message) {
    let bus = &stack.adapters.bus;
    let envelope = bus
        .message_event(
            room,
            message.sequence_id.get(),
            event_json("message", message).unwrap(),
            Vec::new(),
        )
        .unwrap();
    bus.publish_envelope(&envelope).await.unwrap();
}

#[tokio::test]
async fn concurrent_senders_reach_every_connection_in_order_without_duplicates() {
    const USERS: usize = 8;
    const EACH: usize = 10;
    let stack = Stack::start().await;
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let mut conns = Vec::new();
    for u in &users {
        conns.push(stack.connect(u).await);
    }
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let room = stack.group(&users[0], &others).await;
    for conn in &conns {
        stack.join(conn, &room).await;
    }
    let stack = std::sync::Arc::new(stack);
    let mut senders = Vec::new();
    for conn in conns.clone() {
        let stack = stack.clone();
        let room = room.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..EACH {
                stack.send(&conn, &room, &format!("{conn} #{i}")).await;
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let total = (USERS * EACH) as i64;
    let expected: Vec<i64> = (1..=total).collect();
    for conn in &conns {
        stack.gateway.wait_sequence(conn, total).await;
        assert_eq!(stack.gateway.sequences(conn), expected, "{conn}");
    }
}

#[tokio::test]
async fn an_out_of_order_publish_is_delivered_in_order_with_the_gap_filled() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.join(&b1, &room).await;
    let m1 = store_only(&stack, "alice", &room, "one").await;
    let m2 = store_only(&stack, "alice", &room, "two").await;
    let m3 = store_only(&stack, "alice", &room, "three").await;
    publish(&stack, &room, &m1).await;
    publish(&stack, &room, &m3).await;
    publish(&stack, &room, &m2).await;
    stack.send(&a1, &room, "four").await;
    for conn in [&a1, &b1] {
        stack.gateway.wait_sequence(conn, 4).await;
        assert_eq!(stack.gateway.sequences(conn), [1, 2, 3, 4], "{conn}");
    }
    let filled = &stack.gateway.events(&b1, "message")[1];
    assert_eq!(filled["payload"]["content"], "two");
    assert_eq!(filled["payload"]["sender"]["id"], "alice");
    let m = stack.metrics.snapshot();
    assert_eq!(m.gap_fills, 2, "one fill per connection: {m:?}");
    assert!(
        m.store_reads >= 1,
        "seq 2 was never published, so it came from PostgreSQL"
    );
}

#[tokio::test]
async fn a_subscription_behind_the_room_is_filled_from_the_ring() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.send(&a1, &room, "one").await;
    stack.send(&a1, &room, "two").await;
    stack.gateway.wait_sequence(&a1, 2).await;
    // Bob's subscription carries watermark 0, as if his snapshot was read
    // before messages 1 and 2 were fanned out without him, and is joined
    // (as after its `Control::Joined`, which goes nowhere here).
    stack.subscribe_pending(&b1, &room, 0, &[]).await;
    assert!(stack.activate(&b1, &room).await);
    stack.send(&a1, &room, "three").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 3).await, [1, 2, 3]);
    assert_eq!(stack.gateway.wait_sequence(&a1, 3).await, [1, 2, 3]);
    let m = stack.metrics.snapshot();
    assert_eq!(m.gap_fills, 1);
    assert_eq!(m.store_reads, 0, "the ring had 1 and 2: {m:?}");
}

#[tokio::test]
async fn a_join_gets_its_room_joined_first_then_what_it_missed_then_the_rest() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    for text in ["one", "two", "three"] {
        stack.send(&a1, &room, text).await;
    }
    stack.gateway.wait_sequence(&a1, 3).await;
    // Bob's snapshot had message 1; 2 and 3 went out before he subscribed.
    // His subscription is pending, and its `Control::Joined` is held back
    // (published on a channel nobody reads) while message 4 goes out.
    let template = stack.subscribe_pending(&b1, &room, 1, &["alice"]).await;
    stack.send(&a1, &room, "four").await;
    stack.gateway.wait_sequence(&a1, 4).await;
    let typing = json!({"type": "typing", "payload": {"roomId": room, "isTyping": true}});
    stack.frame(&a1, typing).await;
    // A pending subscription gets nothing of the room, messages or not.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let posted = |kind: &str| !stack.gateway.events(&b1, kind).is_empty();
    assert!(!posted("message") && !posted("typing") && !posted("roomJoined"));

    // Now the join's envelope arrives, as the script publishes it (the
    // room's highest published sequence id was 4 when it subscribed).
    let joined = template.fill(&["alice"], 4);
    stack.publish_on_room(&room, &joined).await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 4).await, [2, 3, 4]);
    let kinds: Vec<String> = stack
        .gateway
        .posts(&b1)
        .iter()
        .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap()["type"].to_string())
        .filter(|kind| kind != r#""connected""#)
        .collect();
    assert_eq!(
        kinds,
        [
            r#""roomJoined""#,
            r#""message""#,
            r#""message""#,
            r#""message""#
        ]
    );
    let room_joined = &stack.gateway.events(&b1, "roomJoined")[0];
    assert_eq!(room_joined["payload"]["onlineUsers"], json!(["alice"]));
    // And it is joined: the room's next message comes live.
    stack.send(&a1, &room, "five").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 5).await, [2, 3, 4, 5]);
}

#[tokio::test]
async fn a_legacy_sync_pushes_what_a_joined_subscription_missed() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    for text in ["one", "two", "three"] {
        stack.send(&a1, &room, text).await;
    }
    stack.gateway.wait_sequence(&a1, 3).await;
    // A joined subscription at watermark 1 (as an older function made it),
    // and the `Sync` such a function published.
    stack.subscribe_pending(&b1, &room, 1, &[]).await;
    stack.activate(&b1, &room).await;
    let bus = &stack.adapters.bus;
    let control = bus.control(
        Target::Connection {
            connection_id: b1.clone(),
        },
        Control::Sync {
            room_id: room.clone(),
            connection_id: b1.clone(),
        },
    );
    bus.publish_envelope(&control).await.unwrap();
    assert_eq!(stack.gateway.wait_sequence(&b1, 3).await, [2, 3]);
    stack.send(&a1, &room, "four").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 4).await, [2, 3, 4]);
    // A second sync finds nothing new.
    bus.publish_envelope(&control).await.unwrap();
    stack.send(&a1, &room, "five").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 5).await, [2, 3, 4, 5]);
}

#[tokio::test]
async fn a_restarted_relay_does_not_deliver_again() {
    let mut stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    let joined = stack.join(&b1, &room).await;
    assert!(joined["messages"].as_array().unwrap().is_empty());
    for text in ["one", "two", "three"] {
        stack.send(&a1, &room, text).await;
    }
    stack.gateway.wait_sequence(&b1, 3).await;
    // The relay writes what it delivered back to the subscription.
    let presence = stack.adapters.presence.clone();
    let watermark = |conn: String| {
        let presence = presence.clone();
        let room = room.clone();
        async move {
            presence
                .subscribers(&[room.as_str()])
                .await
                .unwrap()
                .remove(0)
                .into_iter()
                .find(|s| s.connection_id == conn)
                .map(|s| s.watermark)
        }
    };
    wait_for_async("bob's watermark written back", WAIT, || async {
        (watermark(b1.clone()).await == Some(3)).then_some(())
    })
    .await;
    let s = presence
        .subscribers(&[room.as_str()])
        .await
        .unwrap()
        .remove(0);
    let bob = s.iter().find(|s| s.connection_id == b1).unwrap();
    assert_eq!(bob.user_id, "bob", "the rest of the value is kept: {bob:?}");
    assert_eq!(bob.endpoint, stack.gateway.endpoint());

    stack.stop_relay().await;
    stack.start_relay().await;
    stack.send(&a1, &room, "four").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 4).await, [1, 2, 3, 4]);
    assert_eq!(stack.gateway.wait_sequence(&a1, 4).await, [1, 2, 3, 4]);
}
