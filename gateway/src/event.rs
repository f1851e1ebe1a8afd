//! The events API Gateway sends to the route integrations, built as the JSON
//! AWS puts on the wire.
//!
//! The JSON is the source of truth: it has exactly the keys a real event has
//! (absent keys are absent, not `null`), and [`crate::handler`] deserializes
//! it into `ApiGatewayWebsocketProxyRequest` the way `lambda_runtime` does.
//! The shapes follow the events captured in the `aws_lambda_events` fixtures
//! (copied to `tests/fixtures/`) and the API Gateway mapping-template
//! reference:
//!
//! * CONNECT: `headers`, `multiValueHeaders`, the query maps when the upgrade
//!   URL has a query, `requestContext`, `isBase64Encoded`.
//! * MESSAGE: `requestContext` (with `messageId`), `body`, `isBase64Encoded`.
//! * DISCONNECT: the fixed headers API Gateway sends (`Host`, and empty
//!   `x-api-key`, `X-Forwarded-For`, `x-restapi`), `requestContext` (with
//!   `disconnectStatusCode` and `disconnectReason`), `isBase64Encoded`.
//!
//! Header names are lower case: hyper does not keep the client's spelling,
//! and handlers read them through a case-insensitive `HeaderMap` anyway.

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::GatewayConfig;

/// What is known about a connection when `$connect` runs; every later event
/// of the connection repeats it, as API Gateway does.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionMeta {
    /// The id the Management API and every event use.
    pub connection_id: String,
    /// When the upgrade request arrived (`connectedAt`), millisecond precision.
    pub connected_at: DateTime<Utc>,
    /// The configured management listener (`GatewayConfig::domain_name`,
    /// e.g. `127.0.0.1:3100`), never the client's `Host`: the relay builds
    /// its callback URL from it, as it would from `<api>.execute-api...`.
    pub domain_name: String,
    /// The TCP peer's address (`identity.sourceIp`).
    pub source_ip: IpAddr,
    /// The upgrade request's `User-Agent` (`identity.userAgent`), if any.
    pub user_agent: Option<String>,
}

