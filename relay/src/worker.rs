//! Workers: envelopes with the same ordering key are handled by one worker
//! (the one of their worker lane, module `lanes`), one after another, so a
//! room's events reach each connection's outbox in publish order;
//! different workers run in parallel.
//!
//! A worker also makes a room's `message` events gap-free and duplicate-free
//! for every subscribed connection (PROTOCOL.md §2: "each connection
//! receives each event once, and a room's `message` events in increasing
//! `sequenceId`"). For each (room, connection) it keeps the highest
//! sequence id queued so far, starting from the subscription's watermark in
//! Redis (whichever is higher):
//!
//! - a message at or below that mark is skipped (a repeat publish, one that
//!   a gap fill or a sync already delivered, or one in the join snapshot);
//! - a message above mark + 1 first gets the gap filled, from the room's ring
//!   of recent message events when it holds the whole gap, else from
//!   PostgreSQL. A stored sequence id implies every lower one is stored
//!   (each send takes the room's row lock), so that read is complete.
//!
//! `Control::Joined` (a `joinRoom`) posts the connection its `roomJoined`,
//! then every stored message above the snapshot's watermark that went out
//! before the subscription, and only then makes the subscription joined:
//! until then the room's events leave it out (module `resolve`). It is
//! handled by the room's worker, so it is ordered with the room's messages,
//! and no event of the room can overtake the `roomJoined`.
//! `Control::Sync` (what joins published before `Joined` existed) pushes
//! every stored message above the connection's mark.
//!
//! A worker serves the envelopes of the lease shards (module `cluster`)
//! that map to its lane (`lease shard % lanes`), and only while this relay
//! holds their lease. Two more kinds of [`Work`] come from the lease loop:
//! `Release` (finish and write back a shard before its lease is handed
//! over) and `Acquired` (catch up on what nobody handled while the shard
//! had no owner).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chat_shared::bus::{Control, Envelope, Target, event_json};
use chat_shared::domain::SequenceId;
use chat_shared::presence::{RoomMarks, Subscriber};
use chat_shared::store::Store;
use tokio::sync::mpsc;

use crate::Stores;
use crate::cluster::{Missed, Ownership};
use crate::lanes::{Work, lease_shard_of_key};
use crate::management::Management;
use crate::metrics::RelayMetrics;
use crate::outbox::{Outboxes, Route};
use crate::resolve::{self, Recipients};

/// Recent message events kept per room for gap fills.
const RING: usize = 256;
/// Largest gap filled at once; a wider one (a watermark far behind, which
/// a join never produces) gets only its newest part.
const MAX_FILL: i64 = 1000;
/// How often delivered marks are written back and idle rooms evicted.
/// Short, because it bounds what a successor repeats after this relay is
/// killed (marks posted but not yet written back); a write-back is one
/// script call per worker, and only when some mark moved.
pub(crate) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(200);
/// Attempts at an envelope whose Redis or PostgreSQL reads failed. After a
/// Redis restart the connection manager fails the first command and only
/// then reconnects, so one more attempt succeeds; without it that first
/// envelope (often a new connection's `connected`) would be lost.
const STEP_ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled for each later one.
const STEP_RETRY: Duration = Duration::from_millis(50);
/// At shutdown, how long a worker waits for its queued posts before it
/// writes its marks back anyway (then only those already posted).
const EXIT_BARRIER: Duration = Duration::from_secs(3);

/// What one connection has of a room.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Highest sequence id queued for it (or known to be in its snapshot).
    queued: i64,
    /// What was last written back to Redis: marks above it are dirty.
    flushed: i64,
}

/// The per-room state of a shard.
#[derive(Debug)]
struct RoomState {
    /// When the room last had an envelope: idle rooms are evicted, so
    /// memory follows the active rooms, not every room ever seen.
    last_used: Instant,
    /// Per subscribed connection, what it has: the dedupe and gap-fill
    /// reference. Connections that are no longer subscribed are pruned on
    /// the room's next message.
    marks: HashMap<String, Mark>,
    /// The room's most recent message events by sequence id, exactly as
    /// published: most gaps (a join racing with sends, an out-of-order
    /// publish) are filled from here without reading PostgreSQL.
    ring: BTreeMap<i64, Arc<str>>,
}

impl RoomState {
    fn new(now: Instant) -> Self {
        Self {
            last_used: now,
            marks: HashMap::new(),
            ring: BTreeMap::new(),
        }
    }

