//! The room routes of PROTOCOL §4: `GET /rooms`, `POST /direct`,
//! `POST /rooms` (GROUP and CALL), `POST /rooms/:id/members`,
//! `DELETE /rooms/:id/members/:userId`, `GET /rooms/:id/online` and
//! `GET /rooms/:id/unread`, on success and error paths, with the exact
//! response shapes.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{
    API, TestApp, assert_message, assert_room, expect_error, expect_status, keys, member_ids,
    sequence_ids,
};
use serde_json::{Value, json};

fn room_id(reply: &common::Reply) -> String {
    reply.body["room"]["id"]
        .as_str()
        .expect("room id")
        .to_owned()
}

#[tokio::test]
async fn get_rooms_lists_newest_activity_first_with_last_message_and_unread() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol"]).await;
    let empty = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    expect_status(&empty, StatusCode::OK, "empty");
    assert_eq!(empty.body, json!({"rooms": [], "count": 0}));

    let direct = app.direct("alice", "bob").await;
    let group = app.group("alice", &["bob", "carol"]).await;
    let quiet = app.group("alice", &["carol"]).await;
    // Rooms without messages: by creation time, newest first.
    let order = |body: &Value| -> Vec<String> {
        body["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let rooms = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    assert_eq!(
        order(&rooms.body),
        [quiet.clone(), group.clone(), direct.clone()]
    );

    app.send("bob", &direct, "d1").await;
    app.send("alice", &direct, "d2").await;
    app.send("bob", &direct, "d3").await;
    app.send("carol", &group, "g1").await;
    app.send("bob", &group, "g2").await;
    // Activity order now: group (g2), direct (d3), quiet (created earlier).
    let rooms = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    expect_status(&rooms, StatusCode::OK, "rooms");
    assert_eq!(keys(&rooms.body), ["count", "rooms"]);
    assert_eq!(rooms.body["count"], 3);
    assert_eq!(
        order(&rooms.body),
        [group.clone(), direct.clone(), quiet.clone()]
    );
    for entry in rooms.body["rooms"].as_array().unwrap() {
        let mut room = entry.clone();
        let obj = room.as_object_mut().unwrap();
        let messages = obj.remove("messages").expect("messages");
        let unread = obj.remove("unreadCount").expect("unreadCount");
        assert_room(&room);
        assert!(unread.is_i64(), "{entry}");
        for m in messages.as_array().unwrap() {
            assert_message(m);
        }
    }
    let g = &rooms.body["rooms"][0];
    assert_eq!(g["type"], "GROUP");
    assert_eq!(g["name"], "team");
    assert_eq!(member_ids(g), ["alice", "bob", "carol"]);
    assert_eq!(
        g["messages"].as_array().unwrap().len(),
        1,
        "only the last message"
    );
    assert_eq!(g["messages"][0]["content"], "g2");
    assert_eq!(g["messages"][0]["sequenceId"], 2);
    assert_eq!(g["lastMessageText"], "g2");
    assert_eq!(g["lastMessageAt"], g["messages"][0]["createdAt"]);
    assert_eq!(g["lastSequenceId"], 2);
    assert_eq!(g["unreadCount"], 2);
    let d = &rooms.body["rooms"][1];
    assert_eq!(d["type"], "DIRECT");
    assert_eq!(d["name"], Value::Null);
    assert_eq!(d["messages"][0]["content"], "d3");
    // alice's own d2 moved her cursor to 2: only d3 is unread.
    assert_eq!(d["unreadCount"], 1);
    assert_eq!(d["messages"][0]["readBy"], json!([]));
    let q = &rooms.body["rooms"][2];
    assert_eq!(q["messages"], json!([]));
    assert_eq!(q["unreadCount"], 0);
    assert_eq!(q["lastMessageAt"], Value::Null);
    assert_eq!(q["lastMessageText"], Value::Null);

    // Each user sees their own rooms and counts.
    let carol = app.get(&format!("{API}/rooms"), &app.token("carol")).await;
    assert_eq!(order(&carol.body), [group.clone(), quiet.clone()]);
    assert_eq!(
        carol.body["rooms"][0]["unreadCount"], 1,
        "carol sent g1, g2 is unread"
    );
    // Reading moves the counts and readBy of the last message.
    assert_eq!(app.mark_read("alice", &group, 2).await, 2);
    let entry = app.room_entry("bob", &group).await;
    assert_eq!(entry["messages"][0]["readBy"], json!(["alice"]));
    assert_eq!(app.room_entry("alice", &group).await["unreadCount"], 0);
    // A send in the quiet room moves it to the top.
    app.send("carol", &quiet, "q1").await;
    let rooms = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    assert_eq!(order(&rooms.body), [quiet, group, direct]);
}

