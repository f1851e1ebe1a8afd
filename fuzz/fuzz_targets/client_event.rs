//! Fuzzes the WebSocket `$default` path's parsing and validation
//! ([`chat_shared::realtime::parse_client_event`], the very code `$default`
//! runs before any lookup) and checks what it promises, not only that it
//! does not panic:
//!
//! - an accepted event holds only values the protocol allows (room ids of
//!   1–128 chars, content of at most 4,000 chars and not blank, no U+0000,
//!   metadata objects of at most 8 KiB, `clientMessageId` of 1–64 chars,
//!   sequence ids in 0..=2^53-1, user ids in the protocol alphabet);
//! - a refusal is `BAD_REQUEST`, or `FORBIDDEN` for a non-admin's `system`
//!   message (checked before the other message fields), and its `error`
//!   event is valid JSON echoing the request ids;
//! - being an admin only ever turns that `FORBIDDEN` into an acceptance.

#![no_main]

use chat_shared::ErrorCode;
use chat_shared::domain::{
    MAX_CLIENT_MESSAGE_ID_CHARS, MAX_CONTENT_CHARS, MAX_METADATA_BYTES, MAX_ROOM_ID_CHARS,
    MAX_SAFE_INTEGER, MessageType, RoomId, SequenceId, is_blank,
};
use chat_shared::realtime::{
    ClientEvent, JoinTarget, MAX_TOKEN_BYTES, error_event, parse_client_event,
};
use libfuzzer_sys::fuzz_target;

fn check_room(room: &RoomId) {
    let n = room.as_str().chars().count();
    assert!((1..=MAX_ROOM_ID_CHARS).contains(&n), "room id length {n}");
    assert!(!room.as_str().contains('\0'));
}

/// Whether a key or a string anywhere in `value` holds U+0000. (Not a
/// search of the serialized text: a string may hold a backslash followed by
/// `u0000`, which PostgreSQL stores as it is.)
fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn check_sequence(seq: SequenceId) {
    assert!((0..=MAX_SAFE_INTEGER).contains(&seq.get()), "{seq:?}");
}

fn check(event: &ClientEvent, is_admin: bool) {
    match event {
        ClientEvent::JoinRoom {
            target,
            after_sequence_id,
        } => {
            match target {
                JoinTarget::Room(room) => check_room(room),
                JoinTarget::Direct(user) => {
                    let id = user.as_str();
                    assert!((1..=64).contains(&id.len()));
                    assert!(
                        id.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
                    );
                }
            }
            after_sequence_id.map(check_sequence);
        }
        ClientEvent::LeaveRoom { room_id } | ClientEvent::Typing { room_id, .. } => {
            check_room(room_id);
        }
        ClientEvent::MarkRead {
            room_id,
            sequence_id,
        } => {
            check_room(room_id);
            check_sequence(*sequence_id);
        }
        ClientEvent::SendMessage { room_id, message } => {
            check_room(room_id);
            let content = &message.content;
            assert!(content.chars().count() <= MAX_CONTENT_CHARS);
            assert!(!content.contains('\0'));
            let media = matches!(message.kind, MessageType::Image | MessageType::Gift);
            if content.is_empty() {
                assert!(media && message.metadata.is_some(), "empty content");
            } else {
                assert!(!is_blank(content), "blank content {content:?}");
            }
            if message.kind == MessageType::System {
                assert!(is_admin, "system message from a non-admin");
            }
            if let Some(metadata) = &message.metadata {
                assert!(metadata.is_object());
                let size = serde_json::to_vec(metadata)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                assert!(size <= MAX_METADATA_BYTES, "metadata of {size} bytes");
                assert!(!holds_nul(metadata), "metadata holding U+0000");
            }
            if let Some(id) = &message.client_message_id {
                let n = id.as_str().chars().count();
                assert!((1..=MAX_CLIENT_MESSAGE_ID_CHARS).contains(&n));
                assert!(!id.as_str().contains('\0'));
            }
        }
        ClientEvent::Ping => {}
        ClientEvent::Authenticate { token } => {
            assert!(
                (1..=MAX_TOKEN_BYTES).contains(&token.len()),
                "token of {} bytes",
                token.len()
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8 by definition (the gateway refuses
    // anything else before `$default`).
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let as_user = parse_client_event(body, false);
    let as_admin = parse_client_event(body, true);
    match (&as_user, &as_admin) {
        (Ok(user_event), Ok(admin_event)) => {
            assert_eq!(
                user_event, admin_event,
                "the role changed an accepted event"
            );
            check(user_event, false);
        }
        (Err((_, err)), Ok(admin_event)) => {
            assert_eq!(err.code(), ErrorCode::Forbidden, "{err}");
            check(admin_event, true);
        }
        (Ok(_), Err((_, err))) => panic!("accepted for a user, refused for an admin: {err}"),
        (Err((ids, err)), Err((admin_ids, admin_err))) => {
            // The role is checked right after the message type, before the
            // other message fields, so a non-admin's bad `system` message is
            // FORBIDDEN where an admin's is BAD_REQUEST.
            assert!(
                matches!(err.code(), ErrorCode::BadRequest | ErrorCode::Forbidden),
                "{err}"
            );
            assert_eq!(admin_err.code(), ErrorCode::BadRequest, "{admin_err}");
            assert_eq!(ids, admin_ids);
            let reply = error_event(
                err,
                ids.request_type.as_deref(),
                ids.client_message_id.as_deref(),
            );
            let reply: serde_json::Value =
                serde_json::from_str(&reply).expect("the error event is JSON");
            assert_eq!(reply["type"], "error");
            assert_eq!(reply["payload"]["code"], err.code().as_str());
            assert_eq!(
                reply["payload"]["clientMessageId"].as_str(),
                ids.client_message_id.as_deref()
            );
        }
    }
});
