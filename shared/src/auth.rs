//! Token verification (PROTOCOL.md §1).
//!
//! [`TokenVerifier`] is the seam: [`Hs256Verifier`] checks HS256 tokens
//! against `JWT_SECRET` today; an RS256/JWKS verifier can implement the same
//! trait later without touching the handlers. Only the configured algorithm
//! is accepted, so `alg: none` and algorithm switching are refused, and
//! expiry is checked with no leeway.
//!
//! Every refusal says "invalid token" to the client and nothing more: the
//! reason (the library's own words, which name its internals) goes to the
//! log at debug level, without the token.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::domain::UserId;
use crate::error::Error;

/// The caller, as their token describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    /// The `sub` claim.
    pub id: UserId,
    /// `username`, defaulting to the id.
    pub username: String,
    /// `displayName`, if given.
    pub display_name: Option<String>,
    /// `avatar`, if given.
    pub avatar: Option<String>,
    /// `role: "admin"`.
    pub is_admin: bool,
}

/// A verified token: who it belongs to and until when it is good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The caller.
    pub user: AuthUser,
    /// The `exp` claim (seconds since the epoch): an open WebSocket is
    /// closed once it has passed (plus a grace), unless an `authenticate`
    /// frame brings a fresh token first.
    pub expires_at: i64,
    /// The `jti` claim, when it is a string: what revokes this one token
    /// ([`crate::presence::Presence::is_revoked`]).
    pub jti: Option<String>,
    /// The `iat` claim (s), when it is a number: a revocation of the user
    /// covers the tokens issued up to its time.
    pub issued_at: Option<i64>,
}

/// The one message every refused token gets.
pub const INVALID_TOKEN: &str = "invalid token";

/// Checks a bearer token and says who it belongs to.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token`, also returning its expiry.
    ///
    /// # Errors
    /// `UNAUTHORIZED` ("invalid token") for a malformed, expired, wrongly
    /// signed or wrongly addressed token, one without a valid `sub`, or one
    /// whose header names `crit` extensions.
    fn verify_session(&self, token: &str) -> Result<Session, Error>;

    /// Verifies `token`.
    ///
    /// # Errors
    /// As [`TokenVerifier::verify_session`].
    fn verify(&self, token: &str) -> Result<AuthUser, Error> {
        self.verify_session(token).map(|session| session.user)
    }
}

/// The refusal of a token; `reason` goes to the log only.
fn refused(reason: &dyn std::fmt::Display) -> Error {
    tracing::debug!(%reason, "token refused");
    Error::unauthorized(INVALID_TOKEN)
}

/// HS256 with a shared secret.
pub struct Hs256Verifier {
    key: DecodingKey,
    validation: Validation,
}

crate::debug_fields!(Hs256Verifier {});

impl Hs256Verifier {
    /// A verifier for `secret`, also requiring `iss` / `aud` when given.
    pub fn new(secret: &SecretString, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // A token that is not valid yet is refused like an expired one.
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if issuer.is_some() {
            required.push("iss");
        }
        if audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Self {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            validation,
        }
    }
}

impl TokenVerifier for Hs256Verifier {
    fn verify_session(&self, token: &str) -> Result<Session, Error> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| refused(&e))?;
        // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit`
        // names extensions it does not understand. This service understands
        // none, and an empty `crit` is invalid too.
        if let Some(crit) = &data.header.crit {
            return Err(refused(&format_args!(
                "crit header names {} unsupported extension(s)",
                crit.len()
            )));
        }
        session_from_claims(&data.claims)
    }
}

/// Reads the caller and the expiry from verified claims. Profile claims
/// that are not storable strings are ignored rather than refused.
fn session_from_claims(claims: &Map<String, Value>) -> Result<Session, Error> {
    // `exp` is required and was validated as a number; a fraction is
    // rounded down, which only shortens the session.
    let Some(expires_at) = claims.get("exp").and_then(Value::as_f64) else {
        return Err(refused(&"token has no numeric exp claim"));
    };
    let id = match claims.get("sub") {
        Some(Value::String(sub)) => {
            UserId::parse(sub, "sub").map_err(|_| refused(&"invalid sub claim"))?
        }
        _ => return Err(refused(&"token has no sub claim")),
    };
    let text = |name: &str| match claims.get(name) {
        Some(Value::String(s))
            if !s.is_empty() && !s.contains('\0') && s.chars().count() <= 1024 =>
        {
            Some(s.clone())
        }
        _ => None,
    };
    let user = AuthUser {
        username: text("username").unwrap_or_else(|| id.to_string()),
        display_name: text("displayName"),
        avatar: text("avatar"),
        is_admin: claims.get("role").and_then(Value::as_str) == Some("admin"),
        id,
    };
    Ok(Session {
        user,
        expires_at: expires_at.floor() as i64,
        jti: claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .map(str::to_owned),
        issued_at: claims
            .get("iat")
            .and_then(Value::as_f64)
            .map(|iat| iat.floor() as i64),
    })
}

