//! SigV4 on the Management API, as API Gateway checks it.
//!
//! The emulator accepts one key pair ([`ManagementCredentials`]). A request
//! is verified by recomputing its signature with `aws-sigv4` (the signer the
//! AWS SDK itself uses) from the request as received: method, path and
//! query exactly as sent, the headers the client says it signed, the body,
//! and the `x-amz-date` and credential scope it names. The two signatures
//! are compared in constant time. A request is refused when:
//!
//! * `Authorization` is missing or not `AWS4-HMAC-SHA256`;
//! * the access key id is not the configured one, or the service in the
//!   scope is not `execute-api`;
//! * `x-amz-date` is missing, does not match the scope's date, or is more
//!   than 5 minutes from now (as AWS: replays are bounded);
//! * the signature differs.
//!
//! [`sign`] is the client side (tests, tools); the relay signs through the
//! SDK or its own copy of these few lines.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use axum::http::HeaderMap;
use subtle::ConstantTimeEq as _;

/// How far `x-amz-date` may be from the gateway's clock (AWS: 5 minutes).
const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// The signing service name of the Management API.
const SERVICE: &str = "execute-api";

/// The one key pair the Management API accepts.
#[derive(Clone)]
pub struct ManagementCredentials {
    /// The access key id (not secret: it names the key).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for ManagementCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .finish()
    }
}

impl ManagementCredentials {
    fn sdk(&self) -> Credentials {
        Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "chat-gateway-management",
        )
    }
}

/// Why a request was refused (for the gateway's debug log; the client only
/// learns "Forbidden").
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refused {
    #[error("no AWS4-HMAC-SHA256 Authorization header")]
    Unsigned,
    #[error("a malformed Authorization header")]
    Malformed,
    #[error("an unknown access key id")]
    UnknownKey,
    #[error("a missing or bad x-amz-date")]
    BadDate,
    #[error("a request older or newer than the allowed clock skew")]
    Expired,
    #[error("the signature does not match")]
    Mismatch,
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, Refused> {
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(Refused::Unsigned)?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, val) = part.trim().split_once('=').ok_or(Refused::Malformed)?;
        match key {
            "Credential" => credential = Some(val),
            "SignedHeaders" => signed = Some(val),
            "Signature" => signature = Some(val),
            _ => return Err(Refused::Malformed),
        }
    }
    let (credential, signed, signature) = (
        credential.ok_or(Refused::Malformed)?,
        signed.ok_or(Refused::Malformed)?,
        signature.ok_or(Refused::Malformed)?,
    );
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err(Refused::Malformed);
    };
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers: signed.split(';').collect(),
        signature,
    })
}

/// `20261206T124600Z` to a time.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let parsed = chrono::NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%SZ").ok()?;
    let secs = u64::try_from(parsed.and_utc().timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Checks a request's SigV4 signature against `credentials`.
///
/// `path_and_query` is the request target exactly as received.
pub(crate) fn verify(
    credentials: &ManagementCredentials,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), Refused> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::Unsigned)?;
    let auth = parse_authorization(authorization)?;
    if auth.access_key_id != credentials.access_key_id || auth.service != SERVICE {
        return Err(Refused::UnknownKey);
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::BadDate)?;
    if !amz_date.starts_with(auth.date) || auth.date.len() != 8 {
        return Err(Refused::BadDate);
    }
    let time = parse_amz_date(amz_date).ok_or(Refused::BadDate)?;
    let skew = now.duration_since(time).unwrap_or_else(|e| e.duration());
    if skew > MAX_SKEW {
        return Err(Refused::Expired);
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::Malformed)?;
    // Exactly the headers the client signed (the signer adds `host` and
    // `x-amz-date` itself, with the values passed here).
    let mut signed = Vec::with_capacity(auth.signed_headers.len());
    for name in &auth.signed_headers {
        let mut values = headers.get_all(*name).iter();
        let value = values
            .next()
            .and_then(|v| v.to_str().ok())
            .ok_or(Refused::Malformed)?;
        if values.next().is_some() {
            return Err(Refused::Malformed);
        }
        signed.push((*name, value));
    }
    let (_, expected) = sign_output(
        credentials,
        method,
        &format!("http://{host}{path_and_query}"),
        signed.into_iter(),
        body,
        auth.region,
        time,
    )
    .ok_or(Refused::Malformed)?;
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err(Refused::Mismatch)
    }
}

