//! Token verification (PROTOCOL.md §1).
//!
//! [`TokenVerifier`] is the seam: [`Hs256Verifier`] checks HS256 tokens
//! against `JWT_SECRET` today; an RS256/JWKS verifier can implement the same
//! trait later without touching the handlers. Only the configured algorithm
//! is accepted, so `alg: none` and algorithm switching are refused, and
//! expiry is checked with no leeway.

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

/// Checks a bearer token and says who it belongs to.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token`.
    ///
    /// # Errors
    /// `UNAUTHORIZED` for a malformed, expired, wrongly signed or wrongly
    /// addressed token, or one without a valid `sub`.
    fn verify(&self, token: &str) -> Result<AuthUser, Error>;
}

/// HS256 with a shared secret.
pub struct Hs256Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Hs256Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hs256Verifier").finish_non_exhaustive()
    }
}

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
    fn verify(&self, token: &str) -> Result<AuthUser, Error> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| Error::unauthorized(format!("invalid token: {e}")))?;
        user_from_claims(&data.claims)
    }
}

/// Reads the caller from verified claims. Profile claims that are not
/// storable strings are ignored rather than refused.
fn user_from_claims(claims: &Map<String, Value>) -> Result<AuthUser, Error> {
    if !claims.get("exp").is_some_and(Value::is_number) {
        return Err(Error::unauthorized("token has no numeric exp claim"));
    }
    let id = match claims.get("sub") {
        Some(Value::String(sub)) => {
            UserId::parse(sub, "sub").map_err(|_| Error::unauthorized("invalid sub claim"))?
        }
        _ => return Err(Error::unauthorized("token has no sub claim")),
    };
    let text = |name: &str| match claims.get(name) {
        Some(Value::String(s))
            if !s.is_empty() && !s.contains('\0') && s.chars().count() <= 1024 =>
        {
            Some(s.clone())
        }
        _ => None,
    };
    Ok(AuthUser {
        username: text("username").unwrap_or_else(|| id.to_string()),
        display_name: text("displayName"),
        avatar: text("avatar"),
        is_admin: claims.get("role").and_then(Value::as_str) == Some("admin"),
        id,
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
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
