//! PostgreSQL over TLS: libpq's `sslmode` and `sslrootcert`, read from
//! `DATABASE_URL`, carried out with rustls on `ring`.
//!
//! Amazon RDS for PostgreSQL 15 and later sets `rds.force_ssl = 1`: a
//! connection without TLS is refused there. [`pg_config`] takes the two TLS
//! parameters off the URL (tokio-postgres knows only `disable`, `prefer` and
//! `require`, and refuses `sslrootcert`), hands the rest to
//! [`tokio_postgres::Config`] with the matching wire mode, and returns
//! [`PgTls`], a connector whose certificate verifier checks exactly what the
//! mode asks for. [`connect`] opens one connection with it (migrations,
//! tests); the pool takes [`PgTls`] as its [`deadpool_postgres::Connect`].
//!
//! # Modes, as libpq
//!
//! | `sslmode` | TLS | what is verified |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default) | when the server offers it | nothing |
//! | `require` | always | nothing; with `sslrootcert`, the chain, as `verify-ca` (libpq's rule) |
//! | `verify-ca` | always | the chain up to a trusted root, not the host name |
//! | `verify-full` | always | the chain, and that the certificate names the host connected to |
//!
//! # Trusted roots
//!
//! - `sslrootcert=PATH`: the PEM certificates in that file.
//! - `sslrootcert=system`: the operating system's roots
//!   (`rustls-native-certs`, which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`).
//!   As in libpq 16 it makes `verify-full` the default and refuses any weaker
//!   mode: anyone can get a publicly trusted certificate for a name they
//!   control, so only the host name check makes those roots mean something.
//! - no `sslrootcert`: libpq would read `~/.postgresql/root.crt`. We read no
//!   file we were not named, and trust the roots compiled in instead
//!   (`shared/certs/`): Amazon RDS's global CA bundle, and the Amazon Trust
//!   Services roots that RDS Proxy's certificates chain to. So
//!   `sslmode=verify-full` works against RDS and RDS Proxy with nothing to
//!   ship; any other server needs `sslrootcert`.
//!
//! # Differences from libpq
//!
//! - `prefer` falls back to plain text when the server declines TLS, but not
//!   when a TLS handshake fails (tokio-postgres does not retry); `prefer`
//!   verifies nothing, so that takes a server without TLS 1.2 or 1.3.
//! - Not supported: `sslmode=allow` (refused with an error), client
//!   certificates (`sslcert`, `sslkey`), `sslcrl`, and the `PGSSLMODE` family
//!   of environment variables: only `DATABASE_URL` counts.
//!
//! # Errors that name the cause
//!
//! A certificate for another host, a certificate from a CA we do not trust,
//! and a server that requires TLS while `sslmode=disable` each fail with a
//! text that says so ("TLS: certificate not valid for host 'db.internal'
//! …", "TLS: certificate signed by an untrusted CA …", "server requires TLS
//! … but sslmode=disable"), in the error itself where we build it and in a
//! log line where the pool hides it.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use anyhow::{Context as _, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Amazon RDS's global CA bundle, as published (see `shared/certs/README.md`).
const RDS_GLOBAL_BUNDLE: &str = include_str!("../certs/rds-global-bundle.pem");
/// Amazon Root CA 1–4 and Starfield Services Root G2: RDS Proxy's roots.
const AMAZON_TRUST_SERVICES_ROOTS: &str = include_str!("../certs/amazon-trust-services-roots.pem");

