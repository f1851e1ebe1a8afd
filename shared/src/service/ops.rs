//! The operator view (the console's `GET /console/api/ops`): the rooms with
//! the most subscribed connections, the busiest named, and connections per
//! gateway. Read-only; admins only (the caller checks).

use crate::domain::RoomId;
use crate::error::Result;
use crate::model::RoomRow;

use super::Chat;

/// One room of the operator view.
#[derive(Debug, Clone)]
pub struct RoomLoad {
    /// The room.
    pub room_id: RoomId,
    /// Connections subscribed to it.
    pub subscribers: u64,
    /// Its row, for the busiest rooms only (`None` beyond them, or when it
    /// could not be read).
    pub row: Option<RoomRow>,
}

/// What the operator view shows of Redis and PostgreSQL.
#[derive(Debug, Clone)]
pub struct OpsView {
    /// Rooms by subscribed connections, busiest first.
    pub rooms: Vec<RoomLoad>,
    /// Whether the scan stopped before it saw every room.
    pub rooms_truncated: bool,
    /// Connections per Management API endpoint (one per gateway).
    pub gateways: Vec<(String, u64)>,
    /// Whether the count stopped before it saw every connection.
    pub gateways_truncated: bool,
}

impl Chat {
    /// Up to `max_rooms` rooms (the first `named_rooms` with their rows)
    /// and the connections per gateway, counting at most `max_connections`.
    ///
    /// # Errors
    /// When Redis or PostgreSQL fail.
    pub async fn ops_view(
        &self,
        max_rooms: usize,
        max_connections: usize,
        named_rooms: usize,
    ) -> Result<OpsView> {
        let ((rooms, rooms_truncated), (gateways, gateways_truncated)) = tokio::try_join!(
            self.presence.room_subscriber_counts(max_rooms),
            self.presence.connections_by_endpoint(max_connections),
        )?;
        // Names for the busiest rooms only: one indexed read each, concurrently.
        let db = self.store.conn().await?;
        let rows =
            futures::future::join_all(rooms.iter().take(named_rooms).map(|(id, _)| db.room(id)))
                .await;
        drop(db);
        let mut rows = rows.into_iter();
        let rooms = rooms
            .into_iter()
            .map(|(room_id, subscribers)| RoomLoad {
                room_id,
                subscribers,
                row: rows.next().and_then(Result::ok),
            })
            .collect();
        Ok(OpsView {
            rooms,
            rooms_truncated,
            gateways,
            gateways_truncated,
        })
    }
}
