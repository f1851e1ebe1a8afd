//! The PostgreSQL repository: every SQL statement of the service lives here.
//!
//! Statements are prepared once per pooled connection (`prepare_cached`).
//! The hot path, storing a message, is one statement and so one round trip:
//! it checks membership, takes the room's next sequence id under the room
//! row's lock, inserts, moves the sender's read cursor and applies retention
//! together, so ids are gap-free across any number of instances. Sends that
//! arrive together share that statement and its commit (module `batch`).
//!
//! Retention on a send deletes exactly the messages that this send pushed
//! out of the room's newest `MESSAGE_RETENTION`: one primary-key lookup,
//! where a `sequence_id <= last - retention` range would walk the index
//! entries of every message deleted since the last vacuum (measured with
//! the benchmark's pgbench script and rooms at the limit: 3,900 → 5,900
//! sends/s). That keeps a room at the limit as long as the limit does not
//! change; after `MESSAGE_RETENTION` is lowered, the older surplus goes at
//! the next [`Store::cleanup_all`] (the maintenance job, and `chat-local
//! serve` at start-up) or admin cleanup.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::SecretString;
use serde_json::Value;
use tokio_postgres::{Error as PgError, Row, Statement};

use crate::auth::AuthUser;
use crate::domain::{MessageId, MessageType, NewMessage, RoomId, RoomType, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::model::{Member, Message, Profile, RoomRow};
use crate::pg_tls;

mod batch;

pub use batch::{MAX_BATCH, MAX_WORKERS};

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Settings of this service's own sessions, run once on each new pooled
/// connection (one round trip per connection, none per request).
///
/// `random_page_cost = 1.1`: PostgreSQL's default (4.0) prices a random
/// page read as a spinning disk would; RDS (gp3, io) and local SSDs read any
/// page at about the cost of the next, and 1.1 is the usual setting for
/// them. With 4.0 the generic plan of the batch insert (`store/batch.rs`)
/// deleted retired messages with a bitmap heap scan per room: EXPLAIN
/// ANALYZE of a 16-message batch gave 0.85-1.25 ms for that step and
/// 1.7-2.2 ms in all; with 1.1 it is an index scan, 0.2-0.4 ms, and
/// 1.1-1.3 ms in all. Every other statement here is a key lookup or a short
/// range of a key, which index scans suit too.
///
/// A `SET`, not the startup packet's `options`: RDS Proxy refuses
/// connections that carry options ("RDS Proxy currently doesn't support
/// command-line options"). A `SET` may pin the session to one database
/// connection behind the proxy, as the named prepared statements already
/// do (docs/DEPLOY.md).
pub const SESSION_SETUP: &str = "SET random_page_cost = 1.1";

/// Builds the connection pool. Connections are opened lazily, so this
/// succeeds while the database is down; requests then get 503.
///
/// TLS as the URL's `sslmode` / `sslrootcert` say ([`pg_tls`]).
///
/// # Errors
/// When the URL does not parse, or its TLS settings are invalid (see
/// [`pg_tls::pg_config`]).
pub fn connect_pool(url: &SecretString, max_size: usize) -> anyhow::Result<Pool> {
    let (pg, tls) = pg_tls::pg_config(url)?;
    let manager = Manager::from_connect(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(SESSION_SETUP)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .context("building the PostgreSQL pool")
}

/// Applies the migrations in `migrations/` that have not run yet. Instances
/// starting together serialise on an advisory lock.
///
/// # Errors
/// When the database cannot be reached or a migration fails.
pub async fn migrate(url: &SecretString) -> anyhow::Result<usize> {
    let (mut client, conn_task) = pg_tls::connect(url)
        .await
        .context("connecting to PostgreSQL to migrate")?;
    client
        .execute("SELECT pg_advisory_lock(727273)", &[])
        .await
        .context("taking the migration lock")?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .context("applying migrations");
    // The lock goes with the session either way.
    drop(client);
    let _ = conn_task.await;
    Ok(report?.applied_migrations().len())
}

const MESSAGE_COLS: &str = "m.id, m.room_id, m.sender_id, m.content, m.type, m.metadata, \
     m.sequence_id, m.client_message_id, m.created_at, u.username, u.display_name, u.avatar";

const ROOM_COLS: &str = "r.id, r.type, r.name, r.call_id, r.user1_id, r.user2_id, \
     r.last_sequence_id, r.last_message_at, r.last_message_text, r.created_at";

/// Reads a JSONB column. Every stored value was written by serde_json, and
/// with its `float_roundtrip` feature every number PostgreSQL prints back
/// (it may print 1e308 as 309 digits) parses to the same value; should one
/// still fail, that is a 500 for the request, not a panic that drops the
/// connection.
fn json_column(row: &Row, column: &str) -> Result<Option<Value>> {
    row.try_get(column).map_err(Error::internal)
}

fn message_from_row(row: &Row) -> Result<Message> {
    let sender_id = UserId::from_trusted(row.get("sender_id"));
    Ok(Message {
        id: row.get("id"),
        room_id: row.get("room_id"),
        content: row.get("content"),
        kind: MessageType::from_stored(row.get("type")),
        metadata: json_column(row, "metadata")?,
        sequence_id: SequenceId::from_trusted(row.get("sequence_id")),
        client_message_id: row.get("client_message_id"),
        sender: Profile {
            id: sender_id.clone(),
            username: row.get("username"),
            display_name: row.get("display_name"),
            avatar: row.get("avatar"),
        },
        sender_id,
        read_by: Vec::new(),
        created_at: row.get("created_at"),
    })
}

fn member_from_row(row: &Row) -> Member {
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

fn room_from_row(row: &Row) -> RoomRow {
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

/// The message object of a message just stored.
fn message_stored(
    id: &MessageId,
    room_id: &RoomId,
    sender: &UserId,
    message: &NewMessage,
    profile: Profile,
    sequence_id: i64,
    created_at: DateTime<Utc>,
) -> Message {
    Message {
        id: id.to_string(),
        room_id: room_id.to_string(),
        sender_id: sender.clone(),
        content: message.content.clone(),
        kind: message.kind,
        metadata: message.metadata.clone(),
        sequence_id: SequenceId::from_trusted(sequence_id),
        client_message_id: message
            .client_message_id
            .as_ref()
            .map(|c| c.as_str().to_owned()),
        sender: profile,
        // No other member's cursor can be past the room's newest message.
        read_by: Vec::new(),
        created_at,
    }
}

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

/// A pooled connection that counts its round trips
/// ([`crate::metrics::record_pg_round_trip`]): one per statement, plus one
/// for a prepare that missed the connection's statement cache. The methods
/// mirror `tokio_postgres::Client`'s, so queries read as usual.
struct Client(deadpool_postgres::Object);

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

impl Client {
    async fn prepare_cached(&self, query: &str) -> std::result::Result<Statement, PgError> {
        let cached = self.0.statement_cache.size();
        let statement = self.0.prepare_cached(query).await?;
        if self.0.statement_cache.size() != cached {
            crate::metrics::record_pg_round_trip();
        }
        Ok(statement)
    }

    async fn query(
        &self,
        statement: &Statement,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Row>, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.query(statement, params).await
    }

    async fn query_opt(
        &self,
        statement: &Statement,
        params: Params<'_>,
    ) -> std::result::Result<Option<Row>, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.query_opt(statement, params).await
    }

    async fn query_one(
        &self,
        statement: &Statement,
        params: Params<'_>,
    ) -> std::result::Result<Row, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.query_one(statement, params).await
    }

    async fn execute(
        &self,
        statement: &Statement,
        params: Params<'_>,
    ) -> std::result::Result<u64, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.execute(statement, params).await
    }

    async fn simple_query(
        &self,
        query: &str,
    ) -> std::result::Result<Vec<tokio_postgres::SimpleQueryMessage>, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.simple_query(query).await
    }
}

