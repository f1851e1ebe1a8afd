//! The internal bus (PROTOCOL.md §5): envelopes on Redis pub/sub channels,
//! one per partition (`<BROADCAST_CHANNEL>:{p<n>}`,
//! [`crate::presence::Keys::bus_channel`]), chosen by the partition of
//! the envelope's ordering key ([`Envelope::channel_key`]): every envelope
//! of one key goes on one channel, so they stay in publish order. On a
//! Redis Cluster they are published with `SPUBLISH` (sharded pub/sub):
//! each reaches only the shard that owns its channel's slot, where the
//! relays hold a subscription, instead of being broadcast to every node.
//!
//! Handlers publish every outbound event as an [`Envelope`] naming its
//! targets; the relay resolves targets to connection ids and pushes the
//! `event` JSON, byte for byte, with `PostToConnection`. The event is kept
//! as raw JSON so the relay forwards it without re-serializing.
//!
//! ```json
//! {"origin": "instance-1", "target": {"type": "room", "roomId": "room_01J..."},
//!  "exclude": ["L0SM9cOFvHcCIhw="], "excludeUsers": ["u1"], "sequenceId": 42,
//!  "event": {"type": "message", "payload": {...}}}
//! ```
//!
//! What the relay routes and orders by travels on the envelope: the target
//! (the room), the ordering key and, for a room's `message`, its
//! `sequenceId`; the relay never parses the event.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::metrics::CountedRedis;
use crate::presence::{Keys, RedisConn};

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Target {
    /// The connections joined to a room.
    #[serde(rename_all = "camelCase")]
    Room {
        /// The room.
        room_id: String,
    },
    /// The connections joined to any of several rooms (each gets it once).
    #[serde(rename_all = "camelCase")]
    Rooms {
        /// The rooms.
        room_ids: Vec<String>,
    },
    /// Every connection of a user.
    #[serde(rename_all = "camelCase")]
    User {
        /// The user.
        user_id: String,
    },
    /// One connection.
    #[serde(rename_all = "camelCase")]
    Connection {
        /// The connection id.
        connection_id: String,
    },
}

impl Target {
    /// The ordering key of an envelope to this target without a key of
    /// its own: the room (the first of several), user or connection id.
    pub fn key(&self) -> &str {
        match self {
            Target::Room { room_id } => room_id,
            Target::Rooms { room_ids } => room_ids.first().map_or("", String::as_str),
            Target::User { user_id } => user_id,
            Target::Connection { connection_id } => connection_id,
        }
    }
}

/// One bus message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The publishing instance (for logs).
    pub origin: String,
    /// Who receives the event.
    pub target: Target,
    /// Connection ids to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// User ids whose connections are left out (`typing` skips the typist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_users: Vec<String>,
    /// Connection ids that get a room event although they may not have
    /// joined the room: the sender of a `message` always gets it (it is the
    /// acknowledgement).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// `{"type": ..., "payload": ...}`, exactly as clients receive it; absent
    /// for control envelopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Box<RawValue>>,
    /// An instruction to the relay instead of an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// Envelopes with the same ordering key are delivered in publish order;
    /// when absent the key is the target's room, user or connection id.
    /// Presence envelopes carry the user id, so a user's online and offline
    /// can never overtake each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When a room event was published (ms since the epoch, the
    /// publisher's clock): the relay measures its delivery lag from it, and
    /// the gateways shed sends while the lag is high
    /// (`Realtime::with_admission`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// A room's `message` event: its sequence id (the one in the event's
    /// payload), which the relay orders, deduplicates and fills gaps by.
    /// Absent on every other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_id: Option<i64>,
}

impl Envelope {
    /// The room and sequence id of a room's `message` event; `None` for
    /// every other envelope.
    pub fn room_message(&self) -> Option<(&str, i64)> {
        match (&self.target, self.sequence_id, &self.event) {
            (Target::Room { room_id }, Some(sequence_id), Some(_)) => {
                Some((room_id.as_str(), sequence_id))
            }
            _ => None,
        }
    }

