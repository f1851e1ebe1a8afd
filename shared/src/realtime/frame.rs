//! Client frames of PROTOCOL §2, parsed and validated without touching any
//! state: JSON, the `{type, payload}` envelope, and every field of every
//! event. `$default` ([`super::Realtime::message`]) runs exactly this code
//! before it looks anything up, and the fuzz target in `fuzz/` runs it on
//! arbitrary input, so what the fuzzer exercises is the service's own path.
//!
//! Parsing is split in two steps because `$default` renews the presence
//! lease between them: a frame that is not JSON is `BAD_REQUEST` whatever
//! the connection's state, while a JSON frame from a connection that is no
//! longer registered is `UNAUTHORIZED` before its fields are looked at.
//! [`parse_client_event`] runs both steps back to back.

use serde_json::{Map, Value};

use crate::domain::{
    NewMessage, RequestKind, RoomId, SequenceId, UserId, optional_sequence, optional_str,
    required_str,
};
use crate::error::Error;

/// The longest token an `authenticate` frame may carry: far more than any
/// JWT this service issues, and what a handshake's query could hold.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What an `error` reply echoes of the failing frame: its `type` when that
/// is a string, and any string `payload.clientMessageId`, valid or not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestIds {
    /// The frame's `type`, when it is a string.
    pub request_type: Option<String>,
    /// The frame's `payload.clientMessageId`, when it is a string.
    pub client_message_id: Option<String>,
}

impl RequestIds {
    fn of(frame: &Value) -> Self {
        let request_type = frame.get("type").and_then(Value::as_str).map(str::to_owned);
        let client_message_id = frame
            .get("payload")
            .and_then(|p| p.get("clientMessageId"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self {
            request_type,
            client_message_id,
        }
    }
}

/// Where `joinRoom` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTarget {
    /// `{roomId}` (also when `targetUserId` is given too).
    Room(RoomId),
    /// `{targetUserId}`: the DIRECT room with that user, created if needed.
    Direct(UserId),
}

/// A client event with every field validated: all the checks that need no
/// lookup have passed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `joinRoom`.
    JoinRoom {
        /// The room, or the other user of a DIRECT room.
        target: JoinTarget,
        /// **new**: recover the messages after this one.
        after_sequence_id: Option<SequenceId>,
    },
    /// `leaveRoom`.
    LeaveRoom {
        /// The room to unsubscribe from.
        room_id: RoomId,
    },
    /// `sendMessage`.
    SendMessage {
        /// The room to send to.
        room_id: RoomId,
        /// The message (a `system` one only from an admin).
        message: NewMessage,
    },
    /// `typing`.
    Typing {
        /// The room.
        room_id: RoomId,
        /// Started or stopped typing.
        is_typing: bool,
    },
    /// `markRead`.
    MarkRead {
        /// The room.
        room_id: RoomId,
        /// The new read cursor (clamped to the room's last message later).
        sequence_id: SequenceId,
    },
    /// **new** `ping`.
    Ping,
    /// **new** `authenticate`: a fresh token for the connection's user,
    /// which extends the session past the handshake token's `exp`.
    Authenticate {
        /// The token, unverified yet.
        token: String,
    },
}

impl ClientEvent {
    /// The kind of request.
    pub fn kind(&self) -> RequestKind {
        match self {
            Self::JoinRoom { .. } => RequestKind::JoinRoom,
            Self::LeaveRoom { .. } => RequestKind::LeaveRoom,
            Self::SendMessage { .. } => RequestKind::SendMessage,
            Self::Typing { .. } => RequestKind::Typing,
            Self::MarkRead { .. } => RequestKind::MarkRead,
            Self::Ping => RequestKind::Ping,
            Self::Authenticate { .. } => RequestKind::Authenticate,
        }
    }
}

/// A text frame that is valid JSON: the first step of parsing.
#[derive(Debug, Clone)]
pub struct ClientFrame {
    value: Value,
    ids: RequestIds,
}

