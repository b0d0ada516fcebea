use crate::crypto::CryptoError;
use crate::domain::{Role, ValidationError};

/// What can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A unique constraint refused the write; names what is duplicated.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("not found")]
    NotFound,
    #[error("the organization must keep at least one owner")]
    LastOwner,
    /// The endpoint is the provider's own (its base URL and token): it goes
    /// only with the provider.
    #[error("the provider's own endpoint cannot be deleted")]
    OwnEndpoint,
    /// The caller's role no longer allows the change (checked again inside
    /// the transaction, after the request's own check).
    #[error("role {} or higher required", .0.as_str())]
    RoleTooLow(Role),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The change breaks a rule that needs the stored rows to check (a new
    /// base URL without its token, a user who is not a member).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Self::Unavailable(e),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                let what = match db.constraint() {
                    Some("provider_keys_org_name_key") => "a provider with this name",
                    Some("users_email_lower_key") => "an account with this email",
                    Some("memberships_pkey") => "this member",
                    _ => "a record with these values",
                };
                Self::Conflict(what)
            }
            // A referenced row is gone: typically the organization was deleted
            // while the request was in flight.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => Self::NotFound,
            // 57P01..57P03: admin shutdown / cannot connect now; 08xxx: connection errors.
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) =>
            {
                Self::Unavailable(e)
            }
            _ => Self::Database(e),
        }
    }
}

impl StorageError {
    /// True when the database could not be reached (callers answer 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// True when the pool was closed (the process is shutting down): no
    /// retry can succeed.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Unavailable(sqlx::Error::PoolClosed))
    }

    /// A database call that the caller gave up waiting for: unavailable,
    /// like a pool that found no connection in time.
    pub fn timed_out() -> Self {
        Self::Unavailable(sqlx::Error::PoolTimedOut)
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
