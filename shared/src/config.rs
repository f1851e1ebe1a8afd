//! Typed configuration, read once from the environment.
//!
//! Nothing else in the project reads environment variables: binaries call
//! [`Config::from_env`] at start-up and pass the result down. A bad value
//! stops start-up with a message naming the variable. Tests build a config
//! with [`Config::from_lookup`] over a map instead of touching the process
//! environment.
//!
//! The local stack's own settings (`PORT` and the API Gateway emulator's
//! `GATEWAY_*`) are not here: no Lambda reads them, so `chat-local` reads
//! them itself, beside [`Config`], with the helpers [`read`], [`parse`] and
//! [`Get`], so they follow the same rules (blank is unset, a bad value is a
//! [`ConfigError`] naming its variable).

use std::time::Duration;

use secrecy::SecretString;

/// What every process reads: where the stores are, how it logs, who it is.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// PostgreSQL connection URL (`DATABASE_URL`).
    pub database_url: SecretString,
    /// Most PostgreSQL connections per process (`PG_POOL_MAX`, 16).
    pub pg_pool_max: usize,
    /// Redis URL (`REDIS_URL`, or built from `REDIS_HOST` / `REDIS_PORT` /
    /// `REDIS_PASSWORD` / `REDIS_TLS`).
    pub redis_url: SecretString,
    /// Redis is a Redis Cluster (`REDIS_CLUSTER`, false; also true when
    /// `REDIS_URL` lists several seed nodes separated by commas): the
    /// connection follows the slot map ([`crate::redis_conn`]).
    pub redis_cluster: bool,
    /// Prepended to every Redis key, so deployments (and tests) can share a
    /// Redis database (`REDIS_KEY_PREFIX`, empty).
    pub redis_key_prefix: String,
    /// Messages kept per room; 0 keeps all (`MESSAGE_RETENTION`, 100).
    pub message_retention: i64,
    /// The Redis pub/sub channel of the internal bus (`BROADCAST_CHANNEL`).
    pub broadcast_channel: String,
    /// Names this process in bus envelopes and logs (`INSTANCE_ID`).
    pub instance_id: String,
    /// How long a connection stays online without a frame
    /// (`PRESENCE_TTL_SECONDS`, 90).
    pub presence_ttl: Duration,
    /// `json` (Lambda) or `pretty` (local) (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// The tracing filter (`RUST_LOG`, `info`).
    pub log_filter: String,
    /// AWS region for the Management API client (`AWS_REGION`, `us-east-1`).
    pub aws_region: String,
}

