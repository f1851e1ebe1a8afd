//! The Lambda integrations against an Invoke API on `127.0.0.1:0` that
//! answers as `cargo lambda watch` does (`500` with the error document for a
//! function error). The functions here are tiny closures; the real binaries
//! behind `cargo lambda watch` are exercised by scripts/test-lambda-local.sh.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chat_gateway::{FunctionOptions, Handlers, InvokeError, LambdaClient, http_api};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

/// The functions behind the test Invoke API. `echo-event` answers the event
/// it got as an HTTP API response body.
async fn invoke(Path(function): Path<String>, body: String) -> Response {
    let event: Value = serde_json::from_str(&body).unwrap();
    let error = |message: &str| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"errorType": "&str", "errorMessage": message}).to_string(),
        )
            .into_response()
    };
    let ok = |value: Value| (StatusCode::OK, value.to_string()).into_response();
    let message = event["body"].as_str().unwrap_or_default().to_owned();
    match function.as_str() {
        "connect" => ok(json!({"statusCode": 200})),
        "broken-connect" => error("the function panicked"),
        "disconnect" => ok(json!({"statusCode": 200})),
        "message" => match message.as_str() {
            "boom" => error("boom"),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                ok(json!({"statusCode": 200, "body": "late"}))
            }
            "garbage" => ok(json!("not a proxy response")),
            "whoami" => ok(json!({
                "statusCode": 200,
                "body": format!("id:{}", event["requestContext"]["connectionId"].as_str().unwrap()),
            })),
            other => ok(json!({"statusCode": 200, "body": format!("echo:{other}")})),
        },
        "echo-event" => ok(json!({
            "statusCode": 202,
            "headers": {"content-type": "application/json", "x-fn": "1"},
            "cookies": ["s=1"],
            "body": body,
        })),
        _ => (StatusCode::NOT_FOUND, "no such function").into_response(),
    }
}

