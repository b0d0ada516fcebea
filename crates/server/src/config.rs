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
    /// `LLMGW_PUBLIC_URL`: where browsers reach the API listener (cookie `Secure` when https).
    pub public_url: Option<String>,
    /// `LLMGW_GATEWAY_PUBLIC_URL`: the gateway URL shown in the admin UI's quick start.
    pub gateway_public_url: Option<String>,
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

/// An `http(s)://host[:port][/path]` URL, without its trailing `/`.
fn public_url(env: Env, var: &'static str) -> Result<Option<String>, ConfigError> {
    let Some(v) = get(env, var) else {
        return Ok(None);
    };
    let bad = |message: &str| ConfigError {
        var,
        message: format!("{message}, got {v:?}"),
    };
    let url = url::Url::parse(&v).map_err(|_| bad("expected an http(s) URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("expected an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("expected no user, query or fragment"));
    }
    Ok(Some(v.trim_end_matches('/').to_owned()))
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
            public_url: public_url(env, "LLMGW_PUBLIC_URL")?,
            gateway_public_url: public_url(env, "LLMGW_GATEWAY_PUBLIC_URL")?,
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
    fn public_urls_lose_their_trailing_slash() {
        let c = cfg(&[
            ("LLMGW_PUBLIC_URL", "https://llmgw.example.com/"),
            ("LLMGW_GATEWAY_PUBLIC_URL", "http://127.0.0.1:8080"),
        ])
        .unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://llmgw.example.com"));
        assert_eq!(
            c.gateway_public_url.as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert!(cfg(&[]).unwrap().public_url.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, val) in [
            ("LLMGW_GATEWAY_ADDR", "nope"),
            ("LLMGW_UPSTREAM_ALLOW_PRIVATE", "maybe"),
            ("LLMGW_MAX_BODY_BYTES", "-1"),
            ("LLMGW_PUBLIC_URL", "llmgw.example.com"),
            ("LLMGW_GATEWAY_PUBLIC_URL", "ftp://gw.example.com"),
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
    fn database_url_requires_encryption_keys() {
        let e = cfg(&[("DATABASE_URL", "postgres://localhost/x")]).unwrap_err();
        assert_eq!(e.var, "LLMGW_ENCRYPTION_KEYS");
    }
}