/// What the processes that answer clients read: the REST function and
/// the WebSocket handlers (and the local stack, which runs both).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// HS256 secret for tokens (`JWT_SECRET`, required).
    pub jwt_secret: SecretString,
    /// Required `iss`, when set (`JWT_ISSUER`).
    pub jwt_issuer: Option<String>,
    /// Required `aud`, when set (`JWT_AUDIENCE`).
    pub jwt_audience: Option<String>,
    /// REST answers 429 while more requests than this wait for a PostgreSQL
    /// connection (`PG_MAX_WAITING`, 1000): shedding load beats an unbounded
    /// queue.
    pub pg_max_waiting: usize,
    /// WebSocket requests that need PostgreSQL run at most this many at once
    /// per process (`WS_MAX_IN_FLIGHT`, 96); more wait in line for a place
    /// (see `admission` in `realtime`).
    pub ws_max_in_flight: usize,
    /// A WebSocket request is refused (`RATE_LIMITED`, server busy) rather
    /// than queued when its expected wait for a place is over this, or it
    /// has waited this long (`WS_MAX_QUEUE_WAIT_MS`, 10,000).
    pub ws_max_queue_wait_ms: u64,
    /// Most WebSocket requests waiting for a place per process
    /// (`WS_MAX_QUEUED`, 20,000).
    pub ws_max_queued: usize,
    /// Most bytes of frames waiting for a place per process
    /// (`WS_MAX_QUEUED_BYTES`, 64 MiB).
    pub ws_max_queued_bytes: usize,
    /// Most WebSocket requests of one user waiting for a place per process
    /// (`WS_MAX_QUEUED_PER_USER`, 256): one user cannot fill the queue.
    pub ws_max_queued_per_user: usize,
    /// Most bytes of one user's frames waiting per process
    /// (`WS_MAX_QUEUED_BYTES_PER_USER`, 4 MiB).
    pub ws_max_queued_bytes_per_user: usize,
    /// Most WebSocket requests of one connection waiting per process
    /// (`WS_MAX_QUEUED_PER_CONNECTION`, 64).
    pub ws_max_queued_per_connection: usize,
    /// Sends are refused, more of them as it grows, while the relays
    /// deliver later than half of this; all of them beyond it
    /// (`WS_MAX_DELIVERY_LAG_MS`, 5,000; 0 turns it off).
    pub ws_max_delivery_lag_ms: u64,
    /// Per-connection and per-user rate limits, kept in Redis so they hold
    /// across every Lambda instance.
    pub rate_limits: RateLimits,
    /// Most live WebSocket connections one user may hold
    /// (`MAX_CONNECTIONS_PER_USER`, 10; 0 turns the cap off). A new
    /// connection over it closes the user's least recently active one.
    pub max_connections_per_user: usize,
    /// How long after its token's `exp` an open WebSocket may still be used
    /// (`TOKEN_EXPIRY_GRACE_SECONDS`, 30): room for a client's clock and
    /// for an `authenticate` with a fresh token in flight.
    pub token_expiry_grace: Duration,
}

/// What the relay reads (the maintenance job reads its `management` part
/// too: it closes connections through the same endpoint policy).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most `PostToConnection` calls the relay has in flight
    /// (`RELAY_CONCURRENCY`, 256).
    pub concurrency: usize,
    /// Lease shards the relays split the bus into, each leased by one
    /// relay at a time (`RELAY_SHARDS`, 64, at most 1024). Every relay of
    /// a deployment must use the same number.
    pub lease_shards: usize,
    /// Where the Management API is, which endpoints may be called, and the
    /// key pair that signs calls to the local emulator.
    pub management: ManagementSettings,
}

/// The REST function's and the WebSocket handlers' configuration.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Stores, logging, name.
    pub common: CommonConfig,
    /// Tokens, limits, admission.
    pub api: ApiConfig,
}

/// The relay's configuration.
#[derive(Debug, Clone)]
pub struct RelayProcessConfig {
    /// Stores, logging, name.
    pub common: CommonConfig,
    /// Workers, leases, the Management API.
    pub relay: RelayConfig,
}

/// The maintenance job's configuration: the common part and the
/// Management API settings it closes swept connections with.
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// Stores, logging, name, retention.
    pub common: CommonConfig,
    /// The Management API endpoint policy (`MANAGEMENT_ENDPOINT`, ...).
    pub management: ManagementSettings,
}

/// The local stack's configuration: it runs every process, so it reads
/// every part. Its own settings (port, emulator) `chat-local` reads beside
/// it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stores, logging, name.
    pub common: CommonConfig,
    /// The REST and WebSocket handlers.
    pub api: ApiConfig,
    /// The relay.
    pub relay: RelayConfig,
}

/// A token bucket: `per_sec` tokens a second, at most `burst` saved up.
/// A client may send `burst` requests at once, then `per_sec` a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained requests a second (at least 1).
    pub per_sec: u32,
    /// Requests that may come at once after a quiet spell (at least 1).
    pub burst: u32,
}

