//! Every setting comes from the environment (`LLMGW_*`, `DATABASE_URL`,
//! `RUST_LOG`); a bad value names its variable in one line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The whole configuration. `Debug` is written by hand: the URL may carry a
/// password and the keys are the master secrets.
#[derive(Clone)]
pub struct Config {
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub encryption_keys: Option<String>,
    pub gateway_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// `LLMGW_METRICS_ADDR`: when set, `/metrics` is served there and not on the gateway port.
    pub metrics_addr: Option<SocketAddr>,
    pub allow_private: bool,
    pub allow_http: bool,
    pub upstream_http2: bool,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    pub allow_signup: bool,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub session_ttl: Duration,
    pub session_idle: Duration,
    pub api_body_timeout: Duration,
    pub api_max_connections: usize,
    pub db_max_connections: u32,
    pub gateway_workers: usize,
    pub cache_ttl: Duration,
    pub log_queue_capacity: usize,
    pub log_batch_size: usize,
    pub log_flush_interval: Duration,
    pub trusted_proxies: api::TrustedProxies,
    /// `LLMGW_PUBLIC_URL`: where browsers reach the API listener (no trailing `/`).
    pub public_url: Option<String>,
    /// `LLMGW_PASSWORD_LOGIN` and the `LLMGW_OIDC_*` settings.
    pub sso: api::SsoConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "encryption_keys",
                &self.encryption_keys.as_ref().map(|_| "[REDACTED]"),
            )
            .field("data_dir", &self.data_dir)
            .field("gateway_addr", &self.gateway_addr)
            .field("api_addr", &self.api_addr)
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn get(env: Env, var: &'static str) -> Option<String> {
    env(var)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(
    env: Env,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    match get(env, var) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError {
            var,
            message: format!("expected {what}, got {v:?}"),
        }),
    }
}

fn flag(env: Env, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get(env, var).map(|v| v.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(true),
        Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(false),
        Some(v) => Err(ConfigError {
            var,
            message: format!("expected true or false, got {v:?}"),
        }),
    }
}

fn millis(env: Env, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
    let ms: u64 = parse(env, var, default_ms, "a whole number of milliseconds")?;
    if ms == 0 {
        return Err(ConfigError {
            var,
            message: "must be greater than 0".into(),
        });
    }
    Ok(Duration::from_millis(ms))
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    env: Env,
    var: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    let v = parse(env, var, default, "a positive whole number")?;
    if v <= T::default() {
        return Err(ConfigError {
            var,
            message: "must be greater than 0".into(),
        });
    }
    Ok(v)
}

fn session_ttl(env: Env) -> Result<Duration, ConfigError> {
    let hours: u64 = positive(env, "LLMGW_SESSION_TTL_HOURS", 24 * 7)?;
    if hours > 24 * 366 {
        return Err(ConfigError {
            var: "LLMGW_SESSION_TTL_HOURS",
            message: "must be at most 8784 (one year)".into(),
        });
    }
    Ok(Duration::from_secs(3600 * hours))
}

fn session_idle(env: Env) -> Result<Duration, ConfigError> {
    let minutes: u64 = positive(env, "LLMGW_SESSION_IDLE_MINUTES", 12 * 60)?;
    if minutes > 366 * 24 * 60 {
        return Err(ConfigError {
            var: "LLMGW_SESSION_IDLE_MINUTES",
            message: "must be at most 527040 (one year)".into(),
        });
    }
    Ok(Duration::from_secs(60 * minutes))
}

