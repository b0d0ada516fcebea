//! Request bodies and query strings, parsed field by field into domain types
//! so every refusal names its field and none echoes the value it refused
//! (a value may be a token or a password).

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{Map, Value};
use storage::domain::routing::{StaticHeaders, Timeouts, Weight};
use storage::domain::{
    parse_label, BaseUrl, Email, ProviderName, ProviderStatus, Role, ValidationError,
};
use storage::invitations::InvitationToken;
use storage::limits::{parse_allowed_models, Limits, ModelPattern, Prices};
use storage::logs::GroupBy;
use storage::page::Cursor;
use storage::secrets::{parse_new_password, ProviderToken};
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

/// A JSON object (or query string) being taken apart; collects every error.
pub struct Fields {
    map: Map<String, Value>,
    errors: Vec<FieldError>,
}

/// A type built from named string fields.
pub trait FromFields: Sized {
    /// Reads the fields; `None` when one was refused (the error is recorded).
    fn from_fields(f: &mut Fields) -> Option<Self>;
}

impl Fields {
    pub fn new(map: Map<String, Value>) -> Self {
        Self {
            map,
            errors: Vec::new(),
        }
    }

    /// Parses a JSON request body (an object).
    pub fn parse_body<T: FromFields>(bytes: &[u8]) -> Result<T, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            // Syntax errors carry only a position, never a piece of the input.
            ApiError::BadRequest(format!("the request body is not valid JSON ({e})"))
        })?;
        let Value::Object(map) = value else {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        };
        Self::new(map).build()
    }

    /// Parses `key=value` pairs of a query string.
    pub fn parse_query<T: FromFields>(pairs: Vec<(String, String)>) -> Result<T, ApiError> {
        let mut map = Map::new();
        let mut dup = Vec::new();
        for (k, v) in pairs {
            if map.insert(k.clone(), Value::String(v)).is_some() {
                dup.push(FieldError::new(k, "given more than once"));
            }
        }
        let mut f = Self::new(map);
        f.errors = dup;
        f.build()
    }

    fn build<T: FromFields>(mut self) -> Result<T, ApiError> {
        let value = T::from_fields(&mut self);
        let mut unknown: Vec<_> = self.map.keys().cloned().collect();
        unknown.sort();
        for k in unknown {
            self.errors.push(FieldError::new(k, "unknown field"));
        }
        if !self.errors.is_empty() {
            return Err(ApiError::Validation(self.errors));
        }
        value.ok_or_else(|| ApiError::internal("a field parser refused without recording an error"))
    }

    fn reject(&mut self, e: impl Into<FieldError>) -> Option<()> {
        self.errors.push(e.into());
        None
    }

    /// The field's string value: `Ok(None)` when absent or null.
    fn string(&mut self, name: &'static str) -> Result<Option<String>, ()> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => {
                self.errors
                    .push(FieldError::new(name, format!("{name} must be a string")));
                Err(())
            }
        }
    }

    /// The field's raw JSON value: `None` when absent, `Some(Null)` when null.
    fn raw(&mut self, name: &'static str) -> Option<Value> {
        self.map.remove(name)
    }

    /// A JSON (non-string) field parsed by `parse`, which sees `null` too:
    /// `Some(None)` when absent.
    pub fn json<T, E: Into<FieldError>>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&Value) -> Result<T, Vec<E>>,
    ) -> Option<Option<T>> {
        match self.raw(name) {
            None => Some(None),
            Some(v) => match parse(&v) {
                Ok(t) => Some(Some(t)),
                Err(es) => {
                    self.errors.extend(es.into_iter().map(Into::into));
                    None
                }
            },
        }
    }

    /// A required field, parsed.
    pub fn required<T>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, ValidationError>,
    ) -> Option<T> {
        match self.string(name) {
            Ok(Some(s)) => parse(&s).map_err(|e| self.errors.push(e.into())).ok(),
            Ok(None) => {
                self.errors
                    .push(FieldError::new(name, format!("{name} is required")));
                None
            }
            Err(()) => None,
        }
    }

    /// An optional field, parsed; `Some(None)` when absent or null.
    pub fn optional<T>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, ValidationError>,
    ) -> Option<Option<T>> {
        match self.string(name) {
            Ok(Some(s)) => parse(&s)
                .map(Some)
                .map_err(|e| self.errors.push(e.into()))
                .ok(),
            Ok(None) => Some(None),
            Err(()) => None,
        }
    }
}