#[tokio::test]
async fn direct_rooms_are_one_per_pair_with_profiles() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol"]).await;
    let ab = app
        .post(
            &format!("{API}/direct"),
            &app.token("bob"),
            json!({"targetUserId": "alice"}),
        )
        .await;
    expect_status(&ab, StatusCode::OK, "direct");
    assert_eq!(keys(&ab.body), ["messages", "room", "unreadCount"]);
    assert_room(&ab.body["room"]);
    let room = &ab.body["room"];
    assert_eq!(room["type"], "DIRECT");
    assert_eq!(room["name"], Value::Null);
    assert_eq!(room["callId"], Value::Null);
    assert_eq!(room["lastSequenceId"], 0);
    let profile = |id: &str| json!({"id": id, "username": id, "displayName": null, "avatar": null});
    let sides = [room["user1"].clone(), room["user2"].clone()];
    assert!(
        sides.contains(&profile("alice")) && sides.contains(&profile("bob")),
        "{room}"
    );
    assert_eq!(ab.body["messages"], json!([]));
    assert_eq!(ab.body["unreadCount"], 0);
    let id = room_id(&ab);

    // (a, b) and (b, a) are the same room, however often asked.
    assert_eq!(app.direct("alice", "bob").await, id);
    assert_eq!(app.direct("bob", "alice").await, id);
    let other = app.direct("alice", "carol").await;
    assert_ne!(other, id);
    let rooms = app.get(&format!("{API}/rooms"), &app.token("alice")).await;
    assert_eq!(rooms.body["count"], 2);

    // With messages: the last 50, ascending, and the caller's unread count.
    for i in 1..=55 {
        let who = if i % 5 == 0 { "alice" } else { "bob" };
        app.send(who, &id, &format!("m{i}")).await;
    }
    let again = app
        .post(
            &format!("{API}/direct"),
            &app.token("alice"),
            json!({"targetUserId": "bob"}),
        )
        .await;
    expect_status(&again, StatusCode::OK, "direct again");
    assert_eq!(room_id(&again), id);
    assert_eq!(sequence_ids(&again.body), (6..=55).collect::<Vec<_>>());
    for m in again.body["messages"].as_array().unwrap() {
        assert_message(m);
    }
    // alice last sent m55: her cursor is 55, nothing unread.
    assert_eq!(again.body["unreadCount"], 0);
    let for_bob = app
        .post(
            &format!("{API}/direct"),
            &app.token("bob"),
            json!({"targetUserId": "alice"}),
        )
        .await;
    // bob's cursor is at m54 (his last); m55 from alice is unread.
    assert_eq!(for_bob.body["unreadCount"], 1);
    assert_eq!(for_bob.body["room"]["lastMessageText"], "m55");
    assert_eq!(for_bob.body["room"]["lastSequenceId"], 55);
}

#[tokio::test]
async fn direct_room_errors() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let token = app.token("alice");
    let path = format!("{API}/direct");
    let self_chat = app
        .post(&path, &token, json!({"targetUserId": "alice"}))
        .await;
    expect_error(&self_chat, StatusCode::BAD_REQUEST, "direct with yourself");
    let unknown = app
        .post(&path, &token, json!({"targetUserId": "nobody"}))
        .await;
    expect_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "direct with an unknown user",
    );
    for body in [
        json!({}),
        json!({"targetUserId": null}),
        json!({"targetUserId": 42}),
        json!({"targetUserId": ["bob"]}),
        json!({"targetUserId": {"id": "bob"}}),
        json!({"targetUserId": ""}),
        json!({"targetUserId": "bob smith"}),
        json!({"targetUserId": "x".repeat(65)}),
        json!({"targetUserId": "bob'; DROP TABLE rooms; --"}),
        json!({"userId": "bob"}),
    ] {
        let reply = app.post(&path, &token, body.clone()).await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("direct with {body}"),
        );
    }
    let rooms = app.get(&format!("{API}/rooms"), &token).await;
    assert_eq!(
        rooms.body["count"], 0,
        "no room was created: {}",
        rooms.body
    );
    // The unknown user becomes known by authenticating; then it works.
    app.register(&["nobody"]).await;
    let ok = app
        .post(&path, &token, json!({"targetUserId": "nobody"}))
        .await;
    expect_status(&ok, StatusCode::OK, "direct after registration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_room_is_unique_under_concurrent_creation() {
    let app = Arc::new(TestApp::spawn().await);
    app.register(&["alice", "bob"]).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let (me, them) = if i % 2 == 0 {
                ("alice", "bob")
            } else {
                ("bob", "alice")
            };
            app.direct(me, them).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one room per pair: {ids:?}");
    let rooms = app.get(&format!("{API}/rooms"), &app.token("bob")).await;
    assert_eq!(rooms.body["count"], 1);
    assert_eq!(member_ids(&rooms.body["rooms"][0]), ["alice", "bob"]);
}

