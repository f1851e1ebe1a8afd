//! Domain types, parsed once at the edge ("parse, don't validate").
//!
//! Every value that arrives from a client (a WebSocket payload, a REST body or
//! path, a token claim) becomes one of these types before the use cases see
//! it, so the core never re-checks raw strings. The rules are PROTOCOL.md's:
//! user ids are 1–64 chars of `[A-Za-z0-9_.:-]`, content is at most 4,000
//! Unicode scalar values and not blank, metadata is a JSON object of at most
//! 8 KiB, and nothing may contain U+0000 (PostgreSQL `text` and `jsonb`
//! cannot store it).

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;

/// Longest message content, in Unicode scalar values.
pub const MAX_CONTENT_CHARS: usize = 4000;
/// Largest metadata object, as serialized UTF-8 JSON.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Longest `clientMessageId`.
pub const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 64;
/// Longest room id a client may send (ours are 31 chars; the limit keeps
/// garbage out of queries and logs).
pub const MAX_ROOM_ID_CHARS: usize = 128;
/// Longest GROUP room name.
pub const MAX_ROOM_NAME_CHARS: usize = 200;
/// Longest CALL id.
pub const MAX_CALL_ID_CHARS: usize = 128;
/// Most user ids accepted in one `memberIds` / `userIds` list.
pub const MAX_MEMBER_IDS: usize = 1000;

/// The client requests of PROTOCOL §2: the one list of their wire names,
/// and what each costs (what `$default` checks, admits and counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `joinRoom`.
    JoinRoom,
    /// `leaveRoom`.
    LeaveRoom,
    /// `sendMessage`.
    SendMessage,
    /// `typing`.
    Typing,
    /// `markRead`.
    MarkRead,
    /// **new** `ping`.
    Ping,
    /// **new** `authenticate`.
    Authenticate,
}

impl RequestKind {
    /// Every request, in PROTOCOL's order.
    pub const ALL: [Self; 7] = [
        Self::JoinRoom,
        Self::LeaveRoom,
        Self::SendMessage,
        Self::Typing,
        Self::MarkRead,
        Self::Ping,
        Self::Authenticate,
    ];

    /// The wire name (a frame's `type`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JoinRoom => "joinRoom",
            Self::LeaveRoom => "leaveRoom",
            Self::SendMessage => "sendMessage",
            Self::Typing => "typing",
            Self::MarkRead => "markRead",
            Self::Ping => "ping",
            Self::Authenticate => "authenticate",
        }
    }

    /// The request of a wire name, if it is one.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether it needs PostgreSQL (and so waits for admission and can be
    /// shed); `ping`, `leaveRoom` and `authenticate` only touch Redis and
    /// always go through.
    pub const fn needs_postgres(self) -> bool {
        matches!(
            self,
            Self::SendMessage | Self::JoinRoom | Self::MarkRead | Self::Typing
        )
    }

    /// Whether it is charged to the connection's message rate (all but
    /// `ping`).
    pub const fn metered(self) -> bool {
        !matches!(self, Self::Ping)
    }

    /// Whether it is refused while the relays deliver far behind: the
    /// requests that drive the fan-out.
    pub const fn sheddable(self) -> bool {
        matches!(self, Self::SendMessage)
    }

    /// Whether an expired or revoked token closes the connection at this
    /// request: all but `authenticate`, which may bring a fresh token.
    pub const fn checks_expiry(self) -> bool {
        !matches!(self, Self::Authenticate)
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether PostgreSQL can store the string unchanged.
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

/// A required string field of 1..=`max` chars that PostgreSQL can store.
fn bounded_string(value: &str, field: &str, max: usize) -> Result<String, Error> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(Error::bad_request(format!(
            "{field} must be a string of 1-{max} characters"
        )));
    }
    if !storable(value) {
        return Err(Error::bad_request(format!(
            "{field} must not contain U+0000"
        )));
    }
    Ok(value.to_owned())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wraps a value read back from our own storage, which was
            /// validated when it was written.
            pub fn from_trusted(value: String) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A user id: the token's `sub`, 1–64 chars of `[A-Za-z0-9_.:-]`.
    UserId
);
string_newtype!(
    /// A room id (`room_<ULID>` for rooms we create).
    RoomId
);
string_newtype!(
    /// A message id (`msg_<ULID>`).
    MessageId
);
string_newtype!(
    /// An idempotency key chosen by the client, 1–64 chars.
    ClientMessageId
);