/// The rate limits of the issue "Reliability and security"; `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Client frames per WebSocket connection (every frame but `ping`),
    /// and REST sends per user (`RATE_LIMIT_PER_SEC`, 20;
    /// `RATE_LIMIT_BURST`, twice the rate). Over it: `RATE_LIMITED`.
    pub messages: Option<Rate>,
    /// Authenticated REST requests per user, any route
    /// (`REST_RATE_LIMIT_PER_SEC`, 50; `REST_RATE_LIMIT_BURST`, twice the
    /// rate). Over it: 429 with `Retry-After`.
    pub rest: Option<Rate>,
}

/// The Management API (`@connections`): the SigV4 credentials the
/// emulator accepts (and the relay signs local calls with), and which
/// endpoints the relay and the maintenance job may call.
#[derive(Debug, Clone)]
pub struct ManagementSettings {
    /// The access key id the emulator accepts and the relay signs local
    /// calls with (`GATEWAY_MANAGEMENT_ACCESS_KEY_ID`, a local-dev value).
    pub access_key_id: String,
    /// Its secret (`GATEWAY_MANAGEMENT_SECRET_ACCESS_KEY`, a local-dev
    /// value: set a real one wherever the listener is reachable by others).
    pub secret_access_key: SecretString,
    /// Every Management API call goes here when set (`MANAGEMENT_ENDPOINT`,
    /// e.g. `https://{api-id}.execute-api.{region}.amazonaws.com/{stage}`);
    /// connections' own endpoints only when unset.
    pub endpoint: Option<String>,
    /// URL prefixes the relay may call (`RELAY_ALLOWED_ENDPOINTS`,
    /// comma-separated; `*` stands for one DNS label). Unset: the
    /// configured `MANAGEMENT_ENDPOINT` when set, else
    /// `https://*.execute-api.{AWS_REGION}.amazonaws.com/`.
    pub allowed_endpoints: Option<Vec<String>>,
    /// Calls to `http://` (local emulator) endpoints skip the AWS SDK and go
    /// over the relay's own pipelined HTTP/1.1 client
    /// (`RELAY_LOCAL_FAST_PATH`, false). Off, the local stack runs the
    /// path AWS runs: the SDK, SigV4, its timeouts and error mapping.
    pub local_fast_path: bool,
}

