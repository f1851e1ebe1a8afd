//! How one connection's messages reach `$default`: several at once, as API
//! Gateway invokes them ([`Dispatch::Concurrent`], the default, bounded), or
//! one at a time in arrival order ([`Dispatch::Serial`], an option; tested
//! in `lifecycle.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chat_gateway::{Dispatch, GatewayConfig, Handlers, integration_response};
use futures::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Event, Recorder, TestServer, config, id_of, next_text};

/// Invocations of `$default` running now, and the most seen at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// `$default` answers `whoami` at once; `N:MS` is answered `done:N` after
/// MS milliseconds, counted in `in_flight` while it runs.
fn slow_handlers(in_flight: Arc<InFlight>) -> impl FnOnce(&Arc<Recorder>) -> Handlers {
    move |recorder| {
        let (on_connect, on_disconnect) = (Arc::clone(recorder), Arc::clone(recorder));
        Handlers::new(
            move |event: Event| {
                let recorder = Arc::clone(&on_connect);
                async move {
                    recorder.record(event);
                    integration_response(200, None)
                }
            },
            move |event: Event| {
                let in_flight = Arc::clone(&in_flight);
                async move {
                    let body = event.body.clone().unwrap_or_default();
                    if body == "whoami" {
                        return integration_response(200, Some(format!("id:{}", id_of(&event))));
                    }
                    let (n, ms) = body.split_once(':').expect("N:MS");
                    let now = in_flight.now.fetch_add(1, Ordering::SeqCst) + 1;
                    in_flight.most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms.parse().expect("ms"))).await;
                    in_flight.now.fetch_sub(1, Ordering::SeqCst);
                    integration_response(200, Some(format!("done:{n}")))
                }
            },
            move |event: Event| {
                let recorder = Arc::clone(&on_disconnect);
                async move {
                    recorder.record(event);
                    integration_response(200, None)
                }
            },
        )
    }
}

async fn start(dispatch: Dispatch, in_flight: &Arc<InFlight>) -> TestServer {
    TestServer::start_with(
        GatewayConfig {
            dispatch,
            ..config()
        },
        slow_handlers(Arc::clone(in_flight)),
    )
    .await
}

#[test]
fn the_default_is_concurrent_as_api_gateway() {
    assert_eq!(GatewayConfig::default().dispatch, Dispatch::Concurrent(8));
    assert_eq!(Dispatch::Serial.max_in_flight(), 1);
    assert_eq!(Dispatch::Concurrent(0).max_in_flight(), 1);
}

#[tokio::test]
async fn concurrent_dispatch_runs_a_burst_at_once_up_to_its_bound() {
    let in_flight = Arc::new(InFlight::default());
    let server = start(Dispatch::Concurrent(4), &in_flight).await;
    let (mut client, _) = server.connect().await;
    let started = Instant::now();
    for n in 0..12 {
        client
            .send(Message::text(format!("{n}:300")))
            .await
            .unwrap();
    }
    let mut done = Vec::new();
    for _ in 0..12 {
        done.push(next_text(&mut client).await);
    }
    let took = started.elapsed();
    // Three waves of four: never more than the bound at once, and far
    // faster than one at a time (12 × 300 ms).
    assert_eq!(in_flight.most.load(Ordering::SeqCst), 4, "{done:?}");
    assert!(
        took < Duration::from_millis(2_400),
        "12 messages of 300 ms took {took:?}"
    );
    done.sort();
    let mut want: Vec<String> = (0..12).map(|n| format!("done:{n}")).collect();
    want.sort();
    assert_eq!(done, want, "every message answered once");
}

#[tokio::test]
async fn concurrent_dispatch_answers_in_the_order_invocations_finish() {
    let in_flight = Arc::new(InFlight::default());
    let server = start(Dispatch::DEFAULT, &in_flight).await;
    let (mut client, _) = server.connect().await;
    // The first message is slow, the second quick: as on API Gateway, the
    // second is handled, and answered, first.
    client.send(Message::text("1:400")).await.unwrap();
    client.send(Message::text("2:0")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "done:2");
    assert_eq!(next_text(&mut client).await, "done:1");
    assert_eq!(in_flight.most.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn messages_still_running_at_close_finish_before_disconnect() {
    let in_flight = Arc::new(InFlight::default());
    let server = start(Dispatch::DEFAULT, &in_flight).await;
    let (mut client, id) = server.connect().await;
    for n in 0..3 {
        client
            .send(Message::text(format!("{n}:300")))
            .await
            .unwrap();
    }
    // Let the gateway read them, then close without waiting for answers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.close(None).await.unwrap();
    server.recorder.disconnect_of(&id).await;
    assert_eq!(
        in_flight.now.load(Ordering::SeqCst),
        0,
        "`$disconnect` came before the running invocations ended"
    );
    assert_eq!(in_flight.most.load(Ordering::SeqCst), 3);
}
