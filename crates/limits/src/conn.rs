//! The one Redis connection code of llmgw, for the spend controls'
//! counters and the gateways' endpoint health views alike: a single server
//! or a Cluster, one multiplexed connection that is opened in the background
//! (retried until it succeeds) and then reconnects by itself.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Value;

use crate::BackendError;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection to Redis (or a Redis Cluster), usable once connected.
#[derive(Clone)]
pub(crate) struct RedisConn {
    conn: Arc<RwLock<Option<Conn>>>,
}

pub(crate) fn redis_err(e: redis::RedisError) -> BackendError {
    BackendError::Redis(e.to_string())
}

/// The first wait between failed connection attempts, doubling up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(50);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

impl RedisConn {
    /// `urls` as `LLMGW_REDIS_URL` gives them: one URL is a single server,
    /// several are the nodes of a Cluster. `timeout` bounds each answer;
    /// `what` names the user in the log (`"{what}: connected to Redis"`).
    pub fn open(
        urls: &[String],
        timeout: Duration,
        what: &'static str,
    ) -> Result<Self, BackendError> {
        match urls {
            [one] => Self::single(one, timeout, what),
            nodes => Self::cluster(nodes, timeout, what),
        }
    }

    /// A single Redis server (`redis://host:port/db`); connects in the background.
    pub fn single(url: &str, timeout: Duration, what: &'static str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_max_delay(Duration::from_secs(1));
        let this = Self::empty();
        let slot = this.conn.clone();
        tokio::spawn(async move {
            let mut wait = FIRST_RETRY_WAIT;
            loop {
                match ConnectionManager::new_with_config(client.clone(), cfg.clone()).await {
                    Ok(c) => {
                        *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Conn::Single(c));
                        tracing::info!("{what}: connected to Redis");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what}: cannot connect to Redis yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_RETRY_WAIT);
                    }
                }
            }
        });
        Ok(this)
    }

    /// A Redis Cluster, discovered through any of `urls`.
    pub fn cluster(
        urls: &[String],
        timeout: Duration,
        what: &'static str,
    ) -> Result<Self, BackendError> {
        let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(timeout.max(Duration::from_millis(200)))
            .response_timeout(timeout)
            .retries(1)
            .build()
            .map_err(redis_err)?;
        let this = Self::empty();
        let slot = this.conn.clone();
        tokio::spawn(async move {
            let mut wait = FIRST_RETRY_WAIT;
            loop {
                match client.get_async_connection().await {
                    Ok(c) => {
                        *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Conn::Cluster(c));
                        tracing::info!("{what}: connected to Redis Cluster");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what}: cannot connect to Redis Cluster yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_RETRY_WAIT);
                    }
                }
            }
        });
        Ok(this)
    }

    fn empty() -> Self {
        Self {
            conn: Arc::new(RwLock::new(None)),
        }
    }

    fn conn(&self) -> Result<Conn, BackendError> {
        self.conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(BackendError::NotConnected)
    }

    /// Runs a script (EVALSHA, loading it when Redis does not know it yet).
    pub async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Value, BackendError> {
        match self.conn()? {
            Conn::Single(mut c) => inv.invoke_async(&mut c).await.map_err(redis_err),
            Conn::Cluster(mut c) => inv.invoke_async(&mut c).await.map_err(redis_err),
        }
    }
}

/// A script's answer as integers.
pub(crate) fn ints(v: Value) -> Result<Vec<i64>, BackendError> {
    let Value::Array(items) = v else {
        return Err(BackendError::Redis("unexpected script answer".into()));
    };
    items
        .into_iter()
        .map(|i| match i {
            Value::Int(n) => Ok(n),
            _ => Err(BackendError::Redis("unexpected script answer".into())),
        })
        .collect()
}
