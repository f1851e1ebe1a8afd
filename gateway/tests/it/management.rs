//! The Management API (`/{stage}/@connections/{id}`) over real HTTP.

use std::sync::{Arc, Mutex};

use chat_gateway::{Handlers, integration_response};
use chrono::DateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::connect_async;

use crate::helpers::*;

fn assert_gone(response: &HttpResponse) {
    assert_eq!(response.status, 410, "{}", response.text());
    assert_eq!(response.header("x-amzn-ErrorType"), Some("GoneException"));
    assert_eq!(response.json(), serde_json::json!({ "message": null }));
}

#[tokio::test]
async fn post_sends_the_body_to_the_client() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    let response = server.post(&id, "hello from the back end").await;
    assert_eq!(response.status, 200);
    assert!(response.body.is_empty());
    assert_eq!(next_text(&mut client).await, "hello from the back end");
}

#[tokio::test]
async fn posts_arrive_in_the_order_they_were_accepted() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    for i in 0..100 {
        assert_eq!(server.post(&id, &format!("m{i}")).await.status, 200);
    }
    for i in 0..100 {
        assert_eq!(next_text(&mut client).await, format!("m{i}"));
    }
    assert_eq!(server.gateway.stats().posts_out, 100);
}

#[tokio::test]
async fn get_describes_the_connection() {
    let server = TestServer::start(config()).await;
    let (_client, id) = server
        .connect_with("", &[("user-agent", "chat-test/2.0")])
        .await;
    let path = format!("/local/@connections/{}", encode_id(&id));
    let response = server.http("GET", &path, b"").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["connectedAt", "identity", "lastActiveAt"]);
    assert_eq!(body["identity"]["sourceIp"], "127.0.0.1");
    assert_eq!(body["identity"]["userAgent"], "chat-test/2.0");
    let connected_at = body["connectedAt"].as_str().unwrap();
    let last_active_at = body["lastActiveAt"].as_str().unwrap();
    // `2026-11-28T08:45:43.123Z`
    assert_eq!(connected_at.len(), 24, "{connected_at}");
    assert!(connected_at.ends_with('Z'));
    let connected_at = DateTime::parse_from_rfc3339(connected_at).unwrap();
    let last_active_at = DateTime::parse_from_rfc3339(last_active_at).unwrap();
    // The `whoami` message made the connection active after it connected.
    assert!(last_active_at >= connected_at);
    let info = server.gateway.connection(&id).unwrap();
    assert_eq!(info.connected_at, connected_at);
    assert_eq!(info.user_agent.as_deref(), Some("chat-test/2.0"));
}

#[tokio::test]
async fn delete_closes_with_1000_after_the_accepted_posts() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    for i in 0..20 {
        assert_eq!(server.post(&id, &format!("m{i}")).await.status, 200);
    }
    let path = format!("/local/@connections/{}", encode_id(&id));
    let response = server.http("DELETE", &path, b"").await;
    assert_eq!(response.status, 204);
    for i in 0..20 {
        assert_eq!(next_text(&mut client).await, format!("m{i}"));
    }
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1000);
    let disconnect = server.recorder.disconnect_of(&id).await;
    assert_eq!(
        status_of(&disconnect),
        (1000, "Connection Closed Normally".into())
    );
    assert_gone(&server.post(&id, "too late").await);
    assert_gone(&server.http("DELETE", &path, b"").await);
    assert_eq!(server.gateway.connection_count(), 0);
}

#[tokio::test]
async fn unknown_connections_are_gone() {
    let server = TestServer::start(config()).await;
    let path = "/local/@connections/AAAAAAAAAAAAAAA%3D";
    for method in ["POST", "GET", "DELETE"] {
        assert_gone(&server.http(method, path, b"x").await);
    }
}

