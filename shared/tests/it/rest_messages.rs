//! Messages over REST (PROTOCOL §2 message rules, §3, §4): sending with
//! validation that stores nothing on refusal, idempotent `clientMessageId`,
//! history pagination and its query validation, read cursors, `readBy` and
//! `readReceipt`, retention and admin cleanup, and verbatim storage of
//! Unicode and SQL metacharacters.

#![allow(clippy::unwrap_used)]

use crate::common;

use axum::http::StatusCode;
use common::{
    API, TestApp, TestEnv, assert_message, assert_timestamp, expect_error, expect_status, keys,
    sequence_ids, token_with,
};
use serde_json::{Value, json};

/// The room's `lastSequenceId` as `user` sees it in `GET /rooms`.
async fn last_sequence_id(app: &TestApp, user: &str, room: &str) -> i64 {
    app.room_entry(user, room).await["lastSequenceId"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn send_returns_the_message_and_broadcasts_it() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let mut bus = app.subscribe_bus().await;
    let reply = app
        .send_body(
            "alice",
            &room,
            json!({"content": "Hello!", "metadata": {"mood": "happy", "n": [1, 2]}, "clientMessageId": "c-1"}),
        )
        .await;
    expect_status(&reply, StatusCode::CREATED, "send");
    assert_eq!(keys(&reply.body), ["message"]);
    let msg = &reply.body["message"];
    assert_message(msg);
    assert_eq!(msg["roomId"], room);
    assert_eq!(msg["senderId"], "alice");
    assert_eq!(msg["content"], "Hello!");
    assert_eq!(msg["type"], "text");
    assert_eq!(msg["metadata"], json!({"mood": "happy", "n": [1, 2]}));
    assert_eq!(msg["sequenceId"], 1);
    assert_eq!(msg["clientMessageId"], "c-1");
    assert_eq!(
        msg["sender"],
        json!({"id": "alice", "username": "alice", "displayName": null, "avatar": null})
    );
    assert_eq!(msg["readBy"], json!([]));

    // Broadcast exactly like a WebSocket sendMessage: the same object, to the room.
    let envelope = bus.next().await;
    assert_eq!(envelope["target"], json!({"type": "room", "roomId": room}));
    assert_eq!(
        envelope["event"],
        json!({"type": "message", "payload": msg})
    );
    assert_eq!(envelope["origin"], "test");

    // History shows the same object; the room records it as its last.
    let page = app.history("bob", &room, "").await;
    assert_eq!(page["messages"][0], *msg);
    let entry = app.room_entry("bob", &room).await;
    assert_eq!(entry["lastMessageText"], "Hello!");
    assert_eq!(entry["lastMessageAt"], msg["createdAt"]);
    assert_eq!(entry["lastSequenceId"], 1);

    // Without the optional fields: type text, metadata and clientMessageId null.
    let plain = app.send("bob", &room, "hi").await;
    assert_message(&plain);
    assert_eq!(plain["sequenceId"], 2);
    assert_eq!(plain["type"], "text");
    assert_eq!(plain["metadata"], Value::Null);
    assert_eq!(plain["clientMessageId"], Value::Null);
    assert!(plain["createdAt"].as_str() >= msg["createdAt"].as_str());
    assert_ne!(plain["id"], msg["id"]);
    let envelope = bus.next().await;
    assert_eq!(envelope["event"]["payload"]["id"], plain["id"]);
}

#[tokio::test]
async fn refused_sends_store_nothing_and_use_no_sequence_id() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    app.send("alice", &room, "first").await;
    let mut bus = app.subscribe_bus().await;
    let big_metadata = json!({"k": "y".repeat(8 * 1024)});
    let cases: Vec<(Value, StatusCode)> = vec![
        (json!({}), StatusCode::BAD_REQUEST),
        (json!({"content": ""}), StatusCode::BAD_REQUEST),
        (json!({"content": "   "}), StatusCode::BAD_REQUEST),
        (json!({"content": "\n\t\r "}), StatusCode::BAD_REQUEST),
        (json!({"content": "\u{feff}"}), StatusCode::BAD_REQUEST),
        (
            json!({"content": "\u{3000}\u{a0}"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "a".repeat(4001)}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "😀".repeat(4001)}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"content": 5}), StatusCode::BAD_REQUEST),
        (json!({"content": null}), StatusCode::BAD_REQUEST),
        (json!({"content": true}), StatusCode::BAD_REQUEST),
        (json!({"content": ["hi"]}), StatusCode::BAD_REQUEST),
        (json!({"content": {"text": "hi"}}), StatusCode::BAD_REQUEST),
        (json!({"content": "a\u{0}b"}), StatusCode::BAD_REQUEST),
        (
            json!({"content": "hi", "type": "video"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "type": "TEXT"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"content": "hi", "type": 1}), StatusCode::BAD_REQUEST),
        (
            json!({"content": "hi", "type": "system"}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"content": "hi", "metadata": [1]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": "{}"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": 5}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": true}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": big_metadata}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": {"k": "a\u{0}"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "metadata": {"a\u{0}": 1}}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"type": "image"}), StatusCode::BAD_REQUEST),
        (
            json!({"type": "image", "content": ""}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"type": "image", "content": "  ", "metadata": {"url": "u"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"type": "text", "metadata": {"url": "u"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"type": "text", "content": "", "metadata": {"url": "u"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": ""}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": "x".repeat(65)}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": 7}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": true}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": {"id": "x"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"content": "hi", "clientMessageId": "a\u{0}b"}),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, status) in &cases {
        let reply = app.send_body("alice", &room, body.clone()).await;
        let shown: String = body.to_string().chars().take(120).collect();
        expect_error(&reply, *status, &format!("send {shown}"));
    }
    bus.assert_quiet(300).await;
    let page = app.history("alice", &room, "").await;
    assert_eq!(sequence_ids(&page), [1]);
    assert_eq!(last_sequence_id(&app, "alice", &room).await, 1);
    assert_eq!(
        app.room_entry("alice", &room).await["lastMessageText"],
        "first"
    );
    // The next good send takes the next id: nothing was used up.
    assert_eq!(app.send("alice", &room, "second").await["sequenceId"], 2);
}

#[tokio::test]
async fn content_metadata_and_type_limits() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let created = |r: &common::Reply, what: &str| {
        expect_status(r, StatusCode::CREATED, what);
        assert_message(&r.body["message"]);
        r.body["message"].clone()
    };
    // 4,000 Unicode scalar values, whatever their UTF-8 or UTF-16 length.
    for content in ["a".repeat(4000), "😀".repeat(4000), "é".repeat(4000)] {
        let r = app
            .send_body("alice", &room, json!({"content": content}))
            .await;
        assert_eq!(created(&r, "4000 chars")["content"], content.as_str());
    }
    // Stored as sent, not trimmed.
    let r = app
        .send_body("alice", &room, json!({"content": "  padded \n"}))
        .await;
    assert_eq!(created(&r, "padded")["content"], "  padded \n");
    // Blank means empty after JavaScript's trim(), which keeps U+0085.
    let r = app
        .send_body("alice", &room, json!({"content": "\u{85}"}))
        .await;
    assert_eq!(created(&r, "NEL")["content"], "\u{85}");
    // image and gift may be empty (absent or "") when metadata describes them.
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"type": "image", "metadata": {"url": "https://x/1.png"}}),
        )
        .await;
    let m = created(&r, "image");
    assert_eq!(
        (m["content"].clone(), m["type"].clone()),
        (json!(""), json!("image"))
    );
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"type": "gift", "content": "", "metadata": {}}),
        )
        .await;
    assert_eq!(created(&r, "gift")["metadata"], json!({}));
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"type": "gift", "content": null, "metadata": {"g": 1}}),
        )
        .await;
    assert_eq!(created(&r, "gift with null content")["content"], "");
    // Metadata: at most 8 KiB of serialized UTF-8 JSON ({"k":"…"} is 8 bytes of framing).
    let exact = json!({"k": "y".repeat(8192 - 8)});
    let r = app
        .send_body("alice", &room, json!({"content": "m", "metadata": exact}))
        .await;
    assert_eq!(created(&r, "8 KiB metadata")["metadata"], exact);
    let over = json!({"k": "y".repeat(8192 - 7)});
    let r = app
        .send_body("alice", &room, json!({"content": "m", "metadata": over}))
        .await;
    expect_error(&r, StatusCode::BAD_REQUEST, "8 KiB + 1 metadata");
    // Bytes, not characters: 4,092 two-byte chars fit, 4,093 do not.
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"content": "m", "metadata": {"k": "é".repeat(4092)}}),
        )
        .await;
    created(&r, "8 KiB of é");
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"content": "m", "metadata": {"k": "é".repeat(4093)}}),
        )
        .await;
    expect_error(&r, StatusCode::BAD_REQUEST, "8 KiB + 2 of é");
    // clientMessageId: 64 characters is the most.
    let r = app
        .send_body(
            "alice",
            &room,
            json!({"content": "m", "clientMessageId": "k".repeat(64)}),
        )
        .await;
    assert_eq!(
        created(&r, "64-char key")["clientMessageId"],
        "k".repeat(64)
    );
    // system: admins only.
    let r = app
        .post(
            &format!("{API}/rooms/{room}/messages"),
            &app.admin_token("alice"),
            json!({"content": "maintenance at 5", "type": "system"}),
        )
        .await;
    assert_eq!(created(&r, "admin system")["type"], "system");
    let r = app
        .send_body(
            "bob",
            &room,
            json!({"content": "fake notice", "type": "system"}),
        )
        .await;
    expect_error(&r, StatusCode::FORBIDDEN, "non-admin system message");
    // Everything accepted above is in history, in order, gap-free.
    let page = app.history("bob", &room, "").await;
    assert_eq!(sequence_ids(&page), (1..=12).collect::<Vec<_>>());
    assert_eq!(page["messages"][0]["content"], "a".repeat(4000));
    assert_eq!(page["messages"][1]["content"], "😀".repeat(4000));
    assert_eq!(page["messages"][11]["type"], "system");
}

