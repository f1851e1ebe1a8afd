//! Users, rooms and their members, and entering a room.

use std::collections::HashMap;

use tokio_postgres::Row;

use super::messages::message_from_row;
use super::{Conn, Page, RoomForUser};
use crate::auth::AuthUser;
use crate::domain::{RoomId, RoomType, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::model::{Member, Profile, RoomRow};

pub(super) const ROOM_COLS: &str = "r.id, r.type, r.name, r.call_id, r.user1_id, r.user2_id, \
     r.last_sequence_id, r.last_message_at, r.last_message_text, r.created_at";

pub(super) fn member_from_row(row: &Row) -> Member {
    Member {
        profile: Profile {
            id: UserId::from_trusted(row.get("id")),
            username: row.get("username"),
            display_name: row.get("display_name"),
            avatar: row.get("avatar"),
        },
        cursor: SequenceId::from_trusted(row.get("last_read_sequence_id")),
    }
}

pub(super) fn room_from_row(row: &Row) -> RoomRow {
    RoomRow {
        id: row.get("id"),
        kind: RoomType::from_stored(row.get("type")),
        name: row.get("name"),
        call_id: row.get("call_id"),
        user1_id: row.get("user1_id"),
        user2_id: row.get("user2_id"),
        last_sequence_id: SequenceId::from_trusted(row.get("last_sequence_id")),
        last_message_at: row.get("last_message_at"),
        last_message_text: row.get("last_message_text"),
        created_at: row.get("created_at"),
    }
}

/// Which room [`Conn::enter_room`] enters.
#[derive(Debug, Clone, Copy)]
pub enum RoomKey<'a> {
    /// A room by id.
    Id(&'a RoomId),
    /// The DIRECT room with this user, created when missing.
    DirectWith(&'a UserId),
}

/// What [`Conn::enter_room`] read.
#[derive(Debug, Clone)]
pub struct Entered {
    /// The room.
    pub room: RoomRow,
    /// The caller's cursor (always `Some`: non-members get `FORBIDDEN`).
    pub cursor: Option<SequenceId>,
    /// The caller's unread count.
    pub unread_count: i64,
    /// Whether this call created the (DIRECT) room.
    pub created: bool,
    /// The members, in join order.
    pub members: Vec<Member>,
    /// The page of history, ascending, without `readBy`.
    pub page: Page,
}

impl Conn {
    /// Enters a room in one round trip ([`chat_enter_room`] in
    /// `migrations/V2__join_room.sql`): finds the room (a DIRECT room with
    /// `target` is created with both members when missing; concurrent
    /// creators get the same room), checks the caller's membership, and
    /// reads the members, one page of history and the caller's unread
    /// count.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room or DIRECT partner, `FORBIDDEN` for a
    /// non-member.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn enter_room(
        &self,
        user_id: &UserId,
        room: RoomKey<'_>,
        after: Option<SequenceId>,
        limit: i64,
    ) -> Result<Entered> {
        let client = &self.client;
        let stmt = client
            .prepare_cached("SELECT * FROM chat_enter_room($1, $2, $3, $4, $5, $6)")
            .await?;
        let (room_id, target) = match room {
            RoomKey::Id(id) => (Some(id.as_str()), None),
            RoomKey::DirectWith(target) => (None, Some(target.as_str())),
        };
        let new_id = target.map(|_| RoomId::generate());
        let rows = client
            .query(
                &stmt,
                &[
                    &room_id,
                    &user_id.as_str(),
                    &target,
                    &new_id.as_ref().map(RoomId::as_str),
                    &after.map(SequenceId::get),
                    &limit,
                ],
            )
            .await?;
        let mut entered: Option<Entered> = None;
        let mut messages = Vec::new();
        for row in &rows {
            match row.get::<_, &str>("kind") {
                "no_user" => return Err(Error::not_found("user not found")),
                "room" => {
                    entered = Some(Entered {
                        room: room_from_row(row),
                        cursor: row
                            .get::<_, Option<i64>>("cursor")
                            .map(SequenceId::from_trusted),
                        unread_count: row.get::<_, Option<i64>>("unread").unwrap_or(0),
                        created: row.get::<_, Option<bool>>("created").unwrap_or(false),
                        members: Vec::new(),
                        page: Page {
                            messages: Vec::new(),
                            has_more: false,
                        },
                    });
                }
                "member" => {
                    if let Some(entered) = entered.as_mut() {
                        entered.members.push(member_from_row(row));
                    }
                }
                "message" => messages.push(message_from_row(row)?),
                other => {
                    return Err(Error::internal(anyhow::anyhow!(
                        "chat_enter_room returned a row of kind {other:?}"
                    )));
                }
            }
        }
        let mut entered = entered.ok_or_else(|| Error::not_found("room not found"))?;
        if entered.cursor.is_none() {
            return Err(Error::forbidden("not a member of this room"));
        }
        entered.page.has_more = messages.len() as i64 > limit;
        messages.truncate(limit.max(0) as usize);
        if after.is_none() {
            // The newest page comes newest first.
            messages.reverse();
        }
        entered.page.messages = messages;
        Ok(entered)
    }

    /// Records the caller, refreshing their profile when the claims changed.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    #[tracing::instrument(skip_all, fields(user_id = %user.id))]
    pub async fn upsert_user(&self, user: &AuthUser) -> Result<()> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "INSERT INTO users (id, username, display_name, avatar) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                   SET username = EXCLUDED.username, display_name = EXCLUDED.display_name,
                       avatar = EXCLUDED.avatar, updated_at = now()
                 WHERE (users.username, users.display_name, users.avatar)
                       IS DISTINCT FROM (EXCLUDED.username, EXCLUDED.display_name, EXCLUDED.avatar)",
            )
            .await?;
        client
            .execute(
                &stmt,
                &[
                    &user.id.as_str(),
                    &user.username,
                    &user.display_name,
                    &user.avatar,
                ],
            )
            .await?;
        Ok(())
    }

    /// Which of `ids` are known users.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn existing_users(&self, ids: &[UserId]) -> Result<Vec<UserId>> {
        let client = &self.client;
        let stmt = client
            .prepare_cached("SELECT id FROM users WHERE id = ANY($1)")
            .await?;
        let raw: Vec<&str> = ids.iter().map(UserId::as_str).collect();
        let rows = client.query(&stmt, &[&raw]).await?;
        Ok(rows
            .iter()
            .map(|r| UserId::from_trusted(r.get(0)))
            .collect())
    }

    /// The room and the caller's membership, in one query.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room.
    pub async fn room_for_user(&self, room_id: &RoomId, user_id: &UserId) -> Result<RoomForUser> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ROOM_COLS}, m.last_read_sequence_id AS cursor
                   FROM rooms r
                   LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2
                  WHERE r.id = $1"
            ))
            .await?;
        let row = client
            .query_opt(&stmt, &[&room_id.as_str(), &user_id.as_str()])
            .await?
            .ok_or_else(|| Error::not_found("room not found"))?;
        Ok(RoomForUser {
            room: room_from_row(&row),
            cursor: row
                .get::<_, Option<i64>>("cursor")
                .map(SequenceId::from_trusted),
        })
    }

    /// Members (profiles and cursors) of several rooms, in join order.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn members(&self, room_ids: &[&str]) -> Result<HashMap<String, Vec<Member>>> {
        let mut by_room: HashMap<String, Vec<Member>> = room_ids
            .iter()
            .map(|id| ((*id).to_owned(), Vec::new()))
            .collect();
        if room_ids.is_empty() {
            return Ok(by_room);
        }
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "SELECT rm.room_id, rm.last_read_sequence_id, u.id, u.username, u.display_name, u.avatar
                   FROM room_members rm JOIN users u ON u.id = rm.user_id
                  WHERE rm.room_id = ANY($1)
                  ORDER BY rm.joined_at, u.id",
            )
            .await?;
        for row in client.query(&stmt, &[&room_ids]).await? {
            let member = member_from_row(&row);
            by_room.entry(row.get("room_id")).or_default().push(member);
        }
        Ok(by_room)
    }

    /// Members of one room.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn room_members(&self, room_id: &str) -> Result<Vec<Member>> {
        Ok(self
            .members(&[room_id])
            .await?
            .remove(room_id)
            .unwrap_or_default())
    }

    /// The ids of the rooms `user_id` is a member of.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn member_room_ids(&self, user_id: &UserId) -> Result<Vec<String>> {
        let client = &self.client;
        let stmt = client
            .prepare_cached("SELECT room_id FROM room_members WHERE user_id = $1")
            .await?;
        let rows = client.query(&stmt, &[&user_id.as_str()]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The DIRECT room of two users, created (with both as members) when it
    /// does not exist yet. Safe against concurrent creators.
    ///
    /// # Errors
    /// `NOT_FOUND` when `target` is not a known user.
    pub async fn get_or_create_direct(&self, me: &UserId, target: &UserId) -> Result<RoomId> {
        let (a, b) = if me < target {
            (me, target)
        } else {
            (target, me)
        };
        let client = &self.client;
        let find = client
            .prepare_cached(
                "SELECT id FROM rooms
                  WHERE type = 'DIRECT'
                    AND LEAST(user1_id, user2_id) = LEAST($1::text, $2::text)
                    AND GREATEST(user1_id, user2_id) = GREATEST($1::text, $2::text)",
            )
            .await?;
        if let Some(row) = client.query_opt(&find, &[&a.as_str(), &b.as_str()]).await? {
            return Ok(RoomId::from_trusted(row.get(0)));
        }
        if self
            .existing_users(std::slice::from_ref(target))
            .await?
            .is_empty()
        {
            return Err(Error::not_found("user not found"));
        }
        let create = client
            .prepare_cached(
                "WITH r AS (
                   INSERT INTO rooms (id, type, user1_id, user2_id, created_by)
                   VALUES ($1, 'DIRECT', $2, $3, $4)
                   ON CONFLICT ((LEAST(user1_id, user2_id)), (GREATEST(user1_id, user2_id)))
                     WHERE type = 'DIRECT' DO NOTHING
                   RETURNING id
                 ), m AS (
                   INSERT INTO room_members (room_id, user_id)
                   SELECT r.id, u FROM r, unnest(ARRAY[$2::text, $3::text]) AS u
                 )
                 SELECT id FROM r",
            )
            .await?;
        let id = RoomId::generate();
        let created = client
            .query_opt(
                &create,
                &[&id.as_str(), &a.as_str(), &b.as_str(), &me.as_str()],
            )
            .await?;
        if created.is_some() {
            return Ok(id);
        }
        // A concurrent creator won; its room is committed by now.
        let row = client.query_one(&find, &[&a.as_str(), &b.as_str()]).await?;
        Ok(RoomId::from_trusted(row.get(0)))
    }

    /// Creates a GROUP room, or a CALL room unless one exists for the call
    /// id. Returns the room id and whether it was created.
    ///
    /// # Errors
    /// `FORBIDDEN` for an existing CALL room the caller is not a member of.
    pub async fn create_room(
        &self,
        kind: RoomType,
        name: Option<&str>,
        call_id: Option<&str>,
        creator: &UserId,
        members: &[UserId],
    ) -> Result<(RoomId, bool)> {
        let client = &self.client;
        let create = client
            .prepare_cached(
                "WITH r AS (
                   INSERT INTO rooms (id, type, name, call_id, created_by)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (call_id) WHERE call_id IS NOT NULL DO NOTHING
                   RETURNING id
                 ), m AS (
                   INSERT INTO room_members (room_id, user_id)
                   SELECT r.id, u FROM r, unnest($6::text[]) AS u
                 )
                 SELECT id FROM r",
            )
            .await?;
        let id = RoomId::generate();
        let raw: Vec<&str> = members.iter().map(UserId::as_str).collect();
        let created = client
            .query_opt(
                &create,
                &[
                    &id.as_str(),
                    &kind.as_str(),
                    &name,
                    &call_id,
                    &creator.as_str(),
                    &raw,
                ],
            )
            .await?;
        if created.is_some() {
            return Ok((id, true));
        }
        // The call id is taken (the conflicting insert waited for its creator
        // to commit): answer with that room, to its members only.
        let existing = client
            .prepare_cached(
                "SELECT r.id, EXISTS (SELECT 1 FROM room_members m
                                       WHERE m.room_id = r.id AND m.user_id = $2) AS is_member
                   FROM rooms r WHERE r.call_id = $1",
            )
            .await?;
        let row = client
            .query_one(&existing, &[&call_id, &creator.as_str()])
            .await?;
        if !row.get::<_, bool>("is_member") {
            return Err(Error::forbidden(
                "a room exists for this callId and you are not a member",
            ));
        }
        Ok((RoomId::from_trusted(row.get("id")), false))
    }

    /// Adds members (existing ones are skipped).
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn add_members(&self, room_id: &RoomId, users: &[UserId]) -> Result<()> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "INSERT INTO room_members (room_id, user_id)
                 SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            )
            .await?;
        let raw: Vec<&str> = users.iter().map(UserId::as_str).collect();
        client.execute(&stmt, &[&room_id.as_str(), &raw]).await?;
        Ok(())
    }

    /// Removes a member; `false` when they were not one.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn remove_member(&self, room_id: &RoomId, user: &UserId) -> Result<bool> {
        let client = &self.client;
        let stmt = client
            .prepare_cached("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
            .await?;
        Ok(client
            .execute(&stmt, &[&room_id.as_str(), &user.as_str()])
            .await?
            > 0)
    }

    /// The caller's rooms, newest activity first (rooms without messages by
    /// creation time), with each room's unread count.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn rooms_of(&self, user_id: &UserId) -> Result<Vec<(RoomRow, i64)>> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ROOM_COLS},
                        (SELECT count(*) FROM messages x
                          WHERE x.room_id = r.id AND x.sequence_id > m.last_read_sequence_id
                            AND x.sender_id <> m.user_id) AS unread
                   FROM room_members m JOIN rooms r ON r.id = m.room_id
                  WHERE m.user_id = $1
                  ORDER BY COALESCE(r.last_message_at, r.created_at) DESC, r.id DESC"
            ))
            .await?;
        let rows = client.query(&stmt, &[&user_id.as_str()]).await?;
        Ok(rows
            .iter()
            .map(|r| (room_from_row(r), r.get::<_, i64>("unread")))
            .collect())
    }

    /// The row of a room, whoever asks.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room.
    pub async fn room(&self, room_id: &RoomId) -> Result<RoomRow> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms r WHERE r.id = $1"))
            .await?;
        let row = client
            .query_opt(&stmt, &[&room_id.as_str()])
            .await?
            .ok_or_else(|| Error::not_found("room not found"))?;
        Ok(room_from_row(&row))
    }
}
