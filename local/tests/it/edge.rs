//! The edge under attack (issue 15), with real sockets against the real
//! stack: the Management API is internal and signed, and callback
//! endpoints come from configuration, never from the client or a poisoned
//! Redis record.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use chat_local::{Options, Parts, Stack};
use chat_shared::auth::AuthUser;
use chat_shared::domain::UserId;
use chat_shared::presence::Connection;
use chat_test_support::TestEnv;
use common::{Client, TestStack, dev_credentials, keys, raw_http, redis, signed, token};
use redis::AsyncCommands as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A listener that counts the connections made to it and answers nothing:
/// the "foreign" service an attacker would like the relay to reach.
async fn foreign_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, hits)
}

/// Finding 1: a client that knows bob's connection id tries to forge a
/// message into his socket, read his IP and User-Agent, and kill it.
#[tokio::test]
async fn the_management_api_is_internal_and_signed() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    let path = format!(
        "/local/@connections/{}",
        bob.connection_id.replace('=', "%3D")
    );
    let forged = json!({"type": "message", "payload": {"content": "from alice, honest"}})
        .to_string()
        .into_bytes();
    let management = stack.management_addr();
    let wrong = chat_gateway::ManagementCredentials {
        access_key_id: dev_credentials().access_key_id,
        secret_access_key: "guessed".into(),
    };
    for method in ["POST", "GET", "DELETE"] {
        // The client port has no Management API, signed or not.
        let headers = signed(&dev_credentials(), method, stack.addr(), &path, &forged);
        let (status, _, body) = raw_http(stack.addr(), method, &path, &headers, &forged).await;
        assert_eq!(status, 404, "{method} on the client port: {body}");
        // The management port refuses unsigned and wrongly signed calls.
        let (status, head, body) = raw_http(management, method, &path, &[], &forged).await;
        assert_eq!(status, 403, "{method} unsigned: {body}");
        assert!(
            head.contains("x-amzn-errortype: forbiddenexception"),
            "{head}"
        );
        assert!(!body.contains("127.0.0.1"), "{body}");
        let headers = signed(&wrong, method, management, &path, &forged);
        let (status, head, _) = raw_http(management, method, &path, &headers, &forged).await;
        assert_eq!(status, 403, "{method} wrongly signed");
        assert!(
            head.contains("x-amzn-errortype: forbiddenexception"),
            "{head}"
        );
    }
    // /metrics left the client port for the management listener.
    let (status, _, _) = raw_http(stack.addr(), "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 404);
    let (status, _, _) = raw_http(management, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);

    // Nothing reached bob, he is still connected, and the relay's signed
    // posts still deliver.
    bob.assert_quiet(300).await;
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "hi bob", "clientMessageId": "c-1"}),
        )
        .await;
    let message = bob.wait_for("message").await;
    assert_eq!(message["content"], "hi bob");
    stack.stop().await;
}

/// Finding 2: a hostile `Host` does not change where posts go.
#[tokio::test]
async fn a_hostile_host_header_does_not_steer_the_relay() {
    let env = strict_env().await;
    let stack = TestStack::all_in_one(&env).await;
    let (foreign, hits) = foreign_listener().await;
    let room = stack.direct("alice", "mallory").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut request = stack
        .ws_url(&token("mallory"))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "host",
        format!("{foreign}/internal/admin?x=")
            .parse()
            .expect("header"),
    );
    let mut mallory = Client::connect_request(request, "mallory").await;
    alice.join(&room).await;
    mallory.join(&room).await;
    alice
        .send(
            "sendMessage",
            json!({"roomId": room, "content": "to mallory", "clientMessageId": "c-1"}),
        )
        .await;
    assert_eq!(mallory.wait_for("message").await["content"], "to mallory");
    let mut redis = redis(&env).await;
    let endpoint: String = redis
        .hget(keys(&env).conn(&mallory.connection_id), "endpoint")
        .await
        .expect("the record");
    assert_eq!(endpoint, stack.endpoint());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the foreign port was reached"
    );
    stack.stop().await;
}

/// A test env whose relay allows only the default AWS pattern (plus, in
/// `chat-local serve`, its own gateway): the test harness otherwise lets
/// relays call any loopback gateway of the test.
async fn strict_env() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.set(
        "RELAY_ALLOWED_ENDPOINTS",
        "https://*.execute-api.us-east-1.amazonaws.com/",
    );
    env
}