#[tokio::test]
async fn unicode_and_sql_metacharacters_round_trip_verbatim() {
    let app = TestApp::spawn().await;
    app.register(&["bob"]).await;
    let nasty = [
        "'; DROP TABLE messages; --",
        "Robert'); DROP TABLE users;--",
        "\" OR 1=1; -- \\",
        "%_ LIKE '%' ESCAPE '\\'",
        "$1 $$dollar$$ ${x} {{t}} %s %n",
        "👩‍👩‍👧‍👦🎉 family ZWJ",
        "مرحبا بالعالم",
        "שָׁלוֹם עוֹלָם",
        "\u{202e}RTL override\u{202c} mixed עברית and English",
        "𝕳𝖊𝖑𝖑𝖔 astral 𝄞",
        "e\u{301} combining, \u{200b}zero width",
        "line1\nline2\ttab\r\nCRLF",
        "null",
        "NULL",
        "<script>alert(1)</script>",
    ];
    let alice = token_with("alice", |c| {
        c.display_name = Some("علي 'O''Brien'; --".into());
        c.username = Some("ali\"ce".into());
    });
    let group = app
        .post(
            &format!("{API}/rooms"),
            &alice,
            json!({"type": "GROUP", "name": nasty[0], "memberIds": ["bob"]}),
        )
        .await;
    expect_status(&group, StatusCode::CREATED, "group with a nasty name");
    assert_eq!(group.body["room"]["name"], nasty[0]);
    let room = group.body["room"]["id"].as_str().unwrap().to_owned();
    let metadata = json!({
        "sql": nasty[1], "emoji": nasty[5], "rtl": nasty[6],
        "nested": {"list": [nasty[2], nasty[3], 1, null, true], "ключ 🔑": "значение"},
        "'; DROP TABLE rooms; --": "as a key",
        // A backslash and "u0000": text, not U+0000.
        "\\u0000": "\\u0000 and \\\\u0000"
    });
    let mut sent = Vec::new();
    for (i, content) in nasty.iter().enumerate() {
        let r = app
            .post(
                &format!("{API}/rooms/{room}/messages"),
                &alice,
                json!({"content": content, "metadata": metadata, "clientMessageId": format!("'; --{i}🙂")}),
            )
            .await;
        expect_status(&r, StatusCode::CREATED, content);
        assert_eq!(r.body["message"]["content"], *content);
        assert_eq!(r.body["message"]["metadata"], metadata);
        assert_eq!(r.body["message"]["clientMessageId"], format!("'; --{i}🙂"));
        assert_eq!(
            r.body["message"]["sender"]["displayName"],
            "علي 'O''Brien'; --"
        );
        assert_eq!(r.body["message"]["sender"]["username"], "ali\"ce");
        sent.push(r.body["message"].clone());
    }
    // The idempotency key with metacharacters still finds the original.
    let repeat = app
        .post(
            &format!("{API}/rooms/{room}/messages"),
            &alice,
            json!({"content": "other", "clientMessageId": "'; --0🙂"}),
        )
        .await;
    expect_status(&repeat, StatusCode::OK, "repeat");
    assert_eq!(repeat.body["message"]["content"], nasty[0]);

    let page = app.history("bob", &room, "").await;
    assert_eq!(page["count"], nasty.len());
    for (got, want) in page["messages"].as_array().unwrap().iter().zip(&sent) {
        assert_eq!(got, want);
    }
    let entry = app.room_entry("bob", &room).await;
    assert_eq!(entry["name"], nasty[0]);
    assert_eq!(entry["lastMessageText"], nasty[nasty.len() - 1]);
    // The tables are all still there and working.
    let direct = app.direct("bob", "alice").await;
    assert_eq!(
        app.send("bob", &direct, nasty[0]).await["content"],
        nasty[0]
    );
}

