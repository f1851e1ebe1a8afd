//! The developer console's server side: the pages are served, the
//! dev-token endpoint exists only when enabled, `/metrics` speaks the
//! Prometheus text format, and the ops endpoint is admin-only.

use crate::common;

use chat_local::{Options, Parts, Stack};
use chat_test_support::TestEnv;
use common::{Client, TestStack, admin_token, http, token};
use serde_json::{Value, json};

/// A stack (gateway and relay) started with `options`, in the harness's
/// wrapper so its REST and WebSocket helpers work.
async fn stack_with(env: &TestEnv, parts: Parts, options: Options) -> TestStack {
    common::init_logs();
    let listener = if parts.gateway {
        Some(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        )
    } else {
        None
    };
    let stack = Stack::start_with(&env.config(), &env.settings(), listener, parts, options)
        .await
        .expect("stack starts");
    let addr = stack.addr;
    TestStack { stack, addr }
}

async fn dev_stack(env: &TestEnv) -> TestStack {
    stack_with(
        env,
        Parts::default(),
        Options {
            dev_tokens: true,
            ..Options::default()
        },
    )
    .await
}

async fn mint(stack: &TestStack, body: Value) -> common::Reply {
    http(
        stack.addr(),
        "POST",
        "/console/dev-token",
        None,
        Some(&body),
    )
    .await
}

/// The value of the one sample `name{labels}` (labels exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let reply = http(addr, "GET", "/metrics", None, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    reply.body.as_str().expect("a text body").to_owned()
}

/// Every line is a comment (`# HELP` / `# TYPE`) or `name{labels} value`,
/// and every sample belongs to a family declared before it.
fn assert_exposition(text: &str) {
    let mut families = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "summary"].contains(&kind), "{line}");
            families.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().expect("name");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.iter().any(|x| x == f))
            .unwrap_or(name);
        assert!(
            families.iter().any(|f| f == family),
            "sample before its # TYPE: {line}"
        );
    }
}

#[tokio::test]
async fn console_pages_are_served_from_the_binary() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    for (path, content_type, needle) in [
        ("/console", "text/html; charset=utf-8", "Chat console"),
        ("/console/", "text/html; charset=utf-8", "/console/app.js"),
        (
            "/console/app.js",
            "text/javascript; charset=utf-8",
            "./lib/index.js",
        ),
        (
            "/console/lib/index.js",
            "text/javascript; charset=utf-8",
            "ChatClient",
        ),
        ("/console/style.css", "text/css; charset=utf-8", ".messages"),
        ("/console/ops", "text/html; charset=utf-8", "Operator view"),
        (
            "/console/ops.js",
            "text/javascript; charset=utf-8",
            "/console/api/ops",
        ),
    ] {
        let reply = http(stack.addr(), "GET", path, None, None).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), Some(content_type), "{path}");
        assert_eq!(reply.header("cache-control"), Some("no-cache"), "{path}");
        let body = reply.body.as_str().expect("a text body");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
    }
    let missing = http(stack.addr(), "GET", "/console/nope.js", None, None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "NOT_FOUND");
    stack.stop().await;
}

