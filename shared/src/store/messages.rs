//! Messages: storing them, and reading history.
//!
//! Storing is group commit: sends that arrive while others are being
//! stored share one statement, one round trip and one commit.
//!
//! Every send is queued. A worker (at most [`MAX_WORKERS`] per process) takes
//! what is queued, up to [`MAX_BATCH`] messages at a time, and stores it
//! with one statement: [`BATCH_SQL`], or [`SINGLE_SQL`] for a message alone
//! (the same rules in the plain form one message allows; its docs say what
//! the benchmark measured that made it worth a second statement). Under
//! light load every send finds an idle worker and is stored at once, alone;
//! under heavy load batches form by themselves while the previous ones
//! commit, so nothing waits on a timer.
//!
//! Why: measured on the benchmark machine, PostgreSQL spent ~450 µs of CPU
//! per single-message transaction and ~150–250 µs per message in batches of
//! 8–32 (the commit, the statement's fixed costs and the WAL flush are
//! shared). The durable insert rate is no longer bounded by one commit per
//! message.
//!
//! What stays as it was, message by message:
//! - each room's sequence ids are gap-free: a room's messages in a batch take
//!   consecutive ids in queue order, under the room row's lock;
//! - membership and room existence are checked per message; a refused
//!   message takes no sequence id and does not fail its batch-mates;
//! - `clientMessageId` idempotency: a repeat of a stored message returns
//!   the original; two messages with the same key are never in one batch
//!   (the later one waits for the next), and a concurrent batch that stored
//!   the same key first makes the statement fail on the unique index, so
//!   the batch is retried and then finds the original;
//! - the sender's read cursor moves to its message; retention applies.
//!
//! Rooms are locked in id order (`FOR NO KEY UPDATE`: the mode of an
//! `UPDATE` that changes no key, which foreign-key checks do not wait on),
//! so two batches never deadlock on each other's rooms; a room's member rows and messages are only written by whoever
//! holds the room's lock (a mark-read takes no room lock).
//!
//! Queued sends are bounded by their callers: every caller waits for its
//! answer, and callers are bounded upstream (WebSocket admission, REST
//! load shedding, which counts this queue as waiting).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_postgres::Row;

use super::{Conn, Page, PageQuery, Store, Stored};
use crate::domain::{MessageId, MessageType, NewMessage, RoomId, SequenceId, UserId};
use crate::error::{Error, Result};
use crate::model::{Message, Profile};

pub(super) const MESSAGE_COLS: &str = "m.id, m.room_id, m.sender_id, m.content, m.type, m.metadata, \
     m.sequence_id, m.client_message_id, m.created_at, u.username, u.display_name, u.avatar";

/// Reads a JSONB column. Every stored value was written by serde_json, and
/// with its `float_roundtrip` feature every number PostgreSQL prints back
/// (it may print 1e308 as 309 digits) parses to the same value; should one
/// still fail, that is a 500 for the request, not a panic that drops the
/// connection.
pub(super) fn json_column(row: &Row, column: &str) -> Result<Option<Value>> {
    row.try_get(column).map_err(Error::internal)
}

pub(super) fn message_from_row(row: &Row) -> Result<Message> {
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

/// The message object of a stored message (new, or the original of a
/// repeated `clientMessageId`).
fn message_stored(
    id: String,
    room_id: &RoomId,
    sender: &UserId,
    message: &NewMessage,
    profile: Profile,
    sequence_id: i64,
    created_at: DateTime<Utc>,
) -> Message {
    Message {
        id,
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
        // Filled in from the members by whoever needs it (a new message has
        // no reader but its sender yet).
        read_by: Vec::new(),
        created_at,
    }
}

/// What [`BATCH_SQL`]'s row says about one message: refused, a duplicate
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
        let original = NewMessage {
            content: row.get("dup_content"),
            kind: MessageType::from_stored(row.get("dup_type")),
            metadata: json_column(row, "dup_metadata")?,
            client_message_id: message.client_message_id.clone(),
        };
        return Ok(Stored::Duplicate(message_stored(
            dup_id,
            room_id,
            sender,
            &original,
            profile,
            row.get("dup_sequence_id"),
            row.get("dup_created_at"),
        )));
    }
    let sequence_id: Option<i64> = row.get("new_sequence_id");
    let created_at: Option<DateTime<Utc>> = row.get("new_created_at");
    let (Some(sequence_id), Some(created_at)) = (sequence_id, created_at) else {
        return Err(Error::internal(anyhow::anyhow!(
            "message insert returned nothing"
        )));
    };
    Ok(Stored::New(message_stored(
        id.to_string(),
        room_id,
        sender,
        message,
        profile,
        sequence_id,
        created_at,
    )))
}