/// PostgreSQL stores metadata numbers as exact decimals and prints them back
/// in full (f64::MAX as 309 digits). Each must read back as the number that
/// was sent, in the send's answer, history, the room list and a repeat send;
/// schemathesis once found a room list that failed on such a number.
#[tokio::test]
async fn metadata_numbers_round_trip_through_postgres() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.direct("alice", "bob").await;
    let metadata = json!({
        "max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "small": -1.3152244605385063e-67,
        "third": 1.0 / 3.0, "one": 1.0, "e308": 1e308, "i64min": i64::MIN, "u64max": u64::MAX, "zero": 0, "negzero": -0.0,
        "nested": [{"x": [f64::MAX, [0.1, 1e300]]}]
    });
    let body = json!({"content": "numbers", "metadata": metadata, "clientMessageId": "n-1"});
    let path = format!("{API}/rooms/{room}/messages");
    let sent = app.post(&path, &app.token("alice"), body.clone()).await;
    expect_status(&sent, StatusCode::CREATED, "send");
    assert_eq!(sent.body["message"]["metadata"], metadata);

    let page = app.history("bob", &room, "").await;
    assert_eq!(page["messages"][0]["metadata"], metadata, "history");
    let entry = app.room_entry("bob", &room).await;
    assert_eq!(entry["messages"][0]["metadata"], metadata, "room list");
    let repeat = app.post(&path, &app.token("alice"), body).await;
    expect_status(&repeat, StatusCode::OK, "repeat");
    assert_eq!(repeat.body["message"]["metadata"], metadata, "repeat send");
}

