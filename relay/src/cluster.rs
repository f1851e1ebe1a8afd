//! Lease shards: how several relays split the bus without delivering
//! anything twice.
//!
//! Pub/sub is broadcast: every relay subscribes to the channel and reads
//! every envelope. Each envelope belongs to one of `RELAY_SHARDS` (64)
//! lease shards, by its ordering key ([`crate::lanes::lease_shard_of`]), and
//! a relay hands an envelope to its workers only while it holds that
//! shard's lease; the others drop it. So each envelope is handled by at
//! most one relay, and a room (one ordering key) is always handled by one
//! relay, in publish order.
//!
//! # Leases (Redis, no protocol of our own)
//!
//! - `relay:lease:{n}` holds the owning relay's id. A relay takes a free
//!   shard with `SET … NX PX ttl` and renews the shards it holds with a
//!   compare-and-`PEXPIRE` script every [`ClusterOptions::renew`]
//!   (500 ms; ttl 5 s). The key is the whole truth: two relays can never
//!   both hold one.
//! - A relay acts on a shard only until a *local* deadline: the start of
//!   its last successful renewal plus ttl minus [`ClusterOptions::margin`]
//!   (1 s). A relay that cannot renew (Redis unreachable from it, a long
//!   pause) stops handling the shard at least a margin before anyone else
//!   may take it.
//! - `relay:members` is a sorted set of relay ids scored by heartbeat
//!   (Redis `TIME`); members silent for a ttl are dropped. A relay's fair
//!   share is `shards / members`, the first `shards % members` relays (by
//!   id) taking one more, so the shares add up to exactly `shards`.
//! - Below its share, a relay polls every [`ClusterOptions::poll`]
//!   (250 ms) for free shards; above it (a relay joined), it releases the
//!   extras: it stops dispatching the shard, lets its worker finish what
//!   is queued, waits until the outboxes have posted it, writes the
//!   delivered watermarks back, and only then deletes the lease
//!   (compare-and-`DEL`). The new owner starts from those watermarks, so
//!   the handover neither repeats nor loses a message.
//! - A relay that dies keeps its leases until they expire (ttl); within
//!   one renewal interval after that the survivors, whose share has grown,
//!   take them: takeover within ttl + renew ≈ 5.5 s.
//! - At shutdown a relay drains, then deletes its leases and its member
//!   entry, so the others take over at once.
//! - Losing the bus subscription (Redis restarted, or the connection
//!   dropped) revokes every shard locally at once: a restarted Redis has
//!   no leases, and another relay may take them before this one notices.
//!   After resubscribing, the reader asks for a renewal before it reads
//!   anything (pub/sub buffers what arrives meanwhile).
//!
//! # What nobody handles
//!
//! Between a shard's release (or its owner's death) and its takeover,
//! every relay drops that shard's envelopes. While a relay does not own a
//! shard it remembers, for a while, the rooms whose messages it dropped
//! and the `connected` events it dropped ([`Missed`]). When it takes the
//! shard it first catches up: it pushes every stored message above each
//! subscriber's watermark in those rooms (`Work::Acquired`) and delivers
//! each dropped `connected` whose connection is not greeted yet. Other
//! events of that gap (`typing`, `readReceipt`, `presenceUpdate`) are lost,
//! as pub/sub loses them during any relay outage; they are not stored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chat_shared::bus::{Control, Envelope, Target};
use chat_shared::presence::Keys;
use chat_shared::presence::RedisConn;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::lanes::Work;
use crate::metrics::RelayMetrics;

/// Lease timing, fixed for a relay's life.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Lease shards (`RELAY_SHARDS`, 64); the same for every relay.
    pub lease_shards: usize,
    /// Lease lifetime in Redis, renewed every [`ClusterOptions::renew`].
    /// 5 s.
    pub ttl: Duration,
    /// How often leases are renewed and the share recomputed: also how
    /// soon a relay notices that another one left. 500 ms (one script
    /// call).
    pub renew: Duration,
    /// A relay stops handling a shard this long before its lease could
    /// expire in Redis. 1 s.
    pub margin: Duration,
    /// How often a relay below its fair share looks for free shards.
    /// 250 ms.
    pub poll: Duration,
}