    /// What picks the envelope's bus channel: its ordering key, except
    /// that a `Control::Sync` or `Control::Joined` goes by its room, so it
    /// follows the room's
    /// messages on their channel (the relay orders it with them).
    pub fn channel_key(&self) -> &str {
        match &self.control {
            Some(Control::Sync { room_id, .. } | Control::Joined { room_id, .. }) => room_id,
            _ => self.ordering_key(),
        }
    }

    /// The ordering key (see [`Envelope::key`]).
    pub fn ordering_key(&self) -> &str {
        if let Some(key) = &self.key {
            return key;
        }
        self.target.key()
    }
}

/// Instructions to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Control {
    /// A connection joined a room while messages were being sent: push it
    /// every stored message above its watermark that it has not had yet.
    /// Published by joins before [`Control::Joined`] existed; the relay
    /// still honours it while older functions drain during a deploy.
    #[serde(rename_all = "camelCase")]
    Sync {
        /// The room.
        room_id: String,
        /// The connection.
        connection_id: String,
    },
    /// A connection joined a room (`joinRoom`): post it the envelope's
    /// event, its `roomJoined`, then every stored message above its
    /// watermark, and only then count its subscription, which the join made
    /// *pending*, as joined. Handled by the room's worker, in order with the
    /// room's messages, so no live event of the room reaches the connection
    /// before its `roomJoined` (docs/ARCHITECTURE.md, "Entering a room").
    /// Published by the join's Redis script from a [`JoinedTemplate`].
    #[serde(rename_all = "camelCase")]
    Joined {
        /// The room.
        room_id: String,
        /// The connection.
        connection_id: String,
        /// The watermark of the subscription: the highest sequence id the
        /// `roomJoined` holds.
        watermark: i64,
        /// The room's highest published sequence id when the subscription
        /// was made: the relay pushes the stored messages above the
        /// watermark up to (at least) this one.
        published: i64,
    },
    /// A connection that is no longer registered (Redis lost it) sent a
    /// frame: close it at API Gateway (`DeleteConnection`), so its client
    /// reconnects and registers again. Its route is gone from Redis, so the
    /// envelope carries it.
    #[serde(rename_all = "camelCase")]
    Close {
        /// The connection.
        connection_id: String,
        /// Its Management API endpoint.
        endpoint: String,
    },
}

/// One join's [`Control::Joined`] envelope, in the three pieces around the
/// two values that only the join's Redis script knows: the members online
/// (the `roomJoined` event's `onlineUsers` array) and the room's highest
/// published sequence id. The script publishes
/// `head + onlineUsers + middle + published + tail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedTemplate {
    /// Up to the `onlineUsers` array.
    pub head: String,
    /// From after the array up to the `published` number.
    pub middle: String,
    /// The rest.
    pub tail: String,
}

