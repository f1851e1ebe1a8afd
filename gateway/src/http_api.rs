//! A small emulator of an API Gateway HTTP API with one Lambda proxy
//! integration (payload format 2.0): the REST side of the deployed shape.
//!
//! [`router`] answers `/health` and every path under `/api/v1` by invoking
//! one [`LambdaFunction`] (the `rest` binary) through the Lambda Invoke API,
//! with the event an HTTP API sends and its answer mapped back the way an
//! HTTP API maps it:
//!
//! * The event: `version` `2.0`, `routeKey` `$default` (one catch-all
//!   route stands in for the template's routes, which all go to the same
//!   function), `rawPath`, `rawQueryString`, `cookies`, `headers` (names
//!   lower-cased, repeated values joined with commas, `cookie` moved to
//!   `cookies`), `queryStringParameters` (decoded, repeated values joined
//!   with commas), `requestContext` (`http.method`, `http.sourceIp`, ...),
//!   `body` (base64 with `isBase64Encoded` unless its content type is
//!   text).
//! * The answer: a `statusCode` response sets status, headers,
//!   `multiValueHeaders`, `cookies` (as `set-cookie`) and the body (decoded
//!   when `isBase64Encoded`); any other JSON result is a `200` with that
//!   JSON as an `application/json` body, as HTTP APIs infer for format 2.0.
//! * Failures: a function error (a panic included), a throttle or a result
//!   that cannot be read is `500 {"message":"Internal Server Error"}`; a
//!   function that timed out is `503 {"message":"Service Unavailable"}`; a
//!   request body over Lambda's 6 MB payload is `413 {"message":"Request
//!   Entity Too Large"}`; any other path is `404 {"message":"Not Found"}`
//!   ([`not_found`], for the caller's fallback).

use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::event;
use crate::lambda::{InvokeError, LambdaFunction, MAX_PAYLOAD_BYTES};

/// The HTTP API's routes: `/health` and everything under `/api/v1`, any
/// method, each invoking `function`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so that
/// `requestContext.http.sourceIp` is the client's address.
pub fn router(function: LambdaFunction) -> Router {
    Router::new()
        .route("/health", any(forward))
        .route("/api/v1", any(forward))
        .route("/api/v1/", any(forward))
        .route("/api/v1/{*rest}", any(forward))
        .with_state(function)
}

/// What an HTTP API answers for a path no route matches.
pub async fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Not Found")
}

/// `{"message": text}` with `status`, the shape of every HTTP API error.
fn message(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "message": text }).to_string(),
    )
        .into_response()
}

async fn forward(State(function): State<LambdaFunction>, request: Request) -> Response {
    let source_ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "127.0.0.1".to_owned(), |info| info.0.ip().to_string());
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_PAYLOAD_BYTES).await {
        Ok(body) => body,
        Err(_) => return message(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large"),
    };
    let event = request_event(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
        &body,
        &source_ip,
        Utc::now(),
    );
    let payload = match serde_json::to_vec(&event) {
        Ok(payload) => payload,
        Err(_) => return message(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
    };
    match function.invoke(payload).await {
        Ok(result) => response_from(&result).unwrap_or_else(|error| {
            tracing::warn!(function = %function.name(), %error, "HTTP API integration: bad response");
            message(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }),
        Err(InvokeError::Timeout(after)) => {
            tracing::warn!(function = %function.name(), ?after, "HTTP API integration timed out");
            message(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
        }
        Err(error) => {
            tracing::warn!(function = %function.name(), %error, "HTTP API integration failed");
            message(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    }
}

/// The payload format 2.0 event for one request.
pub(crate) fn request_event(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    source_ip: &str,
    now: chrono::DateTime<Utc>,
) -> Value {
    let mut joined: Map<String, Value> = Map::new();
    let mut cookies: Vec<String> = Vec::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        if name == header::COOKIE {
            cookies.extend(
                values
                    .iter()
                    .flat_map(|value| value.split(';'))
                    .map(str::trim)
                    .filter(|cookie| !cookie.is_empty())
                    .map(str::to_owned),
            );
            continue;
        }
        joined.insert(name.as_str().to_owned(), values.join(",").into());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request_id = event::new_id();
    let domain_prefix = host.split(['.', ':']).next().unwrap_or_default().to_owned();
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query.unwrap_or_default(),
        "headers": joined,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": host,
            "domainPrefix": domain_prefix,
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": user_agent,
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": event::request_time(now),
            "timeEpoch": now.timestamp_millis(),
        },
        "isBase64Encoded": false,
    });
    if !cookies.is_empty() {
        event["cookies"] = cookies.into();
    }
    if let Some(parameters) = query_parameters(query) {
        event["queryStringParameters"] = parameters.into();
    }
    if !body.is_empty() {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        match std::str::from_utf8(body) {
            Ok(text) if is_text(content_type) => event["body"] = text.into(),
            _ => {
                event["body"] = STANDARD.encode(body).into();
                event["isBase64Encoded"] = true.into();
            }
        }
    }
    event
}

/// Whether an HTTP API passes a body of this content type as text.
fn is_text(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.is_empty()
        || essence.starts_with("text/")
        || essence.ends_with("json")
        || essence.ends_with("xml")
        || essence.ends_with("javascript")
        || essence == "application/x-www-form-urlencoded"
}

/// `queryStringParameters`: decoded, repeated names' values joined with
/// commas; `None` without parameters, when HTTP APIs omit the key.
fn query_parameters(query: Option<&str>) -> Option<Map<String, Value>> {
    let mut all: Vec<(String, String)> = Vec::new();
    for pair in query?.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        all.push((decode(name), decode(value)));
    }
    if all.is_empty() {
        return None;
    }
    let mut map: Map<String, Value> = Map::new();
    for (name, value) in all {
        match map.get_mut(&name) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            _ => {
                map.insert(name, value.into());
            }
        }
    }
    Some(map)
}