#[tokio::test]
async fn idempotent_client_message_ids() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let other_room = app.group("alice", &["bob"]).await;
    let mut bus = app.subscribe_bus().await;

    let first = app
        .send_body(
            "alice",
            &room,
            json!({"content": "original", "clientMessageId": "k1"}),
        )
        .await;
    expect_status(&first, StatusCode::CREATED, "first");
    let original = first.body["message"].clone();
    assert_eq!(bus.next().await["event"]["payload"], original);

    // A repeat with different content, type and metadata: 200, the original.
    let repeat = app
        .send_body(
            "alice",
            &room,
            json!({"content": "changed", "type": "gift", "metadata": {"x": 1}, "clientMessageId": "k1"}),
        )
        .await;
    expect_status(&repeat, StatusCode::OK, "repeat");
    assert_eq!(keys(&repeat.body), ["message"]);
    assert_eq!(repeat.body["message"], original);
    bus.assert_quiet(300).await;
    let page = app.history("bob", &room, "").await;
    assert_eq!(page["count"], 1);
    assert_eq!(page["messages"][0], original);
    assert_eq!(last_sequence_id(&app, "bob", &room).await, 1);
    assert_eq!(
        app.unread("bob", &room).await,
        1,
        "the repeat is not a second unread message"
    );

    // The repeat shows readBy as it is now.
    app.mark_read("bob", &room, 1).await;
    let _receipt = bus.next().await;
    let repeat = app
        .send_body(
            "alice",
            &room,
            json!({"content": "again", "clientMessageId": "k1"}),
        )
        .await;
    expect_status(&repeat, StatusCode::OK, "repeat after a read");
    assert_eq!(repeat.body["message"]["readBy"], json!(["bob"]));
    assert_eq!(repeat.body["message"]["id"], original["id"]);
    bus.assert_quiet(300).await;

    // The same key from another sender, or in another room, is a new message.
    let bobs = app
        .send_body(
            "bob",
            &room,
            json!({"content": "bob's", "clientMessageId": "k1"}),
        )
        .await;
    expect_status(&bobs, StatusCode::CREATED, "same key, other sender");
    assert_eq!(bobs.body["message"]["sequenceId"], 2);
    assert_ne!(bobs.body["message"]["id"], original["id"]);
    assert_eq!(
        bus.next().await["event"]["payload"]["id"],
        bobs.body["message"]["id"]
    );
    let elsewhere = app
        .send_body(
            "alice",
            &other_room,
            json!({"content": "elsewhere", "clientMessageId": "k1"}),
        )
        .await;
    expect_status(&elsewhere, StatusCode::CREATED, "same key, other room");
    assert_eq!(elsewhere.body["message"]["sequenceId"], 1);
    assert_eq!(
        bus.next().await["event"]["payload"]["id"],
        elsewhere.body["message"]["id"]
    );
    // A new key is a new message; the repeat used no sequence id.
    let next = app
        .send_body(
            "alice",
            &room,
            json!({"content": "new", "clientMessageId": "k2"}),
        )
        .await;
    expect_status(&next, StatusCode::CREATED, "new key");
    assert_eq!(next.body["message"]["sequenceId"], 3);
    // Messages without a key are never deduplicated.
    let a = app.send("alice", &room, "same").await;
    let b = app.send("alice", &room, "same").await;
    assert_eq!(
        (a["sequenceId"].clone(), b["sequenceId"].clone()),
        (json!(4), json!(5))
    );
    let page = app.history("bob", &room, "").await;
    assert_eq!(sequence_ids(&page), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn history_pagination() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    let empty = app.history("alice", &room, "").await;
    assert_eq!(
        empty,
        json!({"messages": [], "count": 0, "unreadCount": 0, "hasMore": false})
    );
    for i in 1..=30 {
        app.send(
            if i % 2 == 0 { "bob" } else { "alice" },
            &room,
            &format!("m{i}"),
        )
        .await;
    }
    let range = |a: i64, b: i64| (a..=b).collect::<Vec<i64>>();
    let cases: Vec<(&str, Vec<i64>, bool)> = vec![
        ("", range(1, 30), false),
        ("limit=100", range(1, 30), false),
        ("limit=30", range(1, 30), false),
        ("limit=29", range(2, 30), true),
        ("limit=10", range(21, 30), true),
        ("limit=1", vec![30], true),
        // Backwards: the page ends right before beforeSequenceId.
        ("beforeSequenceId=21&limit=10", range(11, 20), true),
        ("beforeSequenceId=11&limit=10", range(1, 10), false),
        ("beforeSequenceId=5", range(1, 4), false),
        ("beforeSequenceId=1", vec![], false),
        ("beforeSequenceId=0", vec![], false),
        ("beforeSequenceId=1000", range(1, 30), false),
        // Forwards: the page starts right after afterSequenceId.
        ("afterSequenceId=0&limit=10", range(1, 10), true),
        ("afterSequenceId=10&limit=10", range(11, 20), true),
        ("afterSequenceId=20&limit=10", range(21, 30), false),
        ("afterSequenceId=25", range(26, 30), false),
        ("afterSequenceId=30", vec![], false),
        ("afterSequenceId=999999999999999", vec![], false),
        // Both: the range strictly between, oldest first.
        ("afterSequenceId=5&beforeSequenceId=16", range(6, 15), false),
        (
            "afterSequenceId=5&beforeSequenceId=16&limit=4",
            range(6, 9),
            true,
        ),
        (
            "beforeSequenceId=16&afterSequenceId=5&limit=10",
            range(6, 15),
            false,
        ),
        ("afterSequenceId=5&beforeSequenceId=6", vec![], false),
        ("afterSequenceId=5&beforeSequenceId=5", vec![], false),
        ("afterSequenceId=20&beforeSequenceId=10", vec![], false),
        (
            "afterSequenceId=0&beforeSequenceId=31&limit=30",
            range(1, 30),
            false,
        ),
        // Unknown parameters are ignored.
        ("foo=bar&limit=2", vec![29, 30], true),
    ];
    for (query, expected, has_more) in &cases {
        let page = app.history("alice", &room, query).await;
        assert_eq!(
            keys(&page),
            ["count", "hasMore", "messages", "unreadCount"],
            "{query}"
        );
        assert_eq!(sequence_ids(&page), *expected, "{query}");
        assert_eq!(page["count"], expected.len(), "{query}");
        assert_eq!(page["hasMore"], *has_more, "{query}");
        for m in page["messages"].as_array().unwrap() {
            assert_message(m);
            let seq = m["sequenceId"].as_i64().unwrap();
            assert_eq!(m["content"], format!("m{seq}"), "{query}");
        }
    }
    // unreadCount is the caller's, whatever the page: alice last sent m29,
    // so bob's m30 is unread; bob last sent m30, so nothing is.
    assert_eq!(
        app.history("alice", &room, "limit=1").await["unreadCount"],
        1
    );
    assert_eq!(
        app.history("bob", &room, "beforeSequenceId=3").await["unreadCount"],
        0
    );
    // Walking backwards page by page visits every message once.
    let mut before = None::<i64>;
    let mut seen = Vec::new();
    loop {
        let query = match before {
            Some(b) => format!("limit=7&beforeSequenceId={b}"),
            None => "limit=7".to_owned(),
        };
        let page = app.history("bob", &room, &query).await;
        let ids = sequence_ids(&page);
        seen.splice(0..0, ids.iter().copied());
        if page["hasMore"] != true {
            break;
        }
        before = ids.first().copied();
    }
    assert_eq!(seen, range(1, 30));
    assert_eq!(app.all_sequence_ids("bob", &room).await, range(1, 30));
}