impl ClusterOptions {
    /// The defaults for `lease_shards` lease shards.
    pub fn new(lease_shards: usize) -> Self {
        Self {
            lease_shards: lease_shards.max(1),
            ttl: Duration::from_secs(5),
            renew: Duration::from_millis(500),
            margin: Duration::from_secs(1),
            poll: Duration::from_millis(250),
        }
    }

    /// How long dropped rooms and greetings are remembered: longer than a
    /// takeover can take.
    pub(crate) fn missed_window(&self) -> Duration {
        (self.ttl + self.renew + self.poll) * 3
    }
}

/// Which lease shards this relay may handle right now. Written by the
/// cluster loop and the bus reader, read (lock-free) for every envelope.
#[derive(Debug)]
pub(crate) struct Ownership {
    /// The zero of the deadlines below.
    started: Instant,
    /// Per shard: until when (ms after `started`) this relay may handle
    /// it; 0 when it does not hold it.
    until: Vec<AtomicU64>,
    /// Per shard: being handed over; the bus reader no longer dispatches
    /// it, while its worker finishes what was dispatched before.
    releasing: Vec<AtomicBool>,
    /// Serialises grants with revocations, so a renewal that started
    /// before a revocation cannot grant anything after it.
    epoch: Mutex<u64>,
    /// Whether the bus subscription is up: set by the reader once it has
    /// subscribed, cleared with every revocation (under `epoch`'s lock).
    /// Nothing is granted while it is down, so a renewal that runs between
    /// a lost subscription and the next one cannot take shards (and
    /// catch their rooms up) before the new subscription reads: what is
    /// published in between would be missed by both.
    subscribed: AtomicBool,
}

