//! The use cases: what REST routes and WebSocket events do, independent of
//! the transport.
//!
//! Each method takes the authenticated caller and parsed domain values,
//! enforces the rules of PROTOCOL.md §3 (membership, admin, retention,
//! cursors), touches PostgreSQL through [`Store`] and Redis through
//! [`Presence`], and publishes the events other connections must see on the
//! [`Bus`]. Replies to the caller are return values.

use serde::Serialize;

use crate::auth::AuthUser;
use crate::bus::{Bus, Target, event_json};
use crate::domain::{NewMessage, RoomId, RoomType, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::limits::Limiter;
use crate::model::{Member, Message, Room, RoomRow, rfc3339_millis};
use crate::presence::Presence;
use crate::store::{Conn, PageQuery, RoomKey, Store, Stored};

/// Messages in `roomJoined` and `POST /direct` without `afterSequenceId`.
pub const SNAPSHOT_MESSAGES: i64 = 50;
/// Most messages in a `roomJoined` with `afterSequenceId`.
pub const RECOVERY_MESSAGES: i64 = 100;

/// The service: the repository, presence, the bus and the rate limits.
#[derive(Debug, Clone)]
pub struct Chat {
    store: Store,
    presence: Presence,
    bus: Bus,
    limiter: Limiter,
}

/// Everything a client needs on entering a room.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The room row.
    pub room: RoomRow,
    /// Its members, with cursors.
    pub members: Vec<Member>,
    /// The requested page, `readBy` filled in.
    pub messages: Vec<Message>,
    /// Whether more of the requested range exists beyond the page.
    pub has_more: bool,
    /// The caller's unread count.
    pub unread_count: i64,
}

impl Snapshot {
    /// The room view.
    pub fn room_view(&self) -> Room {
        self.room.view(&self.members)
    }
}

/// One entry of `GET /rooms`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RoomSummary {
    /// The room.
    #[serde(flatten)]
    pub room: Room,
    /// The newest message, if any (a list, as the original API had it).
    pub messages: Vec<Message>,
    /// The caller's unread count.
    pub unread_count: i64,
}

/// A `POST /rooms` request, parsed.
#[derive(Debug, Clone)]
pub enum NewRoom {
    /// A named group.
    Group {
        /// Name.
        name: String,
        /// Members besides the creator.
        member_ids: Vec<UserId>,
    },
    /// A call room, one per call id.
    Call {
        /// The call id.
        call_id: String,
        /// Optional name.
        name: Option<String>,
        /// Participants besides the creator.
        member_ids: Vec<UserId>,
    },
}

impl Chat {
    /// The service over its adapters.
    pub fn new(store: Store, presence: Presence, bus: Bus, limiter: Limiter) -> Self {
        Self {
            store,
            presence,
            bus,
            limiter,
        }
    }

    /// The PostgreSQL repository.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Redis presence side.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// The bus publisher.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The rate limits and `typing` coalescing.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Makes the caller known and refreshes their profile (PROTOCOL §1).
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn authenticate(&self, user: &AuthUser) -> Result<()> {
        self.store.conn().await?.upsert_user(user).await
    }