#[tokio::test]
async fn create_group_rooms() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol"]).await;
    let token = app.token("alice");
    let path = format!("{API}/rooms");
    let created = app
        .post(&path, &token, json!({"type": "GROUP", "name": "Launch 🚀", "memberIds": ["bob", "carol", "bob", "alice"]}))
        .await;
    expect_status(&created, StatusCode::CREATED, "group");
    assert_eq!(keys(&created.body), ["room"]);
    let room = &created.body["room"];
    assert_room(room);
    assert_eq!(room["type"], "GROUP");
    assert_eq!(room["name"], "Launch 🚀");
    assert_eq!(room["callId"], Value::Null);
    assert_eq!(room["lastSequenceId"], 0);
    let mut members = member_ids(room);
    members.sort();
    assert_eq!(
        members,
        ["alice", "bob", "carol"],
        "creator included, duplicates dropped"
    );
    // Every member can use it at once; each GROUP is a new room.
    let id = room_id(&created);
    app.send("carol", &id, "hello").await;
    let second = app
        .post(
            &path,
            &token,
            json!({"type": "GROUP", "name": "Launch 🚀", "memberIds": ["bob"]}),
        )
        .await;
    expect_status(&second, StatusCode::CREATED, "second group");
    assert_ne!(room_id(&second), id);
    // memberIds may be absent: a group of one.
    let alone = app
        .post(&path, &token, json!({"type": "GROUP", "name": "notes"}))
        .await;
    expect_status(&alone, StatusCode::CREATED, "group without memberIds");
    assert_eq!(member_ids(&alone.body["room"]), ["alice"]);
    assert_eq!(app.get(&path, &token).await.body["count"], 3);
}

#[tokio::test]
async fn create_room_errors_leave_nothing_behind() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let token = app.token("alice");
    let path = format!("{API}/rooms");
    let bad = [
        json!({}),
        json!({"name": "x", "memberIds": []}),
        json!({"type": "DIRECT", "memberIds": ["bob"]}),
        json!({"type": "group", "name": "x"}),
        json!({"type": 1, "name": "x"}),
        json!({"type": "GROUP"}),
        json!({"type": "GROUP", "name": ""}),
        json!({"type": "GROUP", "name": "   "}),
        json!({"type": "GROUP", "name": 7}),
        json!({"type": "GROUP", "name": "x".repeat(201)}),
        json!({"type": "GROUP", "name": "a\u{0}b"}),
        json!({"type": "GROUP", "name": "x", "memberIds": "bob"}),
        json!({"type": "GROUP", "name": "x", "memberIds": [1]}),
        json!({"type": "GROUP", "name": "x", "memberIds": ["bad id"]}),
        json!({"type": "GROUP", "name": "x", "memberIds": {"bob": true}}),
        json!({"type": "GROUP", "name": "x", "memberIds": vec!["bob"; 1001]}),
        json!({"type": "CALL"}),
        json!({"type": "CALL", "callId": ""}),
        json!({"type": "CALL", "callId": 5}),
        json!({"type": "CALL", "callId": "c".repeat(129)}),
        json!({"type": "CALL", "callId": "c1", "name": 5}),
    ];
    for body in bad {
        let reply = app.post(&path, &token, body.clone()).await;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("POST /rooms {body}"),
        );
    }
    for body in [
        json!({"type": "GROUP", "name": "x", "memberIds": ["bob", "ghost"]}),
        json!({"type": "CALL", "callId": "c404", "memberIds": ["ghost"]}),
    ] {
        let reply = app.post(&path, &token, body.clone()).await;
        let message = expect_error(
            &reply,
            StatusCode::NOT_FOUND,
            &format!("POST /rooms {body}"),
        );
        // No enumeration: the caller learns that some id is unknown, not
        // which (a bulk user-existence oracle otherwise).
        assert_eq!(message, "one or more users are unknown", "{body}");
    }
    assert_eq!(app.get(&path, &token).await.body["count"], 0);
    assert_eq!(app.get(&path, &app.token("bob")).await.body["count"], 0);
    // The CALL id refused above is still free.
    let call = app
        .post(&path, &token, json!({"type": "CALL", "callId": "c404"}))
        .await;
    expect_status(&call, StatusCode::CREATED, "call id still free");
    // 1,000 member ids is the most accepted (all the same known user here).
    let many = app
        .post(
            &path,
            &token,
            json!({"type": "GROUP", "name": "x", "memberIds": vec!["bob"; 1000]}),
        )
        .await;
    expect_status(&many, StatusCode::CREATED, "1000 member ids");
}