/// The local-dev access key of the Management API, shared by the local
/// stack, the scripts and the relay when nothing else is configured.
pub const DEV_MANAGEMENT_ACCESS_KEY_ID: &str = "LOCALDEVMANAGEMENTKEY";
/// Its secret: fine on loopback, never on a reachable listener.
pub const DEV_MANAGEMENT_SECRET_ACCESS_KEY: &str = "local-dev-management-secret-change-me";

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for CloudWatch.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// A configuration variable with a bad or missing value.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {variable}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// How a configuration reads a variable: its value through a lookup (the
/// environment, or a test map), `None` when unset or blank. [`read`]
/// makes one.
pub type Get<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads a configuration with `parts` through `lookup` (the environment,
/// or a test map), blank values read as unset: what every `from_lookup`
/// does.
///
/// # Errors
/// What `parts` returns: a [`ConfigError`] naming the first variable that
/// is missing or bad.
pub fn read<T>(
    lookup: impl Fn(&str) -> Option<String>,
    parts: impl FnOnce(Get<'_>) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    parts(&|name| lookup(name).filter(|v| !v.trim().is_empty()))
}

impl CommonConfig {
    /// Where Redis is, and whether it is a cluster.
    pub fn redis_target(&self) -> crate::redis_conn::RedisTarget {
        crate::redis_conn::RedisTarget {
            url: self.redis_url.clone(),
            cluster: self.redis_cluster,
        }
    }

    fn read(get: Get<'_>, lambda: bool) -> Result<Self, ConfigError> {
        let database_url = get("DATABASE_URL").ok_or(ConfigError {
            variable: "DATABASE_URL",
            problem: "must be set (e.g. postgres://postgres@127.0.0.1:5432/chat)".into(),
        })?;
        let redis_url = match get("REDIS_URL") {
            Some(url) => url,
            None => match get("REDIS_HOST") {
                Some(host) => {
                    let port = parse::<u16>(get, "REDIS_PORT", 6379)?;
                    let scheme = if parse::<bool>(get, "REDIS_TLS", false)? {
                        "rediss"
                    } else {
                        "redis"
                    };
                    match get("REDIS_PASSWORD") {
                        // Escaped: an AUTH token may hold `#`, `?`, `%`, `:`
                        // (ElastiCache allows any printable ASCII but `/`, `"`
                        // and `@`); the Redis client decodes it again.
                        Some(pw) => format!(
                            "{scheme}://:{}@{host}:{port}",
                            percent_encoding::utf8_percent_encode(
                                &pw,
                                percent_encoding::NON_ALPHANUMERIC
                            )
                        ),
                        None => format!("{scheme}://{host}:{port}"),
                    }
                }
                None => {
                    return Err(ConfigError {
                        variable: "REDIS_URL",
                        problem: "must be set (or REDIS_HOST), e.g. redis://127.0.0.1:6379".into(),
                    });
                }
            },
        };
        let redis_cluster = parse::<bool>(get, "REDIS_CLUSTER", false)? || redis_url.contains(',');
        let redis_key_prefix = get("REDIS_KEY_PREFIX").unwrap_or_default();
        if redis_key_prefix.contains(['{', '}']) {
            return Err(ConfigError {
                variable: "REDIS_KEY_PREFIX",
                problem: "must not contain { or }: they would change the keys' hash tags".into(),
            });
        }
        let broadcast_channel = get("BROADCAST_CHANNEL").unwrap_or_else(|| "chat:broadcast".into());
        if broadcast_channel.contains(['{', '}']) {
            return Err(ConfigError {
                variable: "BROADCAST_CHANNEL",
                problem: "must not contain { or }: the partition's hash tag is appended".into(),
            });
        }
        let message_retention = parse::<i64>(get, "MESSAGE_RETENTION", 100)?;
        if message_retention < 0 {
            return Err(ConfigError {
                variable: "MESSAGE_RETENTION",
                problem: "must be 0 (keep all) or a positive number".into(),
            });
        }
        let presence_ttl_secs = parse::<u64>(get, "PRESENCE_TTL_SECONDS", 90)?;
        if presence_ttl_secs == 0 {
            return Err(ConfigError {
                variable: "PRESENCE_TTL_SECONDS",
                problem: "must be at least 1".into(),
            });
        }
        let pg_pool_max = parse::<usize>(get, "PG_POOL_MAX", 16)?;
        if pg_pool_max == 0 {
            return Err(ConfigError {
                variable: "PG_POOL_MAX",
                problem: "must be at least 1".into(),
            });
        }
        let log_format = match get("LOG_FORMAT").as_deref() {
            None if lambda => LogFormat::Json,
            None => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError {
                    variable: "LOG_FORMAT",
                    problem: format!("must be json or pretty, not {other:?}"),
                });
            }
        };
        Ok(Self {
            database_url: database_url.into(),
            pg_pool_max,
            redis_url: redis_url.into(),
            redis_cluster,
            redis_key_prefix,
            message_retention,
            broadcast_channel,
            instance_id: get("INSTANCE_ID")
                .unwrap_or_else(|| format!("instance-{}", std::process::id())),
            presence_ttl: Duration::from_secs(presence_ttl_secs),
            log_format,
            log_filter: get("RUST_LOG").unwrap_or_else(|| "info".into()),
            aws_region: get("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
        })
    }
}

impl ApiConfig {
    /// The WebSocket admission limits of this configuration.
    pub fn admission_limits(&self) -> crate::realtime::AdmissionLimits {
        crate::realtime::AdmissionLimits {
            max_in_flight: self.ws_max_in_flight,
            max_wait: std::time::Duration::from_millis(self.ws_max_queue_wait_ms),
            max_queued: self.ws_max_queued,
            max_queued_bytes: self.ws_max_queued_bytes,
            max_queued_per_user: self.ws_max_queued_per_user,
            max_queued_bytes_per_user: self.ws_max_queued_bytes_per_user,
            max_queued_per_connection: self.ws_max_queued_per_connection,
            max_delivery_lag_ms: self.ws_max_delivery_lag_ms,
        }
    }

    /// The WebSocket session rules of this configuration.
    pub fn session_policy(&self) -> crate::realtime::SessionPolicy {
        crate::realtime::SessionPolicy {
            max_connections_per_user: (self.max_connections_per_user > 0)
                .then_some(self.max_connections_per_user),
            token_expiry_grace: self.token_expiry_grace,
        }
    }

    fn read(get: Get<'_>) -> Result<Self, ConfigError> {
        let jwt_secret = get("JWT_SECRET").ok_or(ConfigError {
            variable: "JWT_SECRET",
            problem: "must be set: this process verifies tokens with it".into(),
        })?;
        Ok(Self {
            jwt_secret: jwt_secret.into(),
            jwt_issuer: get("JWT_ISSUER"),
            jwt_audience: get("JWT_AUDIENCE"),
            pg_max_waiting: parse::<usize>(get, "PG_MAX_WAITING", 1000)?,
            ws_max_in_flight: parse::<usize>(get, "WS_MAX_IN_FLIGHT", 96)?,
            ws_max_queue_wait_ms: parse::<u64>(get, "WS_MAX_QUEUE_WAIT_MS", 10_000)?,
            ws_max_queued: parse::<usize>(get, "WS_MAX_QUEUED", 20_000)?,
            ws_max_queued_bytes: parse::<usize>(get, "WS_MAX_QUEUED_BYTES", 64 << 20)?,
            ws_max_queued_per_user: parse::<usize>(get, "WS_MAX_QUEUED_PER_USER", 256)?,
            ws_max_queued_bytes_per_user: parse::<usize>(
                get,
                "WS_MAX_QUEUED_BYTES_PER_USER",
                4 << 20,
            )?,
            ws_max_queued_per_connection: parse::<usize>(get, "WS_MAX_QUEUED_PER_CONNECTION", 64)?,
            ws_max_delivery_lag_ms: parse::<u64>(get, "WS_MAX_DELIVERY_LAG_MS", 5_000)?,
            rate_limits: RateLimits {
                messages: rate(get, "RATE_LIMIT_PER_SEC", "RATE_LIMIT_BURST", 20)?,
                rest: rate(get, "REST_RATE_LIMIT_PER_SEC", "REST_RATE_LIMIT_BURST", 50)?,
            },
            max_connections_per_user: parse::<usize>(get, "MAX_CONNECTIONS_PER_USER", 10)?,
            token_expiry_grace: Duration::from_secs(parse::<u64>(
                get,
                "TOKEN_EXPIRY_GRACE_SECONDS",
                30,
            )?),
        })
    }
}

impl ManagementSettings {
    fn read(get: Get<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            access_key_id: get("GATEWAY_MANAGEMENT_ACCESS_KEY_ID")
                .unwrap_or_else(|| DEV_MANAGEMENT_ACCESS_KEY_ID.into()),
            secret_access_key: get("GATEWAY_MANAGEMENT_SECRET_ACCESS_KEY")
                .unwrap_or_else(|| DEV_MANAGEMENT_SECRET_ACCESS_KEY.into())
                .into(),
            endpoint: get("MANAGEMENT_ENDPOINT").map(|e| e.trim().trim_end_matches('/').to_owned()),
            allowed_endpoints: get("RELAY_ALLOWED_ENDPOINTS").map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            local_fast_path: parse::<bool>(get, "RELAY_LOCAL_FAST_PATH", false)?,
        })
    }
}