/// What the operator sees when the server wants TLS and the URL said no.
const DISABLE_HINT: &str = "server requires TLS (pg_hba.conf has no non-TLS entry for this \
     connection) but sslmode=disable; set sslmode=verify-full (or require) in DATABASE_URL";

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, nothing verified (the default).
    Prefer,
    /// TLS always; verified only when `sslrootcert` is given.
    Require,
    /// TLS always; the certificate chain is verified, the host name is not.
    VerifyCa,
    /// TLS always; the chain and the host name are verified.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        Self::Disable,
        Self::Prefer,
        Self::Require,
        Self::VerifyCa,
        Self::VerifyFull,
    ];

    /// The name in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> anyhow::Result<Self> {
        if let Some(mode) = Self::ALL.into_iter().find(|m| m.as_str() == value) {
            return Ok(mode);
        }
        if value == "allow" {
            bail!(
                "DATABASE_URL: sslmode=allow is not supported; use prefer (TLS when offered) \
                 or disable"
            );
        }
        bail!(
            "DATABASE_URL: sslmode={value} is not one of disable, prefer, require, verify-ca, \
             verify-full"
        )
    }

    /// What tokio-postgres negotiates; the verifier does the rest.
    fn wire(self) -> tokio_postgres::config::SslMode {
        match self {
            Self::Disable => tokio_postgres::config::SslMode::Disable,
            Self::Prefer => tokio_postgres::config::SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS connector of one `DATABASE_URL`: what tokio-postgres and the
/// pool connect with. Cloning is cheap (the rustls configuration is shared).
#[derive(Clone)]
pub struct PgTls {
    connector: MakeRustlsConnect,
    mode: SslMode,
    /// Whose certificates we trust, for the "untrusted CA" text.
    trusted: Arc<str>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

/// Parses `DATABASE_URL` (a `postgres://` URL or libpq's `key=value` form)
/// into the connection settings and the TLS connector they call for.
///
/// # Errors
/// When the URL does not parse, `sslmode` is not a mode we support, or the
/// roots cannot be loaded (`sslrootcert` unreadable or holding no
/// certificate, no system roots). The texts name the parameter, never the
/// URL (it may hold a password).
pub fn pg_config(url: &SecretString) -> anyhow::Result<(tokio_postgres::Config, PgTls)> {
    let (rest, params) = split_tls_params(url.expose_secret())?;
    let mode = params.sslmode.as_deref().map(SslMode::parse).transpose()?;
    let (mode, check) = resolve(mode, params.sslrootcert.as_deref())?;
    let mut config = tokio_postgres::Config::from_str(&rest)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    config.ssl_mode(mode.wire());
    let (verifier, trusted) = match check {
        Check::Nothing => (Verifier::new(None, false), String::new()),
        Check::Chain(roots) => (Verifier::new(Some(roots.load()?), false), roots.describe()),
        Check::ChainAndHost(roots) => (Verifier::new(Some(roots.load()?), true), roots.describe()),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol version is available")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((
        config,
        PgTls {
            connector: MakeRustlsConnect::new(tls),
            mode,
            trusted: trusted.into(),
        },
    ))
}

/// Opens one connection to `url` and drives it on a task of its own; the
/// task ends when the client is dropped.
///
/// # Errors
/// As [`pg_config`], and when connecting fails; see [`PgTls::explain`].
pub async fn connect(url: &SecretString) -> anyhow::Result<(Client, JoinHandle<()>)> {
    let (config, tls) = pg_config(url)?;
    tls.open(&config).await.map_err(|e| tls.explain(e))
}

impl PgTls {
    /// The `sslmode` in force (`prefer` when the URL names none).
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Turns a failure to connect into an error that names its cause.
    /// Certificate problems already do ([`PgTlsConnect`] words them); a
    /// server that refuses plain text while `sslmode=disable` gets that said.
    pub fn explain(&self, err: tokio_postgres::Error) -> anyhow::Error {
        if self.refused_plain_text(&err) {
            anyhow::Error::new(err).context(DISABLE_HINT)
        } else {
            anyhow::Error::new(err)
        }
    }

    /// pg_hba.conf's refusal of a connection without TLS: SQLSTATE 28000
    /// and a message ending in "no encryption" (RDS's `rds.force_ssl` words
    /// it the same way).
    fn refused_plain_text(&self, err: &tokio_postgres::Error) -> bool {
        self.mode == SslMode::Disable
            && err.as_db_error().is_some_and(|db| {
                *db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                    && db.message().contains("no encryption")
            })
    }

    async fn open(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
        let (client, connection) = config.connect(self.clone()).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed with an error");
            }
        });
        Ok((client, task))
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = PgTlsConnect<<MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            inner: <MakeRustlsConnect as MakeTlsConnect<S>>::make_tls_connect(
                &mut self.connector,
                host,
            )?,
            host: host.to_owned(),
            trusted: Arc::clone(&self.trusted),
        })
    }
}

