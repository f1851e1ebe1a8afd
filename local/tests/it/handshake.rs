//! The WebSocket handshake (PROTOCOL.md §1, §2): a missing, malformed,
//! expired, wrongly signed or `alg: none` token is refused with HTTP 401
//! and no upgrade, and is told "invalid token" and no more; so is a `crit`
//! header and a repeated `token` parameter. A good token works from
//! `?token=` or from `Authorization: Bearer`.

use crate::common;

use chat_shared::auth::DevClaims;
use chat_test_support::{SECRET, TestEnv, token_with};
use common::{Client, TestStack, handshake, token};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::client::Request;

fn request(url: &str, authorization: Option<&str>) -> Request {
    let mut request = url.into_client_request().expect("a valid URL");
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert("Authorization", value.parse().expect("header value"));
    }
    request
}

/// The same claims signed with `algorithm` and `secret`.
fn signed(user: &str, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &DevClaims::new(user, 3600),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("mint")
}

/// An unsigned token: `{"alg":"none","typ":"JWT"}` over valid claims.
fn unsigned(user: &str) -> String {
    let good = token(user);
    let claims = good.split('.').nth(1).expect("claims segment");
    format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
}

async fn assert_refused(request: Request, what: &str) {
    match handshake(request).await {
        Ok(_) => panic!("{what}: the handshake was accepted"),
        Err((status, body)) => {
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{what}: {body}");
            // "invalid token" and nothing more: no library internals.
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message == "missing token" || message.starts_with("invalid token"),
                "{what}: {body}"
            );
        }
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_no_upgrade() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let base = format!("ws://{}/ws", stack.addr());
    let expired = token_with("mallory", |c| c.exp = chrono::Utc::now().timestamp() - 5);
    let mut tampered: Vec<String> = token("mallory").split('.').map(str::to_owned).collect();
    tampered[1] = token("admin").split('.').nth(1).expect("claims").to_owned();
    let tampered = tampered.join(".");
    let cases = [
        ("missing", base.clone()),
        ("empty", format!("{base}?token=")),
        ("malformed", format!("{base}?token=not-a-jwt")),
        (
            "wrongly signed",
            format!(
                "{base}?token={}",
                signed("mallory", Algorithm::HS256, "another-secret")
            ),
        ),
        ("tampered claims", format!("{base}?token={tampered}")),
        ("expired", format!("{base}?token={expired}")),
        ("alg none", format!("{base}?token={}", unsigned("mallory"))),
        (
            "a crit header naming an extension",
            format!("{base}?token={}", {
                let mut header = Header::new(Algorithm::HS256);
                header.crit = Some(vec!["urn:example:ext".to_owned()]);
                jsonwebtoken::encode(
                    &header,
                    &DevClaims::new("mallory", 3600),
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .expect("mint")
            }),
        ),
        // Ambiguous: either value alone would be accepted.
        (
            "two token parameters",
            format!(
                "{base}?token={}&token={}",
                token("mallory"),
                token("mallory")
            ),
        ),
        (
            "a good token and a bad one",
            format!("{base}?token={}&token=junk", token("mallory")),
        ),
        (
            "algorithm switched to HS512",
            format!(
                "{base}?token={}",
                signed("mallory", Algorithm::HS512, SECRET)
            ),
        ),
    ];
    for (what, url) in &cases {
        assert_refused(request(url, None), what).await;
    }
    for (what, header) in [
        ("bad bearer", format!("Bearer {}", unsigned("mallory"))),
        ("expired bearer", format!("Bearer {expired}")),
        ("not bearer", format!("Basic {}", token("mallory"))),
        ("bearer without token", "Bearer ".to_owned()),
    ] {
        assert_refused(request(&base, Some(&header)), what).await;
    }

    // No connection was ever upgraded or registered.
    let gateway = stack.stack.gateway.as_ref().expect("gateway");
    assert_eq!(gateway.connection_count(), 0);
    assert_eq!(common::lease_count(&env).await, 0);
    // Nor did any of those users become known.
    for user in ["mallory", "admin"] {
        let direct = stack
            .post(
                "alice",
                "/direct",
                serde_json::json!({"targetUserId": user}),
            )
            .await;
        assert_eq!(direct.status, 404, "{user}: {:?}", direct.body);
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_token_in_the_authorization_header_works() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let base = format!("ws://{}/ws", stack.addr());
    let bearer = format!("Bearer {}", token("alice"));
    let mut alice = Client::connect_request(request(&base, Some(&bearer)), "alice").await;
    alice.ping_pong().await;
    // The scheme is case-insensitive.
    let lower = format!("bearer {}", token("alice"));
    let mut again = Client::connect_request(request(&base, Some(&lower)), "alice").await;
    again.ping_pong().await;
    // `?token=` is read first.
    let url = stack.ws_url(&token("bob"));
    let (mut bob, connected) = Client::open(request(&url, Some("Bearer junk")), "bob").await;
    bob.ping_pong().await;
    assert_eq!(connected["userId"], Value::from("bob"));
    for c in [alice, again, bob] {
        c.close().await;
    }
    stack.stop().await;
}