#[tokio::test]
async fn history_query_parameters_are_validated() {
    let app = TestApp::spawn().await;
    app.register(&["alice"]).await;
    let room = app.group("alice", &[]).await;
    app.send("alice", &room, "x").await;
    let token = app.token("alice");
    for query in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "limit=",
        "limit=1e2",
        "limit=%205",
        "limit=5x",
        "limit=99999999999999999999",
        "beforeSequenceId=-1",
        "beforeSequenceId=abc",
        "beforeSequenceId=1.0",
        "beforeSequenceId=",
        "beforeSequenceId=9999999999999999",
        "afterSequenceId=x",
        "afterSequenceId=-1",
        "afterSequenceId=0x10",
        "afterSequenceId=1&limit=0",
        "afterSequenceId=1&beforeSequenceId=y",
    ] {
        let reply = app
            .get(&format!("{API}/rooms/{room}/messages?{query}"), &token)
            .await;
        expect_error(&reply, StatusCode::BAD_REQUEST, query);
    }
    // The boundaries themselves are fine.
    // (Query integers are 1-15 digits, as in the baseline.)
    for query in [
        "limit=1",
        "limit=100",
        "beforeSequenceId=999999999999999",
        "afterSequenceId=0",
    ] {
        let page = app.history("alice", &room, query).await;
        assert_eq!(page["count"], 1, "{query}");
    }
}