impl ClientFrame {
    /// Parses the JSON of a text frame.
    ///
    /// # Errors
    /// `BAD_REQUEST` "malformed JSON" (including unpaired surrogate escapes,
    /// which serde_json refuses).
    pub fn parse(body: &str) -> Result<Self, Error> {
        let value: Value =
            serde_json::from_str(body).map_err(|_| Error::bad_request("malformed JSON"))?;
        let ids = RequestIds::of(&value);
        Ok(Self { value, ids })
    }

    /// What an `error` reply to this frame echoes.
    pub fn ids(&self) -> &RequestIds {
        &self.ids
    }

    /// The kind of request its `type` names, when it names one.
    pub fn kind(&self) -> Option<RequestKind> {
        self.ids
            .request_type
            .as_deref()
            .and_then(RequestKind::from_wire)
    }

    /// The second step: the envelope and the event's fields. `is_admin`
    /// decides whether a `system` message may be sent.
    ///
    /// # Errors
    /// `BAD_REQUEST` for a frame that is not an object, a `type` that is not
    /// a known event, a `payload` that is not an object, or a bad field;
    /// `FORBIDDEN` for a `system` message from a non-admin.
    pub fn event(&self, is_admin: bool) -> Result<ClientEvent, Error> {
        let Value::Object(frame) = &self.value else {
            return Err(Error::bad_request("a message must be a JSON object"));
        };
        let Some(name) = self.ids.request_type.as_deref() else {
            return Err(Error::bad_request("type must be a string"));
        };
        let Some(kind) = RequestKind::from_wire(name) else {
            return Err(Error::bad_request(format!("unknown type {name}")));
        };
        let empty = Map::new();
        let payload = match frame.get("payload") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(Error::bad_request("payload must be a JSON object")),
        };
        event(kind, payload, is_admin)
    }
}

/// The fields of each event, checked in the order the handlers always
/// checked them (so a frame with several bad fields names the same one).
fn event(kind: RequestKind, p: &Map<String, Value>, is_admin: bool) -> Result<ClientEvent, Error> {
    let room = |p: &Map<String, Value>| RoomId::parse(required_str(p, "roomId")?);
    Ok(match kind {
        RequestKind::JoinRoom => {
            let after_sequence_id = optional_sequence(p, "afterSequenceId")?;
            let target = match (optional_str(p, "roomId")?, optional_str(p, "targetUserId")?) {
                (Some(room), _) => JoinTarget::Room(RoomId::parse(room)?),
                (None, Some(target)) => JoinTarget::Direct(UserId::parse(target, "targetUserId")?),
                (None, None) => {
                    return Err(Error::bad_request("roomId or targetUserId is required"));
                }
            };
            ClientEvent::JoinRoom {
                target,
                after_sequence_id,
            }
        }
        RequestKind::LeaveRoom => ClientEvent::LeaveRoom { room_id: room(p)? },
        RequestKind::SendMessage => {
            let room_id = room(p)?;
            ClientEvent::SendMessage {
                room_id,
                message: NewMessage::parse(p, is_admin)?,
            }
        }
        RequestKind::Typing => {
            let room_id = room(p)?;
            let Some(is_typing) = p.get("isTyping").and_then(Value::as_bool) else {
                return Err(Error::bad_request("isTyping must be a boolean"));
            };
            ClientEvent::Typing { room_id, is_typing }
        }
        RequestKind::MarkRead => {
            let room_id = room(p)?;
            let Some(sequence_id) = optional_sequence(p, "sequenceId")? else {
                return Err(Error::bad_request("sequenceId is required"));
            };
            ClientEvent::MarkRead {
                room_id,
                sequence_id,
            }
        }
        RequestKind::Ping => ClientEvent::Ping,
        RequestKind::Authenticate => {
            let token = required_str(p, "token")?;
            if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
                return Err(Error::bad_request("token must be a string of 1-8192 bytes"));
            }
            ClientEvent::Authenticate {
                token: token.to_owned(),
            }
        }
    })
}

