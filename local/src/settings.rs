//! What only the local stack reads: its port and the API Gateway
//! emulator's limits and names (`PORT`, `GATEWAY_*`).
//!
//! No Lambda reads these, so they are not in `chat-shared`'s [`Config`]:
//! the local stack reads them beside it, with the same helpers
//! ([`config::read`], [`config::parse`]), so the same rules hold: blank is
//! unset, and a bad value stops start-up with a [`ConfigError`] naming the
//! variable. They are read straight into the emulator's own types
//! ([`GatewayConfig`], [`EdgeLimits`]), whose defaults (API Gateway's
//! limits) are the variables' defaults.
//!
//! The Management API key pair (`GATEWAY_MANAGEMENT_ACCESS_KEY_ID` /
//! `..._SECRET_ACCESS_KEY`) is the relay's part of [`Config`]: the relay
//! signs with it too.

use std::net::SocketAddr;
use std::time::Duration;

use chat_gateway::{Dispatch, EdgeLimits, GatewayConfig, ManagementCredentials};
use chat_shared::Config;
use chat_shared::config::{self, ConfigError, Get, parse};
use secrecy::ExposeSecret as _;

/// The local stack's own settings, read beside [`Config`].
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// HTTP port of the local stack (`PORT`, 3000).
    pub port: u16,
    /// Where the emulator serves the Management API and `/metrics`
    /// (`GATEWAY_MANAGEMENT_LISTEN`; unset: 127.0.0.1 on the client port +
    /// 100). Never the client port.
    pub management_listen: Option<SocketAddr>,
    /// The emulator's stage, limits and dispatch (`GATEWAY_STAGE`,
    /// `GATEWAY_MAX_MESSAGE_BYTES`, ...). Its domain name, key pair and
    /// instance id are not settings of its own: [`Self::gateway_config`]
    /// fills them in.
    pub gateway: GatewayConfig,
    /// The client port's limits (`GATEWAY_HANDSHAKE_TIMEOUT_SECONDS`,
    /// `GATEWAY_MAX_HANDSHAKES`, `GATEWAY_CONNECT_RATE_PER_IP`); its socket
    /// cap comes from `fd_reserve` when the port is served
    /// ([`Self::edge_limits`]).
    pub edge: EdgeLimits,
    /// The client port stops accepting while fewer than this many file
    /// descriptors are left below `RLIMIT_NOFILE` (`GATEWAY_FD_RESERVE`,
    /// 64), so `/health` and the Management API still answer.
    pub fd_reserve: u64,
}

impl Default for LocalSettings {
    /// What every variable unset gives: port 3000, API Gateway's limits.
    fn default() -> Self {
        Self {
            port: 3000,
            management_listen: None,
            gateway: GatewayConfig::default(),
            edge: EdgeLimits::default(),
            fd_reserve: 64,
        }
    }
}