/// The payload of one client message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MessageBody<'a> {
    /// A text message, passed as is.
    Text(&'a str),
    /// A binary message, passed base64-encoded with `isBase64Encoded: true`.
    Binary(&'a [u8]),
}

/// A new id in API Gateway's style: 11 random bytes in padded base64, 16
/// characters ending in `=` (e.g. `L0SM9cOFvHcCIhw=`).
///
/// The URL-safe alphabet is used: ids captured from API Gateway contain `_`
/// (e.g. request id `U_vNtEwHIAMFoxg=`), and it keeps `/` out of
/// `@connections/{id}` paths.
pub(crate) fn new_id() -> String {
    URL_SAFE.encode(rand::random::<[u8; 11]>())
}

/// `requestTime` as API Gateway writes it: `28/Nov/2026:08:45:43 +0000`.
pub(crate) fn request_time(now: DateTime<Utc>) -> String {
    now.format("%d/%b/%Y:%H:%M:%S %z").to_string()
}

/// A timestamp as the Management API returns it: `2026-11-28T08:45:43.123Z`.
pub(crate) fn iso_millis(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The `$connect` event for an upgrade request with these headers and query.
pub(crate) fn connect_event(
    config: &GatewayConfig,
    meta: &ConnectionMeta,
    headers: &HeaderMap,
    query: Option<&str>,
    now: DateTime<Utc>,
) -> Value {
    let (single, multi) = connect_headers(headers, meta, now);
    let mut event = Map::new();
    event.insert("headers".into(), single.into());
    event.insert("multiValueHeaders".into(), multi.into());
    if let Some((single, multi)) = query_parameters(query) {
        event.insert("queryStringParameters".into(), single.into());
        event.insert("multiValueQueryStringParameters".into(), multi.into());
    }
    let context = request_context(config, meta, "$connect", "CONNECT", now);
    event.insert("requestContext".into(), context.into());
    event.insert("isBase64Encoded".into(), false.into());
    event.into()
}

/// The `$default` event for one client message, and its request id (the
/// "Internal server error" reply to the client quotes it).
pub(crate) fn message_event(
    config: &GatewayConfig,
    meta: &ConnectionMeta,
    body: MessageBody<'_>,
    now: DateTime<Utc>,
) -> (Value, String) {
    let mut context = request_context(config, meta, "$default", "MESSAGE", now);
    context.insert("messageId".into(), new_id().into());
    let request_id = context
        .get("requestId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let (body, is_base64_encoded) = match body {
        MessageBody::Text(text) => (text.to_owned(), false),
        MessageBody::Binary(bytes) => (STANDARD.encode(bytes), true),
    };
    let event = json!({
        "requestContext": context,
        "body": body,
        "isBase64Encoded": is_base64_encoded,
    });
    (event, request_id)
}

/// The `$disconnect` event, with the close status API Gateway reports.
pub(crate) fn disconnect_event(
    config: &GatewayConfig,
    meta: &ConnectionMeta,
    status_code: u16,
    reason: &str,
    now: DateTime<Utc>,
) -> Value {
    // What API Gateway sends on every $disconnect, whatever the upgrade
    // request carried.
    let fixed = [
        ("host", meta.domain_name.as_str()),
        ("x-api-key", ""),
        ("x-forwarded-for", ""),
        ("x-restapi", ""),
    ];
    let single: Map<String, Value> = fixed
        .iter()
        .map(|(name, value)| ((*name).to_owned(), Value::from(*value)))
        .collect();
    let multi: Map<String, Value> = fixed
        .iter()
        .map(|(name, value)| ((*name).to_owned(), json!([value])))
        .collect();
    let mut context = request_context(config, meta, "$disconnect", "DISCONNECT", now);
    context.insert("disconnectStatusCode".into(), status_code.into());
    context.insert("disconnectReason".into(), reason.into());
    json!({
        "headers": single,
        "multiValueHeaders": multi,
        "requestContext": context,
        "isBase64Encoded": false,
    })
}

/// The `requestContext` keys every WebSocket event has.
fn request_context(
    config: &GatewayConfig,
    meta: &ConnectionMeta,
    route_key: &str,
    event_type: &str,
    now: DateTime<Utc>,
) -> Map<String, Value> {
    // `$context.requestId` is documented as the same as `extendedRequestId`.
    let request_id = new_id();
    let mut identity = Map::new();
    identity.insert("sourceIp".into(), meta.source_ip.to_string().into());
    if let Some(user_agent) = &meta.user_agent {
        identity.insert("userAgent".into(), user_agent.clone().into());
    }
    let context = json!({
        "routeKey": route_key,
        "eventType": event_type,
        "extendedRequestId": request_id,
        "requestTime": request_time(now),
        "messageDirection": "IN",
        "stage": config.stage,
        "connectedAt": meta.connected_at.timestamp_millis(),
        "requestTimeEpoch": now.timestamp_millis(),
        "identity": identity,
        "requestId": request_id,
        "domainName": meta.domain_name,
        "connectionId": meta.connection_id,
        "apiId": config.api_id,
    });
    match context {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The `$connect` headers: the upgrade request's headers without the
/// hop-by-hop `Connection` and `Upgrade` (API Gateway does not forward them),
/// plus the ones API Gateway adds (`X-Amzn-Trace-Id`, `X-Forwarded-*`).
///
/// `headers` keeps the last value of a repeated header, `multiValueHeaders`
/// all of them.
fn connect_headers(
    headers: &HeaderMap,
    meta: &ConnectionMeta,
    now: DateTime<Utc>,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in headers.keys() {
        if name == axum::http::header::CONNECTION || name == axum::http::header::UPGRADE {
            continue;
        }
        let values = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        all.insert(name.as_str().to_owned(), values);
    }

    let source_ip = meta.source_ip.to_string();
    match all.get_mut("x-forwarded-for") {
        Some(values) => {
            for value in values.iter_mut() {
                *value = format!("{value}, {source_ip}");
            }
        }
        None => {
            all.insert("x-forwarded-for".into(), vec![source_ip]);
        }
    }
    all.entry("x-amzn-trace-id".into()).or_insert_with(|| {
        let random: [u8; 12] = rand::random();
        let hex: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
        vec![format!("Root=1-{:08x}-{hex}", now.timestamp())]
    });
    let port = meta
        .domain_name
        .rsplit_once(':')
        .map(|(_, port)| port)
        .filter(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("80")
        .to_owned();
    all.entry("x-forwarded-port".into())
        .or_insert_with(|| vec![port]);
    all.entry("x-forwarded-proto".into())
        .or_insert_with(|| vec!["http".into()]);

    single_and_multi(all)
}

/// `queryStringParameters` (last value of each name) and
/// `multiValueQueryStringParameters` (all values), percent-decoded; `None`
/// when the URL has no parameters, since API Gateway then omits both keys.
///
/// A `+` stays a `+`: only percent-escapes are decoded.
fn query_parameters(query: Option<&str>) -> Option<(Map<String, Value>, Map<String, Value>)> {
    let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in query?.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        all.entry(decode(name)).or_default().push(decode(value));
    }
    if all.is_empty() {
        return None;
    }
    Some(single_and_multi(all))
}

/// API Gateway's two views of repeated names: the last value of each
/// (`headers`, `queryStringParameters`) and all of them (`multiValue…`).
fn single_and_multi(
    all: BTreeMap<String, Vec<String>>,
) -> (Map<String, Value>, Map<String, Value>) {
    let single = all
        .iter()
        .filter_map(|(name, values)| Some((name.clone(), Value::from(values.last()?.clone()))))
        .collect();
    let multi = all
        .into_iter()
        .map(|(name, values)| (name, Value::from(values)))
        .collect();
    (single, multi)
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
    use axum::http::HeaderValue;
    use chrono::TimeZone;

    use super::*;

    const CONNECT_FIXTURE: &str =
        include_str!("../tests/fixtures/example-apigw-websocket-request-without-method.json");
    const DISCONNECT_FIXTURE: &str =
        include_str!("../tests/fixtures/example-apigw-websocket-request-disconnect-route.json");
    const MIXED_FIXTURE: &str =
        include_str!("../tests/fixtures/example-apigw-websocket-request.json");

    fn meta(user_agent: Option<&str>) -> ConnectionMeta {
        ConnectionMeta {
            connection_id: "L0SM9cOFvHcCIhw=".into(),
            connected_at: Utc.with_ymd_and_hms(2026, 11, 28, 8, 45, 43).unwrap(),
            domain_name: "127.0.0.1:3000".into(),
            source_ip: Ipv4Addr::new(192, 0, 2, 1).into(),
            user_agent: user_agent.map(str::to_owned),
        }
    }

    fn upgrade_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "127.0.0.1:3000"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        headers
    }

    fn keys(value: &Value) -> BTreeSet<String> {
        value
            .as_object()
            .unwrap()
            .keys()
            .map(|key| key.to_ascii_lowercase())
            .collect()
    }

    fn fixture(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn ids_look_like_api_gateway_ids() {
        let ids: BTreeSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000, "ids repeat");
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(id.ends_with('='), "{id}");
            assert!(
                id[..15]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
            assert_eq!(URL_SAFE.decode(id).unwrap().len(), 11);
        }
    }

    #[test]
    fn times_use_api_gateway_formats() {
        let now = Utc
            .with_ymd_and_hms(2026, 11, 28, 8, 45, 43)
            .unwrap()
            .checked_add_signed(chrono::Duration::milliseconds(123))
            .unwrap();
        assert_eq!(request_time(now), "28/Nov/2026:08:45:43 +0000");
        assert_eq!(iso_millis(now), "2026-11-28T08:45:43.123Z");
    }

    #[test]
    fn connect_event_has_the_keys_of_a_captured_connect_event() {
        let config = GatewayConfig::default();
        let event = connect_event(&config, &meta(None), &upgrade_headers(), None, Utc::now());
        let captured = fixture(CONNECT_FIXTURE);
        assert_eq!(keys(&event), keys(&captured));
        assert_eq!(
            keys(&event["requestContext"]),
            keys(&captured["requestContext"])
        );
        // The fixture's API had API keys; ours has none.
        assert_eq!(
            keys(&event["requestContext"]["identity"]),
            BTreeSet::from(["sourceip".to_owned()])
        );
        // Every header the captured event has, except the API key, plus the
        // upgrade request's own; never the hop-by-hop ones.
        let mut expected = keys(&captured["headers"]);
        expected.remove("x-api-key");
        assert_eq!(keys(&event["headers"]), expected);
        assert_eq!(keys(&event["multiValueHeaders"]), expected);
        assert_eq!(event["requestContext"]["routeKey"], "$connect");
        assert_eq!(event["requestContext"]["eventType"], "CONNECT");
        assert_eq!(event["headers"]["x-forwarded-for"], "192.0.2.1");
        assert_eq!(event["headers"]["x-forwarded-port"], "3000");
        assert_eq!(event["headers"]["x-forwarded-proto"], "http");
        assert_eq!(
            event["requestContext"]["requestId"],
            event["requestContext"]["extendedRequestId"]
        );
    }

    #[test]
    fn connect_event_with_a_query_has_both_query_maps() {
        let config = GatewayConfig::default();
        let query = Some("token=a%2Eb%3D&x=1&x=2&flag&&plus=a+b");
        let event = connect_event(
            &config,
            &meta(Some("test/1.0")),
            &upgrade_headers(),
            query,
            Utc::now(),
        );
        // That fixture lacks `isBase64Encoded`, which every captured event has.
        let mut mixed = keys(&fixture(MIXED_FIXTURE));
        mixed.insert("isbase64encoded".into());
        assert!(keys(&event).is_subset(&mixed), "{:?}", keys(&event));
        assert!(keys(&event).contains("querystringparameters"));
        assert_eq!(
            event["queryStringParameters"],
            json!({"token": "a.b=", "x": "2", "flag": "", "plus": "a+b"})
        );
        assert_eq!(
            event["multiValueQueryStringParameters"],
            json!({"token": ["a.b="], "x": ["1", "2"], "flag": [""], "plus": ["a+b"]})
        );
        assert_eq!(event["requestContext"]["identity"]["userAgent"], "test/1.0");
    }

    #[test]
    fn an_empty_query_is_no_query() {
        assert!(query_parameters(Some("")).is_none());
        assert!(query_parameters(Some("&&")).is_none());
        assert!(query_parameters(None).is_none());
    }

    #[test]
    fn forwarded_for_is_appended_to() {
        let mut headers = upgrade_headers();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let event = connect_event(
            &GatewayConfig::default(),
            &meta(None),
            &headers,
            None,
            Utc::now(),
        );
        assert_eq!(
            event["headers"]["x-forwarded-for"],
            "203.0.113.7, 192.0.2.1"
        );
    }

    #[test]
    fn message_event_has_the_keys_of_a_message_event() {
        let config = GatewayConfig::default();
        let (event, request_id) =
            message_event(&config, &meta(None), MessageBody::Text("hi"), Utc::now());
        let expected: BTreeSet<String> = ["requestcontext", "body", "isbase64encoded"]
            .map(str::to_owned)
            .into();
        assert_eq!(keys(&event), expected);
        // The CONNECT context plus `messageId`.
        let mut expected = keys(&fixture(CONNECT_FIXTURE)["requestContext"]);
        expected.insert("messageid".into());
        assert_eq!(keys(&event["requestContext"]), expected);
        assert_eq!(event["requestContext"]["requestId"], request_id.as_str());
        assert_eq!(event["requestContext"]["eventType"], "MESSAGE");
        assert_eq!(event["requestContext"]["routeKey"], "$default");
        assert_eq!(event["body"], "hi");
        assert_eq!(event["isBase64Encoded"], false);

        let (event, _) = message_event(
            &config,
            &meta(None),
            MessageBody::Binary(&[0xff, 0]),
            Utc::now(),
        );
        assert_eq!(event["body"], "/wA=");
        assert_eq!(event["isBase64Encoded"], true);
    }

    #[test]
    fn disconnect_event_has_the_keys_of_a_captured_disconnect_event() {
        let config = GatewayConfig::default();
        let event = disconnect_event(
            &config,
            &meta(None),
            1005,
            "Client-side close frame status not set",
            Utc::now(),
        );
        let captured = fixture(DISCONNECT_FIXTURE);
        assert_eq!(keys(&event), keys(&captured));
        assert_eq!(keys(&event["headers"]), keys(&captured["headers"]));
        assert_eq!(
            keys(&event["multiValueHeaders"]),
            keys(&captured["multiValueHeaders"])
        );
        assert_eq!(
            keys(&event["requestContext"]),
            keys(&captured["requestContext"])
        );
        assert_eq!(
            keys(&event["requestContext"]["identity"]),
            keys(&captured["requestContext"]["identity"])
        );
        assert_eq!(event["requestContext"]["disconnectStatusCode"], 1005);
        assert_eq!(event["headers"]["host"], "127.0.0.1:3000");
    }

    #[test]
    fn every_event_deserializes_like_lambda_runtime_would() {
        let config = GatewayConfig::default();
        let meta = meta(Some("ua"));
        let now = Utc::now();
        let connect: ApiGatewayWebsocketProxyRequest = serde_json::from_value(connect_event(
            &config,
            &meta,
            &upgrade_headers(),
            Some("token=t"),
            now,
        ))
        .unwrap();
        assert_eq!(
            connect.request_context.route_key.as_deref(),
            Some("$connect")
        );
        assert_eq!(connect.query_string_parameters.first("token"), Some("t"));
        assert_eq!(connect.headers["sec-websocket-version"], "13");
        assert_eq!(
            connect.request_context.connected_at,
            meta.connected_at.timestamp_millis()
        );

        let (message, _) = message_event(&config, &meta, MessageBody::Text("x"), now);
        let message: ApiGatewayWebsocketProxyRequest = serde_json::from_value(message).unwrap();
        assert!(message.request_context.message_id.is_some());
        assert_eq!(message.body.as_deref(), Some("x"));

        let disconnect: ApiGatewayWebsocketProxyRequest =
            serde_json::from_value(disconnect_event(&config, &meta, 1000, "bye", now)).unwrap();
        assert_eq!(
            disconnect.request_context.disconnect_status_code,
            Some(1000)
        );
        assert_eq!(
            disconnect.request_context.disconnect_reason.as_deref(),
            Some("bye")
        );
        assert_eq!(
            disconnect.request_context.identity.user_agent.as_deref(),
            Some("ua")
        );
    }
}