#[tokio::test]
async fn ids_may_be_percent_encoded_or_not() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server.connect().await;
    let plain = format!("/local/@connections/{id}");
    assert_eq!(server.http("POST", &plain, b"plain").await.status, 200);
    let encoded_at = format!("/local/%40connections/{}", encode_id(&id));
    assert_eq!(
        server.http("POST", &encoded_at, b"encoded").await.status,
        200
    );
    assert_eq!(next_text(&mut client).await, "plain");
    assert_eq!(next_text(&mut client).await, "encoded");
}

#[tokio::test]
async fn posts_over_the_message_limit_are_too_large() {
    let server = TestServer::start(chat_gateway::GatewayConfig {
        max_message_bytes: 1024,
        ..config()
    })
    .await;
    let (mut client, id) = server.connect().await;
    let path = format!("/local/@connections/{}", encode_id(&id));
    let response = server.http("POST", &path, &[b'a'; 1025]).await;
    assert_eq!(response.status, 413);
    assert_eq!(
        response.header("x-amzn-ErrorType"),
        Some("PayloadTooLargeException")
    );
    let response = server.http("POST", &path, &[b'b'; 1024]).await;
    assert_eq!(response.status, 200);
    assert_eq!(next_text(&mut client).await, "b".repeat(1024));
}

/// API Gateway refuses posts to a connection whose `$connect` has not
/// finished; so does the emulator, until the socket is live.
#[tokio::test]
async fn posts_during_connect_are_gone() {
    let (ids_tx, mut ids_rx) = mpsc::unbounded_channel::<String>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let server = TestServer::start_with(config(), |recorder| {
        let recording = recording_handlers(recorder);
        let connect = move |event: Event| {
            let ids = ids_tx.clone();
            let release = release.lock().unwrap().take();
            async move {
                ids.send(id_of(&event).to_owned()).unwrap();
                if let Some(release) = release {
                    release.await.unwrap();
                }
                integration_response(200, None)
            }
        };
        Handlers {
            connect: Arc::new(connect),
            ..recording
        }
    })
    .await;

    let url = server.ws_url();
    let connecting = tokio::spawn(async move { connect_async(url).await });
    let id = tokio::time::timeout(WAIT, ids_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_gone(&server.post(&id, "too early").await);
    let path = format!("/local/@connections/{}", encode_id(&id));
    assert_gone(&server.http("GET", &path, b"").await);
    assert_gone(&server.http("DELETE", &path, b"").await);
    assert_eq!(server.gateway.connection_count(), 0);

    release_tx.send(()).unwrap();
    let (mut client, _) = tokio::time::timeout(WAIT, connecting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(whoami(&mut client).await, id);
    assert_eq!(server.post(&id, "now").await.status, 200);
    assert_eq!(next_text(&mut client).await, "now");
}

/// The AWS SDK, pointed at the emulator the way the relay will be, sees
/// every call succeed and recognises `GoneException` and
/// `PayloadTooLargeException`.
#[tokio::test]
async fn the_aws_sdk_works_against_the_emulator() {
    use aws_sdk_apigatewaymanagement::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_apigatewaymanagement::primitives::Blob;

    let server = TestServer::start(chat_gateway::GatewayConfig {
        max_message_bytes: 1024,
        ..config()
    })
    .await;
    let (mut client, id) = server
        .connect_with("", &[("user-agent", "chat-test/3.0")])
        .await;
    let sdk = aws_sdk_apigatewaymanagement::Client::from_conf(
        aws_sdk_apigatewaymanagement::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                &server.credentials.access_key_id,
                &server.credentials.secret_access_key,
                None,
                None,
                "test",
            ))
            .endpoint_url(format!("http://{}/local", server.management))
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build(),
    );

    sdk.post_to_connection()
        .connection_id(&id)
        .data(Blob::new("from the sdk"))
        .send()
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, "from the sdk");

    let too_large = sdk
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new(vec![b'x'; 1025]))
        .send()
        .await
        .unwrap_err();
    assert!(
        too_large
            .as_service_error()
            .is_some_and(|e| e.is_payload_too_large_exception())
    );

    let connection = sdk
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .unwrap();
    let identity = connection.identity().unwrap();
    assert_eq!(identity.source_ip(), Some("127.0.0.1"));
    assert_eq!(identity.user_agent(), Some("chat-test/3.0"));
    let connected_at = connection.connected_at().unwrap();
    assert!(connection.last_active_at().unwrap() >= connected_at);
    let info = server.gateway.connection(&id).unwrap();
    assert_eq!(
        connected_at.to_millis().unwrap(),
        info.connected_at.timestamp_millis()
    );

    sdk.delete_connection()
        .connection_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(u16::from(expect_close(&mut client).await.code), 1000);

    let gone = sdk
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new("too late"))
        .send()
        .await
        .unwrap_err();
    assert!(
        gone.as_service_error()
            .is_some_and(|e| e.is_gone_exception()),
        "{gone:?}"
    );
    let gone = sdk
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .unwrap_err();
    assert!(
        gone.as_service_error()
            .is_some_and(|e| e.is_gone_exception()),
        "{gone:?}"
    );
    let gone = sdk
        .delete_connection()
        .connection_id(&id)
        .send()
        .await
        .unwrap_err();
    assert!(
        gone.as_service_error()
            .is_some_and(|e| e.is_gone_exception()),
        "{gone:?}"
    );
}