fn parse_role(field: &'static str) -> impl Fn(&str) -> Result<Role, ValidationError> {
    move |s| {
        Role::parse(s).ok_or_else(|| {
            ValidationError::new(
                field,
                format!(
                    "{field} must be one of {}",
                    Role::ALL.map(Role::as_str).join(", ")
                ),
            )
        })
    }
}

fn parse_status(s: &str) -> Result<ProviderStatus, ValidationError> {
    ProviderStatus::ALL
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| ValidationError::new("status", "status must be active or inactive"))
}

fn parse_time(field: &'static str) -> impl Fn(&str) -> Result<DateTime<Utc>, ValidationError> {
    move |s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                ValidationError::new(
                    field,
                    format!("{field} must be an RFC 3339 time like 2025-01-31T12:00:00Z"),
                )
            })
    }
}

fn parse_uuid(field: &'static str) -> impl Fn(&str) -> Result<Uuid, ValidationError> {
    move |s| {
        Uuid::parse_str(s)
            .map_err(|_| ValidationError::new(field, format!("{field} must be a UUID")))
    }
}

pub use storage::secrets::{PASSWORD_MAX_CHARS, PASSWORD_MIN_CHARS};
/// Longest password login reads, in characters: more than any account can
/// have, so a too-long one is a wrong password, answered like any other.
pub const LOGIN_PASSWORD_MAX_CHARS: usize = 4096;

/// `POST /auth/signup`.
pub struct Signup {
    pub email: Email,
    pub password: SecretString,
}

impl FromFields for Signup {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let email = f.required("email", Email::parse);
        let password = f.required("password", parse_new_password);
        Some(Self {
            email: email?,
            password: password?,
        })
    }
}

/// `POST /auth/login`: the email is not validated, so a malformed one gets
/// the same answer as an unknown one.
pub struct Login {
    pub email: String,
    pub password: SecretString,
}

impl FromFields for Login {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let email = f.required("email", |s| Ok(s.to_owned()));
        let password = f.required("password", |s| {
            if s.is_empty() || s.chars().count() > LOGIN_PASSWORD_MAX_CHARS {
                Err(ValidationError::new(
                    "password",
                    format!("password must be 1 to {LOGIN_PASSWORD_MAX_CHARS} characters"),
                ))
            } else {
                Ok(SecretString::from(s.to_owned()))
            }
        });
        Some(Self {
            email: email?,
            password: password?,
        })
    }
}

/// `limits` of a body: `null` clears every limit.
fn limits(f: &mut Fields) -> Option<Option<Limits>> {
    f.json("limits", Limits::parse)
}

/// `allowed_models` of a body: `Some(None)` absent, `Some(Some(None))` null (every model).
#[allow(clippy::type_complexity)]
fn allowed_models(f: &mut Fields) -> Option<Option<Option<Vec<ModelPattern>>>> {
    f.json("allowed_models", |v| {
        parse_allowed_models(v).map_err(|e| vec![e])
    })
}

/// `prices` of a body: `null` clears them.
fn prices(f: &mut Fields) -> Option<Option<Prices>> {
    f.json("prices", |v| Prices::parse(v).map_err(|e| vec![e]))
}

/// `headers` of a body: `null` or `{}` removes them.
fn headers(f: &mut Fields) -> Option<Option<StaticHeaders>> {
    f.json("headers", StaticHeaders::parse)
}

/// `timeouts` of a body: `null` or `{}` leaves all three to the gateway.
fn timeouts(f: &mut Fields) -> Option<Option<Timeouts>> {
    f.json("timeouts", Timeouts::parse)
}

/// `weight` of a body (`null` is no weight: refused).
fn weight(f: &mut Fields) -> Option<Option<Weight>> {
    f.json("weight", |v| Weight::parse(v).map_err(|e| vec![e]))
}

/// `PATCH /orgs/{org_id}`: a new name and/or limits (owners only).
pub struct OrgPatch {
    pub name: Option<String>,
    pub limits: Option<Limits>,
}

impl FromFields for OrgPatch {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = f.optional("name", |s| parse_label("name", s));
        let limits = limits(f);
        let patch = Self {
            name: name?,
            limits: limits?,
        };
        if patch.name.is_none() && patch.limits.is_none() {
            f.reject(FieldError::new(
                "body",
                "nothing to change: give name and/or limits",
            ))?;
        }
        Some(patch)
    }
}

