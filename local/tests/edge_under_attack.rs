//! Issue 15, "Tests and proof": while the edge attacks of findings 1 and 2
//! run flat out (forged, unsigned and wrongly signed Management API calls
//! on both ports, and handshakes with a hostile `Host`), a normal pair of
//! users chats one message at a time. Every attack fails, the pair gets
//! every message with no refusal, and the process's RSS stays under a
//! stated bound. A binary of its own, so that the RSS is this test's.

use chat_test_support::stack as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_test_support::TestEnv;
use common::{Client, TestStack, dev_credentials, raw_http, rss_kb, signed, token};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Messages the normal user sends, one at a time, during the attack.
const NORMAL_SENDS: usize = 40;
/// Attack tasks of each kind.
const ATTACKERS: usize = 4;
/// The process's RSS may grow by at most this during the attack: the
/// attacks open short connections and send small bodies, so anything
/// near this bound would mean something keeps what it should drop.
const RSS_GROWTH_BOUND_KB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_user_keeps_chatting_while_the_edge_is_attacked() {
    let env = TestEnv::new().await;
    let stack = Arc::new(TestStack::all_in_one(&env).await);
    let room = stack.direct("ann", "ben").await;
    let mut ann = Client::connect(&stack, "ann").await;
    let mut ben = Client::connect(&stack, "ben").await;
    ann.join(&room).await;
    ben.join(&room).await;
    let target = format!(
        "/local/@connections/{}",
        ben.connection_id.replace('=', "%3D")
    );

    let baseline_kb = rss_kb();
    let stop = Arc::new(AtomicBool::new(false));
    // Attacks that got anything but the refusal they must get.
    let breaches = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..ATTACKERS {
        // Finding 1: the Management API, unsigned, wrongly signed, and on
        // the client port.
        let api = (
            Arc::clone(&stop),
            Arc::clone(&breaches),
            Arc::clone(&attempts),
            Arc::clone(&stack),
            target.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (stop, breaches, attempts, stack, target) = api;
            let forged = json!({"type": "message", "payload": {"content": format!("forged {n}")}})
                .to_string()
                .into_bytes();
            let wrong = chat_gateway::ManagementCredentials {
                access_key_id: dev_credentials().access_key_id,
                secret_access_key: format!("guess-{n}"),
            };
            let management = stack.management_addr();
            while !stop.load(Ordering::Relaxed) {
                for method in ["POST", "DELETE", "GET"] {
                    let (status, _, _) = raw_http(management, method, &target, &[], &forged).await;
                    let headers = signed(&wrong, method, management, &target, &forged);
                    let (wrongly, _, _) =
                        raw_http(management, method, &target, &headers, &forged).await;
                    let headers =
                        signed(&dev_credentials(), method, stack.addr(), &target, &forged);
                    let (client_port, _, _) =
                        raw_http(stack.addr(), method, &target, &headers, &forged).await;
                    attempts.fetch_add(3, Ordering::Relaxed);
                    if status != 403 || wrongly != 403 || client_port != 404 {
                        breaches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        // Finding 2: handshakes with a hostile Host, closed at once.
        let (stop, attempts, stack) =
            (Arc::clone(&stop), Arc::clone(&attempts), Arc::clone(&stack));
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut request = stack
                    .ws_url(&token(&format!("mallory-{n}-{i}")))
                    .into_client_request()
                    .expect("request");
                request.headers_mut().insert(
                    "host",
                    "169.254.169.254/latest/meta-data?x="
                        .parse()
                        .expect("header"),
                );
                // Refused (429 for too many connects from one address) or
                // accepted with the gateway's own endpoint: both are fine;
                // where posts go is checked below.
                if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await {
                    let _ = socket.close(None).await;
                }
                attempts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let peak_kb = Arc::new(AtomicU64::new(baseline_kb));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak_kb));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut refusals = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..NORMAL_SENDS {
        let started = Instant::now();
        let id = format!("ann-{i}");
        if let Err(refusal) = ann.send_and_await(&room, &format!("hello {i}"), &id).await {
            refusals.push(refusal);
        }
        slowest = slowest.max(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let _ = sampler.await;

    // Ben got every message, in order, and nothing forged.
    let received = ben.collect_until("message", NORMAL_SENDS).await;
    let contents: Vec<String> = received
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            e["payload"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..NORMAL_SENDS).map(|i| format!("hello {i}")).collect();
    let growth_kb = peak_kb.load(Ordering::Relaxed).saturating_sub(baseline_kb);
    println!(
        "normal user: {NORMAL_SENDS} sends, {} refused, slowest {slowest:?}; \
         attacks: {} attempts, {} breaches; RSS +{growth_kb} kB (bound {RSS_GROWTH_BOUND_KB} kB)",
        refusals.len(),
        attempts.load(Ordering::Relaxed),
        breaches.load(Ordering::Relaxed),
    );
    assert!(
        refusals.is_empty(),
        "the normal user was refused: {refusals:?}"
    );
    assert_eq!(contents, expected, "ben's messages");
    assert_eq!(breaches.load(Ordering::Relaxed), 0, "an attack got through");
    assert!(
        attempts.load(Ordering::Relaxed) > 100,
        "the attack barely ran: {} attempts",
        attempts.load(Ordering::Relaxed)
    );
    assert!(
        growth_kb < RSS_GROWTH_BOUND_KB,
        "RSS grew by {growth_kb} kB (bound {RSS_GROWTH_BOUND_KB} kB)"
    );
    // Ben is still connected and still gets what ann sends.
    ann.send(
        "sendMessage",
        json!({"roomId": room, "content": "after", "clientMessageId": "ann-after"}),
    )
    .await;
    assert_eq!(ben.wait_for("message").await["content"], "after");
    match Arc::try_unwrap(stack) {
        Ok(stack) => stack.stop().await,
        Err(_) => panic!("the stack is still shared"),
    }
}
