//! Extractors that authenticate the caller and check permissions before a
//! handler runs, so a handler's signature says who may call it.
//!
//! Body, query and id extractors never fail on their own: they keep their
//! error for the handler to return after the permission check, so the answer
//! to an unauthorized caller (401/404/403) never depends on the body sent.

use std::future::{ready, Ready};
use std::marker::PhantomData;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use storage::accounts::User;
use storage::domain::Role;
use storage::orgs::Org;
use storage::secrets::SessionToken;
use storage::Actor;
use uuid::Uuid;

use crate::error::ApiError;
use crate::input::{Fields, FromFields};
use crate::State;

fn state(req: &HttpRequest) -> Result<web::Data<State>, ApiError> {
    req.app_data::<web::Data<State>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("api state is not registered"))
}

/// The session token: `Authorization: Bearer <token>` when the header is
/// present (the cookie is then ignored, valid bearer or not), else the
/// `llmgw_session` cookie, which [`crate::browser::csrf`] has vetted for
/// unsafe methods.
fn bearer(req: &HttpRequest) -> Option<SessionToken> {
    match req.headers().get(header::AUTHORIZATION) {
        Some(_) => bearer_header(req),
        None => crate::browser::cookie_token(req),
    }
}

fn bearer_header(req: &HttpRequest) -> Option<SessionToken> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
        .then(|| SessionToken::from_presented(token))
}

/// A caller with a valid session: not expired, not idle longer than
/// `LLMGW_SESSION_IDLE_MINUTES`.
pub struct Session {
    pub user: User,
    /// Digest of the presented token (what logout deletes).
    pub token_digest: [u8; 32],
}

async fn authenticate(state: &State, token: Option<SessionToken>) -> Result<Session, ApiError> {
    let token = token.ok_or(ApiError::Unauthorized)?;
    let token_digest = token.digest();
    let user = state
        .db
        .session_user(&token_digest, state.cfg.session_idle)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    Ok(Session { user, token_digest })
}

impl FromRequest for Session {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = state(req);
        let token = bearer(req);
        Box::pin(async move {
            let state = state?;
            authenticate(&state, token).await
        })
    }
}

/// The least role a route needs, as a type: `OrgAccess<role::Admin>`.
pub trait MinRole {
    const ROLE: Role;
}

/// Role markers for [`OrgAccess`].
pub mod role {
    use super::{MinRole, Role};

    /// Any member: reads.
    pub struct Member;
    /// Admins and owners: manage provider and API keys, read the audit log.
    pub struct Admin;
    /// Owners: manage members, delete the organization.
    pub struct Owner;

    impl MinRole for Member {
        const ROLE: Role = Role::Member;
    }
    impl MinRole for Admin {
        const ROLE: Role = Role::Admin;
    }
    impl MinRole for Owner {
        const ROLE: Role = Role::Owner;
    }
}

/// A session whose user is a member of `{org_id}` with at least role `R`.
///
/// Refuses before the handler runs: 401 without a session; 404 when the id is
/// malformed, the org does not exist or the caller is not a member (the three
/// are indistinguishable); 403 when the caller's role is below `R`.
pub struct OrgAccess<R> {
    pub user: User,
    /// The organization, with the caller's role.
    pub org: Org,
    _role: PhantomData<R>,
}

impl<R> OrgAccess<R> {
    pub fn org_id(&self) -> Uuid {
        self.org.id
    }

    pub fn role(&self) -> Role {
        self.org.role
    }

    /// The caller, as recorded in the audit log.
    pub fn actor(&self) -> Actor {
        Actor(Some(self.user.id))
    }
}

impl<R: MinRole + 'static> FromRequest for OrgAccess<R> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = state(req);
        let token = bearer(req);
        let org_id = req
            .match_info()
            .get("org_id")
            .and_then(|s| Uuid::parse_str(s).ok());
        Box::pin(async move {
            let state = state?;
            let session = authenticate(&state, token).await?;
            let org_id = org_id.ok_or(ApiError::NotFound)?;
            let org = state.db.org_for_member(org_id, session.user.id).await?;
            if org.role < R::ROLE {
                return Err(ApiError::Forbidden(R::ROLE));
            }
            Ok(Self {
                user: session.user,
                org,
                _role: PhantomData,
            })
        })
    }
}

/// The resource id of the path (`{id}`, or `{user_id}` for members); a
/// malformed one is reported as not found.
pub struct ItemId(Option<Uuid>);

impl ItemId {
    pub fn get(&self) -> Result<Uuid, ApiError> {
        self.0.ok_or(ApiError::NotFound)
    }
}

impl FromRequest for ItemId {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let info = req.match_info();
        let raw = info.get("id").or_else(|| info.get("user_id"));
        ready(Ok(Self(raw.and_then(|s| Uuid::parse_str(s).ok()))))
    }
}

/// The `{endpoint_id}` of the path; a malformed one is reported as not found.
pub struct EndpointId(Option<Uuid>);

impl EndpointId {
    pub fn get(&self) -> Result<Uuid, ApiError> {
        self.0.ok_or(ApiError::NotFound)
    }
}

impl FromRequest for EndpointId {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let raw = req.match_info().get("endpoint_id");
        ready(Ok(Self(raw.and_then(|s| Uuid::parse_str(s).ok()))))
    }
}

/// A JSON body parsed into `T` (see [`crate::input`]); its error, if any, is
/// returned by [`Input::into_inner`].
pub struct Input<T>(Result<T, ApiError>);

impl<T> Input<T> {
    pub fn into_inner(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: FromFields + 'static> FromRequest for Input<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = state(req).map(|s| s.cfg.max_body_bytes).unwrap_or_default();
        // Reads up to the limit set with `web::PayloadConfig`.
        let body = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let parsed = match body.await {
                Ok(bytes) => Fields::parse_body(&bytes),
                Err(e) => Err(match e.as_error::<PayloadError>() {
                    Some(PayloadError::Overflow) => ApiError::PayloadTooLarge(limit),
                    _ => ApiError::BadRequest("the request body could not be read".into()),
                }),
            };
            Ok(Self(parsed))
        })
    }
}

/// Query-string parameters parsed into `T`; the error is kept like [`Input`]'s.
pub struct Query<T>(Result<T, ApiError>);

impl<T> Query<T> {
    pub fn into_inner(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: FromFields> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let parsed = match web::Query::<Vec<(String, String)>>::from_query(req.query_string()) {
            Ok(q) => Fields::parse_query(q.into_inner()),
            Err(_) => Err(ApiError::BadRequest("the query string is malformed".into())),
        };
        ready(Ok(Self(parsed)))
    }
}
