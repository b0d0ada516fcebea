//! Accounts and sessions.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use storage::accounts::User;
use storage::domain::Email;
use storage::secrets::SessionToken;

use crate::browser;
use crate::error::ApiError;
use crate::extract::{Input, Session};
use crate::input::{Login, Signup};
use crate::throttle::client_ip;
use crate::State;

/// A new session; the only answer that carries a session token.
#[derive(Serialize)]
pub(crate) struct NewSession {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub user: User,
}

/// The JSON answer plus the browser's `llmgw_session` cookie with the same token.
fn session_answer(
    state: &State,
    mut res: actix_web::HttpResponseBuilder,
    session: NewSession,
) -> HttpResponse {
    let max_age = state.cfg.session_ttl.as_secs().min(i64::MAX as u64) as i64;
    res.insert_header((
        header::SET_COOKIE,
        browser::set_cookie(&state.cfg.browser, &session.token, max_age),
    ))
    .json(session)
}

pub(crate) fn session_expiry(state: &State) -> Result<DateTime<Utc>, ApiError> {
    let ttl = chrono::Duration::from_std(state.cfg.session_ttl).map_err(ApiError::internal)?;
    Ok(Utc::now() + ttl)
}

pub(crate) async fn start_session(state: &State, user: User) -> Result<NewSession, ApiError> {
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

/// Counts the attempt against the client address before anything else, so
/// a flood of malformed or unknown-account requests is throttled too.
fn throttle_address(state: &State, req: &HttpRequest) -> Result<(), ApiError> {
    state
        .throttle
        .check_address(client_ip(req, &state.cfg.trusted_proxies))
}

pub async fn signup(
    state: web::Data<State>,
    req: HttpRequest,
    input: Input<Signup>,
) -> Result<HttpResponse, ApiError> {
    if !state.sso.password_login {
        return Err(ApiError::PasswordLoginDisabled);
    }
    if !state.cfg.allow_signup {
        return Err(ApiError::SignupDisabled);
    }
    throttle_address(&state, &req)?;
    let Signup { email, password } = input.into_inner()?;
    // argon2id runs on the bounded password pool, never on the async workers.
    // A refusal for a full pool does not spend the email's budget.
    let slot = state.passwords.reserve()?;
    state.throttle.check_email(email.as_str())?;
    let hash = slot.hash(password).await?;
    let token = SessionToken::generate();
    let expires_at = session_expiry(&state)?;
    let user = state
        .db
        .create_user_with_session(&email, &hash, &token.digest(), expires_at)
        .await?;
    let session = NewSession {
        token: token.expose_secret().to_owned(),
        expires_at,
        user,
    };
    Ok(session_answer(&state, HttpResponse::Created(), session))
}

/// Unknown email, malformed email and wrong password all take a full argon2
/// verification and get the same 401. Throttled per address and per email
/// (429), and refused with 503 `busy` when the password pool is full.
pub async fn login(
    state: web::Data<State>,
    req: HttpRequest,
    input: Input<Login>,
) -> Result<HttpResponse, ApiError> {
    if !state.sso.password_login {
        return Err(ApiError::PasswordLoginDisabled);
    }
    throttle_address(&state, &req)?;
    let Login { email, password } = input.into_inner()?;
    // Reserved before the lookup, for known and unknown emails alike: a
    // refusal costs no database work and says nothing about the account;
    // and before the email's throttle, so a user retrying on 503 `busy`
    // does not spend their budget.
    let slot = state.passwords.reserve()?;
    state.throttle.check_email(&email)?;
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
    let ok = slot.verify(hash, password).await?;
    match user {
        Some(user) if ok => {
            let session = start_session(&state, user).await?;
            Ok(session_answer(&state, HttpResponse::Ok(), session))
        }
        _ => Err(ApiError::InvalidCredentials),
    }
}

pub async fn logout(state: web::Data<State>, session: Session) -> Result<HttpResponse, ApiError> {
    state.db.delete_session(&session.token_digest).await?;
    Ok(HttpResponse::NoContent()
        .insert_header((
            header::SET_COOKIE,
            browser::clear_cookie(&state.cfg.browser),
        ))
        .finish())
}

pub async fn me(session: Session) -> HttpResponse {
    HttpResponse::Ok().json(session.user)
}
