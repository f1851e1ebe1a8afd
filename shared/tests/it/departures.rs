//! Sweep-and-close (`chat_shared::departures`), the one implementation the
//! relay's sweeper and the maintenance job share: expired connections are
//! removed step by step, announced `offline`, and closed through the
//! caller's `CloseConnection`, a failed close counted, not fatal.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Mutex;
use std::time::Duration;

use chat_shared::departures::{CloseConnection, Departures, SweepLimits};
use chat_shared::domain::UserId;
use chat_shared::realtime::Realtime;
use common::TestApp;

/// Records what it was asked to close; refuses endpoints under `fail`.
#[derive(Default)]
struct Recorder {
    closed: Mutex<Vec<(String, String)>>,
    removed: Mutex<Vec<String>>,
}

impl CloseConnection for Recorder {
    async fn close(&self, endpoint: &str, connection_id: &str) -> Result<(), String> {
        self.closed
            .lock()
            .unwrap()
            .push((endpoint.to_owned(), connection_id.to_owned()));
        if endpoint.contains("fail") {
            Err("503 from the fake gateway".to_owned())
        } else {
            Ok(())
        }
    }

    fn removed(&self, connection_id: &str) {
        self.removed.lock().unwrap().push(connection_id.to_owned());
    }
}

/// Registers `id` for `user` at `endpoint` with a lease that runs out at
/// once.
async fn expiring(app: &TestApp, id: &str, user: &str, endpoint: &str) {
    let realtime = Realtime::new(app.state.chat.clone(), Duration::from_millis(1));
    let mut conn = common::ws_connection(id, user);
    conn.endpoint = endpoint.to_owned();
    realtime.connect(&conn).await.unwrap();
}

fn departures(app: &TestApp) -> Departures {
    let adapters = &app.adapters;
    Departures::new(
        adapters.store.clone(),
        adapters.presence.clone(),
        adapters.bus.clone(),
    )
}

#[tokio::test]
async fn expired_connections_are_removed_announced_and_closed_step_by_step() {
    let app = TestApp::spawn().await;
    app.register(&["ann", "ben"]).await;
    let room = app.direct("ann", "ben").await;
    expiring(&app, "conn-ann", "ann", "https://ok.example/prod").await;
    expiring(&app, "conn-ben", "ben", "https://fail.example/prod").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut bus = app.subscribe_bus().await;

    let closer = Recorder::default();
    let limits = SweepLimits {
        batch: 1,
        max_batches: 10,
        close_concurrency: 4,
    };
    let report = departures(&app)
        .sweep_and_close(&closer, limits)
        .await
        .unwrap();
    assert_eq!(report.swept, 2, "{report:?}");
    assert_eq!(report.closed, 1, "{report:?}");
    assert_eq!(report.close_failures, 1, "{report:?}");
    assert!(!report.more, "the last step was not full");
    let mut closed = closer.closed.lock().unwrap().clone();
    closed.sort();
    assert_eq!(
        closed,
        [
            ("https://fail.example/prod".into(), "conn-ben".into()),
            ("https://ok.example/prod".into(), "conn-ann".into()),
        ]
    );
    let mut removed = closer.removed.lock().unwrap().clone();
    removed.sort();
    assert_eq!(removed, ["conn-ann", "conn-ben"]);

    // Both are gone from Redis and offline, announced to their room.
    let presence = &app.adapters.presence;
    for id in ["conn-ann", "conn-ben"] {
        assert_eq!(presence.connection_user(id).await.unwrap(), None, "{id}");
    }
    let users = [
        UserId::parse("ann", "u").unwrap(),
        UserId::parse("ben", "u").unwrap(),
    ];
    assert!(presence.online_among(&users).await.unwrap().is_empty());
    let mut offline = Vec::new();
    for _ in 0..2 {
        let envelope = bus.next().await;
        assert_eq!(envelope["event"]["type"], "presenceUpdate", "{envelope}");
        assert_eq!(envelope["event"]["payload"]["status"], "offline");
        assert_eq!(envelope["target"]["roomIds"][0], room.as_str());
        offline.push(
            envelope["event"]["payload"]["userId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    offline.sort();
    assert_eq!(offline, ["ann", "ben"]);

    // Nothing is left: a second sweep does nothing.
    let again = departures(&app)
        .sweep_and_close(&closer, limits)
        .await
        .unwrap();
    assert_eq!((again.swept, again.closed), (0, 0));
}

#[tokio::test]
async fn a_sweep_stops_after_its_steps_and_says_more_may_be_left() {
    let app = TestApp::spawn().await;
    app.register(&["cat"]).await;
    for id in ["conn-c1", "conn-c2", "conn-c3"] {
        expiring(&app, id, "cat", "https://ok.example/prod").await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let closer = Recorder::default();
    let limits = SweepLimits {
        batch: 1,
        max_batches: 2,
        close_concurrency: 1,
    };
    let report = departures(&app)
        .sweep_and_close(&closer, limits)
        .await
        .unwrap();
    assert_eq!((report.swept, report.closed), (2, 2), "{report:?}");
    assert!(report.more, "the last step was full");
    let rest = departures(&app)
        .sweep_and_close(&closer, limits)
        .await
        .unwrap();
    assert_eq!(rest.swept, 1, "{rest:?}");
    assert!(!rest.more, "its second step found nothing");
    assert_eq!(closer.closed.lock().unwrap().len(), 3);
}
