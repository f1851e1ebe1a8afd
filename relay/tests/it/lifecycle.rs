//! Connections that go away, the sweeper, losing the bus, shutting down.

use std::time::Duration;

use crate::common::{Stack, Status, WAIT, random_suffix, redis_url, wait_for, wait_for_async};

/// Whether `key` exists in Redis.
async fn exists(stack: &Stack, key: &str) -> bool {
    let mut redis = stack.redis().await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut redis)
        .await
        .unwrap()
        == 1
}

#[tokio::test]
async fn gone_for_an_established_connection_removes_it_and_announces_offline() {
    let stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.join(&b1, &room).await;
    stack.gateway.wait_events(&b1, "connected", 1).await;
    // Bob's socket closed without a $disconnect.
    stack.gateway.set_status(&b1, Status::Gone);
    stack.send(&a1, &room, "anyone there?").await;

    let offline = wait_for("bob announced offline to alice", WAIT, || {
        stack
            .gateway
            .events(&a1, "presenceUpdate")
            .into_iter()
            .find(|e| e["payload"]["userId"] == "bob" && e["payload"]["status"] == "offline")
    })
    .await;
    assert!(offline["payload"]["timestamp"].is_string());
    assert!(!exists(&stack, &stack.keys().conn(&b1)).await);
    assert!(!exists(&stack, &stack.keys().conn_rooms(&b1)).await);
    let subscribers = stack
        .adapters
        .presence
        .subscribers(&[room.as_str()])
        .await
        .unwrap();
    assert!(subscribers[0].iter().all(|s| s.connection_id != b1));
    let online = stack
        .adapters
        .presence
        .online_among(&[crate::common::auth_user("bob").id])
        .await
        .unwrap();
    assert!(online.is_empty());
    assert_eq!(stack.metrics.snapshot().posts_gone, 1);
    assert_eq!(stack.gateway.sequences(&a1), [1]);
}

/// A connection of `user` whose `$connect` has run for `age` and is still
/// running (API Gateway refuses posts to it); once a few posts were refused
/// it opens. Its `connected` must arrive, once, and it must not have been
/// removed as stale.
async fn refused_while_connecting_then_opened(stack: &Stack, user: &str, age: Duration) {
    let c1 = stack.connect_with(user, age, Status::Pending).await;
    wait_for("posts refused while connecting", WAIT, || {
        (stack.gateway.refused(&c1) >= 2).then_some(())
    })
    .await;
    stack.gateway.set_status(&c1, Status::Live);
    let connected = stack.gateway.wait_events(&c1, "connected", 1).await;
    assert_eq!(connected.len(), 1);
    assert_eq!(connected[0]["payload"]["userId"], user);
    assert!(exists(stack, &stack.keys().conn(&c1)).await);
    let m = stack.metrics.snapshot();
    assert_eq!(m.posts_gone, 0, "{m:?}");
    assert!(m.gone_retries >= 2, "{m:?}");
}

#[tokio::test]
async fn gone_for_a_young_connection_is_retried_until_it_is_accepted() {
    // API Gateway refuses posts while $connect runs; `connected` is
    // published during $connect.
    let stack = Stack::start().await;
    refused_while_connecting_then_opened(&stack, "carol", Duration::ZERO).await;
}