#[tokio::test]
async fn read_cursors_never_move_back_and_clamp_to_the_last_message() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    // Nothing to read yet: any mark leaves the cursor at 0.
    assert_eq!(app.mark_read("bob", &room, 5).await, 0);
    for i in 1..=8 {
        app.send("alice", &room, &format!("m{i}")).await;
    }
    let reply = app
        .post(
            &format!("{API}/rooms/{room}/read"),
            &app.token("bob"),
            json!({"sequenceId": 5}),
        )
        .await;
    expect_status(&reply, StatusCode::OK, "read");
    assert_eq!(
        reply.body,
        json!({"success": true, "roomId": room, "markedUpTo": 5})
    );
    assert_eq!(app.unread("bob", &room).await, 3);
    assert_eq!(app.mark_read("bob", &room, 3).await, 5, "never backwards");
    assert_eq!(app.mark_read("bob", &room, 0).await, 5);
    assert_eq!(app.unread("bob", &room).await, 3);
    assert_eq!(
        app.mark_read("bob", &room, 999).await,
        8,
        "clamped to the last"
    );
    assert_eq!(app.unread("bob", &room).await, 0);
    assert_eq!(app.mark_read("bob", &room, 9_007_199_254_740_991).await, 8);
    // Later messages are above the clamped cursor, so they are unread.
    app.send("alice", &room, "m9").await;
    assert_eq!(app.unread("bob", &room).await, 1);
    assert_eq!(app.history("bob", &room, "").await["unreadCount"], 1);
    // The sender's own messages never count, and sending moves their cursor.
    assert_eq!(app.unread("alice", &room).await, 0);
    app.send("bob", &room, "b10").await;
    assert_eq!(
        app.unread("bob", &room).await,
        0,
        "bob's send moved his cursor past m9"
    );
    assert_eq!(app.unread("alice", &room).await, 1);
    assert_eq!(
        app.mark_read("bob", &room, 9).await,
        10,
        "bob's cursor is at his own message"
    );
    app.send("alice", &room, "m11").await;
    assert_eq!(
        app.unread("alice", &room).await,
        0,
        "alice's send moved her cursor past b10"
    );

    // Bad bodies and callers; the cursor stays where it was.
    let path = format!("{API}/rooms/{room}/read");
    for body in [
        json!({}),
        json!({"sequenceId": null}),
        json!({"sequenceId": "3"}),
        json!({"sequenceId": -1}),
        json!({"sequenceId": 1.5}),
        json!({"sequenceId": 9_007_199_254_740_992_i64}),
        json!({"sequenceId": [3]}),
        json!({"seq": 3}),
    ] {
        let reply = app.post(&path, &app.token("bob"), body.clone()).await;
        expect_error(&reply, StatusCode::BAD_REQUEST, &format!("read {body}"));
    }
    assert_eq!(app.unread("bob", &room).await, 1);
    // JSON has one number type: 11.0 is 11.
    let reply = app
        .post(&path, &app.token("bob"), json!({"sequenceId": 11.0}))
        .await;
    expect_status(&reply, StatusCode::OK, "read 11.0");
    assert_eq!(reply.body["markedUpTo"], 11);
    assert_eq!(app.unread("bob", &room).await, 0);
    app.register(&["eve"]).await;
    let reply = app
        .post(&path, &app.token("eve"), json!({"sequenceId": 1}))
        .await;
    expect_error(&reply, StatusCode::FORBIDDEN, "non-member read");
}