/// `POST /orgs`.
pub struct OrgInput {
    pub name: String,
}

impl FromFields for OrgInput {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = f.required("name", |s| parse_label("name", s));
        Some(Self { name: name? })
    }
}

/// `POST /orgs/{org_id}/members`: an invitation.
pub struct Invite {
    pub email: Email,
    pub role: Role,
}

impl FromFields for Invite {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let email = f.required("email", Email::parse);
        let role = f.optional("role", parse_role("role"));
        Some(Self {
            email: email?,
            role: role?.unwrap_or(Role::Member),
        })
    }
}

/// `POST /me/invitations/{id}/accept`: the token is only looked up (by its
/// digest), so any non-empty string is taken and a wrong one is not found.
pub struct AcceptInvitation {
    pub token: InvitationToken,
}

impl FromFields for AcceptInvitation {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let token = f.required("token", |s| {
            if s.is_empty() {
                Err(ValidationError::new("token", "token must not be empty"))
            } else {
                Ok(InvitationToken::from_presented(s))
            }
        });
        Some(Self { token: token? })
    }
}

/// `DELETE /orgs/{org_id}/members/{user_id}?transfer_api_keys_to=`.
pub struct RemoveMember {
    pub transfer_api_keys_to: Option<Uuid>,
}

impl FromFields for RemoveMember {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let to = f.optional("transfer_api_keys_to", parse_uuid("transfer_api_keys_to"));
        Some(Self {
            transfer_api_keys_to: to?,
        })
    }
}

/// `PATCH /orgs/{org_id}/members/{user_id}`.
pub struct MemberPatch {
    pub role: Role,
}

impl FromFields for MemberPatch {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let role = f.required("role", parse_role("role"));
        Some(Self { role: role? })
    }
}

/// `POST /orgs/{org_id}/provider-keys`.
pub struct CreateProvider(pub storage::providers::NewProvider);

impl FromFields for CreateProvider {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = f.required("name", ProviderName::parse);
        let base_url = f.required("base_url", BaseUrl::parse);
        let token = f.required("token", ProviderToken::parse);
        let prices = prices(f);
        let headers = headers(f);
        let timeouts = timeouts(f);
        Some(Self(storage::providers::NewProvider {
            name: name?,
            base_url: base_url?,
            token: token?,
            prices: prices?.unwrap_or_default(),
            headers: headers?.unwrap_or_default(),
            timeouts: timeouts?.unwrap_or_default(),
        }))
    }
}

/// `PATCH /orgs/{org_id}/provider-keys/{id}`: at least one field. Whether a
/// `base_url` is a change (and so needs `token`) is decided by storage under
/// the row lock, against the stored URL.
pub struct PatchProvider(pub storage::providers::ProviderPatch);

impl FromFields for PatchProvider {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = f.optional("name", ProviderName::parse);
        let base_url = f.optional("base_url", BaseUrl::parse);
        let token = f.optional("token", ProviderToken::parse);
        let status = f.optional("status", parse_status);
        let prices = prices(f);
        let headers = headers(f);
        let timeouts = timeouts(f);
        let patch = storage::providers::ProviderPatch {
            name: name?,
            base_url: base_url?,
            token: token?,
            status: status?,
            prices: prices?,
            headers: headers?,
            timeouts: timeouts?,
            weight: None,
        };
        if patch.name.is_none()
            && patch.base_url.is_none()
            && patch.token.is_none()
            && patch.status.is_none()
            && patch.prices.is_none()
            && patch.headers.is_none()
            && patch.timeouts.is_none()
        {
            f.reject(FieldError::new(
                "body",
                "nothing to change: give at least one of name, base_url, token, status, prices, headers, timeouts",
            ))?;
        }
        Some(Self(patch))
    }
}

/// `POST /orgs/{org_id}/provider-keys/{id}/endpoints`.
pub struct CreateEndpoint(pub storage::endpoints::NewEndpoint);

impl FromFields for CreateEndpoint {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let base_url = f.required("base_url", BaseUrl::parse);
        let token = f.required("token", ProviderToken::parse);
        let weight = weight(f);
        Some(Self(storage::endpoints::NewEndpoint {
            base_url: base_url?,
            token: token?,
            weight: weight?.unwrap_or_default(),
        }))
    }
}

