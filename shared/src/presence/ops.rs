//! Bounded scans for the operator console: rooms by subscriber count, live
//! connections by endpoint.

use super::{Presence, now_ms};
use crate::domain::RoomId;
use crate::error::Result;
use crate::metrics::CountedRedis;

impl Presence {
    /// Rooms with joined connections and how many each has, for the
    /// operator console: SCAN for `room:*:conns` under the prefix, then
    /// HLEN in one pipeline. Bounded: at most `max_rooms` rooms and a few
    /// hundred SCAN calls, so a big keyspace costs a bounded read. The flag
    /// is true when the scan stopped early (more rooms may exist). Sorted
    /// by subscriber count, most first.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn room_subscriber_counts(
        &self,
        max_rooms: usize,
    ) -> Result<(Vec<(RoomId, u64)>, bool)> {
        const MAX_SCANS: usize = 200;
        let rooms = self.keys.room_conns_pattern();
        let pattern = format!("{}*{}", glob_escape(&rooms.head), glob_escape(rooms.tail));
        let mut redis = CountedRedis(self.redis.clone());
        let (mut cursor, mut keys, mut scans) = (0u64, Vec::new(), 0);
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut redis)
                .await?;
            keys.extend(batch);
            cursor = next;
            scans += 1;
            if cursor == 0 || keys.len() >= max_rooms || scans >= MAX_SCANS {
                break;
            }
        }
        let truncated = cursor != 0 || keys.len() > max_rooms;
        keys.sort();
        keys.dedup();
        keys.truncate(max_rooms);
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.hlen(key);
        }
        let counts: Vec<u64> = if keys.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut redis).await?
        };
        let mut rooms: Vec<(RoomId, u64)> = keys
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .filter_map(|(key, n)| {
                let id = key.strip_prefix(&rooms.head)?.strip_suffix(rooms.tail)?;
                Some((RoomId::from_trusted(id.to_owned()), n))
            })
            .collect();
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok((rooms, truncated))
    }

    /// Live connections (unexpired leases) grouped by their Management API
    /// endpoint, which names the gateway instance (or API stage) that holds
    /// them, for the operator console. Reads at most `max_connections`
    /// registrations; the flag is true when there were more.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn connections_by_endpoint(
        &self,
        max_connections: usize,
    ) -> Result<(Vec<(String, u64)>, bool)> {
        let mut redis = CountedRedis(self.redis.clone());
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.leases())
            .arg(now_ms())
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(max_connections + 1)
            .query_async(&mut redis)
            .await?;
        let truncated = ids.len() > max_connections;
        let ids = &ids[..ids.len().min(max_connections)];
        if ids.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(self.keys.conn(id), "endpoint");
        }
        let endpoints: Vec<Option<String>> = pipe.query_async(&mut redis).await?;
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for endpoint in endpoints.into_iter().flatten() {
            *counts.entry(endpoint).or_default() += 1;
        }
        Ok((counts.into_iter().collect(), truncated))
    }
}

/// Escapes the glob characters of a SCAN MATCH pattern (`*?[]\`), so a key
/// prefix is matched literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