/// Runs a send's statement, again (up to twice more) when it failed only
/// because a concurrent send stored one of its idempotency keys first: the
/// unique index refused ours, and the next attempt (a new snapshot) finds
/// the original.
async fn retrying_idempotency_race<T, F, Fut>(mut run: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    let mut attempt = 0;
    loop {
        match run().await {
            Ok(value) => return Ok(value),
            Err(e) if attempt < 2 && lost_idempotency_race(&e) => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a send failed only because a concurrent one stored the same
/// `clientMessageId` first: the unique index refused it, and another
/// attempt (a new snapshot) finds the original.
fn lost_idempotency_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().and_then(|d| d.constraint()) == Some("messages_client_message_id_key")
}

impl Store {
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
            Pending {
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
}

impl Conn {
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
}

/// Most statements storing messages at once per process. Two: while one
/// is in PostgreSQL the next batch gathers, and is sent when the other
/// worker is free, so batches still grow with the load (8–15 messages at
/// 7,500 DIRECT msg/s over two gateways) while one slow statement no longer
/// holds up every send of the process (docs/BENCHMARKS.md, "S2 stalls").
/// Measured on the local stack (docs/BENCHMARKS.md, "Single runs behind
/// the defaults"): at 7,500 msg/s offered, one worker per process
/// accepted 90.7 %, two 95.1–96.0 %, with PostgreSQL using 65 % and 76 % of
/// a core. (Sessions ago, before the sends were batched this well, two
/// workers had done worse: 3,500 msg/s against 4,500.)
pub const MAX_WORKERS: usize = 2;
/// Most messages in one statement.
pub const MAX_BATCH: usize = 64;

/// The statement that stores messages, one or many (see the module docs). Inputs are
/// parallel arrays, one element per message, in queue order.
///
/// The per-message lookups of `room_members`, `rooms` and `users` are scalar
/// subqueries or `LATERAL ... LIMIT 1`, not `EXISTS` or plain joins: for
/// those the generic plan hashed each whole table on every batch (EXPLAIN
/// ANALYZE), work that grows with the tables instead of with the batch.
pub const BATCH_SQL: &str = "
WITH input AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                       $6::jsonb[], $7::text[])
    WITH ORDINALITY AS t(room_id, sender_id, id, content, type, metadata, client_message_id, ord)
), checked AS (
  SELECT i.*,
         (SELECT true FROM room_members m
           WHERE m.room_id = i.room_id AND m.user_id = i.sender_id) IS NOT NULL AS is_member,
         d.id AS dup_id, d.content AS dup_content, d.type AS dup_type,
         d.metadata AS dup_metadata, d.sequence_id AS dup_sequence_id,
         d.created_at AS dup_created_at
    FROM input i
    LEFT JOIN messages d ON i.client_message_id IS NOT NULL AND d.room_id = i.room_id
                        AND d.sender_id = i.sender_id
                        AND d.client_message_id = i.client_message_id
), fresh AS (
  SELECT c.ord, c.room_id, c.sender_id, c.id, c.content, c.type, c.metadata,
         c.client_message_id,
         row_number() OVER w AS k, count(*) OVER w AS n, last_value(c.content) OVER w AS last_text
    FROM checked c
   WHERE c.is_member AND c.dup_id IS NULL
  WINDOW w AS (PARTITION BY c.room_id ORDER BY c.ord
               ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), locked AS (
  SELECT r.id FROM rooms r WHERE r.id IN (SELECT room_id FROM fresh) ORDER BY r.id FOR NO KEY UPDATE
), seq AS (
  UPDATE rooms r SET last_sequence_id = r.last_sequence_id + f.n,
         last_message_at = clock_timestamp(), last_message_text = f.last_text
    FROM (SELECT DISTINCT room_id, n, last_text FROM fresh) f, locked l
   WHERE r.id = f.room_id AND l.id = r.id
  RETURNING r.id, r.last_sequence_id, r.last_message_at, f.n
), numbered AS (
  SELECT f.*, s.last_sequence_id - f.n + f.k AS sequence_id, s.last_message_at AS created_at,
         s.last_sequence_id AS room_last
    FROM fresh f JOIN seq s ON s.id = f.room_id
), ins AS (
  -- A message that retention would delete at once (more new messages in a
  -- room than it keeps) is not inserted: it takes its sequence id and is
  -- answered like the others, as if stored and deleted by a later send.
  INSERT INTO messages (room_id, sequence_id, id, sender_id, content, type, metadata,
                        client_message_id, created_at)
  SELECT room_id, sequence_id, id, sender_id, content, type, metadata, client_message_id,
         created_at
    FROM numbered
   WHERE $8::bigint = 0 OR sequence_id > room_last - $8::bigint
), cursor AS (
  UPDATE room_members m SET last_read_sequence_id = GREATEST(m.last_read_sequence_id, x.seq)
    FROM (SELECT room_id, sender_id, max(sequence_id) AS seq FROM numbered
           GROUP BY room_id, sender_id) x
   WHERE m.room_id = x.room_id AND m.user_id = x.sender_id
), retention AS (
  DELETE FROM messages USING seq
   WHERE messages.room_id = seq.id AND $8::bigint > 0
     AND messages.sequence_id > seq.last_sequence_id - seq.n - $8::bigint
     AND messages.sequence_id <= seq.last_sequence_id - $8::bigint
)
SELECT c.ord, (SELECT true FROM rooms WHERE id = c.room_id) IS NOT NULL AS room_exists, c.is_member,
       nb.sequence_id AS new_sequence_id, nb.created_at AS new_created_at,
       c.dup_id, c.dup_content, c.dup_type, c.dup_metadata, c.dup_sequence_id, c.dup_created_at,
       u.username, u.display_name, u.avatar
  FROM checked c
  LEFT JOIN numbered nb ON nb.id = c.id
  LEFT JOIN LATERAL (SELECT username, display_name, avatar FROM users WHERE id = c.sender_id
                      LIMIT 1) u ON true
 ORDER BY c.ord";

/// A message stored alone: the rules of [`BATCH_SQL`] for a batch of one,
/// in the plain form a single message allows (no arrays, windows or
/// sorting). Why two statements: measured in the benchmark session
/// `20261206T221842Z` (3 runs), a batch of one through [`BATCH_SQL`] cost
/// PostgreSQL 8.3–8.8 % of a core at S3's 100 sends/s against 6.2–6.3 % for
/// this statement, and S3's p50 latency rose from 6.06–6.47 ms to
/// 6.54–6.84 ms; S2 (where batches form) moved within noise. Under light
/// load nearly every send is a batch of one, so that is the common case.
/// `local/tests/it` and `shared/tests/it` run every rule through both: a
/// send alone takes this path, concurrent sends the batch.
pub const SINGLE_SQL: &str = "
WITH mem AS (
  SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2
), dup AS (
  SELECT m.id, m.content, m.type, m.metadata, m.sequence_id, m.created_at
    FROM messages m
   WHERE $7::text IS NOT NULL AND m.room_id = $1 AND m.sender_id = $2
     AND m.client_message_id = $7
), seq AS (
  UPDATE rooms SET last_sequence_id = last_sequence_id + 1,
         last_message_at = clock_timestamp(), last_message_text = $4
   WHERE id = $1 AND EXISTS (SELECT 1 FROM mem) AND NOT EXISTS (SELECT 1 FROM dup)
  RETURNING last_sequence_id, last_message_at
), ins AS (
  INSERT INTO messages (room_id, sequence_id, id, sender_id, content, type, metadata,
                        client_message_id, created_at)
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
 WHERE u.id = $2";

/// A send waiting to be stored.
struct Pending {
    room_id: RoomId,
    sender: UserId,
    message: NewMessage,
    reply: oneshot::Sender<Result<Stored>>,
}

impl Pending {
    /// The idempotency key, when there is one.
    fn key(&self) -> Option<(&str, &str, &str)> {
        self.message
            .client_message_id
            .as_ref()
            .map(|c| (self.room_id.as_str(), self.sender.as_str(), c.as_str()))
    }
}

#[derive(Default)]
struct State {
    /// Sends not taken by a worker yet, oldest first.
    queue: VecDeque<Pending>,
    /// Workers running (each is storing a batch, or about to take one).
    workers: usize,
}

/// The queue and its workers. Cheap to clone; every clone is the same queue.
#[derive(Clone, Default)]
pub(crate) struct Batcher {
    state: Arc<Mutex<State>>,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends queued and not yet taken by a worker.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Queues a send; starts a worker (on the caller's runtime) when fewer
    /// than [`MAX_WORKERS`] run.
    fn push(&self, store: &Store, pending: Pending) {
        let start = {
            let mut state = self.lock();
            state.queue.push_back(pending);
            let start = state.workers < MAX_WORKERS;
            if start {
                state.workers += 1;
            }
            start
        };
        if start {
            tokio::spawn(work(store.clone()));
        }
    }

    /// The next batch, or `None` (and this worker is gone) when nothing is
    /// queued. A send whose idempotency key is already in the batch stays
    /// queued for the next one.
    fn take(&self) -> Option<Vec<Pending>> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.workers -= 1;
            return None;
        }
        let mut batch: Vec<Pending> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(pending) = state.queue.pop_front() {
            if batch.len() == MAX_BATCH {
                state.queue.push_front(pending);
                break;
            }
            let repeat = pending
                .key()
                .is_some_and(|key| batch.iter().any(|b| b.key() == Some(key)));
            if repeat {
                kept.push_back(pending);
            } else {
                batch.push(pending);
            }
        }
        while let Some(pending) = kept.pop_back() {
            state.queue.push_front(pending);
        }
        Some(batch)
    }
}

/// A worker: stores batches until the queue is empty. Should it stop any
/// other way (its runtime shutting down mid-batch), it still gives its place
/// back; the next send starts a new worker.
async fn work(store: Store) {
    struct Place(Option<Batcher>);
    impl Drop for Place {
        fn drop(&mut self) {
            if let Some(batcher) = self.0.take() {
                batcher.lock().workers -= 1;
            }
        }
    }
    let mut place = Place(Some(store.batcher.clone()));
    while let Some(batch) = store.batcher.take() {
        store.store_batch(batch).await;
    }
    // `take` gave the place back when it found the queue empty.
    place.0 = None;
}

impl Store {
    /// Stores one batch and answers each of its senders.
    async fn store_batch(&self, batch: Vec<Pending>) {
        match self.store_many(&batch).await {
            Ok(results) => {
                for (p, result) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(result);
                }
            }
            Err(err) => {
                err.log_if_server_error("storing a batch of messages failed");
                for p in batch {
                    let _ = p.reply.send(Err(replicate(&err)));
                }
            }
        }
    }

    /// Runs [`SINGLE_SQL`] for one message: the outer error is the
    /// statement's failure, the inner result the message's.
    async fn store_one(&self, p: &Pending) -> Result<Result<Stored>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SINGLE_SQL).await?;
        let id = MessageId::generate();
        let client_message_id = p.message.client_message_id.as_ref().map(|c| c.as_str());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &p.room_id.as_str(),
            &p.sender.as_str(),
            &id.as_str(),
            &p.message.content,
            &p.message.kind.as_str(),
            &p.message.metadata,
            &client_message_id,
            &self.retention,
        ];
        let row = retrying_idempotency_race(|| client.query_opt(&stmt, &params)).await?;
        Ok(match row {
            Some(row) => stored_from_row(&row, &id, &p.room_id, &p.sender, &p.message),
            None => Err(Error::internal(anyhow::anyhow!(
                "sender is not a known user"
            ))),
        })
    }

    /// Runs [`BATCH_SQL`] for two or more messages ([`SINGLE_SQL`] for one);
    /// one result per message, in order.
    async fn store_many(&self, batch: &[Pending]) -> Result<Vec<Result<Stored>>> {
        if let [one] = batch {
            return Ok(vec![self.store_one(one).await?]);
        }
        let client = self.client().await?;
        let stmt = client.prepare_cached(BATCH_SQL).await?;
        let ids: Vec<MessageId> = batch.iter().map(|_| MessageId::generate()).collect();
        let room_ids: Vec<&str> = batch.iter().map(|p| p.room_id.as_str()).collect();
        let senders: Vec<&str> = batch.iter().map(|p| p.sender.as_str()).collect();
        let id_strs: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        let contents: Vec<&str> = batch.iter().map(|p| p.message.content.as_str()).collect();
        let kinds: Vec<&str> = batch.iter().map(|p| p.message.kind.as_str()).collect();
        let metadata: Vec<Option<&Value>> =
            batch.iter().map(|p| p.message.metadata.as_ref()).collect();
        let client_ids: Vec<Option<&str>> = batch
            .iter()
            .map(|p| p.message.client_message_id.as_ref().map(|c| c.as_str()))
            .collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &room_ids,
            &senders,
            &id_strs,
            &contents,
            &kinds,
            &metadata,
            &client_ids,
            &self.retention,
        ];
        let rows = retrying_idempotency_race(|| client.query(&stmt, &params)).await?;
        let mut by_ord: HashMap<i64, tokio_postgres::Row> = rows
            .into_iter()
            .map(|r| (r.get::<_, i64>("ord"), r))
            .collect();
        Ok(batch
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, (p, id))| {
                let row = by_ord.remove(&(i as i64 + 1)).ok_or_else(|| {
                    Error::internal(anyhow::anyhow!("no result for a batched message"))
                })?;
                stored_from_row(&row, id, &p.room_id, &p.sender, &p.message)
            })
            .collect())
    }
}

/// The same failure for each message of a failed batch (an `Error` is not
/// `Clone`: its cause is logged once, by the caller).
fn replicate(err: &Error) -> Error {
    match err {
        Error::Unavailable(_) => {
            Error::Unavailable(anyhow::anyhow!("storing the message batch failed"))
        }
        _ => Error::internal(anyhow::anyhow!("storing the message batch failed")),
    }
}