/// A `$connect` that took 10 s (a cold Lambda, a Redis Cluster timing out
/// in a storm: API Gateway allows 29 s) leaves a connection whose
/// `connectedAt` is 10 s old when API Gateway still refuses posts to it.
/// With the default options it is still young: its `connected` is retried
/// until delivered, and it is not removed as stale (with a 5 s window it
/// was, and its first frame got `UNAUTHORIZED`).
#[tokio::test]
async fn a_connection_whose_connect_ran_for_seconds_is_not_taken_for_stale() {
    let stack = Stack::start().await;
    refused_while_connecting_then_opened(&stack, "dora", Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_connection_that_never_opens_is_removed_after_the_young_window() {
    let mut stack = Stack::build(|_| {}).await;
    stack.options.young_connection = Duration::from_millis(300);
    stack.start_relay().await;
    let c1 = stack
        .connect_with("carol", Duration::ZERO, Status::Pending)
        .await;
    let key = stack.keys().conn(&c1);
    wait_for_async("the connection removed", WAIT, || async {
        (!exists(&stack, &key).await).then_some(())
    })
    .await;
    assert_eq!(stack.metrics.snapshot().posts_gone, 1);
    assert!(stack.gateway.refused(&c1) >= 2);
}

#[tokio::test]
async fn the_sweeper_removes_expired_leases_and_closes_them_at_the_gateway() {
    let stack = Stack::build(|vars| {
        vars.insert("PRESENCE_TTL_SECONDS".into(), "1".into());
    })
    .await
    .started()
    .await;
    assert_eq!(stack.options.sweep_interval, Duration::from_secs(1));
    let b1 = stack.connect("bob").await;
    wait_for("DeleteConnection for the expired connection", WAIT, || {
        stack.gateway.deletes().contains(&b1).then_some(())
    })
    .await;
    assert!(!exists(&stack, &stack.keys().conn(&b1)).await);
    let m = stack.metrics.snapshot();
    assert!(m.swept >= 1 && m.sweeps >= 1, "{m:?}");
}

/// A Redis ACL user only the relay's subscription uses, so that killing
/// its pub/sub connection touches nobody else's (other suites share this
/// Redis). Deleted on drop.
struct RelayRedisUser {
    name: String,
}

impl RelayRedisUser {
    /// The test Redis's nodes (one, or a cluster's).
    fn nodes() -> Vec<String> {
        redis_url()
            .split(',')
            .map(|u| u.trim().to_owned())
            .collect()
    }

    /// A connection to one node.
    async fn connect(node: &str) -> redis::aio::MultiplexedConnection {
        redis::Client::open(node)
            .expect("node url")
            .get_multiplexed_async_connection()
            .await
            .expect("node answers")
    }

    async fn create(_stack: &Stack) -> (Self, String) {
        let name = format!("relay_test_{}", random_suffix());
        let password = random_suffix();
        let mut urls = Vec::new();
        for node in Self::nodes() {
            let mut redis = Self::connect(&node).await;
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&name)
                .arg("on")
                .arg(format!(">{password}"))
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .query_async(&mut redis)
                .await
                .expect("ACL SETUSER");
            let rest = node.strip_prefix("redis://").expect("a redis:// URL");
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            urls.push(format!("redis://{name}:{password}@{host}"));
        }
        (Self { name: name.clone() }, urls.join(","))
    }

    /// Kills this user's pub/sub connections on every node; how many.
    async fn kill_pubsub(&self) -> i64 {
        let mut killed = 0;
        for node in Self::nodes() {
            let mut redis = Self::connect(&node).await;
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .arg("USER")
                .arg(&self.name)
                .query_async(&mut redis)
                .await
                .unwrap();
            killed += n;
        }
        killed
    }
}

impl Drop for RelayRedisUser {
    fn drop(&mut self) {
        for node in Self::nodes() {
            if let Ok(mut redis) = redis::Client::open(node).and_then(|c| c.get_connection()) {
                let _: redis::RedisResult<i64> = redis::cmd("ACL")
                    .arg("DELUSER")
                    .arg(&self.name)
                    .query(&mut redis);
            }
        }
    }
}

#[tokio::test]
async fn delivery_resumes_after_the_bus_subscription_is_killed() {
    let mut stack = Stack::build(|_| {}).await;
    let (user, url) = RelayRedisUser::create(&stack).await;
    stack.relay_redis_url = url;
    stack.start_relay().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.join(&b1, &room).await;
    stack.send(&a1, &room, "one").await;
    stack.gateway.wait_sequence(&b1, 1).await;
    assert_eq!(stack.metrics.snapshot().subscriptions, 1);

    let killed = user.kill_pubsub().await;
    // One connection on a single Redis; one per node holding a channel on
    // a cluster.
    assert!(killed >= 1, "the relay's subscription");
    // Published while the relay is (probably) not subscribed: lost on the
    // bus, filled from PostgreSQL before the next message.
    stack.send(&a1, &room, "two").await;
    wait_for("a new subscription", WAIT, || {
        (stack.metrics.snapshot().subscriptions >= 2).then_some(())
    })
    .await;
    stack.wait_subscribers(1).await;
    stack.send(&a1, &room, "three").await;
    assert_eq!(stack.gateway.wait_sequence(&b1, 3).await, [1, 2, 3]);
    assert_eq!(stack.gateway.wait_sequence(&a1, 3).await, [1, 2, 3]);
}

#[tokio::test]
async fn shutdown_finishes_queued_posts_before_returning() {
    let mut stack = Stack::start().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.join(&b1, &room).await;
    stack.gateway.wait_events(&b1, "connected", 1).await;
    stack.gateway.set_delay(Duration::from_millis(40));
    let before = stack.metrics.snapshot().envelopes;
    for i in 1..=20 {
        stack.send(&a1, &room, &format!("m{i}")).await;
    }
    wait_for("the relay read all 20 envelopes", WAIT, || {
        (stack.metrics.snapshot().envelopes >= before + 20).then_some(())
    })
    .await;
    assert!(
        stack.gateway.sequences(&b1).len() < 20,
        "posts are still queued at shutdown"
    );
    stack.stop_relay().await;
    let expected: Vec<i64> = (1..=20).collect();
    assert_eq!(stack.gateway.sequences(&b1), expected);
    assert_eq!(stack.gateway.sequences(&a1), expected);
    stack.wait_subscribers(0).await;
}

#[tokio::test]
async fn health_pings_keep_the_subscription() {
    let mut stack = Stack::build(|_| {}).await;
    stack.options.bus_ping_interval = Duration::from_millis(50);
    stack.start_relay().await;
    let a1 = stack.connect("alice").await;
    let b1 = stack.connect("bob").await;
    let room = stack.group("alice", &["bob"]).await;
    stack.join(&a1, &room).await;
    stack.join(&b1, &room).await;
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        stack.send(&a1, &room, text).await;
        stack.gateway.wait_sequence(&b1, i as i64 + 1).await;
        // Several pings between messages.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stack.gateway.sequences(&b1), [1, 2, 3]);
    assert_eq!(stack.metrics.snapshot().subscriptions, 1, "no reconnects");
}

#[tokio::test]
async fn the_relay_reports_how_late_it_handles_room_events_for_load_shedding() {
    let stack = Stack::start().await;
    let lags = stack.keys().relay_lags();
    // A room event published five seconds ago (as a relay far behind would
    // see it): the next report carries a lag of at least that.
    let stale = chrono::Utc::now().timestamp_millis() - 5_000;
    let envelope = serde_json::json!({
        "origin": "test",
        "target": {"type": "room", "roomId": "room_lag"},
        "event": {"type": "typing", "payload": {"roomId": "room_lag"}},
        "ts": stale,
    });
    stack
        .publish_on_room("room_lag", &envelope.to_string())
        .await;
    let redis = stack.redis().await;
    let reported = |min: u64, max: u64| {
        let lags = lags.clone();
        let redis = redis.clone();
        async move {
            let mut redis = redis;
            let entries: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&lags)
                .query_async(&mut redis)
                .await
                .ok()?;
            entries.values().find_map(|v| {
                let lag: u64 = v.split_once('|')?.0.parse().ok()?;
                (min..=max).contains(&lag).then_some(lag)
            })
        }
    };
    let lag = wait_for_async("a lag of 5 s reported", WAIT, || reported(5_000, 60_000)).await;
    assert!(lag < 10_000, "{lag}");
    // Each report covers its own interval: with nothing late any more the
    // lag falls back.
    wait_for_async("the lag back under 1 s", WAIT, || reported(0, 999)).await;
}