impl RelayConfig {
    fn read(get: Get<'_>) -> Result<Self, ConfigError> {
        let lease_shards = parse::<usize>(get, "RELAY_SHARDS", 64)?;
        if !(1..=1024).contains(&lease_shards) {
            return Err(ConfigError {
                variable: "RELAY_SHARDS",
                problem: format!("must be between 1 and 1024, not {lease_shards}"),
            });
        }
        Ok(Self {
            concurrency: parse::<usize>(get, "RELAY_CONCURRENCY", 256)?.max(1),
            lease_shards,
            management: ManagementSettings::read(get)?,
        })
    }
}

/// `from_env` and `from_lookup` of a process's configuration, which
/// reads its parts with `read`: each process reads only its parts, so a
/// process is never refused for a variable it does not use.
macro_rules! process_config {
    ($process:ty, |$get:ident, $lambda:ident| $read:expr) => {
        impl $process {
            /// Reads the process environment.
            ///
            /// # Errors
            /// A [`ConfigError`] naming the first variable that is missing or bad.
            pub fn from_env() -> Result<Self, ConfigError> {
                Self::from_lookup(|name| std::env::var(name).ok())
            }

            /// Reads configuration through `lookup` (the environment, or a
            /// test map).
            ///
            /// # Errors
            /// A [`ConfigError`] naming the first variable that is missing or bad.
            pub fn from_lookup(
                lookup: impl Fn(&str) -> Option<String>,
            ) -> Result<Self, ConfigError> {
                let $lambda = lookup("AWS_LAMBDA_FUNCTION_NAME").is_some();
                read(lookup, |$get| $read)
            }
        }
    };
}

