//! The PostgreSQL repository: every SQL statement of the service lives here.
//!
//! Statements are prepared once per pooled connection (`prepare_cached`).
//! The hot path, storing a message, is one statement and so one round trip:
//! it checks membership, takes the room's next sequence id under the room
//! row's lock, inserts, moves the sender's read cursor and applies retention
//! together, so ids are gap-free across any number of instances. Sends that
//! arrive together share that statement and its commit ([`messages`]).
//!
//! Retention on a send deletes exactly the messages that this send pushed
//! out of the room's newest `MESSAGE_RETENTION`: a primary-key range
//! bounded on both sides (one key for a send alone), where an open
//! `sequence_id <= last - retention` range would walk the index
//! entries of every message deleted since the last vacuum (measured with
//! the benchmark's pgbench script and rooms at the limit: 3,900 → 5,900
//! sends/s). That keeps a room at the limit as long as the limit does not
//! change; after `MESSAGE_RETENTION` is lowered, the older surplus goes at
//! the next [`Store::cleanup_all`] (the maintenance job, and `chat-local
//! serve` at start-up) or admin cleanup.
//!
//! One module a part, each with its own `impl` blocks:
//! - [`pool`]: the pool, migrations, the round-trip counting client, and
//!   [`Conn`], the one connection a request holds;
//! - [`messages`]: storing messages (the one send statement, and the group
//!   commit that shares it) and reading history;
//! - [`rooms`]: users, rooms, members, entering a room;
//! - [`reads`]: read cursors and unread counts;
//! - [`retention`]: deleting what retention no longer keeps.

use crate::domain::SequenceId;
use crate::error::{Error, Result};
use crate::model::{Message, RoomRow};

pub mod messages;
pub mod pool;
pub mod reads;
pub mod retention;
pub mod rooms;

pub use messages::{BATCH_SQL, MAX_BATCH, MAX_WORKERS, SINGLE_SQL};
pub use pool::{Conn, SESSION_SETUP, Store, connect_pool, migrate};
pub use rooms::{Entered, RoomKey};

/// A room as seen by one user: the row, and their read cursor if they are a
/// member.
#[derive(Debug, Clone)]
pub struct RoomForUser {
    /// The room.
    pub room: RoomRow,
    /// The caller's cursor; `None` when they are not a member.
    pub cursor: Option<SequenceId>,
}

impl RoomForUser {
    /// The cursor, or `FORBIDDEN` for a non-member.
    ///
    /// # Errors
    /// `FORBIDDEN` when the caller is not a member.
    pub fn member_cursor(&self) -> Result<SequenceId> {
        self.cursor
            .ok_or_else(|| Error::forbidden("not a member of this room"))
    }
}

/// Which slice of a room's history to read.
#[derive(Debug, Clone, Copy)]
pub struct PageQuery {
    /// Only messages below this sequence id.
    pub before: Option<SequenceId>,
    /// Only messages above this sequence id; the page then starts right
    /// after it (oldest first) instead of ending at the newest.
    pub after: Option<SequenceId>,
    /// Page size.
    pub limit: i64,
}

/// A page of history, ascending.
#[derive(Debug, Clone)]
pub struct Page {
    /// Messages without `readBy` (the caller fills it from the members).
    pub messages: Vec<Message>,
    /// Whether more of the requested range exists beyond the page.
    pub has_more: bool,
}

/// What storing a message did.
#[derive(Debug, Clone)]
pub enum Stored {
    /// A new message with the room's next sequence id.
    New(Message),
    /// The `clientMessageId` was used before: the original, unchanged.
    Duplicate(Message),
}
