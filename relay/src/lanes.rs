//! How envelopes are split, and what a worker lane carries.
//!
//! Three levels, each with its own name:
//!
//! - an envelope's **ordering key** (a room id; a user id for presence; a
//!   connection id for `connected`; a `Control::Sync` goes by its room)
//!   is hashed (FNV-1a) into one of `RELAY_SHARDS` **lease shards**;
//! - one relay at a time holds a lease shard's lease in Redis (module
//!   `cluster`) and handles its envelopes;
//! - inside the relay, lease shard `n` goes to **worker lane**
//!   `n % lanes`, a queue of [`Work`] that one `Worker` (module `worker`)
//!   handles in order.
//!
//! So one room is handled by one relay and one worker, in publish order.

use std::time::Instant;

use chat_shared::bus::Envelope;
use tokio::sync::oneshot;

/// FNV-1a of a key: stable across processes, runs and machines, which
/// every relay of a cluster needs to agree on lease shards (and makes logs
/// comparable).
pub(crate) fn key_hash(key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The lease shard (of `lease_shards`) of an ordering key.
pub(crate) fn lease_shard_of_key(key: &str, lease_shards: usize) -> usize {
    usize::try_from(key_hash(key) % lease_shards.max(1) as u64).unwrap_or(0)
}

/// The lease shard of an envelope: by the key of its bus channel
/// ([`Envelope::channel_key`]: its ordering key, except that a
/// `Control::Joined` or `Control::Sync` goes by its room, since its target
/// is a connection but it must be ordered with the room's messages).
pub(crate) fn lease_shard_of(envelope: &Envelope, lease_shards: usize) -> usize {
    lease_shard_of_key(envelope.channel_key(), lease_shards)
}

/// The worker lane (of `lanes`) that handles lease shard `lease_shard`.
pub(crate) fn lane_of(lease_shard: usize, lanes: usize) -> usize {
    lease_shard % lanes.max(1)
}

/// What a worker is given to do, in order.
///
/// Nearly every item is an envelope, so the envelope stays inline: boxing
/// it would cost an allocation per envelope to save queue slots' bytes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    /// An envelope of lease shard `shard`, which this relay held when
    /// the bus reader dispatched it.
    Envelope {
        /// Its lease shard.
        shard: usize,
        /// The envelope.
        envelope: Envelope,
    },
    /// Hand lease shard `shard` over: everything of it before this item
    /// is handled; wait until it is posted, write its rooms' marks back
    /// and forget them; answer whether that happened before `deadline`.
    Release {
        /// The shard.
        shard: usize,
        /// Give up (answer false, change nothing) after this.
        deadline: Instant,
        /// The answer.
        done: oneshot::Sender<bool>,
    },
    /// Lease shard `shard` became ours: deliver the `connected` events
    /// nobody delivered, then every stored message of `rooms` above each
    /// subscriber's mark (with the highest sequence id seen dropped, when
    /// known).
    Acquired {
        /// The shard.
        shard: usize,
        /// Rooms with dropped messages.
        rooms: Vec<(String, Option<i64>)>,
        /// Dropped `connected` envelopes, oldest first.
        greetings: Vec<Envelope>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_envelopes_go_to_their_rooms_lease_shard_and_lane() {
        let json = |target: &str, rest: &str| -> Envelope {
            serde_json::from_str(&format!(r#"{{"origin":"t","target":{target}{rest}}}"#))
                .expect("envelope")
        };
        let room = json(
            r#"{"type":"room","roomId":"room_1"}"#,
            r#","event":{"type":"x","payload":{}}"#,
        );
        let sync = json(
            r#"{"type":"connection","connectionId":"c1"}"#,
            r#","control":{"type":"sync","roomId":"room_1","connectionId":"c1"}"#,
        );
        for shards in [1, 7, 16] {
            assert_eq!(lease_shard_of(&room, shards), lease_shard_of(&sync, shards));
            assert!(lease_shard_of(&room, shards) < shards);
            assert!(lane_of(lease_shard_of(&room, shards), 4) < 4);
        }
    }
}
