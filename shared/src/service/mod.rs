//! The use cases: what REST routes and WebSocket events do, independent of
//! the transport.
//!
//! Each method takes the authenticated caller and parsed domain values,
//! enforces the rules of PROTOCOL.md §3 (membership, admin, retention,
//! cursors), touches PostgreSQL through [`Store`] and Redis through
//! [`Presence`] and [`Limiter`], and publishes the events other connections
//! must see on the [`Bus`]. Replies to the caller are return values.
//!
//! One module a use case, each an `impl Chat` block:
//! - [`messages`]: `sendMessage` and `POST /rooms/{id}/messages`, with the
//!   sender's acknowledgement and the republishing of a duplicate.
//! - [`rooms`]: entering a room (`joinRoom`, history, `POST /direct`),
//!   creating rooms, members, listing, retention.
//! - [`reads`]: read cursors and unread counts.
//! - [`presence`]: connections, leases, sessions, subscriptions, who is
//!   online, and the `Sync` and `Close` controls for the relay.
//! - [`typing`]: `typing`, coalesced.
//! - [`ops`]: the operator view of the console.
//!
//! These modules are the only request-path code that calls the adapters;
//! `realtime`, `ws` and `http` parse, admit, and call one of them.

use serde::Serialize;

use crate::auth::AuthUser;
use crate::bus::Bus;
use crate::domain::{RoomId, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::limits::Limiter;
use crate::model::{Member, Message, Room, RoomRow};
use crate::presence::Presence;
use crate::store::{Conn, Store};

pub mod messages;
pub mod ops;
pub mod presence;
pub mod reads;
pub mod rooms;
pub mod typing;

pub use presence::Touch;
pub use rooms::{NewRoom, RoomSummary};

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

/// Which dependency answered a health probe ([`Chat::health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Health {
    /// PostgreSQL answered in time.
    pub postgres: bool,
    /// Redis answered in time.
    pub redis: bool,
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

    /// Whether PostgreSQL and Redis each answer within `timeout`.
    pub async fn health(&self, timeout: std::time::Duration) -> Health {
        let (pg, redis) = tokio::join!(
            tokio::time::timeout(timeout, self.store.ping()),
            tokio::time::timeout(timeout, self.presence.ping()),
        );
        Health {
            postgres: matches!(pg, Ok(Ok(()))),
            redis: matches!(redis, Ok(Ok(()))),
        }
    }

    /// Requests waiting for a PostgreSQL connection now (REST load
    /// shedding).
    pub fn store_waiting(&self) -> usize {
        self.store.waiting()
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
