//! Rooms: entering one (`joinRoom`, the history route, `POST /direct`),
//! creating them, their members, the caller's list, and retention.

use serde::Serialize;

use crate::auth::AuthUser;
use crate::bus::{Target, event_json};
use crate::domain::{RoomId, RoomType, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::model::{Message, Room, RoomRow};
use crate::presence::Connection;
use crate::store::{PageQuery, RoomKey};

use super::{
    Chat, RECOVERY_MESSAGES, SNAPSHOT_MESSAGES, Snapshot, require_member, require_users, room_view,
};

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

/// What `joinRoom` found and subscribed to.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The room, its members, the page and the unread count.
    pub snapshot: Snapshot,
    /// The members with a live connection.
    pub online_users: Vec<UserId>,
    /// With `afterSequenceId`: whether every message after it was still
    /// stored (retention had not deleted any of them).
    pub recovered: Option<bool>,
}

impl Chat {
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
    #[tracing::instrument(skip_all, fields(
        request_kind = "history", user_id = %user.id, room_id = %room_id))]
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
    #[tracing::instrument(skip_all, fields(request_kind = "enterRoom", user_id = %user.id))]
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

    /// `joinRoom`: one PostgreSQL round trip ([`Chat::enter_room`]) and one
    /// Redis round trip ([`crate::presence::Presence::join`]) that
    /// subscribes the connection, pending, with the snapshot's watermark and
    /// publishes its `roomJoined` for the relay, which posts it before any
    /// other event of the room (so the `roomJoined` is not a route
    /// response).
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a connection that is gone; those of
    /// [`Chat::enter_room`].
    #[tracing::instrument(skip_all, fields(
        request_kind = "joinRoom", connection_id = %conn.connection_id, user_id = %conn.user.id))]
    pub async fn join_room(
        &self,
        conn: &Connection,
        room: RoomKey<'_>,
        after: Option<SequenceId>,
    ) -> Result<Joined> {
        let limit = if after.is_some() {
            RECOVERY_MESSAGES
        } else {
            SNAPSHOT_MESSAGES
        };
        let snapshot = self.enter_room(&conn.user, room, after, limit).await?;
        let room_id = RoomId::from_trusted(snapshot.room.id.clone());
        // The connection has every message up to here; the relay pushes
        // only newer ones.
        let newest_in_page = snapshot
            .messages
            .last()
            .map_or(SequenceId::ZERO, |m| m.sequence_id);
        let watermark = snapshot.room.last_sequence_id.max(newest_in_page);
        // Retention deletes a room's oldest messages, so everything after
        // `after` is still stored exactly when its first message is.
        let recovered = after.map(|after| match snapshot.messages.first() {
            Some(first) => first.sequence_id.get() == after.get() + 1,
            None => after >= snapshot.room.last_sequence_id,
        });
        let mut payload = serde_json::Map::new();
        payload.insert("room".into(), to_json(&snapshot.room_view())?);
        payload.insert("messages".into(), to_json(&snapshot.messages)?);
        payload.insert("unreadCount".into(), snapshot.unread_count.into());
        payload.insert("hasMore".into(), snapshot.has_more.into());
        if let Some(recovered) = recovered {
            payload.insert("recovered".into(), recovered.into());
        }
        let joined = self.bus.joined(
            room_id.as_str(),
            &conn.connection_id,
            watermark.get(),
            payload,
        )?;
        let member_ids: Vec<UserId> = snapshot
            .members
            .iter()
            .map(|m| m.profile.id.clone())
            .collect();
        let Some(online_users) = self
            .presence
            .join(
                &room_id,
                conn,
                watermark.get(),
                &member_ids,
                self.bus.channel(),
                &joined,
            )
            .await?
        else {
            return Err(Error::unauthorized(
                "this connection is no longer registered; reconnect",
            ));
        };
        Ok(Joined {
            snapshot,
            online_users,
            recovered,
        })
    }

    /// `leaveRoom`: unsubscribes a connection from a room (nothing if it
    /// had not joined).
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    #[tracing::instrument(skip_all, fields(
        request_kind = "leaveRoom", connection_id = %connection_id, room_id = %room_id))]
    pub async fn leave_room(&self, room_id: &RoomId, connection_id: &str) -> Result<()> {
        self.presence.leave(room_id, connection_id).await
    }

    /// The caller's rooms, newest activity first, each with its last message
    /// and unread count.
    ///
    /// # Errors
    /// A dependency failure.
    #[tracing::instrument(skip_all, fields(request_kind = "listRooms", user_id = %user.id))]
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
    #[tracing::instrument(skip_all, fields(request_kind = "cleanup", user_id = %user.id, room_id = %room_id))]
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
    #[tracing::instrument(skip_all, fields(request_kind = "createRoom", user_id = %user.id))]
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
    #[tracing::instrument(skip_all, fields(request_kind = "addMembers", user_id = %user.id, room_id = %room_id))]
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
    #[tracing::instrument(skip_all, fields(request_kind = "removeMember", user_id = %user.id, room_id = %room_id))]
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

/// `value` as JSON.
fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(Error::internal)
}