/// The PostgreSQL side of the service.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    retention: i64,
    /// Sends waiting to share a statement (group commit).
    batcher: batch::Batcher,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store over `pool` that keeps the newest `retention` messages per
    /// room (0 keeps all).
    pub fn new(pool: Pool, retention: i64) -> Self {
        Self {
            pool,
            retention,
            batcher: batch::Batcher::default(),
        }
    }

    /// The pool (for health checks and load shedding).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How many requests are waiting for a connection, or (sends) for a
    /// batch: what load shedding looks at.
    pub fn waiting(&self) -> usize {
        self.pool.status().waiting + self.batcher.queued()
    }

    /// One pooled connection, for the statements of one request.
    ///
    /// This is the only way to a connection, and nothing reached from a
    /// [`Conn`] can take another: a request that needs several statements
    /// runs them all on the one it took (see [`Conn`]).
    ///
    /// # Errors
    /// `UNAVAILABLE` when no connection could be had within the pool's wait
    /// timeout, or PostgreSQL does not answer.
    pub async fn conn(&self) -> Result<Conn> {
        Ok(Conn {
            client: Client(self.pool.get().await?),
            retention: self.retention,
        })
    }

    async fn client(&self) -> Result<Client> {
        Ok(Client(self.pool.get().await?))
    }

    /// Answers when PostgreSQL answers.
    ///
    /// # Errors
    /// `UNAVAILABLE` when it does not.
    pub async fn ping(&self) -> Result<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Stores a message in one statement (see the module docs), shared with
    /// the sends queued at the same moment.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown room, `FORBIDDEN` for a non-member.
    #[tracing::instrument(skip_all, fields(room_id = %room_id, user_id = %sender))]
    pub async fn store_message(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        message: &NewMessage,
    ) -> Result<Stored> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.batcher.push(
            self,
            batch::Pending {
                room_id: room_id.clone(),
                sender: sender.clone(),
                message: message.clone(),
                reply,
            },
        );
        answer.await.unwrap_or_else(|_| {
            Err(Error::internal(anyhow::anyhow!(
                "the message's batch was abandoned"
            )))
        })
    }

    /// Stores one message alone: the statement of the module docs.
    async fn store_one(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        message: &NewMessage,
    ) -> Result<Stored> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH mem AS (
                   SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2
                 ), dup AS (
                   SELECT m.id, m.content, m.type, m.metadata, m.sequence_id, m.created_at
                     FROM messages m
                    WHERE m.room_id = $1 AND m.sender_id = $2 AND m.client_message_id = $7
                 ), seq AS (
                   UPDATE rooms SET last_sequence_id = last_sequence_id + 1,
                          last_message_at = clock_timestamp(), last_message_text = $4
                    WHERE id = $1 AND EXISTS (SELECT 1 FROM mem) AND NOT EXISTS (SELECT 1 FROM dup)
                    RETURNING last_sequence_id, last_message_at
                 ), ins AS (
                   INSERT INTO messages (room_id, sequence_id, id, sender_id, content, type,
                                         metadata, client_message_id, created_at)
                   SELECT $1, seq.last_sequence_id, $3, $2, $4, $5, $6, $7, seq.last_message_at
                     FROM seq
                   RETURNING sequence_id, created_at
                 ), cursor AS (
                   UPDATE room_members SET last_read_sequence_id =
                          GREATEST(last_read_sequence_id, seq.last_sequence_id)
                     FROM seq WHERE room_id = $1 AND user_id = $2
                 ), retention AS (
                   DELETE FROM messages USING seq
                    WHERE messages.room_id = $1 AND $8::bigint > 0
                      AND messages.sequence_id = seq.last_sequence_id - $8::bigint
                 )
                 SELECT EXISTS (SELECT 1 FROM rooms WHERE id = $1) AS room_exists,
                        EXISTS (SELECT 1 FROM mem) AS is_member,
                        (SELECT sequence_id FROM ins) AS new_sequence_id,
                        (SELECT created_at FROM ins) AS new_created_at,
                        dup.id AS dup_id, dup.content AS dup_content, dup.type AS dup_type,
                        dup.metadata AS dup_metadata, dup.sequence_id AS dup_sequence_id,
                        dup.created_at AS dup_created_at,
                        u.username, u.display_name, u.avatar
                   FROM users u LEFT JOIN dup ON true
                  WHERE u.id = $2",
            )
            .await?;
        let id = MessageId::generate();
        let client_message_id = message.client_message_id.as_ref().map(|c| c.as_str());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &room_id.as_str(),
            &sender.as_str(),
            &id.as_str(),
            &message.content,
            &message.kind.as_str(),
            &message.metadata,
            &client_message_id,
            &self.retention,
        ];
        // A concurrent send with the same clientMessageId can pass the dup
        // check before the other commits; the unique index then refuses it,
        // and a second attempt (new snapshot) finds the original.
        let mut attempt = 0;
        let row = loop {
            match client.query_opt(&stmt, &params).await {
                Ok(row) => break row,
                Err(e) if attempt < 2 && lost_idempotency_race(&e) => {
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let row =
            row.ok_or_else(|| Error::internal(anyhow::anyhow!("sender is not a known user")))?;
        stored_from_row(&row, &id, room_id, sender, message)
    }

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

/// One pooled PostgreSQL connection, and every query of the service but the
/// batched send ([`Store::store_message`]).
///
/// The rule it enforces: **a request holds at most one connection at a
/// time.** A request that held one connection and then waited for a second
/// could wait forever: with the pool full of requests doing the same, none
/// gets its second and none returns its first (until the pool's wait
/// timeout fails them all). So a `Conn` has no way back to the pool: every
/// method runs on `self`, a method that needs another query runs it on the
/// same connection, and independent queries of one request are pipelined
/// on it (`tokio::try_join!` over `&Conn` methods) instead of taking a
/// connection each. `shared/tests/pool_nesting.rs` runs the request types
/// that used to nest with a pool of one connection.
pub struct Conn {
    client: Client,
    retention: i64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
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

    /// One page of a room's history, ascending.
    ///
    /// Without `after`: the newest `limit` messages (below `before`, if
    /// given), `has_more` when older ones exist. With `after`: the oldest
    /// `limit` messages above it (and below `before`), `has_more` when more
    /// of that range follows.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn page(&self, room_id: &str, query: PageQuery) -> Result<Page> {
        let client = &self.client;
        let ascending = query.after.is_some();
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages m JOIN users u ON u.id = m.sender_id
                  WHERE m.room_id = $1
                    AND ($2::bigint IS NULL OR m.sequence_id < $2)
                    AND ($3::bigint IS NULL OR m.sequence_id > $3)
                  ORDER BY m.sequence_id {} LIMIT $4",
                if ascending { "ASC" } else { "DESC" }
            ))
            .await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &room_id,
                    &query.before.map(SequenceId::get),
                    &query.after.map(SequenceId::get),
                    &(query.limit + 1),
                ],
            )
            .await?;
        let has_more = rows.len() as i64 > query.limit;
        let mut messages: Vec<Message> = rows
            .iter()
            .take(query.limit as usize)
            .map(message_from_row)
            .collect::<Result<_>>()?;
        if !ascending {
            messages.reverse();
        }
        Ok(Page { messages, has_more })
    }

    /// Messages strictly between two sequence ids, ascending: what a relay
    /// needs to fill a gap.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn messages_between(
        &self,
        room_id: &str,
        after: SequenceId,
        before: SequenceId,
    ) -> Result<Vec<Message>> {
        let client = &self.client;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages m JOIN users u ON u.id = m.sender_id
                  WHERE m.room_id = $1 AND m.sequence_id > $2 AND m.sequence_id < $3
                  ORDER BY m.sequence_id"
            ))
            .await?;
        let rows = client
            .query(&stmt, &[&room_id, &after.get(), &before.get()])
            .await?;
        rows.iter().map(message_from_row).collect()
    }

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

    /// The newest stored message of each room (rooms without one are absent).
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn last_messages(&self, room_ids: &[&str]) -> Result<HashMap<String, Message>> {
        if room_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let client = &self.client;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM rooms r
                   JOIN messages m ON m.room_id = r.id AND m.sequence_id = r.last_sequence_id
                   JOIN users u ON u.id = m.sender_id
                  WHERE r.id = ANY($1)"
            ))
            .await?;
        let rows = client.query(&stmt, &[&room_ids]).await?;
        rows.iter()
            .map(|r| Ok((r.get::<_, String>("room_id"), message_from_row(r)?)))
            .collect()
    }

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

