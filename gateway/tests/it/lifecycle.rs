//! Handshake, `$default` dispatch, and `$disconnect` for every way a
//! connection ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_gateway::{Handlers, integration_response};
use futures::SinkExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, connect_async};

use crate::helpers::*;

/// Handlers whose `$connect` answers `status` with `body`.
fn connect_answering(status: i64, body: &'static str) -> impl FnOnce(&Arc<Recorder>) -> Handlers {
    move |recorder| {
        let recording = recording_handlers(recorder);
        let record = Arc::clone(recorder);
        let connect = move |event: Event| {
            let record = Arc::clone(&record);
            async move {
                record.record(event);
                let mut response = integration_response(status, Some(body.to_owned()));
                response
                    .headers
                    .insert("content-type", "application/json".parse().unwrap());
                response
            }
        };
        Handlers {
            connect: Arc::new(connect),
            ..recording
        }
    }
}

#[tokio::test]
async fn a_refused_connect_refuses_the_handshake() {
    let server = TestServer::start_with(
        config(),
        connect_answering(401, r#"{"message":"Unauthorized"}"#),
    )
    .await;
    let error = connect_async(server.ws_url())
        .await
        .expect_err("the handshake succeeded");
    let WsError::Http(response) = error else {
        panic!("expected an HTTP refusal, got {error:?}");
    };
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        response.body().as_deref(),
        Some(&br#"{"message":"Unauthorized"}"#[..])
    );
    assert_eq!(server.gateway.connection_count(), 0);
    // Shutdown waits for any `$disconnect`; there must be none.
    server.gateway.shutdown().await;
    let routes: Vec<String> = server
        .recorder
        .events()
        .iter()
        .map(|e| route_of(e).to_owned())
        .collect();
    assert_eq!(routes, ["$connect"]);
}

#[tokio::test]
async fn a_connect_answering_204_upgrades() {
    let server = TestServer::start_with(config(), connect_answering(204, "")).await;
    let (_client, id) = server.connect().await;
    assert_eq!(
        server.gateway.connection(&id).map(|info| info.source_ip),
        Some("127.0.0.1".into())
    );
}

#[tokio::test]
async fn the_subprotocol_chosen_by_connect_is_returned() {
    let server = TestServer::start_with(config(), |recorder| {
        let recording = recording_handlers(recorder);
        let connect = |_event: Event| async {
            let mut response = integration_response(200, None);
            response
                .headers
                .insert("sec-websocket-protocol", "chat.v1".parse().unwrap());
            response
        };
        Handlers {
            connect: Arc::new(connect),
            ..recording
        }
    })
    .await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v1, chat.v0".parse().unwrap(),
    );
    let (_client, response) = connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v1");
}

#[tokio::test]
async fn a_failing_default_is_an_internal_server_error() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    client.send(Message::text("panic")).await.unwrap();
    let reply: serde_json::Value = serde_json::from_str(&next_text(&mut client).await).unwrap();
    assert_eq!(reply["message"], "Internal server error");
    assert_eq!(reply["connectionId"], id.as_str());
    assert!(reply["requestId"].as_str().is_some_and(|r| r.len() == 16));
    // The connection stays open.
    assert_eq!(whoami(&mut client).await, id);
}

#[tokio::test]
async fn an_integration_over_its_timeout_fails_as_on_aws() {
    let slow = |_event: Event| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        integration_response(200, Some("too late".into()))
    };
    let config = chat_gateway::GatewayConfig {
        integration_timeout: Duration::from_millis(300),
        ..config()
    };
    // `$default` too slow: the client gets API Gateway's error message, and
    // the connection stays open.
    let server = TestServer::start_with(config.clone(), |recorder| {
        let recording = recording_handlers(recorder);
        let fast = Arc::clone(&recording.default);
        let default = move |event: Event| {
            let fast = Arc::clone(&fast);
            async move {
                if event.body.as_deref() == Some("slow") {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    return integration_response(200, Some("too late".into()));
                }
                fast.call(event).await
            }
        };
        Handlers {
            default: Arc::new(default),
            ..recording
        }
    })
    .await;
    let (mut client, id) = server.connect().await;
    let started = std::time::Instant::now();
    client.send(Message::text("slow")).await.unwrap();
    let reply: serde_json::Value = serde_json::from_str(&next_text(&mut client).await).unwrap();
    assert_eq!(reply["message"], "Internal server error");
    assert_eq!(reply["connectionId"], id.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(whoami(&mut client).await, id, "the connection stays open");
    // `$connect` too slow: the handshake is refused with 500.
    let server = TestServer::start_with(config, |recorder| Handlers {
        connect: Arc::new(slow),
        ..recording_handlers(recorder)
    })
    .await;
    match connect_async(server.ws_url()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 500),
        other => panic!("expected 500, got {other:?}"),
    }
}

