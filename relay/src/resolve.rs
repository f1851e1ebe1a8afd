//! From an envelope's target to the connections that get its event, with
//! batched Redis reads (never one round trip per connection):
//!
//! | target | reads |
//! |---|---|
//! | `room` | one `HGETALL room:{id}:conns` |
//! | `rooms` | one pipeline of `HGETALL`s; a connection in several rooms counts once |
//! | `user` | `ZRANGE presence:user:{id}`, then one pipeline of `HMGET conn:{id}` |
//! | `connection` | one `HMGET conn:{id}` |
//!
//! `include` adds connections by id (one pipeline, skipping those the
//! target already has); `exclude` and `excludeUsers` then take connections
//! away. A *pending* subscription (a join whose `roomJoined` is not posted
//! yet) gets nothing, by the room or by `include`. Nothing read here is cached: subscriptions and registrations change
//! all the time, and a stale answer would lose or misdirect events.

use std::collections::HashSet;

use chat_shared::bus::{Envelope, Target};
use chat_shared::presence::{Presence, Subscriber};

/// Who gets one envelope's event.
#[derive(Debug, Default)]
pub(crate) struct Recipients {
    /// Connections reached through a room subscription, with the watermark
    /// that subscription carries (room targets only; other targets have
    /// `watermark` 0 and no watermark logic).
    pub(crate) subscribed: Vec<Subscriber>,
    /// Connections reached by id (`include`, or a user or connection
    /// target).
    pub(crate) direct: Vec<Subscriber>,
    /// Subscribed connections that `exclude` / `excludeUsers` left out:
    /// they still count as having seen a room's `message` (the publisher
    /// decided they need not get it), so it is never "filled" later.
    pub(crate) excluded: Vec<Subscriber>,
}

/// Resolves `envelope`'s target, `include`, `exclude` and `excludeUsers`.
///
/// # Errors
/// `UNAVAILABLE` when Redis does not answer.
pub(crate) async fn recipients(
    presence: &Presence,
    envelope: &Envelope,
) -> chat_shared::Result<Recipients> {
    // A pending subscription gets none of the room's events until the
    // relay has posted its `roomJoined` (`Control::Joined`); the join's
    // catch-up brings it what it missed. Nor does its connection get them
    // by `include`: the sender's acknowledgement comes with that catch-up.
    let mut pending: HashSet<String> = HashSet::new();
    let mut subscribed = Vec::new();
    let mut direct = Vec::new();
    match &envelope.target {
        Target::Room { room_id } => {
            subscribed = presence
                .subscribers(&[room_id.as_str()])
                .await?
                .into_iter()
                .flatten()
                .filter(|s| joined(s, &mut pending))
                .collect();
        }
        Target::Rooms { room_ids } => {
            let rooms: Vec<&str> = room_ids.iter().map(String::as_str).collect();
            let mut seen = HashSet::new();
            subscribed = presence
                .subscribers(&rooms)
                .await?
                .into_iter()
                .flatten()
                .filter(|s| joined(s, &mut pending))
                .filter(|s| seen.insert(s.connection_id.clone()))
                .collect();
        }
        Target::User { user_id } => {
            let ids = presence.user_connections(user_id).await?;
            direct = routes(presence, &ids).await?;
        }
        Target::Connection { connection_id } => {
            direct = routes(presence, std::slice::from_ref(connection_id)).await?;
        }
    }
    if !envelope.include.is_empty() {
        let known: HashSet<&str> = subscribed
            .iter()
            .chain(&direct)
            .map(|s| s.connection_id.as_str())
            .chain(pending.iter().map(String::as_str))
            .collect();
        let mut wanted: Vec<String> = Vec::new();
        for id in &envelope.include {
            if !known.contains(id.as_str()) && !wanted.contains(id) {
                wanted.push(id.clone());
            }
        }
        let extra = routes(presence, &wanted).await?;
        direct.extend(extra);
    }
    let left_out = |s: &Subscriber| {
        envelope.exclude.contains(&s.connection_id) || envelope.exclude_users.contains(&s.user_id)
    };
    let (excluded, subscribed) = subscribed.into_iter().partition(|s| left_out(s));
    direct.retain(|s| !left_out(s));
    Ok(Recipients {
        subscribed,
        direct,
        excluded,
    })
}

/// Whether a subscription is joined; a pending one's connection is noted
/// in `pending` instead.
fn joined(s: &Subscriber, pending: &mut HashSet<String>) -> bool {
    if s.pending {
        pending.insert(s.connection_id.clone());
    }
    !s.pending
}

/// The routes of connections by id, leaving out those that are gone.
async fn routes(presence: &Presence, ids: &[String]) -> chat_shared::Result<Vec<Subscriber>> {
    Ok(presence
        .connection_routes(ids)
        .await?
        .into_iter()
        .flatten()
        .collect())
}