/// What the send statement's row says about one message (both the single
/// and the batched statement return these columns): refused, a duplicate
/// of an earlier `clientMessageId`, or newly stored.
fn stored_from_row(
    row: &tokio_postgres::Row,
    id: &MessageId,
    room_id: &RoomId,
    sender: &UserId,
    message: &NewMessage,
) -> Result<Stored> {
    if !row.get::<_, bool>("room_exists") {
        return Err(Error::not_found("room not found"));
    }
    if !row.get::<_, bool>("is_member") {
        return Err(Error::forbidden("not a member of this room"));
    }
    let Some(username) = row.get::<_, Option<String>>("username") else {
        return Err(Error::internal(anyhow::anyhow!(
            "sender is not a known user"
        )));
    };
    let profile = Profile {
        id: sender.clone(),
        username,
        display_name: row.get("display_name"),
        avatar: row.get("avatar"),
    };
    if let Some(dup_id) = row.get::<_, Option<String>>("dup_id") {
        return Ok(Stored::Duplicate(Message {
            id: dup_id,
            room_id: room_id.to_string(),
            sender_id: sender.clone(),
            content: row.get("dup_content"),
            kind: MessageType::from_stored(row.get("dup_type")),
            metadata: json_column(row, "dup_metadata")?,
            sequence_id: SequenceId::from_trusted(row.get("dup_sequence_id")),
            client_message_id: message
                .client_message_id
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            sender: profile,
            read_by: Vec::new(),
            created_at: row.get("dup_created_at"),
        }));
    }
    let sequence_id: Option<i64> = row.get("new_sequence_id");
    let created_at: Option<DateTime<Utc>> = row.get("new_created_at");
    let (Some(sequence_id), Some(created_at)) = (sequence_id, created_at) else {
        return Err(Error::internal(anyhow::anyhow!(
            "message insert returned nothing"
        )));
    };
    Ok(Stored::New(message_stored(
        id,
        room_id,
        sender,
        message,
        profile,
        sequence_id,
        created_at,
    )))
}
/// Whether a send failed only because a concurrent one stored the same
/// `clientMessageId` first: the unique index refused it, and another
/// attempt (a new snapshot) finds the original.
fn lost_idempotency_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().and_then(|d| d.constraint()) == Some("messages_client_message_id_key")
}
