//! The route table: the single place a route is declared. [`register`] mounts
//! it on actix-web and [`crate::openapi::document`] describes it, so the
//! server and its OpenAPI document cannot disagree.

use actix_web::http::Method;
use actix_web::{web, HttpResponse, Scope};
use storage::domain::{Role, PROVIDER_NAME_MAX_LEN, PROVIDER_NAME_PATTERN};

use crate::error::ApiError;
use crate::handlers::{
    api_keys, auth, endpoints, invitations, members, ops, orgs, providers, sessions, ui, usage,
};
use crate::input::{
    FILTER_MAX_LEN, GROUP_BY_NAMES, LOG_PAGE_MAX, PAGE_MAX, STATUS_MAX, STATUS_MIN,
};
use crate::oidc;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Any signed-in user.
    Session,
    /// A member of `{org_id}` with at least this role.
    Org(Role),
}

/// Type of a query parameter, for the document.
#[derive(Debug, Clone, Copy)]
pub enum ParamType {
    Uuid,
    DateTime,
    Integer {
        min: u32,
        max: u32,
    },
    /// Free text of 1 to `max_len` bytes, compared, never interpreted.
    Text {
        max_len: usize,
    },
    /// A string matching `pattern`, at most `max_len` characters.
    Pattern {
        pattern: &'static str,
        max_len: usize,
    },
    /// An opaque `next_cursor` value: never empty.
    Cursor,
    Enum(&'static [&'static str]),
}

/// A query parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub ty: ParamType,
    pub description: &'static str,
}