#[tokio::test]
async fn call_rooms_are_one_per_call_id() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol", "dave"]).await;
    let path = format!("{API}/rooms");
    let first = app
        .post(
            &path,
            &app.token("alice"),
            json!({"type": "CALL", "callId": "call-42", "memberIds": ["bob"]}),
        )
        .await;
    expect_status(&first, StatusCode::CREATED, "first");
    assert_room(&first.body["room"]);
    assert_eq!(first.body["room"]["type"], "CALL");
    assert_eq!(first.body["room"]["callId"], "call-42");
    assert_eq!(first.body["room"]["name"], Value::Null);
    assert_eq!(member_ids(&first.body["room"]), ["alice", "bob"]);
    let id = room_id(&first);

    // A member repeating the callId gets the same room (200), members unchanged,
    // even when the repeat names other members or a name.
    for who in ["alice", "bob"] {
        let again = app
            .post(
                &path,
                &app.token(who),
                json!({"type": "CALL", "callId": "call-42", "name": "renamed", "memberIds": ["carol"]}),
            )
            .await;
        expect_status(&again, StatusCode::OK, "repeat");
        assert_room(&again.body["room"]);
        assert_eq!(room_id(&again), id);
        assert_eq!(member_ids(&again.body["room"]), ["alice", "bob"]);
        assert_eq!(again.body["room"]["name"], Value::Null);
    }
    // A non-member repeating it is refused and not added.
    let carol = app
        .post(
            &path,
            &app.token("carol"),
            json!({"type": "CALL", "callId": "call-42"}),
        )
        .await;
    expect_error(&carol, StatusCode::FORBIDDEN, "non-member repeat");
    assert_eq!(app.get(&path, &app.token("carol")).await.body["count"], 0);
    let history = app
        .get(&format!("{API}/rooms/{id}/messages"), &app.token("carol"))
        .await;
    expect_error(
        &history,
        StatusCode::FORBIDDEN,
        "carol is still not a member",
    );
    // Another callId is another room; a name is kept.
    let other = app
        .post(
            &path,
            &app.token("dave"),
            json!({"type": "CALL", "callId": "call-43", "name": "Standup"}),
        )
        .await;
    expect_status(&other, StatusCode::CREATED, "other call");
    assert_ne!(room_id(&other), id);
    assert_eq!(other.body["room"]["name"], "Standup");
    // CALL ids and GROUP rooms do not collide.
    let group = app
        .post(
            &path,
            &app.token("alice"),
            json!({"type": "GROUP", "name": "call-42"}),
        )
        .await;
    expect_status(&group, StatusCode::CREATED, "group named like the call");
    assert_ne!(room_id(&group), id);
}

