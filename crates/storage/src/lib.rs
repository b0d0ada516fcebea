//! Storage for llmgw: PostgreSQL access (sqlx), migrations, the domain types
//! parsed at the edge, and the handling of secrets (sealed provider tokens,
//! digested API keys, argon2id passwords).

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod embedded;
pub mod error;
pub mod identities;
pub mod invitations;
pub mod limits;
pub mod logs;
pub mod orgs;
pub mod page;
pub mod providers;
pub mod secrets;

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