/// `PATCH /orgs/{org_id}/provider-keys/{id}/endpoints/{endpoint_id}`: at
/// least one field; a new `base_url` needs `token`, as for providers.
pub struct PatchEndpoint(pub storage::endpoints::EndpointPatch);

impl FromFields for PatchEndpoint {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let base_url = f.optional("base_url", BaseUrl::parse);
        let token = f.optional("token", ProviderToken::parse);
        let weight = weight(f);
        let patch = storage::endpoints::EndpointPatch {
            base_url: base_url?,
            token: token?,
            weight: weight?,
        };
        if patch.base_url.is_none() && patch.token.is_none() && patch.weight.is_none() {
            f.reject(FieldError::new(
                "body",
                "nothing to change: give at least one of base_url, token, weight",
            ))?;
        }
        Some(Self(patch))
    }
}

/// A key's `expires_at`: an RFC 3339 time in the future.
fn parse_expiry(s: &str) -> Result<DateTime<Utc>, ValidationError> {
    let t = parse_time("expires_at")(s)?;
    if t <= Utc::now() {
        return Err(ValidationError::new(
            "expires_at",
            "expires_at must be in the future",
        ));
    }
    Ok(t)
}

/// `POST /orgs/{org_id}/api-keys`.
pub struct CreateApiKey {
    pub name: String,
    pub options: storage::api_keys::KeyOptions,
}

impl FromFields for CreateApiKey {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = f.required("name", |s| parse_label("name", s));
        let expires_at = f.optional("expires_at", parse_expiry);
        let limits = limits(f);
        let allowed_models = allowed_models(f);
        Some(Self {
            name: name?,
            options: storage::api_keys::KeyOptions {
                expires_at: expires_at?,
                limits: limits?.unwrap_or_default(),
                allowed_models: allowed_models?.flatten(),
            },
        })
    }
}

/// `PATCH /orgs/{org_id}/api-keys/{id}`: at least one field; `null` clears
/// `expires_at` (never expires), `limits` (none) and `allowed_models` (all).
pub struct PatchApiKey(pub storage::api_keys::ApiKeyPatch);

impl FromFields for PatchApiKey {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let name = match f.raw("name") {
            None => Some(None),
            Some(Value::String(s)) => parse_label("name", &s)
                .map(Some)
                .map_err(|e| f.errors.push(e.into()))
                .ok(),
            Some(_) => f
                .reject(FieldError::new("name", "name must be a string"))
                .map(|_| None),
        };
        let expires_at = f.json("expires_at", |v| match v {
            Value::Null => Ok(None),
            Value::String(s) => parse_expiry(s).map(Some).map_err(|e| vec![e]),
            _ => Err(vec![ValidationError::new(
                "expires_at",
                "expires_at must be an RFC 3339 time, or null for no expiry",
            )]),
        });
        let limits = limits(f);
        let allowed_models = allowed_models(f);
        let patch = storage::api_keys::ApiKeyPatch {
            name: name?,
            expires_at: expires_at?,
            limits: limits?,
            allowed_models: allowed_models?,
        };
        if patch.is_empty() {
            f.reject(FieldError::new(
                "body",
                "nothing to change: give at least one of name, expires_at, limits, allowed_models",
            ))?;
        }
        Some(Self(patch))
    }
}

/// Largest page of API keys and audit entries.
pub const PAGE_MAX: u32 = 200;
/// Largest page of request logs.
pub const LOG_PAGE_MAX: u32 = 500;
/// The HTTP status codes a `status` filter may name.
pub const STATUS_MIN: u16 = 100;
pub const STATUS_MAX: u16 = 599;

fn parse_limit(max: u32) -> impl Fn(&str) -> Result<u32, ValidationError> {
    move |s| match s.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ValidationError::new(
            "limit",
            format!("limit must be an integer from 1 to {max}"),
        )),
    }
}

fn parse_cursor(s: &str) -> Result<Cursor, ValidationError> {
    Cursor::decode(s).ok_or_else(|| {
        ValidationError::new(
            "cursor",
            "cursor must be a next_cursor value this server returned",
        )
    })
}

/// `?cursor&limit` of a paginated list.
pub struct PageQuery<const MAX: u32> {
    pub cursor: Option<Cursor>,
    pub limit: u32,
}

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;