/// One TLS handshake with `host`: tokio-postgres-rustls's, with its
/// certificate failures worded for whoever reads the log.
pub struct PgTlsConnect<T> {
    inner: T,
    host: String,
    trusted: Arc<str>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, T> TlsConnect<S> for PgTlsConnect<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<T::Stream, BoxError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let handshake = self.inner.connect(stream);
        Box::pin(async move {
            handshake
                .await
                .map_err(|e| reword(e.into(), &self.host, &self.trusted))
        })
    }
}

/// A certificate failure in our words; the cause keeps rustls's own.
#[derive(Debug)]
struct TlsProblem {
    text: String,
    cause: BoxError,
}

impl fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for TlsProblem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// Says which check failed when a handshake fails on the certificate.
fn reword(err: BoxError, host: &str, trusted: &str) -> BoxError {
    // tokio-rustls hands rustls's error over inside an io::Error.
    let rustls_error = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let text = match rustls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            format!("TLS: certificate signed by an untrusted CA (trusted: {trusted})")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        })) => format!(
            "TLS: certificate not valid for host '{host}' (it is for {}); sslmode=verify-full \
             needs DATABASE_URL's host to be a name the certificate lists",
            names(presented)
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
            format!("TLS: certificate not valid for host '{host}'")
        }
        _ => return err,
    };
    Box::new(TlsProblem { text, cause: err })
}

/// rustls's `DnsName("db.example")` as `db.example`.
fn names(presented: &[String]) -> String {
    if presented.is_empty() {
        return "no host name".to_owned();
    }
    presented
        .iter()
        .map(|name| {
            name.strip_prefix("DnsName(\"")
                .and_then(|n| n.strip_suffix("\")"))
                .unwrap_or(name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

type ConnectFuture<'a> = Pin<
    Box<dyn Future<Output = Result<(Client, JoinHandle<()>), tokio_postgres::Error>> + Send + 'a>,
>;

/// The pool's way to connect: as deadpool's own, plus a log line naming
/// the cause when the server refuses plain text. The pool's error type is
/// tokio-postgres's, which cannot carry that text: requests that fail log
/// only the server's "no pg_hba.conf entry … no encryption".
impl deadpool_postgres::Connect for PgTls {
    fn connect(&self, pg_config: &tokio_postgres::Config) -> ConnectFuture<'_> {
        let config = pg_config.clone();
        Box::pin(async move {
            self.open(&config).await.inspect_err(|e| {
                if self.refused_plain_text(e) {
                    tracing::error!(error = %e, "{DISABLE_HINT}");
                }
            })
        })
    }
}

/// The two TLS parameters as the URL spelled them.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Splits `sslmode` and `sslrootcert` off a connection string, returning
/// the rest unchanged for tokio-postgres.
fn split_tls_params(conn: &str) -> anyhow::Result<(String, TlsParams)> {
    match ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| conn.strip_prefix(scheme))
    {
        Some(rest) => split_url(conn, rest),
        None => Ok(split_key_value(conn)),
    }
}

/// The URL form. The query starts at the first `?` after the credentials,
/// where tokio-postgres's own parser finds it (a password may hold a `?`).
fn split_url(conn: &str, after_scheme: &str) -> anyhow::Result<(String, TlsParams)> {
    let mut params = TlsParams::default();
    let scheme_len = conn.len() - after_scheme.len();
    let creds_end = after_scheme.find('@').map_or(0, |at| at + 1);
    let Some(q) = after_scheme[creds_end..].find('?') else {
        return Ok((conn.to_owned(), params));
    };
    let q = scheme_len + creds_end + q;
    let (base, query) = (&conn[..q], &conn[q + 1..]);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match decode(key)?.as_ref() {
            "sslmode" => params.sslmode = Some(decode(value)?.into_owned()),
            "sslrootcert" => params.sslrootcert = Some(decode(value)?.into_owned()),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

fn decode(s: &str) -> anyhow::Result<Cow<'_, str>> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .context("DATABASE_URL: a query parameter is not UTF-8 once percent-decoded")
}

/// libpq's `key = value …` form: values bare (backslash escapes) or in
/// single quotes (`\'` and `\\` inside). Anything malformed goes to
/// tokio-postgres whole, which reports it.
fn split_key_value(conn: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    let mut rest = conn.trim_start();
    while !rest.is_empty() {
        let pair_start = rest;
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = rest[key_end..].trim_start();
        let Some(after_eq) = rest.strip_prefix('=') else {
            return (conn.to_owned(), TlsParams::default());
        };
        rest = after_eq.trim_start();
        let Some((value, after)) = key_value_value(rest) else {
            return (conn.to_owned(), TlsParams::default());
        };
        match key {
            "sslmode" => params.sslmode = Some(value),
            "sslrootcert" => params.sslrootcert = Some(value),
            _ => kept.push(&pair_start[..pair_start.len() - after.len()]),
        }
        rest = after.trim_start();
    }
    (kept.join(" "), params)
}

/// One value of the `key=value` form: the unescaped value and what follows.
fn key_value_value(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    if let Some(quoted) = s.strip_prefix('\'') {
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\'' => return Some((value, &quoted[i + 1..])),
                '\\' => value.push(chars.next()?.1),
                c => value.push(c),
            }
        }
        None // unterminated quote
    } else {
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c.is_whitespace() => return Some((value, &s[i..])),
                '\\' => value.push(chars.next()?.1),
                c => value.push(c),
            }
        }
        Some((value, ""))
    }
}

