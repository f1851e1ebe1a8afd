//! The events the integrations receive have API Gateway's shapes.

use std::collections::BTreeSet;

use futures::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use chat_gateway::GatewayConfig;

use crate::helpers::*;

const CONNECT_FIXTURE: &str =
    include_str!("../fixtures/example-apigw-websocket-request-without-method.json");
const DISCONNECT_FIXTURE: &str =
    include_str!("../fixtures/example-apigw-websocket-request-disconnect-route.json");

/// The keys of an object that carry something (not null, not `{}`), lower
/// case: the struct serializes every field, so absent ones come out as
/// `null` or `{}`.
fn present_keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(_, value)| match value {
            Value::Null => false,
            Value::Object(map) => !map.is_empty(),
            _ => true,
        })
        .map(|(key, _)| key.to_ascii_lowercase())
        .collect()
}

/// A captured event, deserialized and serialized like ours, so both sides
/// go through the same struct.
fn fixture(text: &str) -> Value {
    let event: Event = serde_json::from_str(text).unwrap();
    serde_json::to_value(event).unwrap()
}

#[tokio::test]
async fn events_have_the_keys_of_captured_events() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    close_from_client(
        &mut client,
        Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }),
    )
    .await;
    server.recorder.disconnect_of(&id).await;

    let events = server.recorder.of(&id);
    let [connect, message, disconnect] = events.as_slice() else {
        panic!("expected connect, message, disconnect: {events:?}");
    };
    let connect = serde_json::to_value(connect).unwrap();
    let message = serde_json::to_value(message).unwrap();
    let disconnect = serde_json::to_value(disconnect).unwrap();

    let captured_connect = fixture(CONNECT_FIXTURE);
    assert_eq!(present_keys(&connect), present_keys(&captured_connect));
    assert_eq!(
        present_keys(&connect["requestContext"]),
        present_keys(&captured_connect["requestContext"])
    );

    // MESSAGE: no headers; `body` and `messageId` on top of the CONNECT keys.
    let expected: BTreeSet<String> = ["requestcontext", "body", "isbase64encoded"]
        .map(String::from)
        .into();
    assert_eq!(present_keys(&message), expected);
    let mut expected = present_keys(&captured_connect["requestContext"]);
    expected.insert("messageid".into());
    assert_eq!(present_keys(&message["requestContext"]), expected);

    let captured_disconnect = fixture(DISCONNECT_FIXTURE);
    assert_eq!(
        present_keys(&disconnect),
        present_keys(&captured_disconnect)
    );
    assert_eq!(
        present_keys(&disconnect["requestContext"]),
        present_keys(&captured_disconnect["requestContext"])
    );
    assert_eq!(
        present_keys(&disconnect["headers"]),
        present_keys(&captured_disconnect["headers"])
    );
}

#[tokio::test]
async fn events_carry_the_connection_and_the_request() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server
        .connect_with("?token=abc&x=1&x=2", &[("user-agent", "chat-test/1.0")])
        .await;
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "echo:hello");
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    close_from_client(&mut client, Some(frame)).await;
    let disconnect = server.recorder.disconnect_of(&id).await;

    let events = server.recorder.of(&id);
    assert_eq!(
        events.iter().map(route_of).collect::<Vec<_>>(),
        ["$connect", "$default", "$default", "$disconnect"]
    );
    let connect = &events[0];
    let context = &connect.request_context;
    assert_eq!(context.event_type.as_deref(), Some("CONNECT"));
    assert_eq!(context.stage.as_deref(), Some("local"));
    assert_eq!(context.apiid.as_deref(), Some("testapi"));
    // The configured management listener, never the client's `Host`.
    assert_eq!(context.domain_name, Some(server.management.to_string()));
    assert_eq!(context.message_direction.as_deref(), Some("IN"));
    assert_eq!(context.identity.source_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        context.identity.user_agent.as_deref(),
        Some("chat-test/1.0")
    );
    assert_eq!(context.request_id, context.extended_request_id);
    assert!(context.request_time_epoch >= context.connected_at);
    let request_time = context.request_time.as_deref().unwrap();
    assert!(
        request_time.ends_with(" +0000") && request_time.len() == 26,
        "{request_time}"
    );
    assert!(context.message_id.is_none());
    assert_eq!(id.len(), 16);
    assert!(id.ends_with('='));

    assert_eq!(connect.headers["user-agent"], "chat-test/1.0");
    assert!(connect.headers.contains_key("sec-websocket-key"));
    assert_eq!(connect.headers["host"], server.addr.to_string());
    assert_eq!(connect.headers["x-forwarded-for"], "127.0.0.1");
    assert!(!connect.headers.contains_key("connection"));
    assert!(!connect.headers.contains_key("upgrade"));
    assert_eq!(connect.query_string_parameters.first("token"), Some("abc"));
    assert_eq!(connect.query_string_parameters.first("x"), Some("2"));
    assert_eq!(
        connect.multi_value_query_string_parameters.all("x"),
        Some(vec!["1", "2"])
    );
    assert!(!connect.is_base64_encoded);

    let message = &events[2];
    assert_eq!(message.body.as_deref(), Some("hello"));
    assert!(!message.is_base64_encoded);
    assert_eq!(
        message.request_context.event_type.as_deref(),
        Some("MESSAGE")
    );
    assert!(message.request_context.message_id.is_some());
    assert_ne!(
        message.request_context.message_id,
        events[1].request_context.message_id
    );
    assert_ne!(message.request_context.request_id, context.request_id);
    assert!(message.headers.is_empty());

    assert_eq!(
        disconnect.request_context.event_type.as_deref(),
        Some("DISCONNECT")
    );
    assert_eq!(status_of(&disconnect), (1000, "bye".into()));
    for event in &events {
        assert_eq!(id_of(event), id);
        assert_eq!(event.request_context.connected_at, context.connected_at);
        assert_eq!(event.request_context.domain_name, context.domain_name);
    }
}

#[tokio::test]
async fn without_a_query_there_are_no_query_parameters() {
    let server = TestServer::start(config()).await;
    let (_client, id) = server.connect().await;
    let connect = &server.recorder.of(&id)[0];
    assert!(connect.query_string_parameters.is_empty());
    assert!(connect.multi_value_query_string_parameters.is_empty());
}

#[tokio::test]
async fn binary_messages_are_base64_encoded_when_accepted() {
    let server = TestServer::start(GatewayConfig {
        accept_binary_frames: true,
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, "echo:AAEC/w==");
    let message = server.recorder.of(&id).pop().unwrap();
    assert!(message.is_base64_encoded);
    assert_eq!(message.body.as_deref(), Some("AAEC/w=="));
}

#[tokio::test]
async fn binary_frames_close_with_1003_as_on_aws_by_default() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    client
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1003, "{frame:?}");
    let disconnect = server.recorder.disconnect_of(&id).await;
    assert_eq!(status_of(&disconnect).0, 1003);
    // `$default` never saw it.
    assert!(
        server
            .recorder
            .of(&id)
            .iter()
            .all(|event| !event.is_base64_encoded),
        "a binary frame reached $default"
    );
}

#[tokio::test]
async fn connection_ids_are_unique() {
    let server = TestServer::start(config()).await;
    let mut ids = BTreeSet::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (client, id) = server.connect().await;
        assert_eq!(id.len(), 16);
        ids.insert(id);
        clients.push(client);
    }
    assert_eq!(ids.len(), 20);
    assert_eq!(server.gateway.connection_count(), 20);
}
