//! `Store::cleanup_all`, the retention half of the scheduled maintenance
//! job (`functions/maintenance`): every room keeps its newest `retention`
//! messages, sequence ids are never reused, and 0 keeps everything.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{TestApp, TestEnv};

/// An app whose sends apply no retention of their own (so the job has
/// something to do), with two users.
async fn keep_all() -> TestApp {
    let mut env = TestEnv::new().await;
    env.set("MESSAGE_RETENTION", "0");
    let app = TestApp::with_env(env).await;
    app.register(&["ann", "ben", "cat"]).await;
    app
}

#[tokio::test]
async fn cleanup_all_keeps_the_newest_messages_of_every_room() {
    let app = keep_all().await;
    let busy = app.direct("ann", "ben").await;
    let quiet = app.direct("ann", "cat").await;
    for i in 1..=7 {
        app.send("ann", &busy, &format!("busy {i}")).await;
    }
    for i in 1..=2 {
        app.send("cat", &quiet, &format!("quiet {i}")).await;
    }

    let store = &app.adapters.store;
    assert_eq!(store.cleanup_all(3).await.unwrap(), 4, "7 - 3 from busy");
    assert_eq!(app.all_sequence_ids("ben", &busy).await, [5, 6, 7]);
    assert_eq!(app.all_sequence_ids("cat", &quiet).await, [1, 2]);

    // Idempotent: nothing left to delete.
    assert_eq!(store.cleanup_all(3).await.unwrap(), 0);

    // Sequence ids continue after the deleted ones.
    let next = app.send("ben", &busy, "after cleanup").await;
    assert_eq!(next["sequenceId"], 8);
    assert_eq!(store.cleanup_all(3).await.unwrap(), 1);
    assert_eq!(app.all_sequence_ids("ann", &busy).await, [6, 7, 8]);
}

#[tokio::test]
async fn cleanup_all_with_zero_retention_keeps_everything() {
    let app = keep_all().await;
    let room = app.direct("ann", "ben").await;
    for i in 1..=4 {
        app.send("ben", &room, &format!("m{i}")).await;
    }
    assert_eq!(app.adapters.store.cleanup_all(0).await.unwrap(), 0);
    assert_eq!(app.all_sequence_ids("ann", &room).await, [1, 2, 3, 4]);
}