fn public_url(env: Env) -> Result<Option<String>, ConfigError> {
    let Some(url) = get(env, "LLMGW_PUBLIC_URL") else {
        return Ok(None);
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let ok = rest.is_some_and(|r| {
        let host = r.split('/').next().unwrap_or("");
        !host.is_empty() && !r.contains(['?', '#', '@', ' '])
    });
    if !ok {
        return Err(ConfigError {
            var: "LLMGW_PUBLIC_URL",
            message: format!(
                "expected an http(s) URL such as https://llmgw.example.com, got {url:?}"
            ),
        });
    }
    Ok(Some(url.trim_end_matches('/').to_owned()))
}

fn sso(env: Env, public_url: Option<&str>) -> Result<api::SsoConfig, ConfigError> {
    let password_login = flag(env, "LLMGW_PASSWORD_LOGIN", true)?;
    let auto_create = flag(env, "LLMGW_OIDC_AUTO_CREATE", true)?;
    let Some(issuer) = get(env, "LLMGW_OIDC_ISSUER") else {
        if !password_login {
            return Err(ConfigError {
                var: "LLMGW_PASSWORD_LOGIN",
                message: "false needs LLMGW_OIDC_ISSUER: nobody could sign in otherwise".into(),
            });
        }
        return Ok(api::SsoConfig::default());
    };
    if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
        return Err(ConfigError {
            var: "LLMGW_OIDC_ISSUER",
            message: format!("expected the issuer's https URL, got {issuer:?}"),
        });
    }
    let client_id = get(env, "LLMGW_OIDC_CLIENT_ID").ok_or_else(|| ConfigError {
        var: "LLMGW_OIDC_CLIENT_ID",
        message: "required when LLMGW_OIDC_ISSUER is set".into(),
    })?;
    let public_url = public_url.ok_or_else(|| ConfigError {
        var: "LLMGW_PUBLIC_URL",
        message: "required when LLMGW_OIDC_ISSUER is set (the redirect URI is {LLMGW_PUBLIC_URL}/api/v1/auth/oidc/callback)".into(),
    })?;
    let ca_file = get(env, "LLMGW_OIDC_CA_FILE").map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return Err(ConfigError {
                var: "LLMGW_OIDC_CA_FILE",
                message: format!("{} is not a readable file", p.display()),
            });
        }
    }
    Ok(api::SsoConfig {
        password_login,
        oidc: Some(api::OidcConfig {
            issuer,
            client_id,
            client_secret: get(env, "LLMGW_OIDC_CLIENT_SECRET").map(secrecy::SecretString::from),
            public_url: public_url.to_owned(),
            auto_create,
            ca_file,
            timeout: Duration::from_secs(10),
        }),
    })
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `env` (tests pass a map).
    pub fn from_lookup(env: Env) -> Result<Self, ConfigError> {
        let log_format = match get(env, "LLMGW_LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    var: "LLMGW_LOG_FORMAT",
                    message: format!("expected json or pretty, got {other:?}"),
                })
            }
        };
        let database_url = get(env, "DATABASE_URL");
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError {
                    var: "DATABASE_URL",
                    message: "must start with postgres:// or postgresql://".into(),
                });
            }
            storage::Db::options_from_url(url).map_err(|e| ConfigError {
                var: "DATABASE_URL",
                message: format!("not a valid PostgreSQL URL ({e})"),
            })?;
        }
        let encryption_keys = get(env, "LLMGW_ENCRYPTION_KEYS");
        if let Some(spec) = &encryption_keys {
            storage::Keyring::parse(spec).map_err(|e| ConfigError {
                var: "LLMGW_ENCRYPTION_KEYS",
                message: format!(
                    "{e} (format: 1:<base64 32 bytes>,2:<...>; `llmgw keys generate` makes one)"
                ),
            })?;
        } else if database_url.is_some() {
            return Err(ConfigError {
                var: "LLMGW_ENCRYPTION_KEYS",
                message: "required when DATABASE_URL is set (format: 1:<base64 32 bytes>; `llmgw keys generate` makes one)".into(),
            });
        }
        let ca_file = get(env, "LLMGW_UPSTREAM_CA_FILE").map(PathBuf::from);
        if let Some(p) = &ca_file {
            if !p.is_file() {
                return Err(ConfigError {
                    var: "LLMGW_UPSTREAM_CA_FILE",
                    message: format!("{} is not a readable file", p.display()),
                });
            }
        }
        let public_url = public_url(env)?;
        let sso = sso(env, public_url.as_deref())?;
        let default_workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            database_url,
            data_dir: get(env, "LLMGW_DATA_DIR")
                .map_or_else(|| PathBuf::from("./.llmgw"), PathBuf::from),
            encryption_keys,
            gateway_addr: parse(
                env,
                "LLMGW_GATEWAY_ADDR",
                ([127, 0, 0, 1], 8080).into(),
                "host:port",
            )?,
            api_addr: parse(
                env,
                "LLMGW_API_ADDR",
                ([127, 0, 0, 1], 8081).into(),
                "host:port",
            )?,
            metrics_addr: get(env, "LLMGW_METRICS_ADDR")
                .map(|_| {
                    parse(
                        env,
                        "LLMGW_METRICS_ADDR",
                        ([127, 0, 0, 1], 0).into(),
                        "IP:port",
                    )
                })
                .transpose()?,
            allow_private: flag(env, "LLMGW_UPSTREAM_ALLOW_PRIVATE", false)?,
            allow_http: flag(env, "LLMGW_UPSTREAM_ALLOW_HTTP", false)?,
            upstream_http2: flag(env, "LLMGW_UPSTREAM_HTTP2", false)?,
            ca_file,
            connect_timeout: millis(env, "LLMGW_UPSTREAM_CONNECT_TIMEOUT_MS", 5_000)?,
            upstream_timeout: millis(env, "LLMGW_UPSTREAM_TIMEOUT_MS", 300_000)?,
            max_body_bytes: positive(env, "LLMGW_MAX_BODY_BYTES", 10 * 1024 * 1024)?,
            allow_signup: flag(env, "LLMGW_ALLOW_SIGNUP", true)?,
            log_format,
            shutdown_grace: millis(env, "LLMGW_SHUTDOWN_GRACE_MS", 30_000)?,
            session_ttl: session_ttl(env)?,
            session_idle: session_idle(env)?,
            api_body_timeout: millis(env, "LLMGW_API_BODY_TIMEOUT_MS", 10_000)?,
            api_max_connections: positive(env, "LLMGW_API_MAX_CONNECTIONS", 256)?,
            db_max_connections: positive(env, "LLMGW_DB_MAX_CONNECTIONS", 16)?,
            gateway_workers: positive(env, "LLMGW_GATEWAY_WORKERS", default_workers)?,
            cache_ttl: millis(env, "LLMGW_CACHE_TTL_MS", 30_000)?,
            log_queue_capacity: positive(env, "LLMGW_LOG_QUEUE_CAPACITY", 100_000)?,
            log_batch_size: positive(env, "LLMGW_LOG_BATCH_SIZE", 500)?,
            log_flush_interval: millis(env, "LLMGW_LOG_FLUSH_INTERVAL_MS", 200)?,
            trusted_proxies: api::TrustedProxies::parse(
                &get(env, "LLMGW_TRUSTED_PROXIES").unwrap_or_default(),
            )
            .map_err(|message| ConfigError {
                var: "LLMGW_TRUSTED_PROXIES",
                message,
            })?,
            public_url,
            sso,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.gateway_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.max_body_bytes, 10 * 1024 * 1024);
        assert!(c.allow_signup && !c.allow_private);
        assert_eq!(c.data_dir, PathBuf::from("./.llmgw"));
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, val) in [
            ("LLMGW_GATEWAY_ADDR", "nope"),
            ("LLMGW_UPSTREAM_ALLOW_PRIVATE", "maybe"),
            ("LLMGW_MAX_BODY_BYTES", "-1"),
            ("LLMGW_MAX_BODY_BYTES", "0"),
            ("LLMGW_SESSION_TTL_HOURS", "3000000000"),
            ("LLMGW_SESSION_IDLE_MINUTES", "0"),
            ("LLMGW_SESSION_IDLE_MINUTES", "600000"),
            ("LLMGW_API_BODY_TIMEOUT_MS", "0"),
            ("LLMGW_API_MAX_CONNECTIONS", "none"),
            ("LLMGW_UPSTREAM_TIMEOUT_MS", "abc"),
            ("LLMGW_LOG_FORMAT", "xml"),
            ("LLMGW_ENCRYPTION_KEYS", "1:short"),
            ("LLMGW_UPSTREAM_CA_FILE", "/does/not/exist.pem"),
            ("LLMGW_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal"),
            ("DATABASE_URL", "mysql://x"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = cfg(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
            (
                "LLMGW_ENCRYPTION_KEYS",
                "1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ])
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("AAAA"), "{dbg}");
    }

    #[test]
    fn oidc_needs_a_public_url_and_a_client_id() {
        let issuer = ("LLMGW_OIDC_ISSUER", "https://id.example.com");
        let id = ("LLMGW_OIDC_CLIENT_ID", "llmgw");
        assert_eq!(cfg(&[issuer]).unwrap_err().var, "LLMGW_OIDC_CLIENT_ID");
        let e = cfg(&[issuer, id]).unwrap_err();
        assert_eq!(e.var, "LLMGW_PUBLIC_URL", "{e}");
        let c = cfg(&[issuer, id, ("LLMGW_PUBLIC_URL", "https://gw.example.com/")]).unwrap();
        let oidc = c.sso.oidc.expect("oidc configured");
        assert_eq!(oidc.public_url, "https://gw.example.com");
        assert!(oidc.auto_create && c.sso.password_login);
        let e = cfg(&[("LLMGW_PASSWORD_LOGIN", "false")]).unwrap_err();
        assert_eq!(e.var, "LLMGW_PASSWORD_LOGIN");
        assert_eq!(
            cfg(&[("LLMGW_PUBLIC_URL", "ftp://x")]).unwrap_err().var,
            "LLMGW_PUBLIC_URL"
        );
    }

    #[test]
    fn database_url_requires_encryption_keys() {
        let e = cfg(&[("DATABASE_URL", "postgres://localhost/x")]).unwrap_err();
        assert_eq!(e.var, "LLMGW_ENCRYPTION_KEYS");
    }
}