    fn remember(&mut self, sequence_id: i64, event: Arc<str>) {
        self.ring.insert(sequence_id, event);
        while self.ring.len() > RING {
            self.ring.pop_first();
        }
    }

    /// Whether the ring holds every message strictly between `after` and
    /// `before`.
    fn ring_covers(&self, after: i64, before: i64) -> bool {
        let wanted = usize::try_from(before - after - 1).unwrap_or(0);
        wanted == 0 || self.ring.range(after + 1..before).count() == wanted
    }

    /// The connection's mark, at least `watermark`.
    fn mark_of(&self, connection_id: &str, watermark: i64) -> i64 {
        self.marks
            .get(connection_id)
            .map_or(watermark, |m| m.queued.max(watermark))
    }

    fn set_mark(&mut self, connection_id: &str, watermark: i64, queued: i64) {
        let mark = self.marks.entry(connection_id.to_owned()).or_insert(Mark {
            queued,
            // The subscription already stores `watermark`.
            flushed: watermark,
        });
        mark.queued = mark.queued.max(queued);
    }

    fn has_dirty(&self) -> bool {
        self.marks.values().any(|m| m.queued > m.flushed)
    }

    fn dirty(&self) -> Vec<(String, i64)> {
        self.marks
            .iter()
            .filter(|(_, m)| m.queued > m.flushed)
            .map(|(c, m)| (c.clone(), m.queued))
            .collect()
    }
}

/// One worker: the room state of its lane and what it needs to act on
/// envelopes.
pub(crate) struct Worker {
    /// Reads subscriptions and routes (Presence) and messages (Store).
    stores: Stores,
    /// Where resolved events go.
    outboxes: Outboxes,
    /// Closes connections that are no longer registered (`Control::Close`).
    management: Arc<Management>,
    /// Counts gap fills and store reads.
    metrics: Arc<RelayMetrics>,
    /// Per-room state of the rooms this shard has seen recently.
    rooms: HashMap<String, RoomState>,
    /// How long a room may go without envelopes before its state is dropped.
    room_idle: Duration,
    /// Which lease shards this relay holds (checked again for each
    /// envelope: a lease may lapse while its envelopes wait in the queue).
    ownership: Arc<Ownership>,
    /// Where envelopes this worker drops are noted for a later owner.
    missed: Arc<Mutex<Missed>>,
    /// Lease shards handed over since they were last acquired: envelopes
    /// of theirs still in the queue are dropped.
    released: HashSet<usize>,
}

impl Worker {
    pub(crate) fn new(
        stores: Stores,
        outboxes: Outboxes,
        management: Arc<Management>,
        metrics: Arc<RelayMetrics>,
        room_idle: Duration,
        ownership: Arc<Ownership>,
        missed: Arc<Mutex<Missed>>,
    ) -> Self {
        Self {
            stores,
            outboxes,
            management,
            metrics,
            rooms: HashMap::new(),
            room_idle,
            ownership,
            missed,
            released: HashSet::new(),
        }
    }