impl UserId {
    /// Parses a user id.
    ///
    /// # Errors
    /// `BAD_REQUEST` naming `field` when the id is empty, too long, or has a
    /// character outside `[A-Za-z0-9_.:-]`.
    pub fn parse(value: &str, field: &str) -> Result<Self, Error> {
        let ok = (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(Error::bad_request(format!(
                "{field} must be 1-64 characters of A-Z, a-z, 0-9, _ . : -"
            )))
        }
    }
}

impl RoomId {
    /// Parses a room id sent by a client.
    ///
    /// # Errors
    /// `BAD_REQUEST` when it is empty, longer than 128 chars, or holds U+0000.
    pub fn parse(value: &str) -> Result<Self, Error> {
        bounded_string(value, "roomId", MAX_ROOM_ID_CHARS).map(Self)
    }

    /// A fresh room id.
    pub fn generate() -> Self {
        Self(format!("room_{}", ulid::Ulid::generate()))
    }
}

impl MessageId {
    /// A fresh message id; ULIDs sort by creation time.
    pub fn generate() -> Self {
        Self(format!("msg_{}", ulid::Ulid::generate()))
    }
}

impl ClientMessageId {
    /// Parses an idempotency key.
    ///
    /// # Errors
    /// `BAD_REQUEST` when it is empty, longer than 64 chars, or holds U+0000.
    pub fn parse(value: &str) -> Result<Self, Error> {
        bounded_string(value, "clientMessageId", MAX_CLIENT_MESSAGE_ID_CHARS).map(Self)
    }
}

/// A position in a room's message sequence (1, 2, 3, ...; 0 means "before
/// the first message").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct SequenceId(i64);

impl SequenceId {
    /// Before the first message.
    pub const ZERO: Self = Self(0);

    /// The raw value.
    pub fn get(self) -> i64 {
        self.0
    }

    /// Wraps a value read from storage.
    pub fn from_trusted(value: i64) -> Self {
        Self(value)
    }

    /// Parses a JSON value that must be a non-negative integer. JSON has one
    /// number type, so an integral value written with a fraction or an
    /// exponent (`5.0`, `5e0`, as some encoders of doubles emit) is that
    /// integer, as the baseline's `Number.isSafeInteger` takes it.
    ///
    /// # Errors
    /// `BAD_REQUEST` naming `field` for anything else (strings, fractions,
    /// negatives, values beyond 2^53).
    pub fn from_json(value: &Value, field: &str) -> Result<Self, Error> {
        let integral = value.as_i64().or_else(|| {
            value
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64)
                .map(|f| f as i64)
        });
        match integral {
            Some(n) if (0..=MAX_SAFE_INTEGER).contains(&n) => Ok(Self(n)),
            _ => Err(Error::bad_request(format!(
                "{field} must be a non-negative integer"
            ))),
        }
    }

    /// Parses a query-string value of 1–15 decimal digits.
    ///
    /// # Errors
    /// `BAD_REQUEST` naming `field` for anything else.
    pub fn from_query(value: &str, field: &str) -> Result<Self, Error> {
        parse_query_int(value, field, 0, MAX_SAFE_INTEGER).map(Self)
    }
}

/// JavaScript's largest exact integer: the ceiling for ids that clients on
/// any platform can hold in a JSON number.
pub const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Parses a query-string integer in `min..=max`.
///
/// # Errors
/// `BAD_REQUEST` naming `field` when it is not 1–15 ASCII digits or is out of
/// range.
pub fn parse_query_int(value: &str, field: &str, min: i64, max: i64) -> Result<i64, Error> {
    if value.is_empty() || value.len() > 15 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::bad_request(format!("{field} must be an integer")));
    }
    let n: i64 = value
        .parse()
        .map_err(|_| Error::bad_request(format!("{field} must be an integer")))?;
    if n < min || n > max {
        return Err(Error::bad_request(format!(
            "{field} must be between {min} and {max}"
        )));
    }
    Ok(n)
}

/// The kinds of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum RoomType {
    /// Exactly two users; one room per unordered pair.
    Direct,
    /// A named room with members.
    Group,
    /// One room per `callId`, with participants.
    Call,
}

impl RoomType {
    /// The stored (and wire) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "DIRECT",
            Self::Group => "GROUP",
            Self::Call => "CALL",
        }
    }

    /// Reads a stored room type; the table's CHECK constraint allows no other
    /// values, so anything else is treated as GROUP.
    pub fn from_stored(value: &str) -> Self {
        match value {
            "DIRECT" => Self::Direct,
            "CALL" => Self::Call,
            _ => Self::Group,
        }
    }
}