/// Parses and validates one text frame exactly as `$default` does, minus
/// the lookups: JSON, envelope, and every field.
///
/// # Errors
/// The error `$default` answers with (`BAD_REQUEST`, or `FORBIDDEN` for a
/// `system` message from a non-admin), with what its `error` event echoes.
pub fn parse_client_event(body: &str, is_admin: bool) -> Result<ClientEvent, (RequestIds, Error)> {
    let frame = ClientFrame::parse(body).map_err(|e| (RequestIds::default(), e))?;
    frame.event(is_admin).map_err(|e| (frame.ids().clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MessageType;
    use crate::error::ErrorCode;

    fn ok(body: &str) -> ClientEvent {
        parse_client_event(body, false).unwrap_or_else(|(_, e)| panic!("{body}: {e}"))
    }

    fn refused(body: &str, is_admin: bool) -> (RequestIds, ErrorCode, String) {
        match parse_client_event(body, is_admin) {
            Ok(event) => panic!("{body} was accepted as {event:?}"),
            Err((ids, e)) => (ids, e.code(), e.client_message()),
        }
    }

    fn room(id: &str) -> RoomId {
        RoomId::parse(id).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_event_parses() {
        assert_eq!(
            ok(r#"{"type":"joinRoom","payload":{"roomId":"r1","afterSequenceId":4}}"#),
            ClientEvent::JoinRoom {
                target: JoinTarget::Room(room("r1")),
                after_sequence_id: Some(SequenceId::from_trusted(4)),
            }
        );
        assert_eq!(
            ok(r#"{"type":"joinRoom","payload":{"targetUserId":"bob"}}"#),
            ClientEvent::JoinRoom {
                target: JoinTarget::Direct(
                    UserId::parse("bob", "t").unwrap_or_else(|e| panic!("{e}"))
                ),
                after_sequence_id: None,
            }
        );
        // Both given: the room wins.
        assert!(matches!(
            ok(r#"{"type":"joinRoom","payload":{"roomId":"r1","targetUserId":"bob"}}"#),
            ClientEvent::JoinRoom {
                target: JoinTarget::Room(_),
                ..
            }
        ));
        assert_eq!(
            ok(r#"{"type":"leaveRoom","payload":{"roomId":"r1"}}"#),
            ClientEvent::LeaveRoom {
                room_id: room("r1")
            }
        );
        let ClientEvent::SendMessage { room_id, message } = ok(
            r#"{"type":"sendMessage","payload":{"roomId":"r1","content":" hi ","clientMessageId":"c1"}}"#,
        ) else {
            panic!("not a sendMessage");
        };
        assert_eq!(room_id, room("r1"));
        assert_eq!(message.content, " hi ");
        assert_eq!(message.kind, MessageType::Text);
        assert_eq!(
            ok(r#"{"type":"typing","payload":{"roomId":"r1","isTyping":false}}"#),
            ClientEvent::Typing {
                room_id: room("r1"),
                is_typing: false
            }
        );
        assert_eq!(
            ok(r#"{"type":"markRead","payload":{"roomId":"r1","sequenceId":7.0}}"#),
            ClientEvent::MarkRead {
                room_id: room("r1"),
                sequence_id: SequenceId::from_trusted(7)
            }
        );
        assert_eq!(ok(r#"{"type":"ping"}"#), ClientEvent::Ping);
        assert_eq!(
            ok(r#"{"type":"authenticate","payload":{"token":"a.b.c"}}"#),
            ClientEvent::Authenticate {
                token: "a.b.c".into()
            }
        );
        for payload in [r#"{}"#, r#"{"token":""}"#, r#"{"token":7}"#] {
            let body = format!(r#"{{"type":"authenticate","payload":{payload}}}"#);
            assert_eq!(refused(&body, false).1, ErrorCode::BadRequest, "{body}");
        }
        assert_eq!(
            ok(r#"{"type":"ping","payload":null}"#).kind(),
            RequestKind::Ping
        );
    }

    #[test]
    fn envelope_errors_echo_what_they_can() {
        let (ids, code, msg) = refused("{nope", false);
        assert_eq!(
            (ids, code, msg.as_str()),
            (
                RequestIds::default(),
                ErrorCode::BadRequest,
                "malformed JSON"
            )
        );
        // An unpaired surrogate is malformed JSON.
        assert_eq!(
            refused(r#"{"type":"ping","x":"\ud800"}"#, false).1,
            ErrorCode::BadRequest
        );
        for body in ["[]", "1", "\"ping\"", "null"] {
            let (_, code, msg) = refused(body, false);
            assert_eq!(
                (code, msg.as_str()),
                (ErrorCode::BadRequest, "a message must be a JSON object")
            );
        }
        let (ids, _, msg) = refused(r#"{"type":5,"payload":{"clientMessageId":"c9"}}"#, false);
        assert_eq!(msg, "type must be a string");
        assert_eq!(ids.request_type, None);
        assert_eq!(ids.client_message_id.as_deref(), Some("c9"));
        let (ids, _, msg) = refused(r#"{"type":"dance"}"#, false);
        assert_eq!(msg, "unknown type dance");
        assert_eq!(ids.request_type.as_deref(), Some("dance"));
        let (_, _, msg) = refused(r#"{"type":"ping","payload":[1]}"#, false);
        assert_eq!(msg, "payload must be a JSON object");
    }

    #[test]
    fn field_errors_keep_their_order_and_echo_the_client_message_id() {
        // roomId is checked before the message fields.
        let (ids, code, msg) = refused(
            r#"{"type":"sendMessage","payload":{"content":"","clientMessageId":"dup"}}"#,
            false,
        );
        assert_eq!(
            (code, msg.as_str()),
            (ErrorCode::BadRequest, "roomId is required")
        );
        assert_eq!(ids.client_message_id.as_deref(), Some("dup"));
        assert_eq!(ids.request_type.as_deref(), Some("sendMessage"));
        // afterSequenceId before the room.
        let (_, _, msg) = refused(
            r#"{"type":"joinRoom","payload":{"afterSequenceId":-1}}"#,
            false,
        );
        assert_eq!(msg, "afterSequenceId must be a non-negative integer");
        // A non-string targetUserId is refused even beside a good roomId.
        let (_, _, msg) = refused(
            r#"{"type":"joinRoom","payload":{"roomId":"r","targetUserId":1}}"#,
            false,
        );
        assert_eq!(msg, "targetUserId must be a string");
        let (_, _, msg) = refused(r#"{"type":"joinRoom","payload":{}}"#, false);
        assert_eq!(msg, "roomId or targetUserId is required");
        let (_, _, msg) = refused(
            r#"{"type":"typing","payload":{"roomId":"r","isTyping":"yes"}}"#,
            false,
        );
        assert_eq!(msg, "isTyping must be a boolean");
        let (_, _, msg) = refused(r#"{"type":"markRead","payload":{"roomId":"r"}}"#, false);
        assert_eq!(msg, "sequenceId is required");
        let (_, _, msg) = refused(r#"{"type":"leaveRoom","payload":{"roomId":""}}"#, false);
        assert_eq!(msg, "roomId must be a string of 1-128 characters");
    }

    #[test]
    fn system_messages_need_an_admin() {
        let body =
            r#"{"type":"sendMessage","payload":{"roomId":"r","content":"x","type":"system"}}"#;
        assert_eq!(refused(body, false).1, ErrorCode::Forbidden);
        assert!(parse_client_event(body, true).is_ok());
    }
}