/// One route: what the server mounts and the document describes.
pub struct Route {
    pub method: Method,
    /// The full path; `{name}` segments are UUIDs.
    pub path: &'static str,
    pub operation_id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub query: &'static [Param],
    /// Component schema of the JSON body, if the route takes one.
    pub body: Option<&'static str>,
    /// Success status and the component schema of its body.
    pub ok: (u16, Option<&'static str>),
    /// Error statuses beyond those implied by `access`, `body` and the path.
    pub errors: &'static [u16],
    /// Attaches the handler to a route already guarded by `method`.
    pub handler: fn(actix_web::Route) -> actix_web::Route,
}

impl Route {
    /// Every error status the route can answer, ascending.
    pub fn error_statuses(&self) -> Vec<u16> {
        let mut s = vec![500, 503];
        // A browser's cookie-authenticated write (or login/signup) from another
        // origin gets 403 `csrf_failed` (crate::browser).
        if !matches!(self.method, Method::GET | Method::HEAD) {
            s.push(403);
        }
        if self.body.is_some() {
            s.extend([400, 408, 413, 422]);
        }
        // Query strings are read leniently (any bytes make pairs): a bad one is
        // a 422 naming the parameter, never a 400.
        if !self.query.is_empty() {
            s.push(422);
        }
        match self.access {
            Access::Public => {}
            Access::Session => s.push(401),
            Access::Org(role) => {
                s.extend([401, 404]);
                if role > Role::Member {
                    s.push(403);
                }
            }
        }
        if self.path.matches('{').count() > 0 {
            s.push(404);
        }
        s.extend(self.errors);
        s.sort_unstable();
        s.dedup();
        s
    }
}

const PAGE: [Param; 2] = [
    Param {
        name: "cursor",
        ty: ParamType::Cursor,
        description: "`next_cursor` of the previous page; any other value answers 422",
    },
    Param {
        name: "limit",
        ty: ParamType::Integer {
            min: 1,
            max: PAGE_MAX,
        },
        description: "page size (default 50)",
    },
];

/// Filters the request log and the usage report share.
const API_KEY_FILTER: Param = Param {
    name: "api_key_id",
    ty: ParamType::Uuid,
    description: "only requests made with this API key",
};

const PROVIDER_FILTER: Param = Param {
    name: "provider",
    ty: ParamType::Pattern {
        pattern: PROVIDER_NAME_PATTERN,
        max_len: PROVIDER_NAME_MAX_LEN,
    },
    description: "only requests routed to this provider name",
};

const LOG_QUERY: [Param; 7] = [
    API_KEY_FILTER,
    PROVIDER_FILTER,
    Param {
        name: "status",
        ty: ParamType::Integer {
            min: STATUS_MIN as u32,
            max: STATUS_MAX as u32,
        },
        description: "only requests answered with this HTTP status",
    },
    Param {
        name: "from",
        ty: ParamType::DateTime,
        description: "only requests at or after this time; must not be after `to` (else 422)",
    },
    Param {
        name: "to",
        ty: ParamType::DateTime,
        description: "only requests before this time",
    },
    PAGE[0],
    Param {
        name: "limit",
        ty: ParamType::Integer {
            min: 1,
            max: LOG_PAGE_MAX,
        },
        description: "page size (default 50)",
    },
];

const USAGE_QUERY: [Param; 7] = [
    Param {
        name: "from",
        ty: ParamType::DateTime,
        description: "start of the window, inclusive (default: 30 days before `to`); must not be after `to` (else 422)",
    },
    Param {
        name: "to",
        ty: ParamType::DateTime,
        description: "end of the window, exclusive (default: the end of the current UTC hour). Whole UTC hours are read from hourly rollups; the partial hours at either edge from the rows",
    },
    Param {
        name: "group_by",
        ty: ParamType::Enum(&GROUP_BY_NAMES),
        description: "bucket (default `day`, UTC)",
    },
    Param {
        name: "model",
        ty: ParamType::Text { max_len: FILTER_MAX_LEN },
        description: "only requests for this `{customName}/{modelName}`",
    },
    PROVIDER_FILTER,
    API_KEY_FILTER,
    Param {
        name: "endpoint",
        ty: ParamType::Text { max_len: FILTER_MAX_LEN },
        description: "only requests to this endpoint (the path after /v1/, e.g. `chat/completions`, `embeddings`)",
    },
];

const REMOVE_MEMBER_QUERY: [Param; 1] = [Param {
    name: "transfer_api_keys_to",
    ty: ParamType::Uuid,
    description: "a remaining member who takes over the removed member's API keys instead of their being revoked",
}];

const MEMBER: Access = Access::Org(Role::Member);
const ADMIN: Access = Access::Org(Role::Admin);
const OWNER: Access = Access::Org(Role::Owner);

/// Every route the server answers.
pub fn routes() -> Vec<Route> {
    vec![
        Route {
            method: Method::GET,
            path: "/healthz",
            operation_id: "healthz",
            tag: "operations",
            summary: "Liveness: the process is up",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, Some("Status")),
            errors: &[],
            handler: |r| r.to(ops::healthz),
        },
        Route {
            method: Method::GET,
            path: "/readyz",
            operation_id: "readyz",
            tag: "operations",
            summary: "Readiness: the database answers (503 database_unavailable otherwise)",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, Some("Status")),
            errors: &[],
            handler: |r| r.to(ops::readyz),
        },
        Route {
            method: Method::GET,
            path: "/api/openapi.json",
            operation_id: "openapi",
            tag: "operations",
            summary: "This OpenAPI 3 document",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, None),
            errors: &[],
            handler: |r| r.to(ops::openapi),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/auth/signup",
            operation_id: "signup",
            tag: "auth",
            summary: "Create an account and a session (403 signup_disabled when LLMGW_ALLOW_SIGNUP=false)",
            access: Access::Public,
            query: &[],
            body: Some("Signup"),
            ok: (201, Some("Session")),
            errors: &[403, 409, 429],
            handler: |r| r.to(auth::signup),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/auth/login",
            operation_id: "login",
            tag: "auth",
            summary: "Exchange email and password for a bearer session token",
            access: Access::Public,
            query: &[],
            body: Some("Login"),
            ok: (200, Some("Session")),
            errors: &[401, 403, 429],
            handler: |r| r.to(auth::login),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/auth/oidc/start",
            operation_id: "oidcStart",
            tag: "auth",
            summary: "Single sign-on: 302 to the OpenID provider (optional `login_hint` is passed on); 404 sso_not_configured without LLMGW_OIDC_ISSUER; an HTML 502 page when the issuer cannot be reached",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (302, None),
            errors: &[404, 422, 429],
            handler: |r| r.to(oidc::start),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/auth/oidc/callback",
            operation_id: "oidcCallback",
            tag: "auth",
            summary: "Single sign-on: the provider's redirect back (`code`, `state`); answers an HTML page that sets the session cookie, or an HTML 400/403/502 page saying why not",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, None),
            errors: &[404],
            handler: |r| r.to(oidc::callback),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/auth/oidc/link",
            operation_id: "oidcLink",
            tag: "auth",
            summary: "Single sign-on: link the identity to the existing account with the same verified email once its password is re-entered (form: `link_id`, `password`); answers an HTML page (200 signed in; 400/401/422/429 saying why not)",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, None),
            errors: &[404, 413],
            handler: |r| r.to(oidc::link),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/auth/config",
            operation_id: "authConfig",
            tag: "auth",
            summary: "How this server signs people in (password, SSO, signup) and the gateway URL the admin UI shows",
            access: Access::Public,
            query: &[],
            body: None,
            ok: (200, Some("AuthConfig")),
            errors: &[],
            handler: |r| r.to(ui::auth_config),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/auth/logout",
            operation_id: "logout",
            tag: "auth",
            summary: "End this session; its token stops working at once",
            access: Access::Session,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[],
            handler: |r| r.to(auth::logout),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/me",
            operation_id: "me",
            tag: "auth",
            summary: "The signed-in user",
            access: Access::Session,
            query: &[],
            body: None,
            ok: (200, Some("User")),
            errors: &[],
            handler: |r| r.to(auth::me),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/me/sessions",
            operation_id: "signOutEverywhere",
            tag: "auth",
            summary: "End every session of the signed-in user, this one included",
            access: Access::Session,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[],
            handler: |r| r.to(sessions::sign_out_everywhere),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/me/invitations",
            operation_id: "myInvitations",
            tag: "members",
            summary: "Pending, unexpired invitations addressed to the signed-in user's email (no tokens)",
            access: Access::Session,
            query: &[],
            body: None,
            ok: (200, Some("InvitationList")),
            errors: &[],
            handler: |r| r.to(invitations::mine),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/me/invitations/{id}/accept",
            operation_id: "acceptInvitation",
            tag: "members",
            summary: "Join the organization with the invitation's token; answers the organization. \
                Unknown, expired, someone else's and wrong-token invitations all answer 404; \
                409 when already a member",
            access: Access::Session,
            query: &[],
            body: Some("InvitationAccept"),
            ok: (200, Some("Org")),
            errors: &[409],
            handler: |r| r.to(invitations::accept),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs",
            operation_id: "createOrg",
            tag: "organizations",
            summary: "Create an organization; the caller becomes its owner",
            access: Access::Session,
            query: &[],
            body: Some("OrgInput"),
            ok: (201, Some("Org")),
            errors: &[],
            handler: |r| r.to(orgs::create),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs",
            operation_id: "listOrgs",
            tag: "organizations",
            summary: "The organizations the caller belongs to",
            access: Access::Session,
            query: &[],
            body: None,
            ok: (200, Some("OrgList")),
            errors: &[],
            handler: |r| r.to(orgs::list),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}",
            operation_id: "getOrg",
            tag: "organizations",
            summary: "An organization, with the caller's role",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("Org")),
            errors: &[],
            handler: |r| r.to(orgs::get),
        },
        Route {
            method: Method::PATCH,
            path: "/api/v1/orgs/{org_id}",
            operation_id: "renameOrg",
            tag: "organizations",
            summary: "Rename an organization (admin or owner); set its limits, which every key shares (owner only: 403 for an admin)",
            access: ADMIN,
            query: &[],
            body: Some("OrgPatch"),
            ok: (200, Some("Org")),
            errors: &[],
            handler: |r| r.to(orgs::update),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}",
            operation_id: "deleteOrg",
            tag: "organizations",
            summary: "Delete an organization and everything it owns (owner)",
            access: OWNER,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[],
            handler: |r| r.to(orgs::delete),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/members",
            operation_id: "listMembers",
            tag: "members",
            summary: "The organization's members",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("MemberList")),
            errors: &[],
            handler: |r| r.to(members::list),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs/{org_id}/members",
            operation_id: "inviteMember",
            tag: "members",
            summary: "Invite an email with a role (owner); the answer holds the invitation token, shown this once, \
                for the inviter to pass on. Same answer whether or not the email has an account; \
                409 when it belongs to a member or has a pending invitation",
            access: OWNER,
            query: &[],
            body: Some("Invite"),
            ok: (201, Some("InvitationCreated")),
            errors: &[409],
            handler: |r| r.to(members::invite),
        },
        Route {
            method: Method::PATCH,
            path: "/api/v1/orgs/{org_id}/members/{user_id}",
            operation_id: "setMemberRole",
            tag: "members",
            summary: "Change a member's role (owner); the last owner cannot be demoted",
            access: OWNER,
            query: &[],
            body: Some("MemberPatch"),
            ok: (200, Some("Member")),
            errors: &[409],
            handler: |r| r.to(members::set_role),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}/members/{user_id}",
            operation_id: "removeMember",
            tag: "members",
            summary: "Remove a member (owner), or leave (any member removing themselves); the last owner cannot leave. \
                The API keys the member created are revoked in the same transaction, unless \
                `transfer_api_keys_to` names a remaining member who takes them over",
            access: MEMBER,
            query: &REMOVE_MEMBER_QUERY,
            body: None,
            ok: (200, Some("MemberRemoved")),
            errors: &[403, 409],
            handler: |r| r.to(members::remove),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/invitations",
            operation_id: "listInvitations",
            tag: "members",
            summary: "The organization's pending invitations, expired ones included (admin)",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (200, Some("InvitationList")),
            errors: &[],
            handler: |r| r.to(invitations::list),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/invitations/{id}",
            operation_id: "getInvitation",
            tag: "members",
            summary: "One pending invitation (admin); never its token",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (200, Some("Invitation")),
            errors: &[],
            handler: |r| r.to(invitations::get),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}/invitations/{id}",
            operation_id: "deleteInvitation",
            tag: "members",
            summary: "Cancel a pending invitation (owner); its token stops working at once",
            access: OWNER,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[],
            handler: |r| r.to(invitations::delete),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/provider-keys",
            operation_id: "listProviderKeys",
            tag: "provider keys",
            summary: "The organization's custom providers (tokens masked)",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("ProviderKeyList")),
            errors: &[],
            handler: |r| r.to(providers::list),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs/{org_id}/provider-keys",
            operation_id: "createProviderKey",
            tag: "provider keys",
            summary: "Register a custom provider (admin)",
            access: ADMIN,
            query: &[],
            body: Some("ProviderKeyCreate"),
            ok: (201, Some("ProviderKey")),
            errors: &[409],
            handler: |r| r.to(providers::create),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}",
            operation_id: "getProviderKey",
            tag: "provider keys",
            summary: "One custom provider (token masked)",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("ProviderKey")),
            errors: &[],
            handler: |r| r.to(providers::get),
        },
        Route {
            method: Method::PATCH,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}",
            operation_id: "updateProviderKey",
            tag: "provider keys",
            summary: "Change a provider's name, base URL, token, status, prices, headers or timeouts (admin)",
            access: ADMIN,
            query: &[],
            body: Some("ProviderKeyPatch"),
            ok: (200, Some("ProviderKey")),
            errors: &[409],
            handler: |r| r.to(providers::update),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}",
            operation_id: "deleteProviderKey",
            tag: "provider keys",
            summary: "Delete a provider (admin)",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[],
            handler: |r| r.to(providers::delete),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}/test",
            operation_id: "testProviderKey",
            tag: "provider keys",
            summary: "Call the provider's /v1/models with its token; report reachability, status, latency, model count (admin)",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (200, Some("ProviderTest")),
            errors: &[],
            handler: |r| r.to(providers::test),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints",
            operation_id: "listProviderEndpoints",
            tag: "provider keys",
            summary: "A provider's endpoints, its own first (tokens masked), with their weight and health",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("ProviderEndpointList")),
            errors: &[],
            handler: |r| r.to(endpoints::list),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints",
            operation_id: "createProviderEndpoint",
            tag: "provider keys",
            summary: "Add an endpoint (base URL, token, weight) to a provider (admin)",
            access: ADMIN,
            query: &[],
            body: Some("ProviderEndpointCreate"),
            ok: (201, Some("ProviderEndpoint")),
            errors: &[],
            handler: |r| r.to(endpoints::create),
        },
        Route {
            method: Method::PATCH,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}",
            operation_id: "updateProviderEndpoint",
            tag: "provider keys",
            summary: "Change an endpoint's base URL, token or weight (admin); the provider's own endpoint is the provider's base_url and token",
            access: ADMIN,
            query: &[],
            body: Some("ProviderEndpointPatch"),
            ok: (200, Some("ProviderEndpoint")),
            errors: &[],
            handler: |r| r.to(endpoints::update),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}",
            operation_id: "deleteProviderEndpoint",
            tag: "provider keys",
            summary: "Remove an endpoint (admin); the provider's own answers 409 own_endpoint (a provider keeps one)",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (204, None),
            errors: &[409],
            handler: |r| r.to(endpoints::delete),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/api-keys",
            operation_id: "listApiKeys",
            tag: "api keys",
            summary: "The organization's gateway API keys, newest first (never the keys themselves)",
            access: MEMBER,
            query: &PAGE,
            body: None,
            ok: (200, Some("ApiKeyList")),
            errors: &[],
            handler: |r| r.to(api_keys::list),
        },
        Route {
            method: Method::POST,
            path: "/api/v1/orgs/{org_id}/api-keys",
            operation_id: "createApiKey",
            tag: "api keys",
            summary: "Create a gateway API key; the answer holds the key, shown this once (admin)",
            access: ADMIN,
            query: &[],
            body: Some("ApiKeyCreate"),
            ok: (201, Some("ApiKeyCreated")),
            errors: &[],
            handler: |r| r.to(api_keys::create),
        },
        Route {
            method: Method::DELETE,
            path: "/api/v1/orgs/{org_id}/api-keys/{id}",
            operation_id: "revokeApiKey",
            tag: "api keys",
            summary: "Revoke a gateway API key (admin); idempotent",
            access: ADMIN,
            query: &[],
            body: None,
            ok: (200, Some("ApiKey")),
            errors: &[],
            handler: |r| r.to(api_keys::revoke),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/api-keys/{id}",
            operation_id: "getApiKey",
            tag: "api keys",
            summary: "One gateway API key (never the key itself)",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("ApiKey")),
            errors: &[],
            handler: |r| r.to(api_keys::get),
        },
        Route {
            method: Method::PATCH,
            path: "/api/v1/orgs/{org_id}/api-keys/{id}",
            operation_id: "updateApiKey",
            tag: "api keys",
            summary: "Edit a key's name, expiry, limits and allowed models without reissuing it (admin)",
            access: ADMIN,
            query: &[],
            body: Some("ApiKeyPatch"),
            ok: (200, Some("ApiKey")),
            errors: &[],
            handler: |r| r.to(api_keys::update),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/api-keys/{id}/limits",
            operation_id: "apiKeyLimits",
            tag: "api keys",
            summary: "Every limit that applies to the key, its own and its organization's, with consumption \
                (`used` and `remaining` are null while the API has no view of the limiter's counters)",
            access: MEMBER,
            query: &[],
            body: None,
            ok: (200, Some("LimitStates")),
            errors: &[],
            handler: |r| r.to(api_keys::limits),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/logs",
            operation_id: "listLogs",
            tag: "usage",
            summary: "The organization's gateway requests, newest first, filtered",
            access: MEMBER,
            query: &LOG_QUERY,
            body: None,
            ok: (200, Some("RequestLogList")),
            errors: &[],
            handler: |r| r.to(usage::logs),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/usage",
            operation_id: "usage",
            tag: "usage",
            summary: "Requests, errors, tokens and p50/p95 latency, grouped",
            access: MEMBER,
            query: &USAGE_QUERY,
            body: None,
            ok: (200, Some("Usage")),
            errors: &[],
            handler: |r| r.to(usage::usage),
        },
        Route {
            method: Method::GET,
            path: "/api/v1/orgs/{org_id}/audit-log",
            operation_id: "auditLog",
            tag: "audit",
            summary: "Who changed what, when, newest first (admin)",
            access: ADMIN,
            query: &PAGE,
            body: None,
            ok: (200, Some("AuditList")),
            errors: &[],
            handler: |r| r.to(usage::audit_log),
        },
    ]
}

/// Mounts the routes on `scope`, one resource per path, so a known path with
/// another method answers 405 in the API's error shape, with `Allow`.
pub fn register(mut scope: Scope, routes: &[Route]) -> Scope {
    let mut paths: Vec<&str> = Vec::new();
    for r in routes {
        if !paths.contains(&r.path) {
            paths.push(r.path);
        }
    }
    for path in paths {
        let allow = routes
            .iter()
            .filter(|r| r.path == path)
            .map(|r| r.method.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let method_not_allowed = move || {
            let allow = allow.clone();
            async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow)) }
        };
        let mut resource = web::resource(path).default_service(web::to(method_not_allowed));
        for r in routes.iter().filter(|r| r.path == path) {
            resource = resource.route((r.handler)(web::route().method(r.method.clone())));
        }
        scope = scope.service(resource);
    }
    scope
}
