//! Retention: deleting the messages a room no longer keeps. Sends delete
//! what they push out of the window themselves ([`super::BATCH_SQL`],
//! [`super::SINGLE_SQL`]).

use super::{Conn, Store};
use crate::domain::RoomId;
use crate::error::{Error, Result};

impl Store {
    /// Applies retention to every room at once: deletes each room's
    /// messages older than its newest `retention` (0 keeps all). Sends
    /// delete only what they push out of the window (module docs), so
    /// this catches what they cannot: the surplus left after
    /// `MESSAGE_RETENTION` was lowered. One statement. Returns how many
    /// messages were deleted.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn cleanup_all(&self, retention: i64) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM messages m USING rooms r
                  WHERE m.room_id = r.id AND $1::bigint > 0
                    AND m.sequence_id <= r.last_sequence_id - $1::bigint",
            )
            .await?;
        Ok(client.execute(&stmt, &[&retention]).await?)
    }
}

impl Conn {
    /// Applies retention to one room now; returns (deleted, kept).
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room.
    pub async fn cleanup(&self, room_id: &RoomId) -> Result<(i64, i64)> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(
                "WITH r AS (SELECT last_sequence_id FROM rooms WHERE id = $1),
                 d AS (
                   DELETE FROM messages USING r
                    WHERE messages.room_id = $1 AND $2::bigint > 0
                      AND messages.sequence_id <= r.last_sequence_id - $2::bigint
                   RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM r) AS found,
                        (SELECT count(*) FROM d) AS deleted,
                        (SELECT count(*) FROM messages WHERE room_id = $1) - (SELECT count(*) FROM d) AS kept",
            )
            .await?;
        let row = client
            .query_one(&stmt, &[&room_id.as_str(), &self.retention])
            .await?;
        if row.get::<_, i64>("found") == 0 {
            return Err(Error::not_found("room not found"));
        }
        Ok((row.get("deleted"), row.get("kept")))
    }
}