#[tokio::test]
async fn members_can_be_added_and_use_the_room_at_once() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol", "dave"]).await;
    let room = app.group("alice", &["bob"]).await;
    app.send("alice", &room, "before carol").await;
    let path = format!("{API}/rooms/{room}/members");
    // Any member may add (bob is not the creator); duplicates and existing
    // members are skipped.
    let added = app
        .post(
            &path,
            &app.token("bob"),
            json!({"userIds": ["carol", "carol", "alice"]}),
        )
        .await;
    expect_status(&added, StatusCode::OK, "add");
    assert_eq!(keys(&added.body), ["room"]);
    assert_room(&added.body["room"]);
    assert_eq!(room_id(&added), room);
    assert_eq!(member_ids(&added.body["room"]), ["alice", "bob", "carol"]);

    // carol can use the room right away: history, send, unread, read, online.
    let page = app.history("carol", &room, "").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["unreadCount"], 1, "messages before joining are unread");
    let sent = app.send("carol", &room, "hi all").await;
    assert_eq!(sent["sequenceId"], 2);
    assert_eq!(app.unread("carol", &room).await, 0);
    assert_eq!(app.mark_read("carol", &room, 2).await, 2);
    let online = app
        .get(&format!("{API}/rooms/{room}/online"), &app.token("carol"))
        .await;
    expect_status(&online, StatusCode::OK, "online");
    assert!(app.room_entry("carol", &room).await["id"] == room);

    // Errors, each leaving the members as they were.
    let token = app.token("alice");
    for body in [
        json!({}),
        json!({"userIds": []}),
        json!({"userIds": "dave"}),
        json!({"userIds": [5]}),
        json!({"userIds": ["not valid"]}),
        json!({"userIds": null}),
        json!({"memberIds": ["dave"]}),
    ] {
        let reply = app.post(&path, &token, body.clone()).await;
        expect_error(&reply, StatusCode::BAD_REQUEST, &format!("add {body}"));
    }
    let reply = app
        .post(&path, &token, json!({"userIds": ["dave", "ghost"]}))
        .await;
    let message = expect_error(&reply, StatusCode::NOT_FOUND, "unknown user");
    assert_eq!(message, "one or more users are unknown");
    let reply = app
        .post(&path, &app.token("dave"), json!({"userIds": ["dave"]}))
        .await;
    expect_error(
        &reply,
        StatusCode::FORBIDDEN,
        "a non-member adding themself",
    );
    let direct = app.direct("alice", "bob").await;
    let reply = app
        .post(
            &format!("{API}/rooms/{direct}/members"),
            &token,
            json!({"userIds": ["carol"]}),
        )
        .await;
    expect_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "DIRECT rooms have fixed members",
    );
    assert_eq!(
        member_ids(&app.room_entry("alice", &direct).await),
        ["alice", "bob"]
    );
    assert_eq!(
        member_ids(&app.room_entry("alice", &room).await),
        ["alice", "bob", "carol"]
    );
    let reply = app
        .get(&format!("{API}/rooms/{room}/messages"), &app.token("dave"))
        .await;
    expect_error(&reply, StatusCode::FORBIDDEN, "dave was never added");
}