impl JoinedTemplate {
    /// The template of `connection_id` joining `room_id` (see
    /// [`Bus::joined`]), published by `origin`.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn new(
        origin: &str,
        room_id: &str,
        connection_id: &str,
        watermark: i64,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        // Markers no real value can take: a string with a NUL and a random
        // tag, and a negative sequence id; each must occur exactly once.
        let tag: u64 = rand::random();
        let online = format!("\u{0}online-{tag:016x}");
        let published = -i64::try_from(tag >> 2).unwrap_or(1) - 1;
        payload.insert(
            "onlineUsers".into(),
            serde_json::Value::String(online.clone()),
        );
        let event =
            RawValue::from_string(event_json("roomJoined", &payload)?).map_err(Error::internal)?;
        let envelope = Envelope {
            origin: origin.to_owned(),
            target: Target::Connection {
                connection_id: connection_id.to_owned(),
            },
            exclude: Vec::new(),
            exclude_users: Vec::new(),
            include: Vec::new(),
            event: Some(event),
            control: Some(Control::Joined {
                room_id: room_id.to_owned(),
                connection_id: connection_id.to_owned(),
                watermark,
                published,
            }),
            key: None,
            ts: Some(chrono::Utc::now().timestamp_millis()),
            sequence_id: None,
        };
        let json = serde_json::to_string(&envelope).map_err(Error::internal)?;
        let online = serde_json::to_string(&online).map_err(Error::internal)?;
        let (head, rest) = split_at_marker(&json, &online)?;
        let (middle, tail) = split_at_marker(rest, &format!(r#""published":{published}"#))?;
        Ok(Self {
            head: head.to_owned(),
            middle: format!(r#"{middle}"published":"#),
            tail: tail.to_owned(),
        })
    }

    /// The envelope as the script publishes it (for tests, and for a
    /// subscription made some other way).
    pub fn fill(&self, online_users: &[&str], published: i64) -> String {
        let online = serde_json::to_string(online_users).unwrap_or_else(|_| "[]".to_owned());
        format!(
            "{}{online}{}{published}{}",
            self.head, self.middle, self.tail
        )
    }
}

/// Splits `json` around the one occurrence of `marker`.
fn split_at_marker<'a>(json: &'a str, marker: &str) -> Result<(&'a str, &'a str)> {
    let mut found = json.match_indices(marker);
    match (found.next(), found.next()) {
        (Some((at, _)), None) => Ok((&json[..at], &json[at + marker.len()..])),
        _ => Err(Error::internal(anyhow::anyhow!(
            "the roomJoined template marker is not unique"
        ))),
    }
}

/// Serializes a server event `{"type": kind, "payload": payload}`.
///
/// # Errors
/// Only if `payload` fails to serialize, which our types cannot.
pub fn event_json<P: Serialize>(kind: &str, payload: &P) -> Result<String> {
    #[derive(Serialize)]
    struct Event<'a, P> {
        #[serde(rename = "type")]
        kind: &'a str,
        payload: &'a P,
    }
    serde_json::to_string(&Event { kind, payload }).map_err(Error::internal)
}

/// Raises a room's highest published sequence id (KEYS[1]) to ARGV[1]
/// (TTL ARGV[2] s) and publishes ARGV[5] with command ARGV[3] on the
/// room's channel ARGV[4] (in the slot of KEYS[1]).
const PUBLISH_MESSAGE: &str = r"
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return redis.call(ARGV[3], ARGV[4], ARGV[5])
";

static PUBLISH_MESSAGE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PUBLISH_MESSAGE));

/// How long a room's highest published sequence id is kept after its last
/// message. A join only needs it for messages published while it ran
/// (milliseconds); an hour is ample and lets idle rooms cost nothing.
const ROOM_SEQ_TTL_SECS: u64 = 3600;

/// Publishes envelopes on the bus channels.
#[derive(Clone)]
pub struct Bus {
    redis: RedisConn,
    channel: String,
    origin: String,
    keys: Keys,
}

crate::debug_fields!(Bus { channel, origin });

impl Bus {
    /// A publisher on the channels of `channel` (the base name), naming
    /// itself `origin`, that records each room's highest published
    /// sequence id under `keys`.
    pub fn new(redis: RedisConn, channel: String, origin: String, keys: Keys) -> Self {
        Self {
            redis,
            channel,
            origin,
            keys,
        }
    }