#[tokio::test]
async fn read_by_lists_the_other_members_who_read_each_message() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob", "carol"]).await;
    let room = app.group("alice", &["bob", "carol"]).await;
    for i in 1..=4 {
        app.send("alice", &room, &format!("a{i}")).await;
    }
    let read_by = |page: &Value| -> Vec<Value> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["readBy"].clone())
            .collect()
    };
    assert_eq!(
        read_by(&app.history("alice", &room, "").await),
        vec![json!([]); 4]
    );
    app.mark_read("bob", &room, 2).await;
    app.mark_read("carol", &room, 4).await;
    let page = app.history("alice", &room, "").await;
    assert_eq!(
        read_by(&page),
        [
            json!(["bob", "carol"]),
            json!(["bob", "carol"]),
            json!(["carol"]),
            json!(["carol"])
        ]
    );
    // Everyone sees the same readBy.
    assert_eq!(
        read_by(&app.history("bob", &room, "").await),
        read_by(&page)
    );
    // bob sends: his cursor moves to 5, so he has read everything before;
    // his own message is never "read by" him, and alice has not read it.
    app.send("bob", &room, "b5").await;
    let page = app.history("carol", &room, "").await;
    assert_eq!(
        read_by(&page),
        [
            json!(["bob", "carol"]),
            json!(["bob", "carol"]),
            json!(["bob", "carol"]),
            json!(["bob", "carol"]),
            json!([])
        ]
    );
    app.mark_read("alice", &room, 5).await;
    let page = app.history("carol", &room, "afterSequenceId=4").await;
    assert_eq!(read_by(&page), [json!(["alice"])]);
    // The same in GET /rooms' last message.
    assert_eq!(
        app.room_entry("carol", &room).await["messages"][0]["readBy"],
        json!(["alice"])
    );
}

#[tokio::test]
async fn read_receipts_are_published_only_when_the_cursor_moves() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.group("alice", &["bob"]).await;
    for i in 1..=4 {
        app.send("alice", &room, &format!("m{i}")).await;
    }
    let mut bus = app.subscribe_bus().await;
    assert_eq!(app.mark_read("bob", &room, 2).await, 2);
    let envelope = bus.next().await;
    assert_eq!(envelope["target"], json!({"type": "room", "roomId": room}));
    assert_eq!(envelope["event"]["type"], "readReceipt");
    let payload = &envelope["event"]["payload"];
    assert_eq!(
        keys(payload),
        ["roomId", "sequenceId", "timestamp", "userId"]
    );
    assert_eq!(payload["roomId"], room);
    assert_eq!(payload["userId"], "bob");
    assert_eq!(payload["sequenceId"], 2);
    assert_timestamp(&payload["timestamp"]);

    // No move, no receipt: the same id, a lower one, zero, and the sender's
    // own cursor (already at the last message by sending).
    assert_eq!(app.mark_read("bob", &room, 2).await, 2);
    assert_eq!(app.mark_read("bob", &room, 1).await, 2);
    assert_eq!(app.mark_read("bob", &room, 0).await, 2);
    assert_eq!(app.mark_read("alice", &room, 4).await, 4);
    assert_eq!(app.mark_read("alice", &room, 100).await, 4);
    bus.assert_quiet(300).await;

    // A clamped move announces the clamped cursor, once.
    assert_eq!(app.mark_read("bob", &room, 999).await, 4);
    let envelope = bus.next().await;
    assert_eq!(envelope["event"]["type"], "readReceipt");
    assert_eq!(envelope["event"]["payload"]["sequenceId"], 4);
    assert_eq!(app.mark_read("bob", &room, 999).await, 4);
    bus.assert_quiet(300).await;
}

