//! Storage for llmgw: PostgreSQL access (sqlx) and migrations. The domain
//! types, secrets, token envelope and cursors live in the `domain` crate
//! (no sqlx); they are re-exported here at their old paths.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod db;
pub mod embedded;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod identities;
pub mod invitations;
pub mod limits;
pub mod logs;
pub mod orgs;
pub mod partitions;
pub mod providers;
pub mod responses;
pub mod sso;

pub use ::domain;
pub use ::domain::{crypto, page, secrets};

pub use audit::Actor;
pub use crypto::Keyring;
pub use db::{Db, PoolConfig, MIGRATOR};
pub use error::{Result, StorageError};
pub use events::{CacheEvent, CacheNotice, CACHE_CHANNEL};