async fn invoke_api() -> SocketAddr {
    let app = Router::new().route("/2015-03-31/functions/{function}/invocations", post(invoke));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn options(reserved_concurrency: usize, timeout_ms: u64) -> FunctionOptions {
    FunctionOptions {
        reserved_concurrency,
        timeout: Duration::from_millis(timeout_ms),
    }
}

async fn gateway(connect: &'static str) -> TestServer {
    let lambda = LambdaClient::new(&format!("http://{}", invoke_api().await)).unwrap();
    let function = |name: &str| lambda.function(name, options(8, 1_000));
    let handlers = Handlers::new(
        function(connect),
        function("message"),
        function("disconnect"),
    );
    TestServer::start_with(config(), move |_| handlers).await
}

#[tokio::test]
async fn a_function_error_is_internal_server_error_and_the_next_invocation_works() {
    let server = gateway("connect").await;
    let (mut client, id) = server.connect().await;
    for failing in ["boom", "slow", "garbage"] {
        client.send(Message::text(failing)).await.unwrap();
        let reply: Value = serde_json::from_str(&next_text(&mut client).await).unwrap();
        assert_eq!(reply["message"], "Internal server error", "{failing}");
        assert_eq!(reply["connectionId"], id.as_str());
        client.send(Message::text("after")).await.unwrap();
        assert_eq!(
            next_text(&mut client).await,
            "echo:after",
            "after {failing}"
        );
    }
}

#[tokio::test]
async fn a_failed_connect_function_refuses_the_handshake() {
    let server = gateway("broken-connect").await;
    match connect_async(server.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 500);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("Internal server error"), "{body}");
        }
        other => panic!("the handshake was not refused: {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn invocations_over_the_reserved_concurrency_are_throttled() {
    let lambda = LambdaClient::new(&format!("http://{}", invoke_api().await)).unwrap();
    let function = lambda.function("message", options(1, 5_000));
    let slow = serde_json::to_vec(&json!({"body": "slow"})).unwrap();
    let fast = serde_json::to_vec(&json!({"body": "fast"})).unwrap();
    let first = tokio::spawn({
        let function = function.clone();
        let slow = slow.clone();
        async move { function.invoke(slow).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let throttled = function.invoke(fast.clone()).await;
    assert!(
        matches!(throttled, Err(InvokeError::Throttled)),
        "{throttled:?}"
    );
    first.await.unwrap().unwrap();
    function.invoke(fast).await.unwrap();
    let stats = function.stats();
    assert_eq!(
        (stats.invocations, stats.errors, stats.throttles),
        (2, 0, 1)
    );

    // Unlimited: both at once.
    let unlimited = lambda.function("message", options(0, 5_000));
    let (a, b) = tokio::join!(unlimited.invoke(slow.clone()), unlimited.invoke(slow));
    assert!(a.is_ok() && b.is_ok());
}

#[tokio::test]
async fn a_function_over_its_timeout_fails_and_unknown_functions_are_service_errors() {
    let lambda = LambdaClient::new(&format!("http://{}", invoke_api().await)).unwrap();
    let function = lambda.function("message", options(1, 200));
    let result = function
        .invoke(serde_json::to_vec(&json!({"body": "slow"})).unwrap())
        .await;
    assert!(matches!(result, Err(InvokeError::Timeout(_))), "{result:?}");
    assert_eq!(function.stats().errors, 1);
    let missing = lambda.function("nope", options(1, 1_000));
    let result = missing.invoke(b"{}".to_vec()).await;
    assert!(
        matches!(&result, Err(InvokeError::Service { status, .. }) if *status == StatusCode::NOT_FOUND),
        "{result:?}"
    );
    let nowhere = LambdaClient::new("http://127.0.0.1:9").unwrap();
    let result = nowhere
        .function("message", options(1, 1_000))
        .invoke(b"{}".to_vec())
        .await;
    assert!(
        matches!(result, Err(InvokeError::Unreachable(_))),
        "{result:?}"
    );
}

/// Serves the HTTP API emulator for `function` and returns its address.
async fn http_api_for(function: &str, timeout_ms: u64) -> SocketAddr {
    let lambda = LambdaClient::new(&format!("http://{}", invoke_api().await)).unwrap();
    let app = http_api::router(lambda.function(function, options(4, timeout_ms)))
        .fallback(http_api::not_found);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

/// One HTTP/1.1 request over a fresh connection: status, headers, body.
async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let text = format!(
        "{head}\r\nhost: api.local:3000\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let (headers, body) = out.split_once("\r\n\r\n").unwrap();
    let status = headers[9..12].parse().unwrap();
    (status, headers.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn the_http_api_sends_a_format_2_event_and_maps_the_answer_back() {
    let addr = http_api_for("echo-event", 1_000).await;
    let (status, headers, body) = request(
        addr,
        "POST /api/v1/chat/rooms?limit=5&x=a%20b HTTP/1.1\r\ncontent-type: application/json\r\ncookie: a=1; b=2",
        r#"{"name":"r"}"#,
    )
    .await;
    assert_eq!(status, 202);
    assert!(headers.contains("x-fn: 1"), "{headers}");
    assert!(headers.contains("set-cookie: s=1"), "{headers}");
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["version"], "2.0");
    assert_eq!(event["rawPath"], "/api/v1/chat/rooms");
    assert_eq!(event["rawQueryString"], "limit=5&x=a%20b");
    assert_eq!(event["queryStringParameters"]["x"], "a b");
    assert_eq!(event["requestContext"]["http"]["method"], "POST");
    assert_eq!(event["requestContext"]["http"]["sourceIp"], "127.0.0.1");
    assert_eq!(event["requestContext"]["domainName"], "api.local:3000");
    assert_eq!(event["cookies"], json!(["a=1", "b=2"]));
    assert_eq!(event["body"], r#"{"name":"r"}"#);
    assert_eq!(event["isBase64Encoded"], false);

    let (status, _, body) = request(addr, "GET /elsewhere HTTP/1.1", "").await;
    assert_eq!((status, body.as_str()), (404, r#"{"message":"Not Found"}"#));
}

#[tokio::test]
async fn the_http_api_maps_function_errors_and_timeouts() {
    // `broken-connect` always fails; `message` with no `body` answers a
    // proxy response whose body is "echo:".
    let failing = http_api_for("broken-connect", 1_000).await;
    let (status, headers, body) = request(failing, "GET /health HTTP/1.1", "").await;
    assert_eq!(status, 500);
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    assert_eq!(body, r#"{"message":"Internal Server Error"}"#);

    let ok = http_api_for("message", 1_000).await;
    let (status, _, body) = request(ok, "GET /api/v1/x HTTP/1.1", "").await;
    assert_eq!((status, body.as_str()), (200, "echo:"));

    // A text body reaches the function as is: "slow" outlasts the timeout.
    let slow = http_api_for("message", 200).await;
    let (status, _, body) = request(
        slow,
        "POST /api/v1/x HTTP/1.1\r\ncontent-type: text/plain",
        "slow",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"message":"Service Unavailable"}"#)
    );
}