fn user(id: &str) -> AuthUser {
    AuthUser {
        id: UserId::from_trusted(id.to_owned()),
        username: id.to_owned(),
        display_name: None,
        avatar: None,
        is_admin: false,
    }
}

/// Finding 2, through Redis: records whose endpoint is not allowed get no
/// request (not even their `connected` event), and the connection is
/// treated as gone.
#[tokio::test]
async fn a_poisoned_record_gets_no_request() {
    let env = strict_env().await;
    let stack = TestStack::all_in_one(&env).await;
    let (foreign, hits) = foreign_listener().await;
    let state = chat_shared::bootstrap::ws_state(&env.config().handlers())
        .await
        .expect("handlers' state");
    stack.register(&["eve"]).await;
    for (n, endpoint) in [
        format!("http://{foreign}/local"),
        format!("http://{foreign}/internal/admin?x="),
        format!("http://{}/local/../admin", stack.management_addr()),
    ]
    .into_iter()
    .enumerate()
    {
        let conn = Connection {
            connection_id: format!("poisoned{n}AAAAAA="),
            user: user("eve"),
            endpoint,
            connected_at_ms: chrono::Utc::now().timestamp_millis() - 60_000,
        };
        state.realtime.connect(&conn).await.expect("registered");
    }
    // Every record's `connected` is refused and the connection removed.
    let mut redis = redis(&env).await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let mut left = 0;
        for n in 0..3 {
            let exists: i64 = redis
                .exists(keys(&env).conn(&format!("poisoned{n}AAAAAA=")))
                .await
                .expect("exists");
            left += exists;
        }
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the foreign port was reached"
    );
    stack.stop().await;
}

/// Issue 16 §2: behind a custom domain the event's `domainName` is
/// `chat.example.com`; with `MANAGEMENT_ENDPOINT` set the relay posts to
/// the configured endpoint, never to the domain.
#[tokio::test]
async fn a_custom_domain_connection_is_posted_to_the_configured_endpoint() {
    let mut env = TestEnv::new().await;
    let management = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let management_addr = management.local_addr().expect("addr");
    env.set(
        "MANAGEMENT_ENDPOINT",
        &format!("http://{management_addr}/local"),
    );
    let config = env.config();
    let stack = Stack::start_with(
        &config,
        &env.settings(),
        Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
        Parts::default(),
        Options {
            management_listener: Some(management),
            ..Options::default()
        },
    )
    .await
    .expect("stack starts");
    let stack = TestStack {
        addr: stack.addr,
        stack,
    };
    stack.register(&["carol"]).await;
    // A real client: its record holds the gateway's endpoint, and posts
    // reach it through the configured one.
    let mut carol = Client::connect(&stack, "carol").await;
    carol.ping_pong().await;

    // A `$connect` event as API Gateway sends it behind a custom domain.
    let state = chat_shared::bootstrap::ws_state(&config.handlers())
        .await
        .expect("handlers' state");
    let event: ApiGatewayWebsocketProxyRequest = serde_json::from_value(json!({
        "headers": {"Host": "chat.example.com"},
        "queryStringParameters": {"token": token("carol")},
        "requestContext": {
            "routeKey": "$connect",
            "eventType": "CONNECT",
            "connectionId": "customDomainAAA=",
            "domainName": "chat.example.com",
            "stage": "prod",
            "apiId": "abc123",
            "connectedAt": chrono::Utc::now().timestamp_millis() - 60_000,
            "requestTimeEpoch": chrono::Utc::now().timestamp_millis(),
            "requestId": "r",
            "messageDirection": "IN",
            "identity": {"sourceIp": "203.0.113.9"}
        },
        "isBase64Encoded": false
    }))
    .expect("an event");
    let response = chat_shared::ws::handle_connect(&state, event).await;
    assert_eq!(response.status_code, 200);
    // Its `connected` went to the configured endpoint: the emulator does
    // not know the id, answers 410, and the relay removes the connection.
    let mut redis = redis(&env).await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let exists: i64 = redis
            .exists(keys(&env).conn("customDomainAAA="))
            .await
            .expect("exists");
        if exists == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay = stack.stack.relay.clone().expect("a relay");
    assert!(relay.snapshot().posts_gone >= 1, "{:?}", relay.snapshot());
    stack.stop().await;
}
