//! Views for the operator console: rooms by subscriber count, live
//! connections by endpoint. No `SCAN` over the keyspace (a cluster has one
//! keyspace per node): both read index keys, one per partition
//! (`presence:{p}:rooms`, `presence:{p}:leases`), all partitions in one
//! pipeline on a single Redis and concurrently on a cluster.

use super::{Presence, now_ms};
use crate::domain::RoomId;
use crate::error::Result;
use crate::presence::keys::PARTITIONS;

impl Presence {
    /// Rooms with joined connections and how many each has, for the
    /// operator console: the partitions' room indexes (a join adds its
    /// room), then `HLEN` of each. Reads at most `max_rooms` rooms; the flag
    /// is true when there were more. Rooms found empty leave their index
    /// here (a later join adds them back: `SADD` in its script). Sorted by
    /// subscriber count, most first.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis does not answer.
    pub async fn room_subscriber_counts(
        &self,
        max_rooms: usize,
    ) -> Result<(Vec<(RoomId, u64)>, bool)> {
        let indexes = (0..PARTITIONS)
            .map(|p| {
                let key = self.keys.rooms_index(p);
                let mut cmd = redis::cmd("SRANDMEMBER");
                cmd.arg(&key).arg(max_rooms + 1);
                (key, cmd)
            })
            .collect();
        let mut rooms: Vec<String> = Vec::new();
        for batch in self.redis.query_grouped(indexes).await? {
            let batch: Vec<String> = redis::from_redis_value(batch)?;
            rooms.extend(batch);
        }
        rooms.sort();
        rooms.dedup();
        let truncated = rooms.len() > max_rooms;
        rooms.truncate(max_rooms);
        let lengths = rooms
            .iter()
            .map(|room| {
                let key = self.keys.room_conns(room);
                let mut cmd = redis::cmd("HLEN");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        let counts = self.redis.query_grouped(lengths).await?;
        let mut listed = Vec::new();
        let mut empty = Vec::new();
        for (room, count) in rooms.into_iter().zip(counts) {
            let count: u64 = redis::from_redis_value(count)?;
            if count == 0 {
                let key = self.keys.rooms_index_of(&room);
                let mut cmd = redis::cmd("SREM");
                cmd.arg(&key).arg(&room);
                empty.push((key, cmd));
            } else {
                listed.push((RoomId::from_trusted(room), count));
            }
        }
        // Best effort: a join racing this re-adds its room in its own step.
        self.redis.query_grouped(empty).await?;
        listed.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok((listed, truncated))
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
        let now = now_ms();
        let leases = (0..PARTITIONS)
            .map(|p| {
                let key = self.keys.leases(p);
                let mut cmd = redis::cmd("ZRANGEBYSCORE");
                cmd.arg(&key)
                    .arg(now)
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(max_connections + 1);
                (key, cmd)
            })
            .collect();
        let mut ids: Vec<String> = Vec::new();
        for batch in self.redis.query_grouped(leases).await? {
            let batch: Vec<String> = redis::from_redis_value(batch)?;
            ids.extend(batch);
        }
        let truncated = ids.len() > max_connections;
        ids.truncate(max_connections);
        let endpoints = ids
            .iter()
            .map(|id| {
                let key = self.keys.conn(id);
                let mut cmd = redis::cmd("HGET");
                cmd.arg(&key).arg("endpoint");
                (key, cmd)
            })
            .collect();
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for endpoint in self.redis.query_grouped(endpoints).await? {
            let endpoint: Option<String> = redis::from_redis_value(endpoint)?;
            if let Some(endpoint) = endpoint {
                *counts.entry(endpoint).or_default() += 1;
            }
        }
        Ok((counts.into_iter().collect(), truncated))
    }
}