#[tokio::test]
async fn retention_keeps_the_newest_100_by_default() {
    let app = TestApp::spawn().await;
    app.register(&["alice", "bob"]).await;
    let room = app.direct("alice", "bob").await;
    for i in 1..=120 {
        app.send("alice", &room, &format!("m{i}")).await;
    }
    let range = |a: i64, b: i64| (a..=b).collect::<Vec<i64>>();
    let from_start = app.history("bob", &room, "afterSequenceId=0").await;
    assert_eq!(sequence_ids(&from_start), range(21, 120));
    assert_eq!(from_start["hasMore"], false);
    let newest = app.history("bob", &room, "").await;
    assert_eq!(sequence_ids(&newest), range(21, 120));
    assert_eq!(newest["hasMore"], false, "nothing older is stored");
    let older = app.history("bob", &room, "beforeSequenceId=22").await;
    assert_eq!(sequence_ids(&older), [21]);
    assert_eq!(older["hasMore"], false);
    assert_eq!(app.all_sequence_ids("bob", &room).await, range(21, 120));
    // Unread counts stored messages only.
    assert_eq!(newest["unreadCount"], 100);
    assert_eq!(app.unread("bob", &room).await, 100);
    // Sequence ids go on; they are never reused.
    assert_eq!(app.send("bob", &room, "m121").await["sequenceId"], 121);
    assert_eq!(app.all_sequence_ids("alice", &room).await, range(22, 121));
    let direct = app
        .post(
            &format!("{API}/direct"),
            &app.token("bob"),
            json!({"targetUserId": "alice"}),
        )
        .await;
    assert_eq!(sequence_ids(&direct.body), range(72, 121));
    assert_eq!(direct.body["room"]["lastSequenceId"], 121);
    // Cleanup has nothing left to do at the same retention.
    let reply = app
        .delete(
            &format!("{API}/rooms/{room}/cleanup"),
            &app.admin_token("root"),
        )
        .await;
    expect_status(&reply, StatusCode::OK, "cleanup");
    assert_eq!(
        reply.body,
        json!({"roomId": room, "deleted": 0, "kept": 100})
    );
}

#[tokio::test]
async fn admin_cleanup_applies_the_configured_retention() {
    // Instance A keeps everything; instance B, over the same database,
    // keeps 3 per room and runs the cleanup.
    let mut keep_all = TestEnv::new().await;
    keep_all.set("MESSAGE_RETENTION", "0");
    let mut keep_3 = keep_all.sharing();
    keep_3.set("MESSAGE_RETENTION", "3");
    let a = TestApp::with_env(keep_all).await;
    let b = TestApp::with_env(keep_3).await;
    a.register(&["alice", "bob"]).await;
    let room = a.group("alice", &["bob"]).await;
    let untouched = a.group("alice", &["bob"]).await;
    let empty = a.group("alice", &["bob"]).await;
    for i in 1..=10 {
        a.send("alice", &room, &format!("m{i}")).await;
    }
    for i in 1..=5 {
        a.send("bob", &untouched, &format!("u{i}")).await;
    }
    assert_eq!(
        a.all_sequence_ids("bob", &room).await,
        (1..=10).collect::<Vec<_>>()
    );

    let admin = b.admin_token("root");
    let reply = b
        .delete(&format!("{API}/rooms/{room}/cleanup"), &admin)
        .await;
    expect_status(&reply, StatusCode::OK, "cleanup");
    assert_eq!(reply.body, json!({"roomId": room, "deleted": 7, "kept": 3}));
    assert_eq!(a.all_sequence_ids("bob", &room).await, [8, 9, 10]);
    assert_eq!(a.unread("bob", &room).await, 3);
    // Idempotent; other rooms are untouched; an empty room has nothing.
    let reply = b
        .delete(&format!("{API}/rooms/{room}/cleanup"), &admin)
        .await;
    assert_eq!(reply.body, json!({"roomId": room, "deleted": 0, "kept": 3}));
    assert_eq!(a.all_sequence_ids("bob", &untouched).await, [1, 2, 3, 4, 5]);
    let reply = b
        .delete(&format!("{API}/rooms/{empty}/cleanup"), &admin)
        .await;
    assert_eq!(
        reply.body,
        json!({"roomId": empty, "deleted": 0, "kept": 0})
    );
    // Retention 0 keeps everything, so A's cleanup deletes nothing.
    let reply = a
        .delete(
            &format!("{API}/rooms/{untouched}/cleanup"),
            &a.admin_token("root"),
        )
        .await;
    assert_eq!(
        reply.body,
        json!({"roomId": untouched, "deleted": 0, "kept": 5})
    );
    // The admin need not be a member; a non-admin member may not.
    let reply = b
        .delete(
            &format!("{API}/rooms/{untouched}/cleanup"),
            &b.token("alice"),
        )
        .await;
    expect_error(&reply, StatusCode::FORBIDDEN, "member cleanup");
    assert_eq!(a.all_sequence_ids("bob", &untouched).await, [1, 2, 3, 4, 5]);
    // Ids are never reused after a cleanup.
    assert_eq!(a.send("alice", &room, "m11").await["sequenceId"], 11);
    assert_eq!(a.all_sequence_ids("bob", &room).await, [8, 9, 10, 11]);
}