/// The kinds of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// Plain text (the default).
    Text,
    /// An image; content may be empty when metadata describes it.
    Image,
    /// A gift; content may be empty when metadata describes it.
    Gift,
    /// A system notice; only admins may send it.
    System,
}

impl MessageType {
    /// The stored (and wire) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Gift => "gift",
            Self::System => "system",
        }
    }

    /// Parses a wire name.
    ///
    /// # Errors
    /// `BAD_REQUEST` for an unknown name.
    pub fn parse(value: &str) -> Result<Self, Error> {
        match value {
            "text" => Ok(Self::Text),
            "image" => Ok(Self::Image),
            "gift" => Ok(Self::Gift),
            "system" => Ok(Self::System),
            _ => Err(Self::unknown()),
        }
    }

    fn unknown() -> Error {
        Error::bad_request("type must be one of text, image, gift, system")
    }

    /// Reads a stored message type (constrained by a CHECK).
    pub fn from_stored(value: &str) -> Self {
        Self::parse(value).unwrap_or(Self::Text)
    }
}

/// A message to store, validated: what `sendMessage` and
/// `POST /rooms/:roomId/messages` both take.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Stored exactly as sent (not trimmed).
    pub content: String,
    /// The message kind.
    pub kind: MessageType,
    /// A JSON object, or none.
    pub metadata: Option<Value>,
    /// The idempotency key, if the client sent one.
    pub client_message_id: Option<ClientMessageId>,
}

impl NewMessage {
    /// Validates `{content, type?, metadata?, clientMessageId?}`.
    ///
    /// `is_admin` decides whether `system` messages are allowed.
    ///
    /// # Errors
    /// `BAD_REQUEST` for a bad field, `FORBIDDEN` for a `system` message from
    /// a non-admin.
    pub fn parse(payload: &Map<String, Value>, is_admin: bool) -> Result<Self, Error> {
        let kind = match payload.get("type") {
            None | Some(Value::Null) => MessageType::Text,
            Some(Value::String(s)) => MessageType::parse(s)?,
            Some(_) => return Err(MessageType::unknown()),
        };
        if kind == MessageType::System && !is_admin {
            return Err(Error::forbidden("only an admin may send system messages"));
        }
        let metadata = match payload.get("metadata") {
            None | Some(Value::Null) => None,
            Some(value @ Value::Object(_)) => {
                let size = serde_json::to_vec(value)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > MAX_METADATA_BYTES {
                    return Err(Error::bad_request("metadata exceeds 8 KiB"));
                }
                if !json_storable(value) {
                    return Err(Error::bad_request("metadata must not contain U+0000"));
                }
                Some(value.clone())
            }
            Some(_) => return Err(Error::bad_request("metadata must be a JSON object")),
        };
        // Only image and gift messages described by metadata may be empty.
        let may_be_empty =
            matches!(kind, MessageType::Image | MessageType::Gift) && metadata.is_some();
        let content = match payload.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if may_be_empty => String::new(),
            _ => return Err(Error::bad_request("content must be a string")),
        };
        if !storable(&content) {
            return Err(Error::bad_request("content must not contain U+0000"));
        }
        if content.chars().count() > MAX_CONTENT_CHARS {
            return Err(Error::bad_request("content exceeds 4000 characters"));
        }
        let blank = if content.is_empty() {
            !may_be_empty
        } else {
            is_blank(&content)
        };
        if blank {
            return Err(Error::bad_request("content must not be blank"));
        }
        let client_message_id = match payload.get("clientMessageId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(ClientMessageId::parse(s)?),
            Some(_) => {
                return Err(Error::bad_request(
                    "clientMessageId must be a string of 1-64 characters",
                ));
            }
        };
        Ok(Self {
            content,
            kind,
            metadata,
            client_message_id,
        })
    }

    /// The text shown as a room's `lastMessageText`.
    pub fn preview(&self) -> &str {
        &self.content
    }
}

/// Empty or only white space, as JavaScript's `trim()` sees it (the
/// baseline's rule): Unicode `White_Space` plus the byte-order mark, but not
/// U+0085 (NEXT LINE), which `trim()` keeps.
pub fn is_blank(s: &str) -> bool {
    s.chars()
        .all(|c| (c.is_whitespace() && c != '\u{85}') || c == '\u{feff}')
}