process_config!(HandlerConfig, |get, lambda| Ok(Self {
    common: CommonConfig::read(get, lambda)?,
    api: ApiConfig::read(get)?,
}));

process_config!(RelayProcessConfig, |get, lambda| Ok(Self {
    common: CommonConfig::read(get, lambda)?,
    relay: RelayConfig::read(get)?,
}));

process_config!(MaintenanceConfig, |get, lambda| Ok(Self {
    common: CommonConfig::read(get, lambda)?,
    management: ManagementSettings::read(get)?,
}));

process_config!(Config, |get, lambda| Ok(Self {
    common: CommonConfig::read(get, lambda)?,
    api: ApiConfig::read(get)?,
    relay: RelayConfig::read(get)?,
}));

impl Config {
    /// The relay's part of the local stack's configuration, as the relay
    /// process would read it.
    pub fn relay_process(&self) -> RelayProcessConfig {
        RelayProcessConfig {
            common: self.common.clone(),
            relay: self.relay.clone(),
        }
    }

    /// The handlers' part of the local stack's configuration.
    pub fn handlers(&self) -> HandlerConfig {
        HandlerConfig {
            common: self.common.clone(),
            api: self.api.clone(),
        }
    }
}

/// A rate from `per_sec_var` (0 turns it off) and `burst_var` (default
/// twice the rate, so raising the rate alone raises the burst with it).
fn rate(
    get: Get<'_>,
    per_sec_var: &'static str,
    burst_var: &'static str,
    default_per_sec: u32,
) -> Result<Option<Rate>, ConfigError> {
    let per_sec = parse::<u32>(get, per_sec_var, default_per_sec)?;
    if per_sec == 0 {
        return Ok(None);
    }
    let burst = parse::<u32>(get, burst_var, per_sec.saturating_mul(2))?;
    if burst == 0 {
        return Err(ConfigError {
            variable: burst_var,
            problem: format!("must be at least 1 (set {per_sec_var}=0 to turn the limit off)"),
        });
    }
    Ok(Some(Rate { per_sec, burst }))
}

