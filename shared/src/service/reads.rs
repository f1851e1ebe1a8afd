//! Read cursors: `markRead`, `POST /rooms/{roomId}/read`, and unread counts.

use serde::Serialize;

use crate::auth::AuthUser;
use crate::bus::{Target, event_json};
use crate::domain::{RoomId, SequenceId};
use crate::error::Result;
use crate::model::rfc3339_millis;

use super::{Chat, require_member};

impl Chat {
    /// Moves the caller's read cursor (forward only, clamped) and sends a
    /// `readReceipt` to the room when it moved. Returns the cursor.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "markRead", user_id = %user.id, room_id = %room_id))]
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
    #[tracing::instrument(skip_all, fields(
        request_kind = "unreadCount", user_id = %user.id, room_id = %room_id))]
    pub async fn unread_count(&self, user: &AuthUser, room_id: &RoomId) -> Result<i64> {
        let db = self.store.conn().await?;
        let (_, cursor) = require_member(&db, user, room_id).await?;
        db.unread_count(room_id.as_str(), &user.id, cursor).await
    }
}