/// The claims of a token minted for development and tests.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DevClaims {
    /// User id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Optional username.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Optional display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Optional avatar URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// `admin` for admin tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Issuer, when the deployment checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when the deployment checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl DevClaims {
    /// Claims for `sub`, valid for `ttl_secs` from now.
    pub fn new(sub: impl Into<String>, ttl_secs: i64) -> Self {
        Self {
            sub: sub.into(),
            exp: chrono::Utc::now().timestamp() + ttl_secs,
            username: None,
            display_name: None,
            avatar: None,
            role: None,
            iss: None,
            aud: None,
        }
    }
}

/// Signs `claims` with HS256: what the `token` dev command and the tests use.
///
/// # Errors
/// Only if serialization fails, which these claims cannot.
pub fn mint_hs256(secret: &SecretString, claims: &DevClaims) -> Result<String, Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
    .map_err(Error::internal)
}

/// The token in an `Authorization: Bearer <token>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The bearer token of a request's `Authorization` header: the one place
/// every HTTP entry point (REST, the WebSocket handshake, the console)
/// reads it.
///
/// # Errors
/// `UNAUTHORIZED` "missing bearer token" without the header, "malformed
/// Authorization header" when it is not `Bearer <token>`.
pub fn bearer_from_headers(headers: &http::HeaderMap) -> Result<&str, Error> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Error::unauthorized("missing bearer token"))?;
    header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or_else(|| Error::unauthorized("malformed Authorization header"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("test-secret")
    }

    fn verifier() -> Hs256Verifier {
        Hs256Verifier::new(&secret(), None, None)
    }

    #[test]
    fn accepts_a_good_token_and_reads_the_profile() {
        let mut claims = DevClaims::new("u1", 60);
        claims.display_name = Some("User One".into());
        claims.role = Some("admin".into());
        let token = mint_hs256(&secret(), &claims).expect("mint");
        let user = verifier().verify(&token).expect("valid");
        assert_eq!(user.id.as_str(), "u1");
        assert_eq!(user.username, "u1");
        assert_eq!(user.display_name.as_deref(), Some("User One"));
        assert!(user.is_admin);
    }

    #[test]
    fn refuses_expired_forged_and_unsigned_tokens() {
        let expired = mint_hs256(&secret(), &DevClaims::new("u1", -5)).expect("mint");
        assert!(verifier().verify(&expired).is_err());
        let forged =
            mint_hs256(&SecretString::from("other"), &DevClaims::new("u1", 60)).expect("mint");
        assert!(verifier().verify(&forged).is_err());
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6NDEwMjQ0NDgwMH0.";
        assert!(verifier().verify(none).is_err());
        assert!(verifier().verify("not a token").is_err());
        let bad_sub = mint_hs256(&secret(), &DevClaims::new("bad sub", 60)).expect("mint");
        assert!(verifier().verify(&bad_sub).is_err());
    }

    #[test]
    fn refuses_tokens_that_are_not_valid_yet() {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({"sub": "u1", "exp": now + 600, "nbf": now + 300});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"test-secret"),
        )
        .expect("encode");
        assert!(verifier().verify(&token).is_err());
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let v = Hs256Verifier::new(&secret(), Some("issuer"), Some("app"));
        let mut claims = DevClaims::new("u1", 60);
        assert!(
            v.verify(&mint_hs256(&secret(), &claims).expect("mint"))
                .is_err()
        );
        claims.iss = Some("issuer".into());
        claims.aud = Some("app".into());
        assert!(
            v.verify(&mint_hs256(&secret(), &claims).expect("mint"))
                .is_ok()
        );
    }

    #[test]
    fn refuses_crit_headers_and_says_only_invalid_token() {
        for crit in [vec!["exp-ext".to_owned()], Vec::new()] {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = Some(crit.clone());
            let token = jsonwebtoken::encode(
                &header,
                &DevClaims::new("u1", 60),
                &EncodingKey::from_secret(b"test-secret"),
            )
            .expect("encode");
            let err = verifier().verify(&token).expect_err("refused");
            assert_eq!(err.client_message(), INVALID_TOKEN, "crit {crit:?}");
        }
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6NDEwMjQ0NDgwMH0.";
        let expired = mint_hs256(&secret(), &DevClaims::new("u1", -5)).expect("mint");
        for bad in [none, &expired, "x.y.z", "not a token"] {
            let err = verifier().verify(bad).expect_err("refused");
            assert_eq!(err.client_message(), INVALID_TOKEN, "{bad}");
        }
    }

    #[test]
    fn a_session_carries_the_expiry() {
        let claims = DevClaims::new("u1", 60);
        let token = mint_hs256(&secret(), &claims).expect("mint");
        let session = verifier().verify_session(&token).expect("valid");
        assert_eq!(session.expires_at, claims.exp);
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