/// `variable` through `get`, parsed; `default` when it is unset.
///
/// # Errors
/// A [`ConfigError`] naming `variable` when its value does not parse.
pub fn parse<T: std::str::FromStr>(
    get: Get<'_>,
    variable: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match get(variable) {
        None => Ok(default),
        Some(raw) => raw.trim().parse().map_err(|e| ConfigError {
            variable,
            problem: format!("{raw:?} is not valid: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASE: [(&str, &str); 3] = [
        ("DATABASE_URL", "postgres://x@h/db"),
        ("REDIS_URL", "redis://h:1"),
        ("JWT_SECRET", "s"),
    ];

    #[test]
    fn defaults_follow_the_architecture() {
        let c = Config::from_lookup(lookup(&BASE)).expect("valid");
        assert_eq!(c.common.message_retention, 100);
        assert_eq!(c.common.broadcast_channel, "chat:broadcast");
        assert_eq!(c.common.presence_ttl, Duration::from_secs(90));
        assert_eq!(c.common.log_format, LogFormat::Pretty);
        assert_eq!(c.api.max_connections_per_user, 10);
        assert_eq!(c.api.token_expiry_grace, Duration::from_secs(30));
        assert_eq!(c.api.session_policy().max_connections_per_user, Some(10));
        assert_eq!(c.relay.lease_shards, 64);
        assert_eq!(
            c.api.rate_limits,
            RateLimits {
                messages: Some(Rate {
                    per_sec: 20,
                    burst: 40
                }),
                rest: Some(Rate {
                    per_sec: 50,
                    burst: 100
                }),
            }
        );
    }

    #[test]
    fn rate_limits_are_set_and_turned_off_by_zero() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("RATE_LIMIT_PER_SEC", "5"),
            ("REST_RATE_LIMIT_PER_SEC", "0"),
            ("REST_RATE_LIMIT_BURST", "7"),
        ]);
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        assert_eq!(
            c.api.rate_limits.messages,
            Some(Rate {
                per_sec: 5,
                burst: 10
            }),
            "the burst follows the rate"
        );
        assert_eq!(c.api.rate_limits.rest, None, "0 turns it off");
        pairs.push(("RATE_LIMIT_BURST", "1"));
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        assert_eq!(
            c.api.rate_limits.messages,
            Some(Rate {
                per_sec: 5,
                burst: 1
            })
        );
        let mut pairs = BASE.to_vec();
        pairs.push(("RATE_LIMIT_BURST", "0"));
        let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
        assert_eq!(err.variable, "RATE_LIMIT_BURST");
        let mut pairs = BASE.to_vec();
        pairs.push(("REST_RATE_LIMIT_PER_SEC", "-1"));
        let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
        assert_eq!(err.variable, "REST_RATE_LIMIT_PER_SEC");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let mut pairs = BASE.to_vec();
        pairs.push(("MESSAGE_RETENTION", "lots"));
        let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
        assert_eq!(err.variable, "MESSAGE_RETENTION");
        let err = Config::from_lookup(lookup(&BASE[1..])).expect_err("refused");
        assert_eq!(err.variable, "DATABASE_URL");
        for shards in ["0", "1025", "many"] {
            let mut pairs = BASE.to_vec();
            pairs.push(("RELAY_SHARDS", shards));
            let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
            assert_eq!(err.variable, "RELAY_SHARDS");
        }
    }

    #[test]
    fn each_process_reads_only_its_part() {
        let common = [
            ("DATABASE_URL", "postgres://x@h/db"),
            ("REDIS_URL", "redis://h:1"),
        ];
        // The relay and the maintenance job verify no tokens.
        let relay = RelayProcessConfig::from_lookup(lookup(&common)).expect("valid");
        assert_eq!(relay.relay.concurrency, 256);
        MaintenanceConfig::from_lookup(lookup(&common)).expect("valid without JWT_SECRET");
        // The handlers and the local stack do.
        let err = HandlerConfig::from_lookup(lookup(&common)).expect_err("required");
        assert_eq!(err.variable, "JWT_SECRET");
        let err = Config::from_lookup(lookup(&common)).expect_err("required");
        assert_eq!(err.variable, "JWT_SECRET");
        let c = HandlerConfig::from_lookup(lookup(&BASE)).expect("valid");
        assert_eq!(c.api.jwt_secret.expose_secret(), "s");
        // A bad value of another process's part is not this one's concern.
        let mut pairs = common.to_vec();
        pairs.extend([("RELAY_SHARDS", "0"), ("GATEWAY_MAX_FRAME_BYTES", "big")]);
        HandlerConfig::from_lookup(lookup(&[&pairs[..], &BASE[2..]].concat()))
            .expect("the handlers do not read RELAY_SHARDS or GATEWAY_*");
        let err = RelayProcessConfig::from_lookup(lookup(&pairs)).expect_err("refused");
        assert_eq!(err.variable, "RELAY_SHARDS");
    }

    #[test]
    fn redis_url_can_be_built_from_parts() {
        let pairs = [
            ("DATABASE_URL", "postgres://x@h/db"),
            ("JWT_SECRET", "s"),
            ("REDIS_HOST", "cache.local"),
            ("REDIS_PASSWORD", "pw"),
            ("REDIS_TLS", "true"),
        ];
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        assert_eq!(
            c.common.redis_url.expose_secret(),
            "rediss://:pw@cache.local:6379"
        );
    }

    /// ElastiCache AUTH tokens may hold any printable ASCII but `/`, `"`
    /// and `@`: `#`, `?`, `%`, `:` and spaces end or change a URL's user
    /// info unless they are escaped.
    #[test]
    fn a_redis_password_with_url_characters_reaches_redis_unchanged() {
        let token = "a#b?c%d:e f!g[h]i";
        let pairs = [
            ("DATABASE_URL", "postgres://x@h/db"),
            ("JWT_SECRET", "s"),
            ("REDIS_HOST", "cache.local"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", token),
            ("REDIS_TLS", "true"),
        ];
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        let url = c.common.redis_url.expose_secret();
        let info = redis::IntoConnectionInfo::into_connection_info(url).expect("a valid Redis URL");
        assert_eq!(info.redis_settings().password(), Some(token));
        assert!(matches!(
            info.addr(),
            redis::ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "cache.local"
        ));
    }

    #[test]
    fn lambda_logs_json_by_default() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AWS_LAMBDA_FUNCTION_NAME", "rest"));
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        assert_eq!(c.common.log_format, LogFormat::Json);
    }
    #[test]
    fn redis_cluster_is_chosen_by_flag_or_by_a_list_of_seeds() {
        let c = Config::from_lookup(lookup(&BASE)).expect("valid");
        assert!(!c.common.redis_cluster, "a single Redis by default");
        let mut pairs = BASE.to_vec();
        pairs.push(("REDIS_CLUSTER", "true"));
        assert!(
            Config::from_lookup(lookup(&pairs))
                .expect("valid")
                .common
                .redis_cluster
        );
        let mut pairs: Vec<_> = BASE
            .iter()
            .filter(|(k, _)| *k != "REDIS_URL")
            .copied()
            .collect();
        pairs.push(("REDIS_URL", "redis://a:7101,redis://b:7102"));
        let c = Config::from_lookup(lookup(&pairs)).expect("valid");
        assert!(c.common.redis_cluster);
        assert_eq!(
            c.common.redis_target().urls(),
            ["redis://a:7101", "redis://b:7102"]
        );
        for (variable, value) in [("REDIS_KEY_PREFIX", "t{1}:"), ("BROADCAST_CHANNEL", "b}")] {
            let mut pairs = BASE.to_vec();
            pairs.push((variable, value));
            let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
            assert_eq!(err.variable, variable);
        }
        let mut pairs = BASE.to_vec();
        pairs.push(("REDIS_CLUSTER", "maybe"));
        let err = Config::from_lookup(lookup(&pairs)).expect_err("refused");
        assert_eq!(err.variable, "REDIS_CLUSTER");
    }
}