impl<const MAX: u32> FromFields for PageQuery<MAX> {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let cursor = f.optional("cursor", parse_cursor);
        let limit = f.optional("limit", parse_limit(MAX));
        Some(Self {
            cursor: cursor?,
            limit: limit?.unwrap_or(DEFAULT_LIMIT),
        })
    }
}

/// `GET /orgs/{org_id}/logs` filters.
pub struct LogQuery {
    pub filter: storage::logs::LogFilter,
    pub page: PageQuery<LOG_PAGE_MAX>,
}

impl FromFields for LogQuery {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let api_key_id = f.optional("api_key_id", parse_uuid("api_key_id"));
        let provider = f.optional("provider", parse_provider);
        let status = f.optional("status", |s| match s.parse::<u16>() {
            Ok(n) if (STATUS_MIN..=STATUS_MAX).contains(&n) => Ok(n as i16),
            _ => Err(ValidationError::new(
                "status",
                format!("status must be an HTTP status code ({STATUS_MIN} to {STATUS_MAX})"),
            )),
        });
        let from = f.optional("from", parse_time("from"));
        let to = f.optional("to", parse_time("to"));
        if let (Some(Some(from)), Some(Some(to))) = (from, to) {
            check_window(f, from, to)?;
        }
        let page = PageQuery::<LOG_PAGE_MAX>::from_fields(f);
        Some(Self {
            filter: storage::logs::LogFilter {
                api_key_id: api_key_id?,
                provider_name: provider?,
                status_code: status?,
                from: from?,
                to: to?,
            },
            page: page?,
        })
    }
}

fn parse_provider(s: &str) -> Result<String, ValidationError> {
    storage::domain::ProviderName::parse(s)
        .map(|n| n.as_str().to_owned())
        .map_err(|e| ValidationError::new("provider", e.message))
}

/// Longest `model` and `endpoint` filter values, in characters.
pub const FILTER_MAX_LEN: usize = 512;

/// A free-text filter value: what it names is compared, never interpreted.
fn parse_filter_text(field: &'static str) -> impl Fn(&str) -> Result<String, ValidationError> {
    move |s| {
        if s.is_empty() || s.chars().count() > FILTER_MAX_LEN {
            return Err(ValidationError::new(
                field,
                format!("{field} must be 1 to {FILTER_MAX_LEN} characters"),
            ));
        }
        Ok(s.to_owned())
    }
}

/// `GET /orgs/{org_id}/usage`.
pub struct UsageQuery {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: GroupBy,
    pub filter: storage::logs::UsageFilter,
}

/// Window when `from` is not given.
pub const DEFAULT_USAGE_DAYS: i64 = 30;

/// The `group_by` values, in the order the document lists them.
pub const GROUP_BY: [(&str, GroupBy); 5] = [
    ("day", GroupBy::Day),
    ("model", GroupBy::Model),
    ("provider", GroupBy::Provider),
    ("api_key", GroupBy::ApiKey),
    ("endpoint", GroupBy::Endpoint),
];

/// The names of [`GROUP_BY`], for the document.
pub const GROUP_BY_NAMES: [&str; GROUP_BY.len()] = {
    let mut names = [""; GROUP_BY.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = GROUP_BY[i].0;
        i += 1;
    }
    names
};

/// The end of `t`'s UTC hour: the default end of a usage window, so that
/// the default window is whole hours, which the hourly rollups answer alone.
fn end_of_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    DateTime::from_timestamp(s - s.rem_euclid(3600) + 3600, 0).unwrap_or(t)
}