fn json_storable(value: &Value) -> bool {
    match value {
        Value::String(s) => storable(s),
        Value::Array(items) => items.iter().all(json_storable),
        Value::Object(map) => map.iter().all(|(k, v)| storable(k) && json_storable(v)),
        _ => true,
    }
}

/// A GROUP room name: 1–200 chars, not blank.
///
/// # Errors
/// `BAD_REQUEST` otherwise.
pub fn parse_room_name(value: Option<&Value>) -> Result<String, Error> {
    match value {
        Some(Value::String(s)) if !is_blank(s) => bounded_string(s, "name", MAX_ROOM_NAME_CHARS),
        _ => Err(Error::bad_request("name must be a non-blank string")),
    }
}

/// A list of user ids (`memberIds`, `userIds`): at most 1,000, duplicates
/// dropped, order kept.
///
/// # Errors
/// `BAD_REQUEST` when it is not an array of valid user ids.
pub fn parse_user_ids(value: Option<&Value>, field: &str) -> Result<Vec<UserId>, Error> {
    let items = match value {
        Some(Value::Array(items)) if items.len() <= MAX_MEMBER_IDS => items,
        _ => {
            return Err(Error::bad_request(format!(
                "{field} must be an array of at most {MAX_MEMBER_IDS} user ids"
            )));
        }
    };
    let mut ids: Vec<UserId> = Vec::with_capacity(items.len());
    for item in items {
        let id = match item {
            Value::String(s) => UserId::parse(s, &format!("{field}[]"))?,
            _ => return Err(Error::bad_request(format!("{field}[] must be a user id"))),
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Reads a required string field.
///
/// # Errors
/// `BAD_REQUEST` naming the field when it is absent or not a string.
pub fn required_str<'a>(payload: &'a Map<String, Value>, field: &str) -> Result<&'a str, Error> {
    match payload.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Error::bad_request(format!("{field} must be a string"))),
        None => Err(Error::bad_request(format!("{field} is required"))),
    }
}

/// Reads an optional field that must be a string when present (null counts
/// as absent).
///
/// # Errors
/// `BAD_REQUEST` naming the field when it is present but not a string.
pub fn optional_str<'a>(
    payload: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, Error> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Error::bad_request(format!("{field} must be a string"))),
    }
}

