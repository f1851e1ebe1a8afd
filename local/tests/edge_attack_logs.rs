//! Issue 15, finding 1: connection ids are capabilities wherever the
//! Management API can be reached, and they used to appear in WARN lines.
//! The real binary (`chat-local serve`, its own telemetry) runs as a child
//! process at its default level (`info`, so the `connection` span and its
//! fields are on), once with JSON and once with pretty logs. While two users
//! chat, the Management API is attacked with their connection ids (unsigned,
//! wrongly signed, and on the client port), handshakes come with a hostile
//! `Host`, and, so that WARN lines are certainly written inside the
//! connections' own context (the `connection` span carries the id), a
//! private Redis is killed under the stack while one of them sends.
//! Then no WARN or ERROR line holds any connection id, raw or
//! percent-encoded, while INFO lines do (the test would see them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chat_test_support::stack as common;
#[path = "support/serve.rs"]
mod serve;

use chat_test_support::TestEnv;
use common::{PrivateRedis, dev_credentials, raw_http, signed};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Attack rounds (each: three methods × three kinds of call, per victim).
const ROUNDS: usize = 20;

/// The level of one log line, for both formats.
fn level(line: &str, format: &str) -> Option<&'static str> {
    const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
    if format == "json" {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let level = value["level"].as_str()?;
        LEVELS.into_iter().find(|l| *l == level)
    } else {
        // Compact, coloured: `<time>  WARN target: ...`.
        strip_ansi(line)
            .split_whitespace()
            .take(3)
            .find_map(|word| LEVELS.into_iter().find(|l| *l == word))
    }
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn connection_ids_stay_out_of_warn_lines_during_the_management_api_attack() {
    let dir = serve::temp_dir("attack-logs");
    for format in ["json", "pretty"] {
        // A Redis of the test's own, which it stops for a moment.
        let mut redis = PrivateRedis::start().await;
        let mut env = TestEnv::new().await;
        env.set("REDIS_URL", &redis.url());
        let server = serve::Serve::start(
            &env,
            &dir,
            &format!("attack-{format}"),
            serve::Options {
                log_format: format,
                ..serve::Options::default()
            },
        )
        .await;
        let ws = |user: &str| server.ws_url(user);
        let (room, mut ann, ben) = server.pair("ann", "ben").await;
        let ids = [ann.connection_id.clone(), ben.connection_id.clone()];

        // Finding 1: the Management API with the victims' ids.
        let wrong = chat_gateway::ManagementCredentials {
            access_key_id: dev_credentials().access_key_id,
            secret_access_key: "a-guess".into(),
        };
        let forged = json!({"type": "message", "payload": {"content": "forged"}})
            .to_string()
            .into_bytes();
        let mut refused = 0;
        for _ in 0..ROUNDS {
            for id in &ids {
                let path = format!("/local/@connections/{}", id.replace('=', "%3D"));
                for method in ["POST", "GET", "DELETE"] {
                    let (unsigned, _, _) =
                        raw_http(server.management, method, &path, &[], &forged).await;
                    let headers = signed(&wrong, method, server.management, &path, &forged);
                    let (wrongly, _, _) =
                        raw_http(server.management, method, &path, &headers, &forged).await;
                    let headers = signed(&dev_credentials(), method, server.addr, &path, &forged);
                    let (client_port, _, _) =
                        raw_http(server.addr, method, &path, &headers, &forged).await;
                    assert_eq!((unsigned, wrongly, client_port), (403, 403, 404));
                    refused += 3;
                }
            }
            // Finding 2: a hostile Host on a handshake.
            let mut request = ws("mallory").into_client_request().unwrap();
            request
                .headers_mut()
                .insert("host", "169.254.169.254/latest?x=".parse().unwrap());
            if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await {
                let _ = socket.close(None).await;
            }
        }

        // WARN lines inside the connections' context: their frames fail
        // while Redis is gone, and the relay's posts fail.
        redis.kill().await;
        for i in 0..3 {
            ann.send(
                "sendMessage",
                json!({"roomId": room, "content": format!("lost {i}"), "clientMessageId": format!("l{i}")}),
            )
            .await;
        }
        let answers = ann.collect(1_500).await;
        assert!(
            answers.iter().any(|a| a["type"] == "error"),
            "no frame failed without Redis: {answers:?}"
        );
        redis.restart().await;
        ann.close().await;
        ben.close().await;
        let log = server.stop();

        let mut warn_lines = 0;
        let mut info_with_id = 0;
        let mut kinds = std::collections::BTreeSet::new();
        for line in log.lines() {
            let Some(level) = level(line, format) else {
                continue;
            };
            let holds_id = ids
                .iter()
                .any(|id| line.contains(id.as_str()) || line.contains(&id.replace('=', "%3D")));
            match level {
                "WARN" | "ERROR" => {
                    warn_lines += 1;
                    if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
                        kinds.insert(format!("{} {}", value["target"], value["message"]));
                    }
                    assert!(
                        !holds_id,
                        "{format}: a {level} line holds a connection id: {line}"
                    );
                }
                _ => info_with_id += usize::from(holds_id),
            }
        }
        println!(
            "{format}: {refused} Management API calls refused; {warn_lines} WARN/ERROR lines, \
             none with a connection id; {info_with_id} INFO lines with one; {kinds:?}"
        );
        assert!(
            warn_lines >= 1,
            "{format}: no WARN line was written:\n{log}"
        );
        assert!(
            info_with_id >= 2,
            "{format}: connection ids never logged at all, so their absence proves nothing:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