    /// The base name of the channels.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The name this publisher gives itself in envelopes.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Builds the envelope JSON for `event` (see [`event_json`]), ordered
    /// by `key` when given.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn envelope(
        &self,
        target: Target,
        event: String,
        exclude: Vec<String>,
        exclude_users: Vec<String>,
        key: Option<String>,
    ) -> Result<String> {
        let envelope = Envelope {
            origin: self.origin.clone(),
            target,
            exclude,
            exclude_users,
            include: Vec::new(),
            event: Some(RawValue::from_string(event).map_err(Error::internal)?),
            control: None,
            key,
            ts: None,
            sequence_id: None,
        };
        serde_json::to_string(&envelope).map_err(Error::internal)
    }

    /// The `presenceUpdate` envelope of `user_id` (`status` `online` or
    /// `offline`) for the members of `rooms`, ordered by the user id so a
    /// user's online and offline never overtake each other; `None` when
    /// they are in no room.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn presence_update(
        &self,
        user_id: &crate::domain::UserId,
        status: &str,
        rooms: Vec<String>,
    ) -> Result<Option<String>> {
        if rooms.is_empty() {
            return Ok(None);
        }
        let timestamp = crate::model::rfc3339_millis(&chrono::Utc::now());
        let event = event_json(
            "presenceUpdate",
            &serde_json::json!({"userId": user_id, "status": status, "timestamp": timestamp}),
        )?;
        self.envelope(
            Target::Rooms { room_ids: rooms },
            event,
            Vec::new(),
            Vec::new(),
            Some(user_id.to_string()),
        )
        .map(Some)
    }

    /// Publishes a ready envelope.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn publish_envelope(&self, envelope: &Envelope) -> Result<()> {
        let payload = serde_json::to_string(envelope).map_err(Error::internal)?;
        self.publish_raw(envelope.channel_key(), payload).await
    }

    /// Publishes a room's new `message` envelope ([`Bus::message_event`])
    /// and records its sequence id as the room's highest published one, in
    /// one step (one round trip): what lets a join that subscribes at the
    /// same moment tell whether it missed the fan-out
    /// ([`crate::presence::Presence::join`]).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer; `INTERNAL` for an envelope
    /// that is no room's `message`.
    pub async fn publish_room_message(&self, envelope: &Envelope) -> Result<()> {
        let (room_id, sequence_id) = envelope
            .room_message()
            .ok_or_else(|| Error::internal(anyhow::anyhow!("not a room's message")))?;
        let payload = serde_json::to_string(envelope).map_err(Error::internal)?;
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = PUBLISH_MESSAGE_SCRIPT
            .key(self.keys.room_seq(room_id))
            .arg(sequence_id)
            .arg(ROOM_SEQ_TTL_SECS)
            .arg(self.redis.publish_command())
            .arg(Keys::bus_channel_of(&self.channel, room_id))
            .arg(payload)
            .invoke_async(&mut redis)
            .await?;
        Ok(())
    }

    /// A room's new `message` event with its sequence id, also delivered
    /// to `include`.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn message_event(
        &self,
        room_id: &str,
        sequence_id: i64,
        event: String,
        include: Vec<String>,
    ) -> Result<Envelope> {
        Ok(Envelope {
            sequence_id: Some(sequence_id),
            ..self.room_event(room_id, event, include)?
        })
    }

    /// Another event for a room (no sequence id), also delivered to
    /// `include`.
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn room_event(
        &self,
        room_id: &str,
        event: String,
        include: Vec<String>,
    ) -> Result<Envelope> {
        Ok(Envelope {
            origin: self.origin.clone(),
            target: Target::Room {
                room_id: room_id.to_owned(),
            },
            exclude: Vec::new(),
            exclude_users: Vec::new(),
            include,
            event: Some(RawValue::from_string(event).map_err(Error::internal)?),
            control: None,
            key: None,
            ts: Some(chrono::Utc::now().timestamp_millis()),
            sequence_id: None,
        })
    }

    /// A control envelope for the relay.
    pub fn control(&self, target: Target, control: Control) -> Envelope {
        Envelope {
            origin: self.origin.clone(),
            target,
            exclude: Vec::new(),
            exclude_users: Vec::new(),
            include: Vec::new(),
            event: None,
            control: Some(control),
            key: None,
            ts: None,
            sequence_id: None,
        }
    }

    /// The [`Control::Joined`] envelope of `connection_id` joining
    /// `room_id`, whose `roomJoined` event has `payload` plus the
    /// `onlineUsers` that the join's script fills in (see
    /// [`JoinedTemplate`]).
    ///
    /// # Errors
    /// Only if serialization fails.
    pub fn joined(
        &self,
        room_id: &str,
        connection_id: &str,
        watermark: i64,
        payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<JoinedTemplate> {
        JoinedTemplate::new(&self.origin, room_id, connection_id, watermark, payload)
    }

    /// Publishes `payload` on the channel of `channel_key`.
    async fn publish_raw(&self, channel_key: &str, payload: String) -> Result<()> {
        let mut redis = CountedRedis(self.redis.clone());
        let _: i64 = redis::cmd(self.redis.publish_command())
            .arg(Keys::bus_channel_of(&self.channel, channel_key))
            .arg(payload)
            .query_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Publishes `event` to `target`.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn publish(&self, target: Target, event: String) -> Result<()> {
        self.publish_excluding(target, event, Vec::new(), Vec::new())
            .await
    }

    /// Publishes `event` to `target`, leaving out some connections and users.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn publish_excluding(
        &self,
        target: Target,
        event: String,
        exclude: Vec<String>,
        exclude_users: Vec<String>,
    ) -> Result<()> {
        let channel_key = target.key().to_owned();
        let payload = self.envelope(target, event, exclude, exclude_users, None)?;
        self.publish_raw(&channel_key, payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_template_filled_in_is_the_envelope_with_its_values() {
        let mut payload = serde_json::Map::new();
        // Content that looks like the markers stays as it is.
        payload.insert(
            "messages".into(),
            serde_json::json!([{"content": "\"published\":-1 onlineUsers \u{0}online-"}]),
        );
        payload.insert("unreadCount".into(), 0.into());
        let template = JoinedTemplate::new("gw", "room_1", "c1", 3, payload).expect("template");
        let json = template.fill(&["u1", "u/2"], 7);
        let back: Envelope = serde_json::from_str(&json).expect("parses");
        assert_eq!(
            back.control,
            Some(Control::Joined {
                room_id: "room_1".into(),
                connection_id: "c1".into(),
                watermark: 3,
                published: 7,
            })
        );
        assert_eq!(
            back.target,
            Target::Connection {
                connection_id: "c1".into()
            }
        );
        let event: serde_json::Value =
            serde_json::from_str(back.event.expect("event").get()).expect("event JSON");
        assert_eq!(event["type"], "roomJoined");
        assert_eq!(
            event["payload"]["onlineUsers"],
            serde_json::json!(["u1", "u/2"])
        );
        assert_eq!(
            event["payload"]["messages"][0]["content"],
            "\"published\":-1 onlineUsers \u{0}online-"
        );
        let empty: Envelope = serde_json::from_str(&template.fill(&[], 0)).expect("parses");
        assert!(
            empty
                .event
                .expect("event")
                .get()
                .contains(r#""onlineUsers":[]"#)
        );
    }

    #[test]
    fn envelopes_round_trip_with_the_event_untouched() {
        let target = Target::Room {
            room_id: "room_1".into(),
        };
        let event = r#"{"type":"typing","payload":{"roomId":"room_1","isTyping":true}}"#;
        let json = serde_json::to_string(&Envelope {
            origin: "a".into(),
            target: target.clone(),
            exclude: vec![],
            exclude_users: vec!["u1".into()],
            include: vec![],
            event: Some(RawValue::from_string(event.into()).expect("valid")),
            control: None,
            key: None,
            ts: None,
            sequence_id: None,
        })
        .expect("serializes");
        assert!(json.contains(r#""target":{"type":"room","roomId":"room_1"}"#));
        assert!(json.contains(r#""excludeUsers":["u1"]"#));
        let back: Envelope = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.target, target);
        assert_eq!(
            back.event.map(|e| e.get().to_owned()).as_deref(),
            Some(event)
        );
    }

    #[test]
    fn a_room_message_carries_its_sequence_id_and_nothing_else_does() {
        let message = Envelope {
            origin: "a".into(),
            target: Target::Room {
                room_id: "room_1".into(),
            },
            exclude: vec![],
            exclude_users: vec![],
            include: vec!["c1".into()],
            event: Some(
                RawValue::from_string(r#"{"type":"message","payload":{"sequenceId":7}}"#.into())
                    .expect("valid"),
            ),
            control: None,
            key: None,
            ts: Some(1),
            sequence_id: Some(7),
        };
        let json = serde_json::to_string(&message).expect("serializes");
        assert!(json.contains(r#""sequenceId":7"#), "{json}");
        let back: Envelope = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.room_message(), Some(("room_1", 7)));
        // Another event to a room, or a message to one connection, has none.
        let receipt = Envelope {
            sequence_id: None,
            ..serde_json::from_str(&json).expect("parses")
        };
        assert_eq!(receipt.room_message(), None);
        let direct = Envelope {
            target: Target::Connection {
                connection_id: "c1".into(),
            },
            ..serde_json::from_str(&json).expect("parses")
        };
        assert_eq!(direct.room_message(), None);
    }
}