/// Reads an optional non-negative integer field (null counts as absent).
///
/// # Errors
/// `BAD_REQUEST` naming the field for any other value.
pub fn optional_sequence(
    payload: &Map<String, Value>,
    field: &str,
) -> Result<Option<SequenceId>, Error> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => SequenceId::from_json(v, field).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test payloads are objects"),
        }
    }

    #[test]
    fn user_ids_follow_the_protocol_alphabet() {
        assert!(UserId::parse("u1", "sub").is_ok());
        assert!(UserId::parse("A.b:c-d_9", "sub").is_ok());
        assert!(UserId::parse(&"x".repeat(64), "sub").is_ok());
        assert!(UserId::parse(&"x".repeat(65), "sub").is_err());
        assert!(UserId::parse("", "sub").is_err());
        assert!(UserId::parse("a b", "sub").is_err());
        assert!(UserId::parse("é", "sub").is_err());
        assert!(UserId::parse("a'; DROP TABLE users;--", "sub").is_err());
    }

    #[test]
    fn content_is_counted_in_scalar_values_and_stored_as_sent() {
        let ok = NewMessage::parse(&obj(json!({"content": "😀".repeat(4000)})), false);
        assert_eq!(ok.map(|m| m.content.chars().count()).ok(), Some(4000));
        let long = NewMessage::parse(&obj(json!({"content": "a".repeat(4001)})), false);
        assert!(long.is_err());
        let padded = NewMessage::parse(&obj(json!({"content": "  hi  "})), false);
        assert_eq!(padded.map(|m| m.content).ok().as_deref(), Some("  hi  "));
    }

    #[test]
    fn blank_content_is_refused_except_described_media() {
        for content in ["", "   ", "\n\t", "\u{feff}", "\u{3000}\u{a0}\u{2028}"] {
            assert!(NewMessage::parse(&obj(json!({"content": content})), false).is_err());
        }
        // JavaScript's trim() keeps U+0085, so it is content.
        assert!(NewMessage::parse(&obj(json!({"content": "\u{85}"})), false).is_ok());
        let image = NewMessage::parse(
            &obj(json!({"type": "image", "metadata": {"url": "x"}})),
            false,
        );
        assert_eq!(image.map(|m| m.content).ok().as_deref(), Some(""));
        let gift = NewMessage::parse(
            &obj(json!({"type": "gift", "content": "", "metadata": {}})),
            false,
        );
        assert!(gift.is_ok());
        let bare_image = NewMessage::parse(&obj(json!({"type": "image", "content": ""})), false);
        assert!(bare_image.is_err());
        let blank_image = NewMessage::parse(
            &obj(json!({"type": "image", "content": " ", "metadata": {}})),
            false,
        );
        assert!(blank_image.is_err());
    }

    #[test]
    fn bad_fields_are_bad_requests() {
        let cases = [
            json!({"content": 5}),
            json!({"content": "a\u{0}b"}),
            json!({"content": "hi", "type": "video"}),
            json!({"content": "hi", "type": 1}),
            json!({"content": "hi", "metadata": [1]}),
            json!({"content": "hi", "metadata": {"k": "x".repeat(9000)}}),
            json!({"content": "hi", "metadata": {"k": "\u{0}"}}),
            json!({"content": "hi", "clientMessageId": ""}),
            json!({"content": "hi", "clientMessageId": "x".repeat(65)}),
            json!({"content": "hi", "clientMessageId": 7}),
        ];
        for case in cases {
            let err = NewMessage::parse(&obj(case.clone()), false).err();
            assert_eq!(
                err.map(|e| e.code()),
                Some(crate::error::ErrorCode::BadRequest),
                "{case}"
            );
        }
    }

    #[test]
    fn only_admins_send_system_messages() {
        let p = obj(json!({"content": "maintenance", "type": "system"}));
        assert_eq!(
            NewMessage::parse(&p, false).err().map(|e| e.code()),
            Some(crate::error::ErrorCode::Forbidden)
        );
        assert!(NewMessage::parse(&p, true).is_ok());
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_a_nul() {
        // The text \u0000 (backslash, "u0000") is six storable characters.
        let p = obj(json!({"content": "\\u0000", "metadata": {"\\u0000": "a\\u0000"}}));
        let message = NewMessage::parse(&p, false).expect("accepted");
        assert_eq!(message.metadata, Some(json!({"\\u0000": "a\\u0000"})));
    }

    #[test]
    fn metadata_limit_is_inclusive() {
        // {"k":"..."} is 8 bytes of framing.
        let exact =
            obj(json!({"content": "x", "metadata": {"k": "y".repeat(MAX_METADATA_BYTES - 8)}}));
        assert!(NewMessage::parse(&exact, false).is_ok());
        let over =
            obj(json!({"content": "x", "metadata": {"k": "y".repeat(MAX_METADATA_BYTES - 7)}}));
        assert!(NewMessage::parse(&over, false).is_err());
    }

    #[test]
    fn query_integers_are_strict() {
        assert_eq!(parse_query_int("50", "limit", 1, 100).ok(), Some(50));
        for bad in [
            "",
            "0",
            "101",
            "-1",
            "1.5",
            "abc",
            " 5",
            "1e2",
            "9999999999999999",
        ] {
            assert!(parse_query_int(bad, "limit", 1, 100).is_err(), "{bad}");
        }
    }

    #[test]
    fn sequence_ids_from_json() {
        assert!(SequenceId::from_json(&json!(0), "s").is_ok());
        assert_eq!(
            SequenceId::from_json(&json!(5.0), "s").ok(),
            Some(SequenceId(5))
        );
        assert_eq!(
            SequenceId::from_json(&json!(9_007_199_254_740_991.0), "s").ok(),
            Some(SequenceId(MAX_SAFE_INTEGER))
        );
        assert!(SequenceId::from_json(&json!(9_007_199_254_740_992.0), "s").is_err());
        assert!(SequenceId::from_json(&json!(9_007_199_254_740_992_i64), "s").is_err());
        assert!(SequenceId::from_json(&json!(-1.0), "s").is_err());
        assert!(SequenceId::from_json(&json!(null), "s").is_err());
        assert!(SequenceId::from_json(&json!(-1), "s").is_err());
        assert!(SequenceId::from_json(&json!(1.5), "s").is_err());
        assert!(SequenceId::from_json(&json!("3"), "s").is_err());
    }

    #[test]
    fn user_id_lists_are_deduplicated() {
        let ids = parse_user_ids(Some(&json!(["a", "b", "a"])), "memberIds");
        assert_eq!(ids.map(|v| v.len()).ok(), Some(2));
        assert!(parse_user_ids(Some(&json!("a")), "memberIds").is_err());
        assert!(parse_user_ids(Some(&json!(["bad id"])), "memberIds").is_err());
    }
}