/// Whose certificates a verifying mode trusts.
#[derive(Debug, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
    Amazon,
}

/// What the verifier checks.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain(Roots),
    ChainAndHost(Roots),
}

/// libpq's rules from `sslmode` and `sslrootcert` to what is checked.
fn resolve(mode: Option<SslMode>, rootcert: Option<&str>) -> anyhow::Result<(SslMode, Check)> {
    let rootcert = rootcert.filter(|r| !r.is_empty());
    let system = rootcert == Some("system");
    let mode = match (mode, system) {
        (None, true) => SslMode::VerifyFull,
        (Some(weak), true) if weak != SslMode::VerifyFull => bail!(
            "DATABASE_URL: sslrootcert=system needs sslmode=verify-full (or no sslmode), not \
             sslmode={weak}: anyone can get a publicly trusted certificate for a name they \
             control, so the system's roots only mean something with the host name checked"
        ),
        (mode, _) => mode.unwrap_or(SslMode::Prefer),
    };
    let roots = || match rootcert {
        Some("system") => Roots::System,
        Some(path) => Roots::File(PathBuf::from(path)),
        None => Roots::Amazon,
    };
    let check = match mode {
        SslMode::Disable | SslMode::Prefer => Check::Nothing,
        // libpq: "if a root CA file exists, require behaves like verify-ca".
        SslMode::Require if rootcert.is_some() => Check::Chain(roots()),
        SslMode::Require => Check::Nothing,
        SslMode::VerifyCa => Check::Chain(roots()),
        SslMode::VerifyFull => Check::ChainAndHost(roots()),
    };
    Ok((mode, check))
}

/// The roots compiled in, parsed once per process.
static AMAZON_ROOTS: LazyLock<Arc<RootCertStore>> = LazyLock::new(|| {
    let mut store = RootCertStore::empty();
    for pem in [RDS_GLOBAL_BUNDLE, AMAZON_TRUST_SERVICES_ROOTS] {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.expect("the embedded CA bundles are valid PEM (unit-tested)");
            store
                .add(cert)
                .expect("the embedded CA certificates parse (unit-tested)");
        }
    }
    Arc::new(store)
});