#[tokio::test]
async fn serial_dispatch_handles_messages_one_at_a_time_in_order() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (running_in, most_in) = (Arc::clone(&running), Arc::clone(&most));
    let serial = chat_gateway::GatewayConfig {
        dispatch: chat_gateway::Dispatch::Serial,
        ..config()
    };
    let server = TestServer::start_with(serial, move |recorder| {
        let recording = recording_handlers(recorder);
        let default = move |event: Event| {
            let (running, most) = (Arc::clone(&running_in), Arc::clone(&most_in));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Simulated work, longer for earlier messages: out-of-order
                // completion would show if calls overlapped.
                let n: u64 = event.body.as_deref().unwrap_or("0").parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(20 - n)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                integration_response(200, event.body.clone())
            }
        };
        Handlers {
            default: Arc::new(default),
            ..recording
        }
    })
    .await;
    let (mut client, _) = tokio::time::timeout(WAIT, connect_async(server.ws_url()))
        .await
        .unwrap()
        .unwrap();
    for i in 0..10 {
        client.send(Message::text(i.to_string())).await.unwrap();
    }
    for i in 0..10 {
        assert_eq!(next_text(&mut client).await, i.to_string());
    }
    assert_eq!(most.load(Ordering::SeqCst), 1);
    assert_eq!(server.gateway.stats().messages_in, 10);
}

#[tokio::test]
async fn disconnect_runs_exactly_once_whatever_closes_the_connection() {
    let server = TestServer::start(chat_gateway::GatewayConfig {
        max_message_bytes: 1024,
        max_frame_bytes: 1024,
        ..config()
    })
    .await;
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();

    // The client closes, with a code and without one.
    let (mut client, id) = server.connect().await;
    close_from_client(
        &mut client,
        Some(CloseFrame {
            code: CloseCode::Away,
            reason: "".into(),
        }),
    )
    .await;
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1001);
    let (mut client, id) = server.connect().await;
    close_from_client(&mut client, None).await;
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1005);

    // The TCP connection just ends (FIN), or is reset (RST).
    let (client, id) = server.connect().await;
    drop(client);
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1006);
    let (client, id) = server.connect().await;
    if let MaybeTlsStream::Plain(tcp) = client.get_ref() {
        tcp.set_zero_linger().unwrap();
    }
    drop(client);
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1006);

    // The Management API deletes it.
    let (mut client, id) = server.connect().await;
    let path = format!("/local/@connections/{}", encode_id(&id));
    assert_eq!(server.http("DELETE", &path, b"").await.status, 204);
    expect_close(&mut client).await;
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1000);

    // A message over the limit.
    let (mut client, id) = server.connect().await;
    client.send(Message::text("x".repeat(2000))).await.unwrap();
    expect_close(&mut client).await;
    server.recorder.disconnect_of(&id).await;
    expected.insert(id, 1009);

    // Shutdown, for the ones still open.
    let (mut open_a, id_a) = server.connect().await;
    let (mut open_b, id_b) = server.connect().await;
    expected.insert(id_a, 1001);
    expected.insert(id_b, 1001);
    let shutdown = tokio::spawn({
        let gateway = server.gateway.clone();
        async move { gateway.shutdown().await }
    });
    assert_eq!(u16::from(expect_close(&mut open_a).await.code), 1001);
    assert_eq!(u16::from(expect_close(&mut open_b).await.code), 1001);
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();

    // Every `$disconnect` has run by now; each connection has exactly one.
    let events = server.recorder.events();
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for event in events.iter().filter(|e| route_of(e) == "$disconnect") {
        seen.entry(id_of(event).to_owned())
            .or_default()
            .push(status_of(event).0);
    }
    let seen: BTreeMap<String, i64> = seen
        .into_iter()
        .map(|(id, codes)| {
            assert_eq!(codes.len(), 1, "{id} got {codes:?}");
            (id, codes[0])
        })
        .collect();
    assert_eq!(seen, expected);
    // And `$disconnect` is always the connection's last event.
    for id in expected.keys() {
        let events = server.recorder.of(id);
        assert_eq!(route_of(events.last().unwrap()), "$disconnect");
        assert_eq!(route_of(&events[0]), "$connect");
    }
    assert_eq!(server.gateway.connection_count(), 0);
}

#[tokio::test]
async fn shutdown_refuses_new_connections() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    let shutdown = tokio::spawn({
        let gateway = server.gateway.clone();
        async move { gateway.shutdown().await }
    });
    let frame = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "Going away")
    );
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    let disconnect = server.recorder.of(&id).pop().unwrap();
    assert_eq!(status_of(&disconnect), (1001, "Going away".into()));
    match connect_async(server.ws_url()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(server.gateway.stats().connections_open, 0);
}

#[tokio::test]
async fn a_failing_connect_is_a_500() {
    let server = TestServer::start_with(config(), |recorder| {
        let recording = recording_handlers(recorder);
        let connect = |_event: Event| async {
            panic!("the connect handler panics on purpose");
            #[allow(unreachable_code)]
            integration_response(200, None)
        };
        Handlers {
            connect: Arc::new(connect),
            ..recording
        }
    })
    .await;
    match connect_async(server.ws_url()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 500),
        other => panic!("expected 500, got {other:?}"),
    }
    server.gateway.shutdown().await;
    assert!(server.recorder.events().is_empty());
}
