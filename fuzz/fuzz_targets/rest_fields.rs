//! Fuzzes the validation of REST input that needs no lookup: message bodies
//! ([`NewMessage::parse`], shared with `sendMessage`), `memberIds` /
//! `userIds`, GROUP names, path ids and query integers, fed from one JSON
//! document (`{"body": {...}, "name": .., "ids": .., "query": "..", "path": ".."}`)
//! or from the raw input as a path segment and query value. Besides "never
//! panics", it checks that what is accepted stays within PROTOCOL.md's
//! limits.

#![no_main]

use chat_shared::ErrorCode;
use chat_shared::domain::{
    MAX_MEMBER_IDS, MAX_ROOM_NAME_CHARS, MAX_SAFE_INTEGER, NewMessage, RoomId, SequenceId, UserId,
    is_blank, parse_query_int, parse_room_name, parse_user_ids,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn query(raw: &str) {
    if let Ok(n) = parse_query_int(raw, "limit", 1, 100) {
        assert!((1..=100).contains(&n));
        assert!(raw.bytes().all(|b| b.is_ascii_digit()));
    }
    if let Ok(seq) = SequenceId::from_query(raw, "afterSequenceId") {
        assert!((0..=MAX_SAFE_INTEGER).contains(&seq.get()));
    }
}

fn path(raw: &str) {
    if let Ok(room) = RoomId::parse(raw) {
        assert_eq!(room.as_str(), raw, "room ids are kept verbatim");
    }
    if let Ok(user) = UserId::parse(raw, "userId") {
        assert_eq!(user.as_str(), raw);
        assert!(raw.len() <= 64 && raw.is_ascii());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    path(text);
    query(text);
    let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if let Some(Value::Object(body)) = doc.get("body") {
        for is_admin in [false, true] {
            match NewMessage::parse(body, is_admin) {
                Ok(message) => {
                    if let Some(Value::String(sent)) = body.get("content") {
                        assert_eq!(&message.content, sent, "content is stored as sent");
                    }
                }
                Err(err) => assert!(
                    err.code() == ErrorCode::BadRequest
                        || (!is_admin && err.code() == ErrorCode::Forbidden),
                    "{err}"
                ),
            }
        }
    }
    if let Ok(name) = parse_room_name(doc.get("name")) {
        assert!((1..=MAX_ROOM_NAME_CHARS).contains(&name.chars().count()));
        assert!(!is_blank(&name) && !name.contains('\0'));
    }
    if let Ok(ids) = parse_user_ids(doc.get("ids"), "memberIds") {
        assert!(ids.len() <= MAX_MEMBER_IDS);
        for (i, id) in ids.iter().enumerate() {
            assert!(!ids[..i].contains(id), "duplicates are dropped");
        }
    }
    if let Some(Value::String(raw)) = doc.get("query") {
        query(raw);
    }
    if let Some(Value::String(raw)) = doc.get("path") {
        path(raw);
    }
});