impl Roots {
    fn load(&self) -> anyhow::Result<Arc<RootCertStore>> {
        match self {
            Self::Amazon => Ok(Arc::clone(&AMAZON_ROOTS)),
            Self::File(path) => {
                let shown = path.display();
                let pem = std::fs::read(path).with_context(|| {
                    format!("DATABASE_URL: sslrootcert={shown}: cannot read it")
                })?;
                let mut store = RootCertStore::empty();
                for (n, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
                    let cert = cert.with_context(|| {
                        format!("DATABASE_URL: sslrootcert={shown}: certificate {n} is not PEM")
                    })?;
                    store.add(cert).with_context(|| {
                        format!("DATABASE_URL: sslrootcert={shown}: certificate {n} is not usable as a CA")
                    })?;
                }
                if store.is_empty() {
                    bail!("DATABASE_URL: sslrootcert={shown} holds no PEM certificate");
                }
                Ok(Arc::new(store))
            }
            Self::System => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    bail!(
                        "DATABASE_URL: sslrootcert=system, but no system root certificate was \
                         found ({} error(s) reading them; install ca-certificates or set \
                         SSL_CERT_FILE)",
                        found.errors.len()
                    );
                }
                Ok(Arc::new(store))
            }
        }
    }

    /// Names the roots in an "untrusted CA" error.
    fn describe(&self) -> String {
        match self {
            Self::File(path) => format!("the CAs in sslrootcert={}", path.display()),
            Self::System => "the system's root CAs (sslrootcert=system)".to_owned(),
            Self::Amazon => "the Amazon RDS and Amazon Trust Services roots built in, as \
                             DATABASE_URL names no sslrootcert; set sslrootcert=PATH for \
                             another server"
                .to_owned(),
        }
    }
}

