//! The JSON shapes clients see (PROTOCOL.md §2 "Message object", §4 rooms).
//!
//! Field names are camelCase; timestamps are RFC 3339 UTC with milliseconds.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::domain::{MessageType, RoomType, SequenceId, UserId};

/// Serializes a timestamp as `2025-11-06T12:00:00.000Z`.
pub fn rfc3339_millis(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ts<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_millis(at))
}

fn opt_ts<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => ts(at, s),
        None => s.serialize_none(),
    }
}

/// A user's public profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// User id.
    pub id: UserId,
    /// Username (defaults to the id).
    pub username: String,
    /// Display name, if any.
    #[cfg_attr(feature = "http", schema(required))]
    pub display_name: Option<String>,
    /// Avatar URL, if any.
    #[cfg_attr(feature = "http", schema(required))]
    pub avatar: Option<String>,
}

/// A room member: profile plus read cursor (for `readBy`).
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's profile as it is now.
    pub profile: Profile,
    /// Highest sequence id the member has read.
    pub cursor: SequenceId,
}

/// A stored message, as every event and REST answer shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// `msg_<ULID>`.
    pub id: String,
    /// The room.
    pub room_id: String,
    /// The sender's id.
    pub sender_id: UserId,
    /// As sent.
    pub content: String,
    /// `text`, `image`, `gift` or `system`.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// A JSON object or null.
    #[cfg_attr(feature = "http", schema(value_type = Option<Object>))]
    #[cfg_attr(feature = "http", schema(required))]
    pub metadata: Option<Value>,
    /// Position in the room.
    pub sequence_id: SequenceId,
    /// The sender's idempotency key, or null.
    #[cfg_attr(feature = "http", schema(required))]
    pub client_message_id: Option<String>,
    /// The sender's profile as it is now.
    pub sender: Profile,
    /// Members other than the sender whose cursor has reached this message.
    pub read_by: Vec<UserId>,
    /// When it was stored.
    #[serde(serialize_with = "ts")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub created_at: DateTime<Utc>,
}

impl Message {
    /// Fills `readBy` from the room's members.
    pub fn with_read_by(mut self, members: &[Member]) -> Self {
        self.read_by = members
            .iter()
            .filter(|m| m.profile.id != self.sender_id && m.cursor >= self.sequence_id)
            .map(|m| m.profile.id.clone())
            .collect();
        self
    }
}

/// A room, with its members' profiles.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Room {
    /// `room_<ULID>`.
    pub id: String,
    /// DIRECT, GROUP or CALL.
    #[serde(rename = "type")]
    pub kind: RoomType,
    /// GROUP name (CALL rooms may have one too).
    #[cfg_attr(feature = "http", schema(required))]
    pub name: Option<String>,
    /// CALL rooms: the call id.
    #[cfg_attr(feature = "http", schema(required))]
    pub call_id: Option<String>,
    /// DIRECT rooms: the first user (ids sorted); null otherwise.
    #[cfg_attr(feature = "http", schema(required))]
    pub user1: Option<Profile>,
    /// DIRECT rooms: the second user; null otherwise.
    #[cfg_attr(feature = "http", schema(required))]
    pub user2: Option<Profile>,
    /// Every member's profile.
    pub members: Vec<Profile>,
    /// The newest sequence id used in the room.
    pub last_sequence_id: SequenceId,
    /// When the newest message was sent.
    #[serde(serialize_with = "opt_ts")]
    #[cfg_attr(feature = "http", schema(value_type = Option<String>, format = DateTime))]
    #[cfg_attr(feature = "http", schema(required))]
    pub last_message_at: Option<DateTime<Utc>>,
    /// The newest message's content.
    #[cfg_attr(feature = "http", schema(required))]
    pub last_message_text: Option<String>,
    /// When the room was created.
    #[serde(serialize_with = "ts")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub created_at: DateTime<Utc>,
}

/// A room's stored row, before its members are attached.
#[derive(Debug, Clone)]
pub struct RoomRow {
    /// Room id.
    pub id: String,
    /// Room type.
    pub kind: RoomType,
    /// Name.
    pub name: Option<String>,
    /// Call id.
    pub call_id: Option<String>,
    /// DIRECT: first user id.
    pub user1_id: Option<String>,
    /// DIRECT: second user id.
    pub user2_id: Option<String>,
    /// Sequence counter.
    pub last_sequence_id: SequenceId,
    /// Newest message time.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Newest message text.
    pub last_message_text: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl RoomRow {
    /// The client view, with `members` in join order.
    pub fn view(&self, members: &[Member]) -> Room {
        let side = |id: &Option<String>| {
            id.as_ref().and_then(|id| {
                members
                    .iter()
                    .find(|m| m.profile.id.as_str() == id)
                    .map(|m| m.profile.clone())
            })
        };
        let direct = self.kind == RoomType::Direct;
        Room {
            id: self.id.clone(),
            kind: self.kind,
            name: self.name.clone(),
            call_id: self.call_id.clone(),
            user1: if direct { side(&self.user1_id) } else { None },
            user2: if direct { side(&self.user2_id) } else { None },
            members: members.iter().map(|m| m.profile.clone()).collect(),
            last_sequence_id: self.last_sequence_id,
            last_message_at: self.last_message_at,
            last_message_text: self.last_message_text.clone(),
            created_at: self.created_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let at = DateTime::parse_from_rfc3339("2025-11-06T12:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(rfc3339_millis(&at), "2025-11-06T12:00:00.000Z");
    }

    #[test]
    fn read_by_leaves_out_the_sender_and_laggards() {
        let p = |id: &str| Profile {
            id: UserId::from_trusted(id.into()),
            username: id.into(),
            display_name: None,
            avatar: None,
        };
        let member = |id: &str, cursor| Member {
            profile: p(id),
            cursor: SequenceId::from_trusted(cursor),
        };
        let msg = Message {
            id: "msg_1".into(),
            room_id: "room_1".into(),
            sender_id: UserId::from_trusted("a".into()),
            content: "hi".into(),
            kind: MessageType::Text,
            metadata: None,
            sequence_id: SequenceId::from_trusted(5),
            client_message_id: None,
            sender: p("a"),
            read_by: vec![],
            created_at: Utc::now(),
        }
        .with_read_by(&[member("a", 9), member("b", 5), member("c", 4)]);
        assert_eq!(msg.read_by, vec![UserId::from_trusted("b".into())]);
    }
}