/// The attacks of issue 15, finding 1: anyone who can reach the client
/// port, and knows a connection id, tried to forge a message into the
/// socket, read its IP and User-Agent, and kill it. The client port has no
/// Management API; the management listener answers 403 to unsigned and
/// wrongly signed calls; nothing reaches the socket and it stays up.
#[tokio::test]
async fn the_management_api_is_not_on_the_client_port_and_requires_sigv4() {
    let server = TestServer::start(config()).await;
    let (mut client, id) = server
        .connect_with("", &[("user-agent", "victim/1.0")])
        .await;
    let path = format!("/local/@connections/{}", encode_id(&id));
    for method in ["POST", "GET", "DELETE"] {
        // On the client port: no such route, whatever the signature.
        let url = format!("http://{}{path}", server.addr);
        let signed = chat_gateway::sign(
            &server.credentials,
            method,
            &url,
            &[],
            b"forged",
            "us-east-1",
        );
        let headers: Vec<(&str, &str)> = signed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let response = http(server.addr, method, &path, &headers, b"forged").await;
        assert_eq!(response.status, 404, "{method} on the client port");
        assert!(!response.text().contains("victim"));

        // On the management listener, unsigned.
        let response = http(server.management, method, &path, &[], b"forged").await;
        assert_eq!(response.status, 403, "{method} unsigned");
        assert_eq!(
            response.header("x-amzn-ErrorType"),
            Some("ForbiddenException")
        );
        assert!(!response.text().contains("victim"));

        // Signed with a guessed secret, and with the signature of another
        // request replayed.
        let wrong = chat_gateway::ManagementCredentials {
            access_key_id: server.credentials.access_key_id.clone(),
            secret_access_key: "guessed".into(),
        };
        let url = format!("http://{}{path}", server.management);
        let signed = chat_gateway::sign(&wrong, method, &url, &[], b"forged", "us-east-1");
        let headers: Vec<(&str, &str)> = signed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let response = http(server.management, method, &path, &headers, b"forged").await;
        assert_eq!(response.status, 403, "{method} wrongly signed");
        assert_eq!(
            response.header("x-amzn-ErrorType"),
            Some("ForbiddenException")
        );
        let signed = chat_gateway::sign(
            &server.credentials,
            method,
            &url,
            &[],
            b"harmless",
            "us-east-1",
        );
        let headers: Vec<(&str, &str)> = signed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let response = http(server.management, method, &path, &headers, b"forged").await;
        assert_eq!(
            response.status, 403,
            "{method} with another body's signature"
        );
    }
    // Nothing happened to the connection: no message, still live, and a
    // signed call still works.
    assert!(server.gateway.connection(&id).is_some());
    assert_eq!(server.post(&id, "genuine").await.status, 200);
    assert_eq!(next_text(&mut client).await, "genuine");
}