impl Ownership {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            started: Instant::now(),
            until: (0..shards.max(1)).map(|_| AtomicU64::new(0)).collect(),
            releasing: (0..shards.max(1)).map(|_| AtomicBool::new(false)).collect(),
            epoch: Mutex::new(0),
            subscribed: AtomicBool::new(false),
        }
    }

    /// The bus subscription is up (again): renewals may grant shards.
    pub(crate) fn subscribed(&self) {
        let _epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        self.subscribed.store(true, Ordering::Release);
    }

    /// Number of lease shards.
    pub(crate) fn shards(&self) -> usize {
        self.until.len()
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this relay's lease on `shard` is (locally) still valid.
    pub(crate) fn holds(&self, shard: usize) -> bool {
        self.until
            .get(shard)
            .is_some_and(|u| self.ms(Instant::now()) < u.load(Ordering::Acquire))
    }

    /// Whether the bus reader hands `shard`'s envelopes to the workers.
    pub(crate) fn dispatches(&self, shard: usize) -> bool {
        self.holds(shard)
            && !self
                .releasing
                .get(shard)
                .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// Shards held right now.
    pub(crate) fn held(&self) -> usize {
        (0..self.shards()).filter(|s| self.holds(*s)).count()
    }

    /// The current epoch (see [`Ownership::grant`]).
    fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `shards` until `until`, unless a revocation happened since
    /// `epoch` was read. Returns the shards that were not held before.
    fn grant(&self, epoch: u64, shards: &[usize], until: Instant) -> Option<Vec<usize>> {
        let current = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != epoch || !self.subscribed.load(Ordering::Acquire) {
            return None;
        }
        let now = self.ms(Instant::now());
        let until = self.ms(until);
        let mut new = Vec::new();
        for &s in shards {
            let Some(slot) = self.until.get(s) else {
                continue;
            };
            if slot.swap(until, Ordering::AcqRel) <= now {
                new.push(s);
            }
        }
        drop(current);
        Some(new)
    }

    /// Stops handling `shard` (its lease is gone or handed over).
    fn drop_shard(&self, shard: usize) {
        if let Some(slot) = self.until.get(shard) {
            slot.store(0, Ordering::Release);
        }
    }

    fn set_releasing(&self, shard: usize, releasing: bool) {
        if let Some(flag) = self.releasing.get(shard) {
            flag.store(releasing, Ordering::Release);
        }
    }

    /// Stops handling every shard at once (the bus subscription was lost).
    pub(crate) fn revoke_all(&self) {
        let mut epoch = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        *epoch += 1;
        self.subscribed.store(false, Ordering::Release);
        for slot in &self.until {
            slot.store(0, Ordering::Release);
        }
    }
}

/// What the bus reader dropped per shard it did not own: what a new owner
/// must catch up on.
#[derive(Debug)]
pub(crate) struct Missed {
    /// How long entries are kept.
    window: Duration,
    /// Per shard: rooms with dropped messages (or syncs), the highest
    /// dropped sequence id (`None`: unknown, read the store), last seen.
    rooms: Vec<HashMap<String, (Option<i64>, Instant)>>,
    /// Per shard: dropped `connected` events and `Control::Joined`
    /// envelopes ([`is_greeting`]), oldest first.
    greetings: Vec<VecDeque<(Instant, Envelope)>>,
    /// When entries older than `window` were last removed.
    pruned: Instant,
}

/// Whether a dropped envelope is one a later owner must still deliver by
/// itself, because nothing else would bring it: a new connection's
/// `connected`, or a join's `roomJoined` (`Control::Joined`).
fn is_greeting(envelope: &Envelope) -> bool {
    match (&envelope.control, &envelope.event) {
        (Some(Control::Joined { .. }), _) => true,
        (None, Some(event)) => event.get().starts_with(r#"{"type":"connected""#),
        _ => false,
    }
}

/// Most rooms remembered per shard.
const MISSED_ROOMS: usize = 8192;
/// Most greetings remembered per shard.
const MISSED_GREETINGS: usize = 512;

impl Missed {
    pub(crate) fn new(shards: usize, window: Duration) -> Self {
        Self {
            window,
            rooms: (0..shards.max(1)).map(|_| HashMap::new()).collect(),
            greetings: (0..shards.max(1)).map(|_| VecDeque::new()).collect(),
            pruned: Instant::now(),
        }
    }

    /// Remembers what a new owner of `shard` would have to catch up on
    /// from an envelope nobody here handles.
    pub(crate) fn note(&mut self, shard: usize, envelope: Envelope) {
        let now = Instant::now();
        if now.duration_since(self.pruned) >= Duration::from_secs(1) {
            self.prune(now);
        }
        let room = match (&envelope.control, &envelope.target, &envelope.event) {
            (Some(Control::Sync { room_id, .. }), _, _) => Some((room_id.clone(), None)),
            (None, Target::Room { .. }, Some(_)) => envelope
                .room_message()
                .map(|(room_id, seq)| (room_id.to_owned(), Some(seq))),
            (Some(Control::Joined { .. }), _, _) | (None, Target::Connection { .. }, Some(_))
                if is_greeting(&envelope) =>
            {
                if let Some(greetings) = self.greetings.get_mut(shard) {
                    if greetings.len() >= MISSED_GREETINGS {
                        greetings.pop_front();
                    }
                    greetings.push_back((now, envelope));
                }
                None
            }
            _ => None,
        };
        let (Some((room_id, seq)), Some(rooms)) = (room, self.rooms.get_mut(shard)) else {
            return;
        };
        if rooms.len() >= MISSED_ROOMS && !rooms.contains_key(&room_id) {
            return;
        }
        let entry = rooms.entry(room_id).or_insert((seq, now));
        entry.0 = match (entry.0, seq) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        entry.1 = now;
    }

    /// Takes what was noted for `shard`.
    pub(crate) fn take(&mut self, shard: usize) -> (Vec<(String, Option<i64>)>, Vec<Envelope>) {
        self.prune(Instant::now());
        let rooms = self
            .rooms
            .get_mut(shard)
            .map(|r| r.drain().map(|(room, (seq, _))| (room, seq)).collect())
            .unwrap_or_default();
        let greetings = self
            .greetings
            .get_mut(shard)
            .map(|g| g.drain(..).map(|(_, e)| e).collect())
            .unwrap_or_default();
        (rooms, greetings)
    }

    fn prune(&mut self, now: Instant) {
        self.pruned = now;
        let window = self.window;
        for rooms in &mut self.rooms {
            rooms.retain(|_, (_, seen)| now.duration_since(*seen) < window);
        }
        for greetings in &mut self.greetings {
            while greetings
                .front()
                .is_some_and(|(seen, _)| now.duration_since(*seen) >= window)
            {
                greetings.pop_front();
            }
        }
    }
}

/// A relay's fair share of `shards` among `members` (relay ids, `me`
/// among them): `shards / n`, plus one for the first `shards % n` ids in
/// sorted order, so the shares add up to `shards`.
pub(crate) fn fair_share(shards: usize, members: &[String], me: &str) -> usize {
    let mut ids: Vec<&str> = members.iter().map(String::as_str).collect();
    if !ids.contains(&me) {
        ids.push(me);
    }
    ids.sort_unstable();
    ids.dedup();
    let n = ids.len();
    let rank = ids.iter().position(|id| *id == me).unwrap_or(0);
    shards / n + usize::from(rank < shards % n)
}

/// Heartbeat and renewal in one step. `KEYS[1]`: members; `KEYS[2..]`:
/// every lease, shard 0 first. `ARGV`: relay id, ttl (ms). Returns the
/// live members, the shards this relay holds (renewed) and the free ones.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 10)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local held, free = {}, {}
for i = 2, #KEYS do
  local owner = redis.call('GET', KEYS[i])
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ttl)
    held[#held + 1] = i - 2
  elseif not owner then
    free[#free + 1] = i - 2
  end
end
return {members, held, free}
";

/// Takes up to `ARGV[3]` of the free leases in `KEYS`, in order, with
/// `SET NX PX`. `ARGV`: relay id, ttl (ms), how many. Returns the 1-based
/// positions in `KEYS` it took.
const ACQUIRE: &str = r"
local got = {}
local want = tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  if #got >= want then break end
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then got[#got + 1] = i end
end
return got
";

/// Deletes the leases in `KEYS[2..]` that this relay holds
/// (compare-and-`DEL`); with `ARGV[2] == '1'` also leaves `KEYS[1]`
/// (members). `ARGV[1]`: relay id.
const RELEASE: &str = r"
local n = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
if ARGV[2] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return n
";

/// The scripts, hashed once.
static HEARTBEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(HEARTBEAT));
static ACQUIRE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACQUIRE));
static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// Asks the cluster loop for an immediate renewal and waits for it.
#[derive(Debug, Clone)]
pub(crate) struct Refresh(mpsc::Sender<oneshot::Sender<()>>);

impl Refresh {
    /// Renews (and acquires) now; returns when done, or after `timeout`.
    pub(crate) async fn now(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(tx).await.is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

/// The lease loop of one relay.
pub(crate) struct Cluster {
    /// This relay's id in leases and members (unique per relay object).
    pub(crate) id: String,
    /// Runs the lease scripts.
    pub(crate) redis: RedisConn,
    /// Key names.
    pub(crate) keys: Keys,
    /// Timing.
    pub(crate) options: ClusterOptions,
    /// What the bus reader and the workers check.
    pub(crate) ownership: Arc<Ownership>,
    /// What was dropped while a shard was not ours.
    pub(crate) missed: Arc<Mutex<Missed>>,
    /// The workers, for `Release` and `Acquired`. Weak, so that the
    /// workers stop when the bus reader (the only strong holder) does.
    pub(crate) workers: Vec<mpsc::WeakSender<Work>>,
    /// `shards_owned`, `shards_acquired`, `shards_released`.
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Once cancelled (shutdown began) the loop only renews: no new
    /// shards, no releases, until it is stopped.
    pub(crate) draining: CancellationToken,
}

impl Cluster {
    /// A channel for [`Refresh`] and the loop's end of it.
    pub(crate) fn refresh_channel() -> (Refresh, mpsc::Receiver<oneshot::Sender<()>>) {
        let (tx, rx) = mpsc::channel(4);
        (Refresh(tx), rx)
    }

    /// Renews, acquires and releases until `stop`; then gives every lease
    /// back and leaves the member set.
    pub(crate) async fn run(
        mut self,
        stop: CancellationToken,
        mut refresh: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let mut below_share = true;
        // The reader drops its end at shutdown; renewals go on until `stop`.
        let mut requests_open = true;
        loop {
            let wait = if below_share {
                self.options.poll
            } else {
                self.options.renew
            };
            let reply = tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => None,
                request = refresh.recv(), if requests_open => match request {
                    Some(reply) => Some(reply),
                    None => {
                        requests_open = false;
                        continue;
                    }
                },
            };
            below_share = match self.step().await {
                Ok(below) => below,
                Err(err) => {
                    tracing::warn!(error = %err, cause = ?err, "renewing the relay's shard leases failed; will retry");
                    true
                }
            };
            self.metrics
                .shards_owned
                .store(self.ownership.held() as u64, Ordering::Relaxed);
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
        }
        self.leave().await;
    }

    fn lease_keys(&self, shards: impl IntoIterator<Item = usize>) -> Vec<String> {
        shards
            .into_iter()
            .map(|s| self.keys.relay_lease(s))
            .collect()
    }

    /// One round: heartbeat, renew, take free shards up to the fair share,
    /// release extras. Returns whether this relay is still below its share.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub(crate) async fn step(&mut self) -> chat_shared::Result<bool> {
        let shards = self.ownership.shards();
        let started = Instant::now();
        let epoch = self.ownership.epoch();
        let mut script = HEARTBEAT_SCRIPT.prepare_invoke();
        script.key(self.keys.relay_members());
        for key in self.lease_keys(0..shards) {
            script.key(key);
        }
        script.arg(&self.id).arg(ttl_ms(self.options.ttl));
        let (members, mut held, free): (Vec<String>, Vec<usize>, Vec<usize>) =
            script.invoke_async(&mut self.redis).await?;
        let draining = self.draining.is_cancelled();
        let share = fair_share(shards, &members, &self.id);
        if held.len() < share && !free.is_empty() && !draining {
            // Start at an offset of our own, so relays that start together
            // do not all reach for the same shards first.
            let offset = crate::lanes::key_hash(&self.id) as usize % free.len();
            let candidates: Vec<usize> = free[offset..]
                .iter()
                .chain(&free[..offset])
                .copied()
                .collect();
            let mut acquire = ACQUIRE_SCRIPT.prepare_invoke();
            for key in self.lease_keys(candidates.iter().copied()) {
                acquire.key(key);
            }
            acquire
                .arg(&self.id)
                .arg(ttl_ms(self.options.ttl))
                .arg(share - held.len());
            let got: Vec<usize> = acquire.invoke_async(&mut self.redis).await?;
            held.extend(got.iter().filter_map(|i| candidates.get(i.wrapping_sub(1))));
        }
        held.sort_unstable();
        let until = started + self.options.ttl.saturating_sub(self.options.margin);
        let Some(new) = self.ownership.grant(epoch, &held, until) else {
            // The bus subscription was lost meanwhile: the reader asks again.
            return Ok(true);
        };
        for shard in 0..shards {
            if held.binary_search(&shard).is_err() && self.ownership.holds(shard) {
                tracing::warn!(shard, "lost a shard lease to another relay or to expiry");
                self.ownership.drop_shard(shard);
            }
        }
        if !new.is_empty() {
            tracing::info!(
                relay = %self.id, shards = ?new, held = held.len(), share,
                members = members.len(), "took lease shards"
            );
            for shard in &new {
                self.acquired(*shard).await;
            }
        }
        if held.len() > share && !draining {
            let extras: Vec<usize> = held[share..].to_vec();
            self.release(&extras, until).await?;
        }
        Ok(held.len() < share)
    }

    /// Tells the shard's worker to catch up on what was missed; from now
    /// on the reader dispatches the shard.
    async fn acquired(&self, shard: usize) {
        RelayMetrics::bump(&self.metrics.shards_acquired);
        let (rooms, greetings) = self
            .missed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(shard);
        if let Some(worker) = self.worker(shard) {
            let _ = worker
                .send(Work::Acquired {
                    shard,
                    rooms,
                    greetings,
                })
                .await;
        }
    }

    fn worker(&self, shard: usize) -> Option<mpsc::Sender<Work>> {
        self.workers
            .get(crate::lanes::lane_of(shard, self.workers.len()))
            .and_then(mpsc::WeakSender::upgrade)
    }

    /// Hands `shards` over: stop dispatching them, let their workers
    /// finish and write back, then delete the leases. A shard whose
    /// worker could not finish in time is kept (and caught up).
    async fn release(&mut self, shards: &[usize], until: Instant) -> chat_shared::Result<()> {
        // Leave room for the worker's write-back before our lease lapses.
        let deadline = until
            .checked_sub(self.options.margin)
            .unwrap_or(until)
            .max(Instant::now() + Duration::from_millis(100));
        let mut pending = Vec::new();
        for &shard in shards {
            self.ownership.set_releasing(shard, true);
            let (done, finished) = oneshot::channel();
            match self.worker(shard) {
                Some(worker)
                    if worker
                        .send(Work::Release {
                            shard,
                            deadline,
                            done,
                        })
                        .await
                        .is_ok() =>
                {
                    pending.push((shard, finished));
                }
                _ => self.ownership.set_releasing(shard, false),
            }
        }
        let mut released = Vec::new();
        for (shard, finished) in pending {
            if finished.await.unwrap_or(false) {
                released.push(shard);
            } else {
                tracing::warn!(shard, "could not hand a shard over in time; keeping it");
                self.ownership.set_releasing(shard, false);
                self.acquired(shard).await;
            }
        }
        if released.is_empty() {
            return Ok(());
        }
        let mut script = RELEASE_SCRIPT.prepare_invoke();
        script.key(self.keys.relay_members());
        for key in self.lease_keys(released.iter().copied()) {
            script.key(key);
        }
        script.arg(&self.id).arg("0");
        let result: chat_shared::Result<i64> = script
            .invoke_async(&mut self.redis)
            .await
            .map_err(Into::into);
        for &shard in &released {
            self.ownership.drop_shard(shard);
            self.ownership.set_releasing(shard, false);
        }
        self.metrics
            .shards_released
            .fetch_add(released.len() as u64, Ordering::Relaxed);
        tracing::info!(relay = %self.id, shards = ?released, "handed lease shards over");
        // A failed DEL leaves leases that expire by themselves (ttl).
        result.map(|_| ())
    }

    /// Gives every lease back and leaves the members, so the other relays
    /// take over at once (shutdown, after the drain).
    async fn leave(&mut self) {
        let shards = self.ownership.shards();
        let mut script = RELEASE_SCRIPT.prepare_invoke();
        script.key(self.keys.relay_members());
        for key in self.lease_keys(0..shards) {
            script.key(key);
        }
        script.arg(&self.id).arg("1");
        let left: redis::RedisResult<i64> = script.invoke_async(&mut self.redis).await;
        self.ownership.revoke_all();
        self.metrics.shards_owned.store(0, Ordering::Relaxed);
        match left {
            Ok(n) => tracing::info!(relay = %self.id, released = n, "left the relay cluster"),
            Err(err) => tracing::warn!(
                error = %err,
                "could not give the shard leases back; they expire by themselves"
            ),
        }
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn fair_shares_add_up_to_every_shard() {
        for n in 1..=7 {
            let members: Vec<String> = (0..n).map(|i| format!("relay-{i}")).collect();
            let shares: Vec<usize> = members
                .iter()
                .map(|me| fair_share(64, &members, me))
                .collect();
            assert_eq!(shares.iter().sum::<usize>(), 64, "{n} relays: {shares:?}");
            let (min, max) = (shares.iter().min(), shares.iter().max());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{shares:?}");
        }
        // A relay not yet in the member list counts itself.
        assert_eq!(fair_share(64, &ids(&["a"]), "b"), 32);
        assert_eq!(fair_share(64, &[], "a"), 64);
        assert_eq!(fair_share(3, &ids(&["a", "b"]), "a"), 2);
        assert_eq!(fair_share(3, &ids(&["a", "b"]), "b"), 1);
    }

    #[test]
    fn ownership_lapses_at_its_deadline_and_revocation_wins_until_resubscribed() {
        let own = Ownership::new(4);
        own.subscribed();
        assert!(!own.holds(0));
        let epoch = own.epoch();
        let new = own.grant(epoch, &[0, 2], Instant::now() + Duration::from_secs(60));
        assert_eq!(new, Some(vec![0, 2]));
        assert!(own.holds(0) && own.dispatches(0) && !own.holds(1) && own.holds(2));
        assert_eq!(own.held(), 2);
        // Renewed: nothing new.
        let again = own.grant(epoch, &[0, 2], Instant::now() + Duration::from_secs(60));
        assert_eq!(again, Some(vec![]));
        own.set_releasing(2, true);
        assert!(own.holds(2) && !own.dispatches(2));
        own.revoke_all();
        assert_eq!(own.held(), 0);
        // A renewal that started before the revocation grants nothing.
        assert_eq!(
            own.grant(epoch, &[0], Instant::now() + Duration::from_secs(60)),
            None
        );
        assert!(!own.holds(0));
        // So does one that started after it, until the bus subscription is
        // up again.
        assert_eq!(
            own.grant(own.epoch(), &[0], Instant::now() + Duration::from_secs(60)),
            None
        );
        own.subscribed();
        let expired = own.grant(own.epoch(), &[1], Instant::now());
        assert_eq!(expired, Some(vec![1]));
        assert!(!own.holds(1), "a deadline in the past holds nothing");
    }

    fn envelope(json: &str) -> Envelope {
        serde_json::from_str(json).expect("envelope")
    }

    #[test]
    fn missed_keeps_rooms_with_their_highest_message_and_connected_events() {
        let mut missed = Missed::new(2, Duration::from_secs(30));
        let message = |seq: i64| {
            envelope(&format!(
                r#"{{"origin":"t","target":{{"type":"room","roomId":"r1"}},"sequenceId":{seq},"event":{{"type":"message","payload":{{"sequenceId":{seq}}}}}}}"#
            ))
        };
        missed.note(1, message(4));
        missed.note(1, message(3));
        // The relay reads the sequence id from the envelope, never the event.
        missed.note(1, envelope(
            r#"{"origin":"t","target":{"type":"room","roomId":"r4"},"event":{"type":"message","payload":{"sequenceId":9}}}"#,
        ));
        missed.note(1, envelope(
            r#"{"origin":"t","target":{"type":"room","roomId":"r2"},"event":{"type":"typing","payload":{}}}"#,
        ));
        missed.note(1, envelope(
            r#"{"origin":"t","target":{"type":"connection","connectionId":"c1"},"event":{"type":"connected","payload":{}}}"#,
        ));
        missed.note(0, envelope(
            r#"{"origin":"t","target":{"type":"connection","connectionId":"c2"},"control":{"type":"sync","roomId":"r3","connectionId":"c2"}}"#,
        ));
        let (rooms, greetings) = missed.take(1);
        assert_eq!(rooms, vec![("r1".to_owned(), Some(4))]);
        assert_eq!(greetings.len(), 1);
        let (rooms, greetings) = missed.take(1);
        assert!(rooms.is_empty() && greetings.is_empty(), "taken once");
        let (rooms, _) = missed.take(0);
        assert_eq!(rooms, vec![("r3".to_owned(), None)]);
    }

    #[test]
    fn missed_forgets_what_is_older_than_its_window() {
        let mut missed = Missed::new(1, Duration::ZERO);
        missed.note(0, envelope(
            r#"{"origin":"t","target":{"type":"room","roomId":"r1"},"sequenceId":1,"event":{"type":"message","payload":{"sequenceId":1}}}"#,
        ));
        let (rooms, greetings) = missed.take(0);
        assert!(rooms.is_empty() && greetings.is_empty());
    }
}