/// `from` and `to` of a time window: `from` must not come after `to`.
fn check_window(f: &mut Fields, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<()> {
    if from > to {
        f.reject(FieldError::new("from", "from must not be after to"))?;
    }
    Some(())
}

impl FromFields for UsageQuery {
    fn from_fields(f: &mut Fields) -> Option<Self> {
        let from = f.optional("from", parse_time("from"));
        let to = f.optional("to", parse_time("to"));
        let group_by = f.optional("group_by", |s| {
            GROUP_BY
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, g)| *g)
                .ok_or_else(|| {
                    ValidationError::new(
                        "group_by",
                        format!("group_by must be one of {}", GROUP_BY_NAMES.join(", ")),
                    )
                })
        });
        let model = f.optional("model", parse_filter_text("model"));
        let provider = f.optional("provider", parse_provider);
        let api_key_id = f.optional("api_key_id", parse_uuid("api_key_id"));
        let endpoint = f.optional("endpoint", parse_filter_text("endpoint"));
        let to = to?.unwrap_or_else(|| end_of_hour(Utc::now()));
        let from = from?.unwrap_or(to - chrono::Duration::days(DEFAULT_USAGE_DAYS));
        check_window(f, from, to)?;
        Some(Self {
            from,
            to,
            group_by: group_by?.unwrap_or(GroupBy::Day),
            filter: storage::logs::UsageFilter {
                model: model?,
                provider_name: provider?,
                api_key_id: api_key_id?,
                endpoint: endpoint?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body<T: FromFields>(json: &str) -> Result<T, ApiError> {
        Fields::parse_body(json.as_bytes())
    }

    fn fields(e: ApiError) -> Vec<String> {
        match e {
            ApiError::Validation(d) => d.into_iter().map(|f| f.field).collect(),
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn every_bad_field_is_named_and_unknown_fields_refused() {
        let e = body::<CreateProvider>(r#"{"name":"Bad","base_url":5,"extra":1}"#)
            .err()
            .unwrap();
        assert_eq!(fields(e), ["name", "base_url", "token", "extra"]);
        assert!(matches!(
            body::<CreateProvider>("[1]"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            body::<CreateProvider>("{"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn refusals_never_echo_the_value() {
        let e = body::<CreateProvider>(
            r#"{"name":"x","base_url":"https://a.example.com","token":" sk-SECRETVALUE"}"#,
        )
        .err()
        .unwrap();
        assert!(!format!("{e:?}").contains("SECRETVALUE"));
        let e = body::<Signup>(r#"{"email":"a@b.c","password":"short"}"#)
            .err()
            .unwrap();
        assert!(!format!("{e:?}").contains("short\""));
    }

    #[test]
    fn empty_patch_is_refused() {
        assert_eq!(fields(body::<PatchProvider>("{}").err().unwrap()), ["body"]);
        assert!(body::<PatchProvider>(r#"{"status":"inactive"}"#).is_ok());
        assert!(body::<PatchProvider>(r#"{"headers":null}"#).is_ok());
        assert_eq!(fields(body::<PatchEndpoint>("{}").err().unwrap()), ["body"]);
        assert!(body::<PatchEndpoint>(r#"{"weight":5}"#).is_ok());
    }

    #[test]
    fn endpoint_and_provider_settings_name_their_fields() {
        let e = body::<CreateEndpoint>(r#"{"base_url":"https://a.example.com/v1","weight":0}"#)
            .err()
            .unwrap();
        assert_eq!(fields(e), ["base_url", "token", "weight"]);
        let ok = body::<CreateEndpoint>(r#"{"base_url":"https://a.example.com","token":"sk-1"}"#)
            .ok()
            .unwrap();
        assert_eq!(ok.0.weight.get(), 1);
        let e = body::<PatchEndpoint>(r#"{"weight":null}"#).err().unwrap();
        assert_eq!(fields(e), ["weight"]);
        let e = body::<PatchProvider>(
            r#"{"headers":{"Authorization":"Bearer SECRETVALUE"},"timeouts":{"total_ms":0}}"#,
        )
        .err()
        .unwrap();
        assert!(!format!("{e:?}").contains("SECRETVALUE"));
        assert_eq!(fields(e), ["headers", "timeouts.total_ms"]);
    }

    #[test]
    fn query_duplicates_and_ranges() {
        let q = |p: &[(&str, &str)]| {
            Fields::parse_query::<UsageQuery>(
                p.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            )
        };
        assert!(q(&[("group_by", "model")]).is_ok());
        assert_eq!(
            fields(q(&[("group_by", "week")]).err().unwrap()),
            ["group_by"]
        );
        assert_eq!(
            fields(
                q(&[("group_by", "day"), ("group_by", "day")])
                    .err()
                    .unwrap()
            ),
            ["group_by"]
        );
        assert_eq!(
            fields(
                q(&[
                    ("from", "2025-02-01T00:00:00Z"),
                    ("to", "2025-01-01T00:00:00Z")
                ])
                .err()
                .unwrap()
            ),
            ["from"]
        );
    }
}
