//! Read cursors and unread counts.

use super::Conn;
use crate::domain::{RoomId, SequenceId, UserId};
use crate::error::Result;

impl Conn {
    /// Stored messages above the cursor that others sent.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn unread_count(
        &self,
        room_id: &str,
        user_id: &UserId,
        cursor: SequenceId,
    ) -> Result<i64> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "SELECT count(*) FROM messages
                  WHERE room_id = $1 AND sequence_id > $2 AND sender_id <> $3",
            )
            .await?;
        let row = client
            .query_one(&stmt, &[&room_id, &cursor.get(), &user_id.as_str()])
            .await?;
        Ok(row.get(0))
    }

    /// Moves the caller's cursor forward, clamped to the room's last
    /// sequence id. Returns the cursor after the call and whether it moved;
    /// the condition is re-checked on the locked row, so two concurrent
    /// calls cannot both claim the same move.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN` for an unknown room / a non-member.
    pub async fn mark_read(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        sequence_id: SequenceId,
    ) -> Result<(SequenceId, bool)> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "UPDATE room_members m SET last_read_sequence_id = LEAST($3::bigint, r.last_sequence_id)
                   FROM rooms r
                  WHERE r.id = $1 AND m.room_id = $1 AND m.user_id = $2
                    AND m.last_read_sequence_id < LEAST($3::bigint, r.last_sequence_id)
                  RETURNING m.last_read_sequence_id",
            )
            .await?;
        let moved = client
            .query_opt(
                &stmt,
                &[&room_id.as_str(), &user_id.as_str(), &sequence_id.get()],
            )
            .await?;
        match moved {
            Some(row) => Ok((SequenceId::from_trusted(row.get(0)), true)),
            None => {
                let cursor = self
                    .room_for_user(room_id, user_id)
                    .await?
                    .member_cursor()?;
                Ok((cursor, false))
            }
        }
    }
}
