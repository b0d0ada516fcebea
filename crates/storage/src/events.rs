//! Cache events: the `LISTEN llmgw_cache` connection as a stream of typed
//! notices, so the gateway learns of changes to keys and providers (made by
//! the settings API or another replica) without knowing sqlx or the tables.
//!
//! The stream never ends: a lost connection is announced, then retried with
//! backoff (100 ms doubling to 5 s), and a connection regained after a loss
//! is announced as [`CacheNotice::Reconnected`], since notifications sent in
//! between were missed. Dropping the stream closes the connection.

use std::time::Duration;

use futures_util::Stream;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::db::Db;

/// PostgreSQL channel on which changes to providers (their endpoints
/// included) and API keys are announced.
/// Payload: `{"table":"provider_keys"|"provider_endpoints"|"api_keys"|"organizations","op":"INSERT"|"UPDATE"|"DELETE","org_id":…,"id":…}`,
/// and for `provider_endpoints` also `"provider_key_id"`, the endpoint's provider.
pub const CACHE_CHANNEL: &str = "llmgw_cache";

/// A decoded `llmgw_cache` notification.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
pub struct CacheEvent {
    pub table: String,
    pub op: String,
    pub org_id: uuid::Uuid,
    pub id: uuid::Uuid,
    /// The provider an endpoint belongs to (`provider_endpoints` only).
    #[serde(default)]
    pub provider_key_id: Option<uuid::Uuid>,
}

/// What the cache listener saw, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheNotice {
    /// Listening for the first time: nothing can have been missed.
    Connected,
    /// Listening again after the connection was lost: changes made in
    /// between were not announced, so every cached entry is suspect.
    Reconnected,
    /// The connection was lost; it is being re-established.
    Disconnected,
    /// An API key was created, changed or deleted.
    ApiKey { org_id: Uuid, id: Uuid },
    /// One of an organization's providers was created, changed or deleted,
    /// or one of its endpoints was: `id` is the provider's.
    Provider { org_id: Uuid, id: Uuid },
    /// An organization's limits changed: every cached key of it carries them.
    Org { org_id: Uuid },
    /// A notification of a shape this version does not know: treat
    /// everything as changed.
    Unknown,
}

impl CacheNotice {
    /// Reads a notification's payload.
    pub fn from_payload(payload: &str) -> Self {
        match serde_json::from_str::<CacheEvent>(payload) {
            Ok(ev) if ev.table == "api_keys" => Self::ApiKey {
                org_id: ev.org_id,
                id: ev.id,
            },
            Ok(ev) if ev.table == "provider_keys" => Self::Provider {
                org_id: ev.org_id,
                id: ev.id,
            },
            Ok(CacheEvent {
                table,
                org_id,
                provider_key_id: Some(id),
                ..
            }) if table == "provider_endpoints" => Self::Provider { org_id, id },
            Ok(ev) if ev.table == "organizations" => Self::Org { org_id: ev.org_id },
            _ => {
                tracing::warn!(payload, "unexpected cache notification");
                Self::Unknown
            }
        }
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The listener's state between two notices.
struct Listening {
    db: Db,
    listener: Option<PgListener>,
    connected_before: bool,
    backoff: Duration,
}

impl Listening {
    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut l = PgListener::connect_with(self.db.pool()).await?;
        l.listen(CACHE_CHANNEL).await?;
        Ok(l)
    }

    async fn next(&mut self) -> CacheNotice {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.connect().await {
                    Ok(l) => {
                        self.listener = Some(l);
                        self.backoff = FIRST_BACKOFF;
                        let again = std::mem::replace(&mut self.connected_before, true);
                        return if again {
                            CacheNotice::Reconnected
                        } else {
                            CacheNotice::Connected
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache listener cannot connect; retrying in {:?}", self.backoff);
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            };
            return match listener.try_recv().await {
                Ok(Some(n)) => CacheNotice::from_payload(n.payload()),
                // The connection dropped and sqlx reconnected: changes may have been missed.
                Ok(None) => {
                    tracing::warn!("cache listener reconnected");
                    CacheNotice::Reconnected
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache listener lost its connection");
                    self.listener = None;
                    CacheNotice::Disconnected
                }
            };
        }
    }
}

impl Db {
    /// Listens on [`CACHE_CHANNEL`] on a connection of its own (not one of
    /// the pool's), for as long as the stream is kept. The first notice is
    /// [`CacheNotice::Connected`] once the first connection is up.
    pub fn cache_notices(&self) -> impl Stream<Item = CacheNotice> + Send + 'static {
        let state = Listening {
            db: self.clone(),
            listener: None,
            connected_before: false,
            backoff: FIRST_BACKOFF,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            let notice = state.next().await;
            Some((notice, state))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_by_table() {
        let (org, id) = (Uuid::new_v4(), Uuid::new_v4());
        let payload = |table: &str| {
            format!(r#"{{"table":"{table}","op":"UPDATE","org_id":"{org}","id":"{id}"}}"#)
        };
        assert_eq!(
            CacheNotice::from_payload(&payload("api_keys")),
            CacheNotice::ApiKey { org_id: org, id }
        );
        assert_eq!(
            CacheNotice::from_payload(&payload("provider_keys")),
            CacheNotice::Provider { org_id: org, id }
        );
        assert_eq!(
            CacheNotice::from_payload(&payload("organizations")),
            CacheNotice::Org { org_id: org }
        );
        // An endpoint's change is its provider's.
        let provider = Uuid::new_v4();
        assert_eq!(
            CacheNotice::from_payload(&format!(
                r#"{{"table":"provider_endpoints","op":"DELETE","org_id":"{org}","id":"{id}","provider_key_id":"{provider}"}}"#
            )),
            CacheNotice::Provider {
                org_id: org,
                id: provider
            }
        );
        for odd in [
            payload("users"),
            payload("provider_endpoints"),
            "{}".into(),
            "not json".into(),
        ] {
            assert_eq!(CacheNotice::from_payload(&odd), CacheNotice::Unknown);
        }
    }
}