impl LocalSettings {
    /// Reads the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first variable that is bad.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (the environment, or a test
    /// map); an unset variable keeps its [`Default`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first variable that is bad.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        config::read(lookup, |get| {
            let d = Self::default();
            let (gateway, edge) = (d.gateway, d.edge);
            Ok(Self {
                port: parse(get, "PORT", d.port)?,
                management_listen: match get("GATEWAY_MANAGEMENT_LISTEN") {
                    None => None,
                    Some(raw) => Some(raw.trim().parse().map_err(|e| ConfigError {
                        variable: "GATEWAY_MANAGEMENT_LISTEN",
                        problem: format!("{raw:?} is not an address like 127.0.0.1:3100: {e}"),
                    })?),
                },
                gateway: GatewayConfig {
                    stage: get("GATEWAY_STAGE").unwrap_or(gateway.stage),
                    max_message_bytes: parse(
                        get,
                        "GATEWAY_MAX_MESSAGE_BYTES",
                        gateway.max_message_bytes,
                    )?,
                    max_frame_bytes: parse(
                        get,
                        "GATEWAY_MAX_FRAME_BYTES",
                        gateway.max_frame_bytes,
                    )?,
                    accept_binary_frames: parse(
                        get,
                        "GATEWAY_ACCEPT_BINARY_FRAMES",
                        gateway.accept_binary_frames,
                    )?,
                    integration_timeout: seconds(
                        get,
                        "GATEWAY_INTEGRATION_TIMEOUT_SECONDS",
                        gateway.integration_timeout,
                    )?,
                    idle_timeout: seconds(
                        get,
                        "GATEWAY_IDLE_TIMEOUT_SECONDS",
                        gateway.idle_timeout,
                    )?,
                    max_lifetime: seconds(
                        get,
                        "GATEWAY_MAX_LIFETIME_SECONDS",
                        gateway.max_lifetime,
                    )?,
                    max_queued_bytes: parse(
                        get,
                        "GATEWAY_MAX_QUEUED_BYTES",
                        gateway.max_queued_bytes,
                    )?,
                    max_pings_per_sec: parse(
                        get,
                        "GATEWAY_MAX_PINGS_PER_SEC",
                        gateway.max_pings_per_sec,
                    )?,
                    dispatch: dispatch(get, gateway.dispatch)?,
                    ..gateway
                },
                edge: EdgeLimits {
                    handshake_timeout: seconds(
                        get,
                        "GATEWAY_HANDSHAKE_TIMEOUT_SECONDS",
                        edge.handshake_timeout,
                    )?
                    .max(Duration::from_secs(1)),
                    max_handshakes: parse(get, "GATEWAY_MAX_HANDSHAKES", edge.max_handshakes)?
                        .max(1),
                    connect_rate_per_ip: parse(
                        get,
                        "GATEWAY_CONNECT_RATE_PER_IP",
                        edge.connect_rate_per_ip,
                    )?,
                    ..edge
                },
                fd_reserve: parse(get, "GATEWAY_FD_RESERVE", d.fd_reserve)?,
            })
        })
    }

    /// The emulator's configuration: these settings, with its Management
    /// API on `management` (what `$connect` records as the callback
    /// endpoint), the key pair of `config`'s relay part and `config`'s
    /// instance id.
    pub fn gateway_config(&self, config: &Config, management: SocketAddr) -> GatewayConfig {
        let key = &config.relay.management;
        GatewayConfig {
            domain_name: management.to_string(),
            management_credentials: ManagementCredentials {
                access_key_id: key.access_key_id.clone(),
                secret_access_key: key.secret_access_key.expose_secret().to_owned(),
            },
            instance_id: config.common.instance_id.clone(),
            ..self.gateway.clone()
        }
    }

    /// The client port's limits (see [`chat_gateway::listener`]), its
    /// socket cap counted now from `RLIMIT_NOFILE`, the descriptors open
    /// and `fd_reserve`.
    pub fn edge_limits(&self) -> EdgeLimits {
        EdgeLimits {
            max_sockets: chat_gateway::listener::sockets_within_fd_limit(self.fd_reserve),
            ..self.edge.clone()
        }
    }
}

/// A duration in whole seconds from `variable`.
fn seconds(
    get: Get<'_>,
    variable: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    parse(get, variable, default.as_secs()).map(Duration::from_secs)
}

