//! One HTTP answer type for every suite: the REST app called in process
//! (`rest`) and the stack called over a socket (`stack`) answer alike.

use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// An HTTP answer: status, headers and the body as JSON (`Null` when
/// empty, a string when it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The answer of these parts; `body` is read as JSON where it is JSON.
    pub fn new(status: StatusCode, headers: HeaderMap, body: &[u8]) -> Self {
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        Self {
            status,
            headers,
            body,
        }
    }

    /// A header's value, when it is present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Asserts a timestamp is RFC 3339 UTC with milliseconds, as PROTOCOL.md
/// writes them: `2025-11-06T12:00:00.000Z`.
pub fn assert_timestamp(value: &Value) {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let parsed = chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let canonical = parsed
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(s, canonical, "timestamp format");
    assert_eq!(s.len(), "2025-11-06T12:00:00.000Z".len(), "{s}");
}