fn decode(text: &str) -> String {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The HTTP response for a function's result.
pub(crate) fn response_from(result: &[u8]) -> Result<Response, String> {
    let value: Value = serde_json::from_slice(result)
        .map_err(|error| format!("the result is not JSON ({error})"))?;
    let Some(status) = value.get("statusCode") else {
        // Format 2.0 without a status: the JSON is the body, 200.
        let mut response = Response::new(Body::from(Bytes::copy_from_slice(result)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(response);
    };
    let status = status
        .as_u64()
        .and_then(|code| u16::try_from(code).ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("bad statusCode {status}"))?;
    let text = match value.get("body") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => return Err(format!("body is not a string: {other}")),
    };
    let body = if value.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
        STANDARD
            .decode(text.as_bytes())
            .map_err(|error| format!("isBase64Encoded, but the body is not base64 ({error})"))?
    } else {
        text.into_bytes()
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(Value::Object(map)) = value.get("multiValueHeaders") {
        for (name, values) in map {
            for value in values.as_array().into_iter().flatten() {
                append(headers, name, value)?;
            }
        }
    }
    if let Some(Value::Object(map)) = value.get("headers") {
        for (name, value) in map {
            let name = header_name(name)?;
            headers.remove(&name);
            append(headers, name.as_str(), value)?;
        }
    }
    for cookie in value
        .get("cookies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        append(headers, "set-cookie", cookie)?;
    }
    for hop in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
    ] {
        headers.remove(hop);
    }
    Ok(response)
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad header name {name:?}"))
}

fn append(headers: &mut HeaderMap, name: &str, value: &Value) -> Result<(), String> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        _ => return Err(format!("bad value of header {name:?}: {value}")),
    };
    let value =
        HeaderValue::from_str(&text).map_err(|_| format!("bad value of header {name:?}"))?;
    headers.append(header_name(name)?, value);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
    use http_body_util::BodyExt as _;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_event_is_a_format_2_event() {
        let event = request_event(
            "POST",
            "/api/v1/chat/rooms",
            Some("a=1&a=2&b=x%20y&c"),
            &headers(&[
                ("host", "127.0.0.1:3000"),
                ("authorization", "Bearer t"),
                ("content-type", "application/json"),
                ("x-many", "1"),
                ("x-many", "2"),
                ("cookie", "a=1; b=2"),
            ]),
            br#"{"type":"GROUP"}"#,
            "192.0.2.1",
            Utc::now(),
        );
        assert_eq!(event["version"], "2.0");
        assert_eq!(event["rawQueryString"], "a=1&a=2&b=x%20y&c");
        assert_eq!(
            event["queryStringParameters"],
            json!({"a": "1,2", "b": "x y", "c": ""})
        );
        assert_eq!(event["headers"]["x-many"], "1,2");
        assert!(event["headers"].get("cookie").is_none());
        assert_eq!(event["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(event["body"], r#"{"type":"GROUP"}"#);
        assert_eq!(event["isBase64Encoded"], false);
        assert_eq!(event["requestContext"]["http"]["sourceIp"], "192.0.2.1");
        assert_eq!(event["requestContext"]["domainPrefix"], "127");

        // What lambda_http reads it as.
        let request: ApiGatewayV2httpRequest = serde_json::from_value(event).unwrap();
        assert_eq!(request.request_context.http.method, "POST");
        assert_eq!(request.raw_path.as_deref(), Some("/api/v1/chat/rooms"));
        assert_eq!(request.headers["authorization"], "Bearer t");
        assert_eq!(request.query_string_parameters.first("b"), Some("x y"));
        assert_eq!(request.body.as_deref(), Some(r#"{"type":"GROUP"}"#));
    }

    #[test]
    fn binary_bodies_are_base64_and_a_bare_request_has_no_optional_keys() {
        let event = request_event(
            "PUT",
            "/api/v1/x",
            None,
            &headers(&[("content-type", "application/octet-stream")]),
            &[0xff, 0x00],
            "127.0.0.1",
            Utc::now(),
        );
        assert_eq!(event["body"], "/wA=");
        assert_eq!(event["isBase64Encoded"], true);
        let event = request_event(
            "GET",
            "/health",
            None,
            &HeaderMap::new(),
            &[],
            "127.0.0.1",
            Utc::now(),
        );
        for key in ["body", "cookies", "queryStringParameters"] {
            assert!(event.get(key).is_none(), "{key}");
        }
        assert_eq!(event["rawQueryString"], "");
    }

    async fn body_text(response: Response) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn responses_map_back_like_an_http_api() {
        let response = response_from(
            br#"{"statusCode":201,"headers":{"content-type":"application/json","x-a":"1"},
                "multiValueHeaders":{"x-b":["1","2"]},"cookies":["s=1"],
                "body":"{\"ok\":true}","isBase64Encoded":false}"#,
        )
        .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()["x-a"], "1");
        assert_eq!(response.headers().get_all("x-b").iter().count(), 2);
        assert_eq!(response.headers()["set-cookie"], "s=1");
        assert_eq!(body_text(response).await, r#"{"ok":true}"#);

        let response =
            response_from(br#"{"statusCode":200,"body":"aGk=","isBase64Encoded":true}"#).unwrap();
        assert_eq!(body_text(response).await, "hi");

        // No statusCode: the JSON is the body.
        let response = response_from(br#"{"hello":"world"}"#).unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(body_text(response).await, r#"{"hello":"world"}"#);

        assert!(response_from(b"not json").is_err());
        assert!(response_from(br#"{"statusCode":99}"#).is_err());
    }
}