    /// Handles work until the channel closes; then waits (a while) for its
    /// posts and writes the delivered marks back.
    pub(crate) async fn run(mut self, mut work: mpsc::Receiver<Work>) {
        let mut maintenance = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Maintenance first: a steady stream of envelopes must not
                // starve the write-back.
                biased;
                _ = maintenance.tick() => self.maintain(Instant::now()).await,
                item = work.recv() => match item {
                    Some(Work::Envelope { shard, envelope }) => {
                        if self.ownership.holds(shard) && !self.released.contains(&shard) {
                            self.deliver(&envelope).await;
                        } else {
                            RelayMetrics::bump(&self.metrics.envelopes_not_owned);
                            self.missed
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .note(shard, envelope);
                        }
                    }
                    Some(Work::Release { shard, deadline, done }) => {
                        let released = self.release(shard, deadline).await;
                        let _ = done.send(released);
                    }
                    Some(Work::Acquired { shard, rooms, greetings }) => {
                        self.acquired(shard, rooms, greetings).await;
                    }
                    None => break,
                },
            }
        }
        // Marks go back only for what was posted: a mark written for an
        // event still queued would make the next owner skip that event if
        // this process died before posting it.
        let posted = tokio::time::timeout(EXIT_BARRIER, self.outboxes.barrier())
            .await
            .is_ok();
        if let Err(err) = self.flush(None, !posted).await {
            tracing::warn!(error = %err, "writing delivered watermarks back failed at shutdown");
        }
    }

    /// `Work::Release`: waits until everything queued so far is posted,
    /// writes the marks of the shard's rooms back and forgets those rooms.
    /// False (and nothing changed) when that did not finish by `deadline`.
    async fn release(&mut self, shard: usize, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from_std(deadline);
        if tokio::time::Instant::now() >= deadline
            || tokio::time::timeout_at(deadline, self.outboxes.barrier())
                .await
                .is_err()
        {
            return false;
        }
        if let Err(err) = self.flush(Some(shard), false).await {
            tracing::warn!(shard, error = %err, "writing marks back before a handover failed");
            return false;
        }
        let shards = self.ownership.shards();
        self.rooms
            .retain(|room, _| lease_shard_of_key(room, shards) != shard);
        self.released.insert(shard);
        true
    }

    /// `Work::Acquired`: delivers the greetings nobody delivered, then
    /// catches each room up.
    async fn acquired(
        &mut self,
        shard: usize,
        rooms: Vec<(String, Option<i64>)>,
        greetings: Vec<Envelope>,
    ) {
        self.released.remove(&shard);
        for envelope in greetings {
            if matches!(envelope.control, Some(Control::Joined { .. })) {
                // Its handling makes the subscription joined only once.
                self.deliver(&envelope).await;
                continue;
            }
            let Target::Connection { connection_id } = &envelope.target else {
                continue;
            };
            let greeted = self.stores.presence.is_greeted(connection_id).await;
            match greeted {
                Ok(false) => self.deliver(&envelope).await,
                Ok(true) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "could not check a missed greeting");
                    tracing::debug!(%connection_id, "the connection");
                }
            }
        }
        // The rooms of the shard this worker still knows are caught up too:
        // a shard is acquired again after the bus subscription was lost
        // (a failover, a resharding that moved a channel), and what was
        // published meanwhile never arrived, so no next message may come
        // to fill it.
        let shards = self.ownership.shards();
        let mut known: Vec<(String, Option<i64>)> = self
            .rooms
            .keys()
            .filter(|room| lease_shard_of_key(room, shards) == shard)
            .filter(|room| !rooms.iter().any(|(listed, _)| listed == *room))
            .map(|room| (room.clone(), None))
            .collect();
        known.sort();
        for (room_id, seen) in rooms.into_iter().chain(known) {
            if let Err(err) = self.catch_up(&room_id, seen).await {
                tracing::warn!(
                    %room_id, error = %err,
                    "catching a room up after a takeover failed; its next message fills the gap"
                );
            }
        }
    }

    /// Pushes every stored message of the room above each subscriber's
    /// mark (after a takeover: nobody handled the room for a while). Reads
    /// nothing when every mark is at `seen` (the highest message dropped)
    /// already.
    async fn catch_up(&mut self, room_id: &str, seen: Option<i64>) -> chat_shared::Result<()> {
        // A pending subscription is caught up by its `Control::Joined`.
        let subscribers: Vec<Subscriber> = self
            .stores
            .presence
            .subscribers(&[room_id])
            .await?
            .into_iter()
            .flatten()
            .filter(|s| !s.pending)
            .collect();
        let state = used_room(&mut self.rooms, room_id);
        let marks: Vec<(Subscriber, i64)> = subscribers
            .into_iter()
            .map(|s| {
                let mark = state.mark_of(&s.connection_id, s.watermark);
                (s, mark)
            })
            .collect();
        let Some(low) = marks.iter().map(|(_, m)| *m).min() else {
            return Ok(());
        };
        if seen.is_some_and(|seen| low >= seen) {
            return Ok(());
        }
        let low = seen.map_or(low, |seen| low.max(seen - MAX_FILL));
        RelayMetrics::bump(&self.metrics.store_reads);
        let events = stored_events(&self.stores.store, room_id, low, i64::MAX).await?;
        for (sequence_id, event) in &events {
            state.remember(*sequence_id, event.clone());
        }
        for (s, mark) in &marks {
            let route = Route::from(s);
            let mut last = *mark;
            for (sequence_id, event) in events.iter().filter(|(seq, _)| *seq > *mark) {
                self.outboxes.enqueue(&route, event.clone());
                last = *sequence_id;
            }
            if last > *mark {
                RelayMetrics::bump(&self.metrics.gap_fills);
                state.set_mark(&s.connection_id, s.watermark, last);
            }
        }
        Ok(())
    }

    /// [`Shard::step`], attempted again (up to [`STEP_ATTEMPTS`] in all)
    /// when a dependency did not answer. A failed step has queued nothing,
    /// so another attempt cannot deliver anything twice.
    async fn deliver(&mut self, envelope: &Envelope) {
        if let Some(published) = envelope.ts {
            let lag = chrono::Utc::now().timestamp_millis() - published;
            self.metrics.delivery_lag_ms.fetch_max(
                u64::try_from(lag).unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut wait = STEP_RETRY;
        for attempt in 1..=STEP_ATTEMPTS {
            match self.step(envelope).await {
                Ok(()) => return,
                Err(err)
                    if attempt < STEP_ATTEMPTS
                        && err.code() == chat_shared::ErrorCode::Unavailable =>
                {
                    tracing::debug!(error = %err, attempt, "envelope failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "envelope not delivered");
                    return;
                }
            }
        }
    }

    /// Handles one envelope: resolves its recipients and queues its event
    /// (with any gap fill) in their outboxes. Nothing is queued unless it
    /// succeeds.
    ///
    /// # Errors
    /// When Redis (or PostgreSQL, for a sync) does not answer; the envelope
    /// is then not delivered.
    pub(crate) async fn step(&mut self, envelope: &Envelope) -> chat_shared::Result<()> {
        match &envelope.control {
            Some(Control::Sync {
                room_id,
                connection_id,
            }) => return self.sync(room_id, connection_id).await,
            Some(Control::Joined {
                room_id,
                connection_id,
                watermark,
                published,
            }) => {
                let Some(event) = envelope.event.as_ref() else {
                    return Ok(());
                };
                return self
                    .joined(room_id, connection_id, *watermark, *published, event.get())
                    .await;
            }
            Some(Control::Close {
                connection_id,
                endpoint,
            }) => {
                self.close(connection_id, endpoint);
                return Ok(());
            }
            None => {}
        }
        let Some(event) = envelope.event.as_ref() else {
            return Ok(());
        };
        let event: Arc<str> = Arc::from(event.get());
        let recipients = resolve::recipients(&self.stores.presence, envelope).await?;
        match (&envelope.target, envelope.room_message()) {
            (Target::Room { room_id }, Some((_, sequence_id))) => {
                self.room_message(room_id, sequence_id, event, recipients)
                    .await;
            }
            _ => {
                for s in recipients.subscribed.iter().chain(&recipients.direct) {
                    self.outboxes.enqueue(&Route::from(s), event.clone());
                }
            }
        }
        Ok(())
    }

    /// A room's `message` event: dedupe, fill gaps, queue.
    async fn room_message(
        &mut self,
        room_id: &str,
        sequence_id: i64,
        event: Arc<str>,
        recipients: Recipients,
    ) {
        let state = used_room(&mut self.rooms, room_id);
        state.remember(sequence_id, event.clone());
        // Forget connections that left the room (or are gone): they start
        // again from a new watermark if they come back.
        let present: HashSet<&str> = recipients
            .subscribed
            .iter()
            .chain(&recipients.excluded)
            .map(|s| s.connection_id.as_str())
            .collect();
        state.marks.retain(|c, _| present.contains(c.as_str()));

        let mut plan: Vec<(&Subscriber, i64)> = Vec::new();
        let mut lowest_behind: Option<i64> = None;
        for s in &recipients.subscribed {
            let mark = state.mark_of(&s.connection_id, s.watermark);
            if sequence_id <= mark {
                continue;
            }
            if sequence_id > mark + 1 {
                lowest_behind = Some(lowest_behind.map_or(mark, |l| l.min(mark)));
            }
            plan.push((s, mark));
        }
        for s in &recipients.excluded {
            state.set_mark(&s.connection_id, s.watermark, sequence_id);
        }

        let fill: BTreeMap<i64, Arc<str>> = match lowest_behind {
            None => BTreeMap::new(),
            Some(low) => {
                let low = low.max(sequence_id - 1 - MAX_FILL);
                if state.ring_covers(low, sequence_id) {
                    state
                        .ring
                        .range(low + 1..sequence_id)
                        .map(|(k, v)| (*k, v.clone()))
                        .collect()
                } else {
                    RelayMetrics::bump(&self.metrics.store_reads);
                    match stored_events(&self.stores.store, room_id, low, sequence_id).await {
                        Ok(events) => {
                            for (k, v) in &events {
                                state.remember(*k, v.clone());
                            }
                            events.into_iter().collect()
                        }
                        Err(err) => {
                            tracing::error!(
                                room_id, error = %err,
                                "reading missed messages failed; delivering without the gap"
                            );
                            BTreeMap::new()
                        }
                    }
                }
            }
        };

        for (s, mark) in plan {
            let route = Route::from(s);
            if sequence_id > mark + 1 {
                RelayMetrics::bump(&self.metrics.gap_fills);
                for missed in fill.range(mark + 1..sequence_id).map(|(_, e)| e) {
                    self.outboxes.enqueue(&route, missed.clone());
                }
            }
            self.outboxes.enqueue(&route, event.clone());
            state.set_mark(&s.connection_id, s.watermark, sequence_id);
        }
        // Included connections that have not joined the room (the sender's
        // acknowledgement) get the event as it is.
        for s in &recipients.direct {
            self.outboxes.enqueue(&Route::from(s), event.clone());
        }
    }

    /// `Control::Close`: drops what is queued for the connection and closes
    /// it at API Gateway, in the background (best effort, as the sweeper's
    /// closes): it has no registration left, so nothing else would.
    ///
    /// The handler publishes the close before its `error` reply ("reconnect")
    /// goes back as the route response, so the close waits a moment: the
    /// client should read why before the socket goes.
    fn close(&self, connection_id: &str, endpoint: &str) {
        const LET_THE_REPLY_GO_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
        self.outboxes.forget(connection_id);
        let management = self.management.clone();
        let (connection_id, endpoint) = (connection_id.to_owned(), endpoint.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(LET_THE_REPLY_GO_FIRST).await;
            if let Err(cause) = management.delete(&endpoint, &connection_id).await {
                tracing::debug!(%connection_id, %cause, "DeleteConnection failed (best effort)");
            }
        });
    }

    /// `Control::Joined`: posts the connection its `roomJoined`, then every
    /// stored message above the watermark up to `published` (the room's
    /// highest published sequence id when the join subscribed; the ones
    /// published later come after this envelope), and makes the
    /// subscription joined, so the room's next events reach it. Reads come
    /// first and posts last, so a failed step (tried again) has done
    /// nothing twice.
    async fn joined(
        &mut self,
        room_id: &str,
        connection_id: &str,
        watermark: i64,
        published: i64,
        event: &str,
    ) -> chat_shared::Result<()> {
        let event: Arc<str> = Arc::from(event);
        let state = used_room(&mut self.rooms, room_id);
        let missed: Vec<(i64, Arc<str>)> = if published <= watermark {
            Vec::new()
        } else if state.ring_covers(watermark, published + 1) {
            state
                .ring
                .range(watermark + 1..=published)
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        } else {
            RelayMetrics::bump(&self.metrics.store_reads);
            stored_events(&self.stores.store, room_id, watermark, i64::MAX).await?
        };
        let presence = &self.stores.presence;
        let Some((subscription, was_pending)) = presence.activate(room_id, connection_id).await?
        else {
            // It left the room, or is gone, before its `roomJoined` went
            // out; the answer to its `joinRoom` still goes, by its route.
            let route = presence
                .connection_routes(&[connection_id.to_owned()])
                .await?
                .into_iter()
                .flatten()
                .next();
            if let Some(route) = route {
                self.outboxes.enqueue(&Route::from(&route), event);
            }
            return Ok(());
        };
        let route = Route::from(&subscription);
        self.outboxes.enqueue(&route, event);
        let state = used_room(&mut self.rooms, room_id);
        if was_pending {
            // A new subscription starts from its snapshot, whatever an
            // earlier one of the same connection had.
            state.marks.remove(connection_id);
        }
        let mark = state.mark_of(connection_id, watermark);
        let mut last = mark;
        for (sequence_id, missed) in missed {
            state.remember(sequence_id, missed.clone());
            if sequence_id > last {
                self.outboxes.enqueue(&route, missed);
                last = sequence_id;
            }
        }
        if last > mark {
            RelayMetrics::bump(&self.metrics.gap_fills);
        }
        state.set_mark(connection_id, subscription.watermark, last);
        Ok(())
    }

    /// `Control::Sync`: pushes every stored message above the connection's
    /// mark in the room.
    async fn sync(&mut self, room_id: &str, connection_id: &str) -> chat_shared::Result<()> {
        let presence = &self.stores.presence;
        let subscription = presence
            .subscribers(&[room_id])
            .await?
            .into_iter()
            .flatten()
            .find(|s| s.connection_id == connection_id && !s.pending);
        let Some(subscription) = subscription else {
            // It left the room, or the connection is gone.
            return Ok(());
        };
        let state = used_room(&mut self.rooms, room_id);
        let mark = state.mark_of(connection_id, subscription.watermark);
        RelayMetrics::bump(&self.metrics.store_reads);
        let events = stored_events(&self.stores.store, room_id, mark, i64::MAX).await?;
        let route = Route::from(&subscription);
        let mut last = mark;
        for (sequence_id, event) in events {
            state.remember(sequence_id, event.clone());
            self.outboxes.enqueue(&route, event);
            last = sequence_id;
        }
        state.set_mark(connection_id, subscription.watermark, last);
        Ok(())
    }

    /// Writes dirty marks back, then drops the state of idle rooms whose
    /// marks are all written.
    pub(crate) async fn maintain(&mut self, now: Instant) {
        if let Err(err) = self.flush(None, true).await {
            tracing::warn!(error = %err, "writing delivered watermarks back failed; will retry");
            return;
        }
        let idle = self.room_idle;
        self.rooms
            .retain(|_, state| now.duration_since(state.last_used) < idle || state.has_dirty());
    }

    /// Writes dirty marks back to Redis: of every room, or only of the
    /// rooms of lease shard `only`. With `posted`, a connection with
    /// posts still queued or in flight keeps its mark dirty for now: the
    /// watermark in Redis then never runs ahead of what was posted, so if
    /// this relay dies with posts queued, its successor repeats the last
    /// moments' messages rather than skipping them.
    async fn flush(&mut self, only: Option<usize>, posted: bool) -> chat_shared::Result<()> {
        let shards = self.ownership.shards();
        let outboxes = &self.outboxes;
        let batch: Vec<RoomMarks> = self
            .rooms
            .iter()
            .filter(|(room, _)| only.is_none_or(|s| lease_shard_of_key(room, shards) == s))
            .map(|(room, state)| {
                let mut marks = state.dirty();
                if posted {
                    marks.retain(|(connection_id, _)| !outboxes.is_pending(connection_id));
                }
                (room.clone(), marks)
            })
            .filter(|(_, marks)| !marks.is_empty())
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.stores.presence.raise_watermarks(&batch).await?;
        for (room, marks) in batch {
            if let Some(state) = self.rooms.get_mut(&room) {
                for (connection_id, queued) in marks {
                    if let Some(mark) = state.marks.get_mut(&connection_id) {
                        mark.flushed = mark.flushed.max(queued);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A room's state, made when missing, marked used now.
fn used_room<'a>(rooms: &'a mut HashMap<String, RoomState>, room_id: &str) -> &'a mut RoomState {
    let now = Instant::now();
    let state = rooms
        .entry(room_id.to_owned())
        .or_insert_with(|| RoomState::new(now));
    state.last_used = now;
    state
}

/// The stored messages strictly between `after` and `before`, as `message`
/// events with `readBy` as of now.
async fn stored_events(
    store: &Store,
    room_id: &str,
    after: i64,
    before: i64,
) -> chat_shared::Result<Vec<(i64, Arc<str>)>> {
    // One pooled connection for both reads.
    let db = store.conn().await?;
    let messages = db
        .messages_between(
            room_id,
            SequenceId::from_trusted(after),
            SequenceId::from_trusted(before),
        )
        .await?;
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let members = db.room_members(room_id).await?;
    drop(db);
    messages
        .into_iter()
        .map(|m| {
            let m = m.with_read_by(&members);
            let sequence_id = m.sequence_id.get();
            event_json("message", &m).map(|e| (sequence_id, Arc::from(e)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_and_knows_what_it_covers() {
        let mut state = RoomState::new(Instant::now());
        for s in 1..=300 {
            state.remember(s, Arc::from(format!("e{s}")));
        }
        assert_eq!(state.ring.len(), RING);
        assert_eq!(state.ring.keys().next(), Some(&45));
        assert!(state.ring_covers(44, 301));
        assert!(!state.ring_covers(43, 301));
        assert!(state.ring_covers(300, 301));
        state.ring.remove(&200);
        assert!(!state.ring_covers(100, 250));
        assert!(state.ring_covers(200, 250));
    }

    #[test]
    fn marks_start_at_the_watermark_and_only_rise() {
        let mut state = RoomState::new(Instant::now());
        assert_eq!(state.mark_of("c", 5), 5);
        state.set_mark("c", 5, 9);
        assert_eq!(state.mark_of("c", 5), 9);
        assert_eq!(state.mark_of("c", 12), 12);
        state.set_mark("c", 5, 7);
        assert_eq!(state.mark_of("c", 0), 9);
        assert_eq!(state.dirty(), vec![("c".to_owned(), 9)]);
    }
}
