//! A handler that panics fails its own request (500 `INTERNAL`, the API's
//! error body) and nothing else: the server answers the next request. The
//! release binaries unwind (`panic = "unwind"` in Cargo.toml) so that this
//! holds where it is deployed, too; `release_profile_unwinds` checks that.

#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

async fn call(app: &Router, path: &str) -> (StatusCode, Value) {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn boom() -> &'static str {
    panic!("on purpose")
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
    let app = Router::new()
        .route("/boom", get(boom))
        .route("/fine", get(|| async { "fine" }))
        .layer(chat_shared::http::catch_panics());
    let (status, body) = call(&app, "/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "INTERNAL", "{body}");
    assert_eq!(
        body["error"]["message"], "internal error",
        "the panic stays in the log"
    );
    let (status, _) = call(&app, "/fine").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "and again");
}

#[test]
fn release_profile_unwinds() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    let release = manifest
        .split("[profile.release]")
        .nth(1)
        .expect("a release profile")
        .split("\n[")
        .next()
        .unwrap();
    assert!(
        release.contains("panic = \"unwind\""),
        "the deployed binaries must unwind, so a panic fails one request: {release}"
    );
}