/// Every module of the client library copied into
/// `local/console/vendor/chat-client/` (scripts/build-console-lib.sh) is
/// served under `/console/lib/` as it is on disk: a module the
/// copy gained but `LIB` in console.rs lacks would break the console's
/// imports in the browser.
#[tokio::test]
async fn every_client_library_module_is_served() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console/vendor/chat-client");
    let mut served = 0;
    for entry in std::fs::read_dir(&dir).expect("local/console/vendor/chat-client") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a file name");
        assert!(
            name.ends_with(".js"),
            "only the library's .js modules belong in local/console/vendor/chat-client: {name}"
        );
        let on_disk = std::fs::read_to_string(&path).expect("a text file");
        let reply = http(
            stack.addr(),
            "GET",
            &format!("/console/lib/{name}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            reply.status, 200,
            "/console/lib/{name} is not served: add it to LIB in local/src/console.rs"
        );
        assert_eq!(
            reply.header("content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(
            reply.body.as_str(),
            Some(on_disk.as_str()),
            "/console/lib/{name} differs from the file: rebuild chat-local"
        );
        served += 1;
    }
    assert!(
        served >= 4,
        "the library has at least 4 modules, found {served}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn dev_tokens_are_404_unless_enabled() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let reply = mint(&stack, json!({"userId": "alice"})).await;
    assert_eq!(reply.status, 404, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "NOT_FOUND");
    stack.stop().await;
}

#[tokio::test]
async fn dev_tokens_sign_in_any_valid_user_when_enabled() {
    let env = TestEnv::new().await;
    let stack = dev_stack(&env).await;

    let reply = mint(
        &stack,
        json!({"userId": "alice", "displayName": "Alice A."}),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["userId"], "alice");
    let alice = reply.body["token"].as_str().expect("token").to_owned();

    // The token works for REST (the profile comes from its claims) and
    // for the WebSocket handshake.
    let rooms = stack.call("GET", "/rooms", &alice, None).await;
    assert_eq!(rooms.status, 200, "{:?}", rooms.body);
    let client = Client::connect_url(&stack.ws_url(&alice), "alice").await;
    client.close().await;
    let bob = mint(&stack, json!({"userId": "bob"})).await;
    let bob = bob.body["token"].as_str().expect("token").to_owned();
    stack.call("GET", "/rooms", &bob, None).await;
    let direct = stack
        .call(
            "POST",
            "/direct",
            &bob,
            Some(json!({"targetUserId": "alice"})),
        )
        .await;
    assert_eq!(direct.status, 200, "{:?}", direct.body);
    let members = direct.body["room"]["members"].as_array().expect("members");
    let alice_profile = members
        .iter()
        .find(|m| m["id"] == "alice")
        .expect("alice is a member");
    assert_eq!(alice_profile["displayName"], "Alice A.");

    // Plain tokens are not admin tokens; `admin: true` mints one.
    let refused = http(stack.addr(), "GET", "/console/api/ops", Some(&alice), None).await;
    assert_eq!(refused.status, 403);
    let admin = mint(&stack, json!({"userId": "ops", "admin": true})).await;
    let admin = admin.body["token"].as_str().expect("token").to_owned();
    let ops = http(stack.addr(), "GET", "/console/api/ops", Some(&admin), None).await;
    assert_eq!(ops.status, 200, "{:?}", ops.body);

    // Validation: user ids follow UserId::parse, the rest is typed.
    for body in [
        json!({}),
        json!({"userId": ""}),
        json!({"userId": "has space"}),
        json!({"userId": "x".repeat(65)}),
        json!({"userId": 42}),
        json!({"userId": "carol", "admin": "yes"}),
        json!({"userId": "carol", "displayName": 7}),
        json!({"userId": "carol", "displayName": "n".repeat(101)}),
    ] {
        let reply = mint(&stack, body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "BAD_REQUEST", "{body}");
    }
    let reply = http(
        stack.addr(),
        "POST",
        "/console/dev-token",
        None,
        Some(&json!("alice")),
    )
    .await;
    assert_eq!(reply.status, 400);
    stack.stop().await;
}

#[tokio::test]
async fn metrics_expose_gateway_relay_and_error_counters() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    common::wait_relays(&env, 1).await;
    let text = scrape(stack.management_addr()).await;
    assert_exposition(&text);
    assert_eq!(
        sample(&text, "chat_gateway_connections{gateway=\"test\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "chat_relay_subscriptions_total"), Some(1.0));
    let rest_404 = "chat_errors_total{source=\"rest\",code=\"NOT_FOUND\"}";
    let ws_400 = "chat_errors_total{source=\"ws\",code=\"BAD_REQUEST\"}";
    let refused = "chat_errors_total{source=\"handshake\",code=\"UNAUTHORIZED\"}";
    let before = |series| sample(&text, series).expect("every error series is exposed");
    let (rest_before, ws_before, refused_before) =
        (before(rest_404), before(ws_400), before(refused));

    // Traffic: two users chat, one REST 404, one bad frame, one refused
    // handshake.
    let room = stack.direct("alice", "bob").await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    alice.join(&room).await;
    bob.join(&room).await;
    alice.say(&room, "hello").await;
    bob.expect("message").await;
    assert_eq!(stack.get("alice", "/nope").await.status, 404);
    alice
        .send_raw(tokio_tungstenite::tungstenite::Message::text("{oops"))
        .await;
    alice.expect_error("BAD_REQUEST").await;
    let handshake = common::handshake(
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            stack.ws_url("not-a-token"),
        )
        .expect("request"),
    )
    .await;
    assert_eq!(handshake.err().map(|(status, _)| status), Some(401));

    let text = scrape(stack.management_addr()).await;
    assert_exposition(&text);
    assert_eq!(
        sample(&text, "chat_gateway_connections{gateway=\"test\"}"),
        Some(2.0)
    );
    assert!(sample(&text, "chat_gateway_messages_in_total{gateway=\"test\"}") >= Some(4.0));
    assert!(sample(&text, "chat_relay_posts_total{result=\"ok\"}") >= Some(4.0));
    assert!(sample(&text, "chat_relay_envelopes_total") >= Some(2.0));
    let pushes = sample(&text, "chat_relay_push_latency_seconds_count").expect("count");
    assert!(pushes >= 4.0);
    assert!(sample(&text, "chat_relay_push_latency_seconds_sum") > Some(0.0));
    // The error counters are process-wide and other tests run beside this
    // one: at least ours were counted.
    assert!(sample(&text, rest_404) >= Some(rest_before + 1.0));
    assert!(sample(&text, ws_400) >= Some(ws_before + 1.0));
    assert!(sample(&text, refused) >= Some(refused_before + 1.0));
    alice.close().await;
    bob.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_relay_alone_serves_its_metrics_when_asked() {
    let env = TestEnv::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay = stack_with(
        &env,
        Parts {
            gateway: false,
            relay: true,
        },
        Options {
            metrics_listener: Some(listener),
            ..Options::default()
        },
    )
    .await;
    let addr = relay.stack.metrics_addr.expect("metrics address");
    common::wait_relays(&env, 1).await;
    let text = scrape(addr).await;
    assert_exposition(&text);
    assert_eq!(sample(&text, "chat_relay_subscriptions_total"), Some(1.0));
    assert!(!text.contains("chat_gateway_"), "no gateway here");
    assert!(text.contains("chat_errors_total{source=\"rest\",code=\"INTERNAL\"}"));
    // Only /metrics: the console and REST live on gateways.
    let reply = http(addr, "GET", "/console", None, None).await;
    assert_eq!(reply.status, 404);
    relay.stop().await;
}

#[tokio::test]
async fn the_ops_view_is_for_admins_and_counts_rooms_and_gateways() {
    let env = TestEnv::new().await;
    let stack = TestStack::all_in_one(&env).await;
    let ops = |token: Option<String>| {
        let addr = stack.addr();
        async move { http(addr, "GET", "/console/api/ops", token.as_deref(), None).await }
    };
    let reply = ops(None).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body["error"]["code"], "UNAUTHORIZED");
    let reply = ops(Some("not-a-token".into())).await;
    assert_eq!(reply.status, 401);
    let reply = ops(Some(token("alice"))).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body["error"]["code"], "FORBIDDEN");

    let reply = ops(Some(admin_token("ops"))).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["rooms"], json!([]));
    assert_eq!(reply.body["gateways"], json!([]));
    assert_eq!(reply.body["gateway"]["connectionsOpen"], 0);

    let room = stack.direct("alice", "bob").await;
    let group = stack.group("alice", &["bob", "carol"]).await;
    let mut alice = Client::connect(&stack, "alice").await;
    let mut bob = Client::connect(&stack, "bob").await;
    let mut alice_too = Client::connect(&stack, "alice").await;
    alice.join(&room).await;
    bob.join(&room).await;
    alice_too.join(&room).await;
    alice.join(&group).await;
    alice.say(&room, "counted").await;

    let reply = ops(Some(admin_token("ops"))).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let body = &reply.body;
    assert_eq!(
        body["rooms"],
        json!([
            {"roomId": room, "subscribers": 3, "type": "DIRECT", "name": null, "lastSequenceId": 1},
            {"roomId": group, "subscribers": 1, "type": "GROUP", "name": "team", "lastSequenceId": 0},
        ])
    );
    assert_eq!(body["roomsTruncated"], false);
    assert_eq!(
        body["gateways"],
        json!([{"endpoint": stack.endpoint(), "connections": 3}])
    );
    assert_eq!(body["gateway"]["instance"], "test");
    assert_eq!(body["gateway"]["connectionsOpen"], 3);
    assert!(body["relay"]["postsOk"].as_u64() >= Some(3));
    assert!(body["relay"]["pushLatencyCount"].as_u64() >= Some(3));
    let errors = body["errors"].as_object().expect("errors by code");
    assert_eq!(errors.len(), chat_shared::metrics::ERROR_CODES.len());
    assert!(errors["FORBIDDEN"].as_u64() >= Some(1));

    // A connection that leaves is no longer counted (once its
    // `$disconnect` has run).
    bob.close().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let reply = ops(Some(admin_token("ops"))).await;
        let counts = (
            reply.body["rooms"][0]["subscribers"].clone(),
            reply.body["gateways"][0]["connections"].clone(),
        );
        if counts == (json!(2), json!(2)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still counted: {counts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    alice.close().await;
    alice_too.close().await;
    stack.stop().await;
}