    /// Makes a connecting user known ([`Chat::authenticate`]) and returns
    /// the ids of their rooms (for the `online` presence update), pipelined
    /// on one connection.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn authenticate_with_rooms(&self, user: &AuthUser) -> Result<Vec<String>> {
        let db = self.store.conn().await?;
        let ((), rooms) = tokio::try_join!(db.upsert_user(user), db.member_room_ids(&user.id))?;
        Ok(rooms)
    }

    /// The ids of the rooms `user_id` is a member of.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn member_room_ids(&self, user_id: &UserId) -> Result<Vec<String>> {
        self.store.conn().await?.member_room_ids(user_id).await
    }

    /// The room a caller is a member of, or the error that explains why not.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`.
    pub async fn require_member(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
    ) -> Result<(RoomRow, SequenceId)> {
        require_member(&self.store.conn().await?, user, room_id).await
    }

    /// Room, members, a page of messages and the caller's unread count (the
    /// history route; joins use [`Chat::enter_room`]).
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn snapshot(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        page: PageQuery,
    ) -> Result<Snapshot> {
        let db = self.store.conn().await?;
        let (room, cursor) = require_member(&db, user, room_id).await?;
        let (members, page, unread_count) = tokio::try_join!(
            db.room_members(room_id.as_str()),
            db.page(room_id.as_str(), page),
            db.unread_count(room_id.as_str(), &user.id, cursor),
        )?;
        let messages = page
            .messages
            .into_iter()
            .map(|m| m.with_read_by(&members))
            .collect();
        Ok(Snapshot {
            room,
            members,
            messages,
            has_more: page.has_more,
            unread_count,
        })
    }

    /// Enters a room: finds it (the DIRECT room with a user is created when
    /// missing), checks membership, and reads the members, one page of
    /// history (the newest `limit` messages, or the oldest `limit` after
    /// `after`) and the caller's unread count. One PostgreSQL round trip
    /// ([`crate::store::Conn::enter_room`]).
    ///
    /// # Errors
    /// `BAD_REQUEST` for a DIRECT room with yourself, `NOT_FOUND` /
    /// `FORBIDDEN`, or a dependency failure.
    pub async fn enter_room(
        &self,
        user: &AuthUser,
        room: RoomKey<'_>,
        after: Option<SequenceId>,
        limit: i64,
    ) -> Result<Snapshot> {
        if let RoomKey::DirectWith(target) = room
            && *target == user.id
        {
            return Err(Error::bad_request(
                "cannot open a direct room with yourself",
            ));
        }
        let entered = self
            .store
            .conn()
            .await?
            .enter_room(&user.id, room, after, limit)
            .await?;
        let members = entered.members;
        let messages = entered
            .page
            .messages
            .into_iter()
            .map(|m| m.with_read_by(&members))
            .collect();
        Ok(Snapshot {
            room: entered.room,
            members,
            messages,
            has_more: entered.page.has_more,
            unread_count: entered.unread_count,
        })
    }

    /// Stores a message and broadcasts it to the room's joined connections.
    /// A repeated `clientMessageId` stores and broadcasts nothing and
    /// returns the original.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn send_message(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        message: &NewMessage,
    ) -> Result<Stored> {
        self.send_message_from(user, room_id, message, None).await
    }

    /// Like [`Chat::send_message`], from a WebSocket connection: the
    /// `message` event also goes to `connection_id` whether it joined the
    /// room or not (it is the sender's acknowledgement).
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn send_message_from(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        message: &NewMessage,
        connection_id: Option<&str>,
    ) -> Result<Stored> {
        match self.store.store_message(room_id, &user.id, message).await? {
            Stored::New(msg) => {
                let event = event_json("message", &msg)?;
                let include = connection_id.map(str::to_owned).into_iter().collect();
                let envelope = self.bus.message_event(
                    room_id.as_str(),
                    msg.sequence_id.get(),
                    event,
                    include,
                )?;
                self.bus.publish_room_message(&envelope).await?;
                Ok(Stored::New(msg))
            }
            Stored::Duplicate(msg) => {
                let members = self
                    .store
                    .conn()
                    .await?
                    .room_members(room_id.as_str())
                    .await?;
                Ok(Stored::Duplicate(msg.with_read_by(&members)))
            }
        }
    }

    /// Moves the caller's read cursor (forward only, clamped) and sends a
    /// `readReceipt` to the room when it moved. Returns the cursor.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn mark_read(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        sequence_id: SequenceId,
    ) -> Result<SequenceId> {
        let (cursor, moved) = self
            .store
            .conn()
            .await?
            .mark_read(room_id, &user.id, sequence_id)
            .await?;
        if moved {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct ReadReceipt<'a> {
                room_id: &'a str,
                user_id: &'a str,
                sequence_id: SequenceId,
                timestamp: String,
            }
            let event = event_json(
                "readReceipt",
                &ReadReceipt {
                    room_id: room_id.as_str(),
                    user_id: user.id.as_str(),
                    sequence_id: cursor,
                    timestamp: rfc3339_millis(&chrono::Utc::now()),
                },
            )?;
            self.bus
                .publish(
                    Target::Room {
                        room_id: room_id.to_string(),
                    },
                    event,
                )
                .await?;
        }
        Ok(cursor)
    }

    /// The caller's unread count in a room.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn unread_count(&self, user: &AuthUser, room_id: &RoomId) -> Result<i64> {
        let db = self.store.conn().await?;
        let (_, cursor) = require_member(&db, user, room_id).await?;
        db.unread_count(room_id.as_str(), &user.id, cursor).await
    }

    /// The members of a room with a live connection.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn online_in_room(&self, user: &AuthUser, room_id: &RoomId) -> Result<Vec<UserId>> {
        let members = {
            let db = self.store.conn().await?;
            require_member(&db, user, room_id).await?;
            db.room_members(room_id.as_str()).await?
        };
        self.online_members(&members).await
    }

    /// Which of `members` are online.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn online_members(&self, members: &[Member]) -> Result<Vec<UserId>> {
        let ids: Vec<UserId> = members.iter().map(|m| m.profile.id.clone()).collect();
        self.presence.online_among(&ids).await
    }

    /// The caller's rooms, newest activity first, each with its last message
    /// and unread count.
    ///
    /// # Errors
    /// A dependency failure.
    pub async fn list_rooms(&self, user: &AuthUser) -> Result<Vec<RoomSummary>> {
        let db = self.store.conn().await?;
        let rooms = db.rooms_of(&user.id).await?;
        let ids: Vec<&str> = rooms.iter().map(|(r, _)| r.id.as_str()).collect();
        let (mut members, mut last) = tokio::try_join!(db.members(&ids), db.last_messages(&ids))?;
        drop(db);
        Ok(rooms
            .iter()
            .map(|(row, unread_count)| {
                let room_members = members.remove(&row.id).unwrap_or_default();
                let messages = last
                    .remove(&row.id)
                    .map(|m| vec![m.with_read_by(&room_members)])
                    .unwrap_or_default();
                RoomSummary {
                    room: row.view(&room_members),
                    messages,
                    unread_count: *unread_count,
                }
            })
            .collect())
    }

    /// Applies retention to a room now (admin only). Returns (deleted, kept).
    ///
    /// # Errors
    /// `FORBIDDEN` for a non-admin, `NOT_FOUND` for an unknown room.
    pub async fn cleanup(&self, user: &AuthUser, room_id: &RoomId) -> Result<(i64, i64)> {
        if !user.is_admin {
            return Err(Error::forbidden("admin only"));
        }
        self.store.conn().await?.cleanup(room_id).await
    }

    /// Creates a GROUP or CALL room with the caller as a member. Returns the
    /// room and whether it is new (an existing CALL room is not).
    ///
    /// # Errors
    /// `NOT_FOUND` for unknown members, `FORBIDDEN` for an existing CALL room
    /// the caller is not in.
    pub async fn create_room(&self, user: &AuthUser, request: NewRoom) -> Result<(Room, bool)> {
        let (kind, name, call_id, member_ids) = match request {
            NewRoom::Group { name, member_ids } => (RoomType::Group, Some(name), None, member_ids),
            NewRoom::Call {
                call_id,
                name,
                member_ids,
            } => (RoomType::Call, name, Some(call_id), member_ids),
        };
        let mut ids = vec![user.id.clone()];
        ids.extend(member_ids.into_iter().filter(|id| *id != user.id));
        let db = self.store.conn().await?;
        require_users(&db, &ids).await?;
        let (room_id, created) = db
            .create_room(kind, name.as_deref(), call_id.as_deref(), &user.id, &ids)
            .await?;
        Ok((room_view(&db, &room_id).await?, created))
    }

    /// Adds users to a GROUP or CALL room (any member may).
    ///
    /// # Errors
    /// `BAD_REQUEST` for an empty list or a DIRECT room, `FORBIDDEN` for a
    /// non-member caller, `NOT_FOUND` for an unknown room or user.
    pub async fn add_members(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        user_ids: &[UserId],
    ) -> Result<Room> {
        if user_ids.is_empty() {
            return Err(Error::bad_request("userIds must not be empty"));
        }
        let db = self.store.conn().await?;
        let (room, _) = require_member(&db, user, room_id).await?;
        if room.kind == RoomType::Direct {
            return Err(Error::bad_request(
                "the members of a DIRECT room cannot change",
            ));
        }
        require_users(&db, user_ids).await?;
        db.add_members(room_id, user_ids).await?;
        room_view(&db, room_id).await
    }

    /// Removes a member (yourself, or anyone if you are an admin); their
    /// joined connections are unsubscribed and told `roomLeft`.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room or a non-member target, `FORBIDDEN`
    /// for removing someone else without being admin, `BAD_REQUEST` for a
    /// DIRECT room.
    pub async fn remove_member(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        target: &UserId,
    ) -> Result<()> {
        let db = self.store.conn().await?;
        let room = db.room(room_id).await?;
        if *target != user.id && !user.is_admin {
            return Err(Error::forbidden(
                "only the member themself or an admin may remove a member",
            ));
        }
        if room.kind == RoomType::Direct {
            return Err(Error::bad_request(
                "the members of a DIRECT room cannot change",
            ));
        }
        if !db.remove_member(room_id, target).await? {
            return Err(Error::not_found("not a member of this room"));
        }
        // Redis next: the connection goes back to the pool first.
        drop(db);
        let left = self.presence.unsubscribe_user(room_id, target).await?;
        if !left.is_empty() {
            let event = event_json("roomLeft", &serde_json::json!({ "roomId": room_id }))?;
            for connection_id in left {
                self.bus
                    .publish(Target::Connection { connection_id }, event.clone())
                    .await?;
            }
        }
        Ok(())
    }
}

/// The room a caller is a member of, or the error that explains why not.
async fn require_member(
    db: &Conn,
    user: &AuthUser,
    room_id: &RoomId,
) -> Result<(RoomRow, SequenceId)> {
    let found = db.room_for_user(room_id, &user.id).await?;
    let cursor = found.member_cursor()?;
    Ok((found.room, cursor))
}

/// `NOT_FOUND` unless every one of `ids` is a known user. The message does
/// not say which ones are unknown: naming them would let any caller test
/// a thousand ids a request for existence.
async fn require_users(db: &Conn, ids: &[UserId]) -> Result<()> {
    let known = db.existing_users(ids).await?;
    if known.len() == ids.len() {
        return Ok(());
    }
    Err(Error::not_found("one or more users are unknown"))
}

/// The room view of a room (its row and members, pipelined).
async fn room_view(db: &Conn, room_id: &RoomId) -> Result<Room> {
    let (room, members) = tokio::try_join!(db.room(room_id), db.room_members(room_id.as_str()))?;
    Ok(room.view(&members))
}