#[tokio::test]
async fn removing_members() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol", "dave", "root"])
        .await;
    let room = app.group("alice", &["bob", "carol"]).await;
    app.send("bob", &room, "bob was here").await;
    let path = |u: &str| format!("{API}/rooms/{room}/members/{u}");

    // Leaving: yourself, 204 with no body.
    let left = app.delete(&path("bob"), &app.token("bob")).await;
    expect_status(&left, StatusCode::NO_CONTENT, "leave");
    assert_eq!(left.body, Value::Null);
    // bob is out of every member route now.
    let bob = app.token("bob");
    let routes = [
        (
            axum::http::Method::GET,
            format!("{API}/rooms/{room}/messages"),
            None,
        ),
        (
            axum::http::Method::POST,
            format!("{API}/rooms/{room}/messages"),
            Some(json!({"content": "x"})),
        ),
        (
            axum::http::Method::GET,
            format!("{API}/rooms/{room}/unread"),
            None,
        ),
        (
            axum::http::Method::POST,
            format!("{API}/rooms/{room}/read"),
            Some(json!({"sequenceId": 1})),
        ),
        (
            axum::http::Method::GET,
            format!("{API}/rooms/{room}/online"),
            None,
        ),
        (
            axum::http::Method::POST,
            format!("{API}/rooms/{room}/members"),
            Some(json!({"userIds": ["bob"]})),
        ),
    ];
    for route in &routes {
        let reply = app.call_route(route, Some(&bob)).await;
        expect_error(
            &reply,
            StatusCode::FORBIDDEN,
            &format!("removed bob: {} {}", route.0, route.1),
        );
    }
    assert_eq!(
        app.get(&format!("{API}/rooms"), &bob).await.body["count"],
        0
    );
    // His message stays, with his profile.
    let page = app.history("alice", &room, "").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["messages"][0]["sender"]["id"], "bob");
    // Leaving again: not a member, 404.
    let again = app.delete(&path("bob"), &bob).await;
    expect_error(&again, StatusCode::NOT_FOUND, "leaving twice");

    // Someone else: only an admin, who need not be a member.
    let reply = app.delete(&path("carol"), &app.token("alice")).await;
    expect_error(&reply, StatusCode::FORBIDDEN, "alice removing carol");
    assert_eq!(
        member_ids(&app.room_entry("alice", &room).await),
        ["alice", "carol"]
    );
    let reply = app.delete(&path("carol"), &app.admin_token("root")).await;
    expect_status(&reply, StatusCode::NO_CONTENT, "admin removes carol");
    assert_eq!(member_ids(&app.room_entry("alice", &room).await), ["alice"]);
    let reply = app.delete(&path("dave"), &app.admin_token("root")).await;
    expect_error(&reply, StatusCode::NOT_FOUND, "removing a non-member");
    let reply = app.delete(&path("ghost"), &app.admin_token("root")).await;
    expect_error(&reply, StatusCode::NOT_FOUND, "removing an unknown user");
    let reply = app
        .delete(&path("bad%20id"), &app.admin_token("root"))
        .await;
    expect_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid user id in the path",
    );

    // DIRECT rooms keep their two users, even for an admin.
    let direct = app.direct("alice", "dave").await;
    for (who, token) in [
        ("alice", app.token("alice")),
        ("alice", app.admin_token("root")),
    ] {
        let reply = app
            .delete(&format!("{API}/rooms/{direct}/members/{who}"), &token)
            .await;
        expect_error(&reply, StatusCode::BAD_REQUEST, "DIRECT member removal");
    }
    assert_eq!(
        member_ids(&app.room_entry("dave", &direct).await),
        ["alice", "dave"]
    );

    // A removed member can be added back and sees the room again.
    let reply = app
        .post(
            &format!("{API}/rooms/{room}/members"),
            &app.token("alice"),
            json!({"userIds": ["bob"]}),
        )
        .await;
    expect_status(&reply, StatusCode::OK, "re-add bob");
    assert_eq!(app.history("bob", &room, "").await["count"], 1);
}

#[tokio::test]
async fn online_reads_the_presence_set() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol", "eve"]).await;
    let room = app.group("alice", &["bob", "carol"]).await;
    let path = format!("{API}/rooms/{room}/online");
    let nobody = app.get(&path, &app.token("alice")).await;
    expect_status(&nobody, StatusCode::OK, "online");
    assert_eq!(
        nobody.body,
        json!({"roomId": room, "onlineUsers": [], "count": 0})
    );

    app.set_online("carol").await;
    app.set_online("bob").await;
    app.set_online("eve").await; // online, but not a member
    let some = app.get(&path, &app.token("alice")).await;
    assert_eq!(some.body["roomId"], room);
    assert_eq!(some.body["count"], 2);
    let mut users: Vec<String> = some.body["onlineUsers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    users.sort();
    assert_eq!(users, ["bob", "carol"]);
    assert_eq!(keys(&some.body), ["count", "onlineUsers", "roomId"]);
    // A REST call does not make the caller online.
    assert!(!users.contains(&"alice".to_owned()));
    let reply = app.get(&path, &app.token("eve")).await;
    expect_error(
        &reply,
        StatusCode::FORBIDDEN,
        "eve is online but not a member",
    );
}

#[tokio::test]
async fn unread_counts_others_messages_above_the_cursor() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let reply = app
        .get(&format!("{API}/rooms/{room}/unread"), &app.token("bob"))
        .await;
    expect_status(&reply, StatusCode::OK, "unread");
    assert_eq!(reply.body, json!({"roomId": room, "unreadCount": 0}));
    for i in 0..3 {
        app.send("alice", &room, &format!("a{i}")).await;
    }
    app.send("bob", &room, "b").await;
    app.send("alice", &room, "a3").await;
    // bob's send moved his cursor to 4: only a3 is unread for him.
    assert_eq!(app.unread("bob", &room).await, 1);
    // alice's own messages never count for her; bob's "b" is below her cursor.
    assert_eq!(app.unread("alice", &room).await, 0);
    let reply = app
        .get(&format!("{API}/rooms/{room}/unread"), &app.token("alice"))
        .await;
    assert_eq!(reply.body, json!({"roomId": room, "unreadCount": 0}));
}
