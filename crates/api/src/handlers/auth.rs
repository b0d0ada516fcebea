//! Accounts and sessions.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use storage::accounts::User;
use storage::domain::Email;
use storage::secrets::{hash_password, verify_password, SessionToken};

use crate::error::ApiError;
use crate::extract::{Input, Session};
use crate::input::{Login, Signup};
use crate::State;

/// A new session; the only answer that carries a session token.
#[derive(Serialize)]
struct NewSession {
    token: String,
    expires_at: DateTime<Utc>,
    user: User,
}

fn session_expiry(state: &State) -> Result<DateTime<Utc>, ApiError> {
    let ttl = chrono::Duration::from_std(state.cfg.session_ttl).map_err(ApiError::internal)?;
    Ok(Utc::now() + ttl)
}

async fn start_session(state: &State, user: User) -> Result<NewSession, ApiError> {
    let token = SessionToken::generate();
    let expires_at = session_expiry(state)?;
    state
        .db
        .create_session(user.id, &token.digest(), expires_at)
        .await?;
    Ok(NewSession {
        token: token.expose_secret().to_owned(),
        expires_at,
        user,
    })
}

pub async fn signup(
    state: web::Data<State>,
    input: Input<Signup>,
) -> Result<HttpResponse, ApiError> {
    if !state.cfg.allow_signup {
        return Err(ApiError::SignupDisabled);
    }
    let Signup { email, password } = input.into_inner()?;
    // argon2id is CPU-heavy: keep it off the async workers.
    let hash = tokio::task::spawn_blocking(move || hash_password(&password)).await?;
    let token = SessionToken::generate();
    let expires_at = session_expiry(&state)?;
    let user = state
        .db
        .create_user_with_session(&email, &hash, &token.digest(), expires_at)
        .await?;
    Ok(HttpResponse::Created().json(NewSession {
        token: token.expose_secret().to_owned(),
        expires_at,
        user,
    }))
}

/// Unknown email, malformed email and wrong password all take a full argon2
/// verification and get the same 401.
pub async fn login(state: web::Data<State>, input: Input<Login>) -> Result<HttpResponse, ApiError> {
    let Login { email, password } = input.into_inner()?;
    let creds = match Email::parse(&email) {
        Ok(email) => state.db.user_credentials(&email).await?,
        Err(_) => None,
    };
    let (user, hash) = match creds {
        Some(c) => (
            Some(User {
                id: c.id,
                email: c.email,
            }),
            Some(c.password_hash),
        ),
        None => (None, None),
    };
    let ok =
        tokio::task::spawn_blocking(move || verify_password(hash.as_deref(), &password)).await?;
    match user {
        Some(user) if ok => Ok(HttpResponse::Ok().json(start_session(&state, user).await?)),
        _ => Err(ApiError::InvalidCredentials),
    }
}

pub async fn logout(state: web::Data<State>, session: Session) -> Result<HttpResponse, ApiError> {
    state.db.delete_session(&session.token_digest).await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn me(session: Session) -> HttpResponse {
    HttpResponse::Ok().json(session.user)
}
