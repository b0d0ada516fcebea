//! Storage for llmgw: PostgreSQL access (sqlx) and migrations. The domain
//! types, secrets, token envelope and cursors live in the `domain` crate
//! (no sqlx); they are re-exported here at their old paths.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod db;
pub mod embedded;
pub mod error;
pub mod identities;
pub mod invitations;
pub mod logs;
pub mod orgs;
pub mod providers;

pub use ::domain;
pub use ::domain::{crypto, page, secrets};

pub use audit::Actor;
pub use crypto::Keyring;
pub use db::{Db, PoolConfig, MIGRATOR};
pub use error::{Result, StorageError};

/// PostgreSQL channel on which changes to providers and API keys are announced.
/// Payload: `{"table":"provider_keys"|"api_keys","op":"INSERT"|"UPDATE"|"DELETE","org_id":…,"id":…}`.
pub const CACHE_CHANNEL: &str = "llmgw_cache";

/// A decoded `llmgw_cache` notification.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
pub struct CacheEvent {
    pub table: String,
    pub op: String,
    pub org_id: uuid::Uuid,
    pub id: uuid::Uuid,
}