/// How `$default` is invoked: `GATEWAY_DISPATCH` (`concurrent` or
/// `serial`) and, when concurrent, `GATEWAY_DISPATCH_CONCURRENCY` (a
/// concurrency of 1 is serial).
fn dispatch(get: Get<'_>, default: Dispatch) -> Result<Dispatch, ConfigError> {
    match get("GATEWAY_DISPATCH").as_deref().map(str::trim) {
        None | Some("concurrent") => {
            match parse(get, "GATEWAY_DISPATCH_CONCURRENCY", default.max_in_flight())?.max(1) {
                1 => Ok(Dispatch::Serial),
                n => Ok(Dispatch::Concurrent(n)),
            }
        }
        Some("serial") => Ok(Dispatch::Serial),
        Some(other) => Err(ConfigError {
            variable: "GATEWAY_DISPATCH",
            problem: format!("{other:?} is not `concurrent` or `serial`"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<LocalSettings, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        LocalSettings::from_lookup(|k| map.get(k).map(|v| (*v).to_owned()))
    }

    #[test]
    fn unset_variables_give_the_documented_defaults() {
        let s = read(&[("GATEWAY_STAGE", " ")]).expect("valid");
        assert_eq!(s.port, 3000);
        assert_eq!(s.management_listen, None);
        assert_eq!(s.gateway.stage, "local", "blank is unset");
        assert_eq!(s.gateway.max_message_bytes, 131_072);
        assert_eq!(s.gateway.max_frame_bytes, 32_768);
        assert!(!s.gateway.accept_binary_frames);
        assert_eq!(s.gateway.integration_timeout, Duration::from_secs(29));
        assert_eq!(s.gateway.idle_timeout, Duration::from_secs(600));
        assert_eq!(s.gateway.max_lifetime, Duration::from_secs(7200));
        assert_eq!(s.gateway.max_queued_bytes, 1 << 20);
        assert_eq!(s.gateway.max_pings_per_sec, 10);
        assert_eq!(s.gateway.dispatch, Dispatch::Concurrent(8));
        assert_eq!(s.edge.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.edge.max_handshakes, 1024);
        assert_eq!(s.edge.connect_rate_per_ip, 2000);
        assert_eq!(s.fd_reserve, 64);
    }

    #[test]
    fn every_variable_reaches_its_setting() {
        let s = read(&[
            ("PORT", "4000"),
            ("GATEWAY_MANAGEMENT_LISTEN", "127.0.0.1:4100"),
            ("GATEWAY_STAGE", "dev"),
            ("GATEWAY_MAX_MESSAGE_BYTES", "1000"),
            ("GATEWAY_MAX_FRAME_BYTES", "500"),
            ("GATEWAY_ACCEPT_BINARY_FRAMES", "true"),
            ("GATEWAY_INTEGRATION_TIMEOUT_SECONDS", "3"),
            ("GATEWAY_IDLE_TIMEOUT_SECONDS", "4"),
            ("GATEWAY_MAX_LIFETIME_SECONDS", "5"),
            ("GATEWAY_MAX_QUEUED_BYTES", "6000"),
            ("GATEWAY_MAX_PINGS_PER_SEC", "0"),
            ("GATEWAY_HANDSHAKE_TIMEOUT_SECONDS", "0"),
            ("GATEWAY_MAX_HANDSHAKES", "7"),
            ("GATEWAY_CONNECT_RATE_PER_IP", "0"),
            ("GATEWAY_FD_RESERVE", "9"),
        ])
        .expect("valid");
        assert_eq!(s.port, 4000);
        assert_eq!(s.management_listen, Some(([127, 0, 0, 1], 4100).into()));
        assert_eq!(s.gateway.stage, "dev");
        assert_eq!(s.gateway.max_message_bytes, 1000);
        assert_eq!(s.gateway.max_frame_bytes, 500);
        assert!(s.gateway.accept_binary_frames);
        assert_eq!(s.gateway.integration_timeout, Duration::from_secs(3));
        assert_eq!(s.gateway.idle_timeout, Duration::from_secs(4));
        assert_eq!(s.gateway.max_lifetime, Duration::from_secs(5));
        assert_eq!(s.gateway.max_queued_bytes, 6000);
        assert_eq!(s.gateway.max_pings_per_sec, 0);
        assert_eq!(
            s.edge.handshake_timeout,
            Duration::from_secs(1),
            "at least a second"
        );
        assert_eq!(s.edge.max_handshakes, 7);
        assert_eq!(s.edge.connect_rate_per_ip, 0);
        assert_eq!(s.fd_reserve, 9);
    }

    #[test]
    fn gateway_dispatch_is_concurrent_unless_set_serial() {
        let dispatch = |pairs: &[(&str, &str)]| read(pairs).map(|s| s.gateway.dispatch);
        assert_eq!(dispatch(&[]).ok(), Some(Dispatch::Concurrent(8)));
        assert_eq!(
            dispatch(&[("GATEWAY_DISPATCH", "serial")]).ok(),
            Some(Dispatch::Serial)
        );
        assert_eq!(
            dispatch(&[
                ("GATEWAY_DISPATCH", "concurrent"),
                ("GATEWAY_DISPATCH_CONCURRENCY", "3")
            ])
            .ok(),
            Some(Dispatch::Concurrent(3))
        );
        assert_eq!(
            dispatch(&[("GATEWAY_DISPATCH_CONCURRENCY", "1")]).ok(),
            Some(Dispatch::Serial)
        );
        let err = dispatch(&[("GATEWAY_DISPATCH", "parallel")]).expect_err("refused");
        assert_eq!(err.variable, "GATEWAY_DISPATCH");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (variable, value) in [
            ("PORT", "70000"),
            ("GATEWAY_MAX_FRAME_BYTES", "big"),
            ("GATEWAY_IDLE_TIMEOUT_SECONDS", "-1"),
            ("GATEWAY_ACCEPT_BINARY_FRAMES", "yes"),
            ("GATEWAY_DISPATCH_CONCURRENCY", "many"),
            ("GATEWAY_MANAGEMENT_LISTEN", "3100"),
        ] {
            let err = read(&[(variable, value)]).expect_err("refused");
            assert_eq!(err.variable, variable);
        }
    }

    #[test]
    fn the_emulator_gets_the_relays_key_pair_and_the_instance_id() {
        let config = Config::from_lookup(|name| {
            let value = match name {
                "DATABASE_URL" => "postgres://x@h/db",
                "REDIS_URL" => "redis://h:1",
                "JWT_SECRET" => "s",
                "INSTANCE_ID" => "gw-1",
                "GATEWAY_MANAGEMENT_ACCESS_KEY_ID" => "AKID",
                "GATEWAY_MANAGEMENT_SECRET_ACCESS_KEY" => "key-secret",
                _ => return None,
            };
            Some(value.to_owned())
        })
        .expect("valid");
        let settings = read(&[("GATEWAY_STAGE", "dev")]).expect("valid");
        let gateway = settings.gateway_config(&config, ([127, 0, 0, 1], 3100).into());
        assert_eq!(gateway.domain_name, "127.0.0.1:3100");
        assert_eq!(gateway.management_credentials.access_key_id, "AKID");
        assert_eq!(
            gateway.management_credentials.secret_access_key,
            "key-secret"
        );
        assert_eq!(gateway.instance_id, "gw-1");
        assert_eq!(gateway.stage, "dev");
    }
}