#[allow(clippy::type_complexity)]
fn sign_output<'a>(
    credentials: &ManagementCredentials,
    method: &'a str,
    url: &'a str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    body: &'a [u8],
    region: &str,
    time: SystemTime,
) -> Option<(Vec<(String, String)>, String)> {
    let identity = credentials.sdk().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .ok()?
        .into();
    let request = SignableRequest::new(method, url, headers, SignableBody::Bytes(body)).ok()?;
    let (instructions, signature) = aws_sigv4::http_request::sign(request, &params)
        .ok()?
        .into_parts();
    let headers = instructions
        .headers()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    Some((headers, signature))
}

/// The headers that sign a Management API request as the AWS SDK does
/// (`authorization`, `x-amz-date`): for tests and tools that call the
/// emulator without the SDK. `url` is `http://host:port/path?query`,
/// already percent-encoded as it will be sent; `extra` are further headers
/// to sign (sent as given).
///
/// # Panics
///
/// If `url` is not a valid absolute URL (a caller's bug).
#[must_use]
pub fn sign(
    credentials: &ManagementCredentials,
    method: &str,
    url: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    region: &str,
) -> Vec<(String, String)> {
    sign_output(
        credentials,
        method,
        url,
        extra.iter().copied(),
        body,
        region,
        SystemTime::now(),
    )
    .map(|(headers, _)| headers)
    .expect("a valid URL to sign")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn credentials() -> ManagementCredentials {
        ManagementCredentials {
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
        }
    }

    fn signed(method: &str, path: &str, body: &[u8], creds: &ManagementCredentials) -> HeaderMap {
        let url = format!("http://127.0.0.1:9/{}", path.trim_start_matches('/'));
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:9"));
        for (name, value) in sign(creds, method, &url, &[], body, "us-east-1") {
            headers.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(&value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_refuses_it() {
        let creds = credentials();
        let path = "/local/@connections/AAAA%3D";
        let headers = signed("POST", path, b"hello", &creds);
        let now = SystemTime::now();
        assert_eq!(
            verify(&creds, "POST", path, &headers, b"hello", now),
            Ok(())
        );
        assert_eq!(
            verify(&creds, "POST", path, &headers, b"hellO", now),
            Err(Refused::Mismatch)
        );
        assert_eq!(
            verify(&creds, "DELETE", path, &headers, b"hello", now),
            Err(Refused::Mismatch)
        );
        assert_eq!(
            verify(
                &creds,
                "POST",
                "/local/@connections/BBBB%3D",
                &headers,
                b"hello",
                now
            ),
            Err(Refused::Mismatch)
        );
        let later = now + Duration::from_secs(600);
        assert_eq!(
            verify(&creds, "POST", path, &headers, b"hello", later),
            Err(Refused::Expired)
        );
    }

    #[test]
    fn other_keys_and_unsigned_requests_are_refused() {
        let creds = credentials();
        let path = "/local/@connections/AAAA%3D";
        let now = SystemTime::now();
        let mut wrong_secret = creds.clone();
        wrong_secret.secret_access_key = "guess".into();
        let headers = signed("GET", path, b"", &wrong_secret);
        assert_eq!(
            verify(&creds, "GET", path, &headers, b"", now),
            Err(Refused::Mismatch)
        );
        let mut other_key = creds.clone();
        other_key.access_key_id = "AKIDOTHER".into();
        let headers = signed("GET", path, b"", &other_key);
        assert_eq!(
            verify(&creds, "GET", path, &headers, b"", now),
            Err(Refused::UnknownKey)
        );
        let mut unsigned = HeaderMap::new();
        unsigned.insert("host", HeaderValue::from_static("127.0.0.1:9"));
        assert_eq!(
            verify(&creds, "GET", path, &unsigned, b"", now),
            Err(Refused::Unsigned)
        );
    }
}