/// Our server certificate verifier: nothing (`prefer`, `require`), the
/// chain (`verify-ca`), or the chain and the host name (`verify-full`).
/// rustls's own `WebPkiServerVerifier` always checks the name, so
/// `verify-ca` needs one of our own; both checks are rustls's public
/// building blocks, and their errors stay rustls's (so the server gets the
/// right alert); [`PgTlsConnect`] words them for people.
#[derive(Debug)]
struct Verifier {
    /// `None`: accept any certificate (the handshake's signatures are still
    /// checked, so the connection is encrypted to whoever holds that key).
    roots: Option<Arc<RootCertStore>>,
    check_host: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Verifier {
    fn new(roots: Option<Arc<RootCertStore>>, check_host: bool) -> Self {
        Self {
            roots,
            check_host,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_host {
            verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(conn: &str) -> (String, TlsParams) {
        split_tls_params(conn).expect("splits")
    }

    fn params(mode: Option<&str>, root: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(str::to_owned),
            sslrootcert: root.map(str::to_owned),
        }
    }

    #[test]
    fn url_loses_only_the_tls_parameters() {
        let (rest, p) = split(
            "postgres://u:p%3Fw@db.example:5432/chat?sslmode=verify-full&application_name=x\
             &sslrootcert=%2Fetc%2Fca%20bundle.pem&connect_timeout=5",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example:5432/chat?application_name=x&connect_timeout=5"
        );
        assert_eq!(p, params(Some("verify-full"), Some("/etc/ca bundle.pem")));
    }

    #[test]
    fn url_query_starts_after_the_credentials() {
        let (rest, p) = split("postgresql://u:pa?ss@h/db?sslmode=require");
        assert_eq!(rest, "postgresql://u:pa?ss@h/db");
        assert_eq!(p, params(Some("require"), None));
        let (rest, p) = split("postgres://h:5432/db");
        assert_eq!(
            (rest.as_str(), p),
            ("postgres://h:5432/db", TlsParams::default())
        );
    }

    #[test]
    fn key_value_form_keeps_quoting_of_the_rest() {
        let (rest, p) = split(
            "host=h  sslmode = 'verify-full' password='a b\\'c' sslrootcert=/x/y\\ z.pem dbname=d",
        );
        assert_eq!(rest, "host=h password='a b\\'c' dbname=d");
        assert_eq!(p, params(Some("verify-full"), Some("/x/y z.pem")));
        let (config, tls) = pg_config(&SecretString::from(
            "host=h password='a b\\'c' dbname=d sslmode=disable",
        ))
        .expect("parses");
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(tls.mode(), SslMode::Disable);
        // Malformed: handed on whole, and tokio-postgres says so.
        assert_eq!(split("host=h sslmode").0, "host=h sslmode");
    }

    #[test]
    fn modes_follow_libpq() {
        let r = |m: Option<SslMode>, root: Option<&str>| resolve(m, root).expect("resolves");
        assert_eq!(r(None, None), (SslMode::Prefer, Check::Nothing));
        assert_eq!(
            r(Some(SslMode::Require), None),
            (SslMode::Require, Check::Nothing)
        );
        assert_eq!(
            r(Some(SslMode::Require), Some("/ca.pem")),
            (
                SslMode::Require,
                Check::Chain(Roots::File("/ca.pem".into()))
            )
        );
        assert_eq!(r(Some(SslMode::Prefer), Some("/ca.pem")).1, Check::Nothing);
        assert_eq!(
            r(Some(SslMode::VerifyCa), None),
            (SslMode::VerifyCa, Check::Chain(Roots::Amazon))
        );
        assert_eq!(
            r(Some(SslMode::VerifyFull), Some("")),
            (SslMode::VerifyFull, Check::ChainAndHost(Roots::Amazon))
        );
        assert_eq!(
            r(None, Some("system")),
            (SslMode::VerifyFull, Check::ChainAndHost(Roots::System))
        );
        let err = resolve(Some(SslMode::VerifyCa), Some("system")).expect_err("weak");
        assert!(
            err.to_string().contains("needs sslmode=verify-full"),
            "{err}"
        );
    }

    #[test]
    fn unknown_modes_are_refused_by_name() {
        for (value, says) in [
            ("verify_full", "not one of disable, prefer"),
            ("allow", "sslmode=allow is not supported"),
        ] {
            let url = SecretString::from(format!("postgres://u:secret@h/db?sslmode={value}"));
            let err = pg_config(&url).expect_err("refused");
            let text = format!("{err:#}");
            assert!(text.contains(says), "{text}");
            assert!(!text.contains("secret"), "no password in errors: {text}");
        }
    }

    #[test]
    fn wire_mode_is_what_tokio_postgres_understands() {
        for (mode, wire) in [
            ("disable", tokio_postgres::config::SslMode::Disable),
            ("prefer", tokio_postgres::config::SslMode::Prefer),
            ("require", tokio_postgres::config::SslMode::Require),
            ("verify-ca", tokio_postgres::config::SslMode::Require),
            ("verify-full", tokio_postgres::config::SslMode::Require),
        ] {
            let url = SecretString::from(format!("postgres://u@h/db?sslmode={mode}"));
            let (config, tls) = pg_config(&url).expect("parses");
            assert_eq!(config.get_ssl_mode(), wire, "{mode}");
            assert_eq!(tls.mode().as_str(), mode);
        }
        let (config, tls) = pg_config(&SecretString::from("postgres://u@h/db")).expect("parses");
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        assert_eq!(tls.mode(), SslMode::Prefer, "libpq's default");
    }

    #[test]
    fn embedded_amazon_roots_all_parse() {
        let count = |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).count();
        // shared/certs/README.md: 115 in the RDS bundle, 5 Amazon Trust Services roots.
        assert_eq!(count(RDS_GLOBAL_BUNDLE), 115);
        assert_eq!(count(AMAZON_TRUST_SERVICES_ROOTS), 5);
        assert_eq!(AMAZON_ROOTS.len(), 120);
    }

    #[test]
    fn unreadable_rootcert_names_the_file() {
        let url = SecretString::from(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        );
        let err = pg_config(&url).expect_err("no such file");
        assert!(
            err.to_string()
                .contains("sslrootcert=/nonexistent/ca.pem: cannot read it"),
            "{err:#}"
        );
    }
}
