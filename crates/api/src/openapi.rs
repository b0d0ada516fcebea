//! The OpenAPI 3 document, generated from the route table and the error table.
//!
//! Every constraint a validator enforces is stated here from the validator's
//! own constant (`storage::domain`, `storage::secrets`, `crate::input`), so a
//! client generated from the document sends what the server accepts.

use serde_json::{json, Map, Value};
use storage::domain::routing::{
    EndpointHealth, HEADER_VALUE_PATTERN, MAX_ENDPOINTS, MAX_HEADERS, MAX_HEADERS_BYTES,
    MAX_HEADER_NAME_LEN, MAX_HEADER_VALUE_LEN, MAX_TIMEOUT_MS, RESERVED_HEADERS,
    RESERVED_HEADER_PREFIXES, TIMEOUT_FIELDS, WEIGHT_MAX, WEIGHT_MIN,
};
use storage::domain::{
    ProviderStatus, Role, BASE_URL_MAX_LEN, BASE_URL_PATTERN, EMAIL_MAX_LEN, LABEL_MAX_CHARS,
    LABEL_PATTERN, PROVIDER_NAME_MAX_LEN, PROVIDER_NAME_PATTERN,
};
use storage::limits::{
    BUDGET_SCALE, COUNT_LIMITS, MAX_COUNT, MAX_PATTERNS, MAX_PATTERN_CHARS, MAX_USD, PRICE_SCALE,
};
use storage::secrets::{MAX_TOKEN_LEN, TOKEN_PATTERN};

use crate::error::ALL_KINDS;
use crate::handlers::providers::TEST_MODELS_SHOWN;
use crate::input::{
    GROUP_BY_NAMES, LOGIN_PASSWORD_MAX_CHARS, PASSWORD_MAX_CHARS, PASSWORD_MIN_CHARS,
};
use crate::routes::{Access, ParamType, Route};

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(name: &str) -> Value {
    json!({"application/json": {"schema": schema_ref(name)}})
}

fn param_schema(ty: ParamType) -> Value {
    match ty {
        ParamType::Uuid => json!({"type": "string", "format": "uuid"}),
        ParamType::DateTime => json!({"type": "string", "format": "date-time"}),
        ParamType::Integer { min, max } => {
            json!({"type": "integer", "minimum": min, "maximum": max})
        }
        ParamType::Text { max_len } => {
            json!({"type": "string", "minLength": 1, "maxLength": max_len})
        }
        ParamType::Pattern { pattern, max_len } => {
            json!({"type": "string", "pattern": pattern, "maxLength": max_len})
        }
        ParamType::Cursor => json!({"type": "string", "minLength": 1}),
        ParamType::Enum(values) => json!({"type": "string", "enum": values}),
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No content",
        _ => "Success",
    }
}

/// The headers every answer carries, plus those of one error status.
fn response_headers(status: u16) -> Value {
    let string = json!({"type": "string"});
    let mut headers = json!({
        "x-request-id": {"description": "the request's id (the client's `x-request-id` when short and plain)",
                         "required": true, "schema": string},
    });
    match status {
        401 => {
            headers["WWW-Authenticate"] =
                json!({"required": true, "schema": {"type": "string", "enum": ["Bearer"]}})
        }
        503 => {
            headers["Retry-After"] = json!({"description": "seconds", "required": true, "schema": {"type": "string", "pattern": "^[0-9]+$"}})
        }
        _ => {}
    }
    headers
}

fn operation(route: &Route) -> Value {
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"},
                   "description": "malformed, unknown and other organizations' ids all answer 404"})
        })
        .collect();
    params.extend(route.query.iter().map(|p| {
        json!({"name": p.name, "in": "query", "required": false, "schema": param_schema(p.ty), "description": p.description})
    }));

    let mut responses = Map::new();
    let (ok, ok_schema) = route.ok;
    let mut ok_body = json!({"description": status_text(ok), "headers": response_headers(ok)});
    if let Some(name) = ok_schema {
        ok_body["content"] = json_content(name);
    } else if route.operation_id == "openapi" {
        ok_body["content"] = json!({"application/json": {"schema": {"type": "object"}}});
    }
    responses.insert(ok.to_string(), ok_body);
    for status in route.error_statuses() {
        let codes: Vec<String> = ALL_KINDS
            .iter()
            .filter(|k| k.status == status)
            .map(|k| format!("`{}`: {}", k.code, k.meaning))
            .collect();
        responses.insert(
            status.to_string(),
            json!({"description": codes.join("; "), "headers": response_headers(status), "content": json_content("Error")}),
        );
    }

    let access = match route.access {
        Access::Public => "Public.".to_owned(),
        Access::Session => "Requires a session.".to_owned(),
        Access::Org(role) => format!(
            "Requires the `{}` role or higher in the organization.",
            role.as_str()
        ),
    };
    let mut description = access;
    if !route.query.is_empty() {
        description.push_str(" Unknown or repeated query parameters answer 422.");
    }
    let mut op = json!({
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": description,
        "tags": [route.tag],
        "parameters": params,
        "responses": responses,
    });
    if route.access != Access::Public {
        op["security"] = json!([{"bearer": []}]);
    }
    if let Some(body) = route.body {
        op["requestBody"] = json!({"required": true, "content": json_content(body)});
    }
    op
}

/// The whole document.
pub fn document(routes: &[Route]) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let item = paths.entry(route.path).or_insert_with(|| json!({}));
        item[route.method.as_str().to_ascii_lowercase()] = operation(route);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "llmgw settings API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accounts, organizations, members, custom providers, gateway API keys, usage and audit. \
                Send `Authorization: Bearer <token>` from signup/login. Errors: \
                `{\"error\":{\"code\",\"message\",\"details\":[{\"field\",\"message\"}]}}`. \
                A documented path called with another method answers 405 `method_not_allowed` with `Allow` \
                listing the methods it answers; an unknown path answers 404 `route_not_found`.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}

fn list_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": schema_ref(item)},
            "next_cursor": {"type": "string", "nullable": true, "description": "pass as `cursor` for the next page; null on the last"},
        },
    })
}

fn schemas() -> Value {
    let uuid = json!({"type": "string", "format": "uuid"});
    let time = json!({"type": "string", "format": "date-time"});
    let time_or_null = json!({"type": "string", "format": "date-time", "nullable": true});
    let roles: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
    let role = json!({"type": "string", "enum": roles});
    let statuses: Vec<&str> = ProviderStatus::ALL.iter().map(|s| s.as_str()).collect();
    let status = json!({"type": "string", "enum": statuses});
    let provider_name = json!({"type": "string", "pattern": PROVIDER_NAME_PATTERN, "maxLength": PROVIDER_NAME_MAX_LEN,
        "description": "lowercase a-z only, unique in the organization; used as `{name}/{model}` at the gateway"});
    // No `format: uri`: the pattern says more, and the two together make
    // example generation crawl.
    let base_url = json!({"type": "string", "pattern": BASE_URL_PATTERN, "maxLength": BASE_URL_MAX_LEN,
        "description": "https URL with a host, no userinfo, query or fragment, not ending in /v1 \
            (the gateway appends /v1/chat/completions); a trailing / is dropped. A host that resolves to a \
            private, loopback or link-local address answers 422 unless LLMGW_UPSTREAM_ALLOW_PRIVATE=true. \
            The pattern is what every client can rely on; the server also accepts IPv6 literals, \
            percent-encoded and international names, and http:// where the operator allows it."});
    let token = json!({"type": "string", "writeOnly": true, "minLength": 1, "maxLength": MAX_TOKEN_LEN,
        "pattern": TOKEN_PATTERN,
        "description": "the provider's API token: printable ASCII without leading or trailing spaces (it is sent as an HTTP header); never returned"});
    // `maxLength` counts characters and the server counts bytes: the same for ASCII addresses.
    let email = json!({"type": "string", "format": "email", "maxLength": EMAIL_MAX_LEN,
        "description": "one `@` with something on each side, no whitespace or control characters, \
            at most 320 bytes; compared case-insensitively"});
    let label = json!({"type": "string", "minLength": 1, "maxLength": LABEL_MAX_CHARS, "pattern": LABEL_PATTERN,
        "description": "free text without control characters; surrounding whitespace is trimmed"});
    let int = json!({"type": "integer", "format": "int64"});
    let int_or_null = json!({"type": "integer", "format": "int64", "nullable": true});
    let str_or_null = json!({"type": "string", "nullable": true});
    // Money travels as a decimal string so no client or server rounds it
    // through binary floating point.
    let usd = |scale: u32, what: &str| {
        json!({"type": "string", "pattern": format!("^[0-9]+(\\.[0-9]{{1,{scale}}})?$"),
               "description": format!("{what}: a decimal string in USD, 0 to {MAX_USD}, at most {scale} decimal places (a JSON number is read from its text)")})
    };
    // Costs as priced when each row was written: exact, at whatever scale.
    let cost = |what: &str| {
        json!({"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$",
               "description": format!("{what}: a decimal string in USD")})
    };
    let mut row_cost = cost(
        "the request's cost under its provider's prices when it was logged \
        (null: no price applied, or no token counts were known)",
    );
    row_cost["nullable"] = json!(true);
    let mut limit_props = Map::new();
    for name in COUNT_LIMITS {
        limit_props.insert(
            name.to_owned(),
            json!({"type": "integer", "minimum": 0, "maximum": MAX_COUNT, "nullable": true,
                   "description": "0 blocks every request; null or absent: no limit"}),
        );
    }
    let mut budget = usd(
        BUDGET_SCALE,
        "money spent this UTC calendar month, priced by the providers' `prices`",
    );
    budget["nullable"] = json!(true);
    limit_props.insert("budget_per_month_usd".to_owned(), budget);
    limit_props.insert(
        "soft_limit_percent".to_owned(),
        json!({"type": "integer", "minimum": 1, "maximum": 100, "nullable": true,
               "description": "a warning threshold in percent of each limit above (limits nothing by itself): `/limits` shows it, and the alert webhook is called once per period when the day and month budgets' settled usage reaches it and again at the limit; null or absent: none"}),
    );
    let limits = json!({"type": "object", "additionalProperties": false, "properties": limit_props,
        "description": "Each field optional; null or absent: no limit of that kind. A key is held to its own limits and its organization's (the tighter applies)."});
    let allowed_models = json!({"type": "array", "nullable": true, "maxItems": MAX_PATTERNS,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN_CHARS,
                  "description": "`{customName}/{modelName}` with `*` wildcards (`*` matches `/` too), e.g. `mycompany/*`"},
        "description": "models the key may call; null: every model, []: none"});
    let prices = json!({"type": "array", "maxItems": MAX_PATTERNS,
        "description": "USD per million tokens by upstream model name; the most specific entry wins (an exact name, then the pattern with the most literal characters, then `*`)",
        "items": {"type": "object", "additionalProperties": false,
                  "required": ["model", "input_per_million_usd", "output_per_million_usd"],
                  "properties": {"model": {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN_CHARS,
                                           "description": "a model name (`llama-3-8b`), a pattern (`llama-*`) or `*`"},
                                 "input_per_million_usd": usd(PRICE_SCALE, "per million prompt tokens"),
                                 "output_per_million_usd": usd(PRICE_SCALE, "per million completion tokens")}}});
    let weight = json!({"type": "integer", "minimum": WEIGHT_MIN, "maximum": WEIGHT_MAX,
        "description": "the endpoint's share of the provider's traffic, relative to the other endpoints' weights"});
    let healths: Vec<&str> = EndpointHealth::ALL.iter().map(|h| h.as_str()).collect();
    let endpoint_token = {
        let mut t = token.clone();
        t["description"] = json!("the endpoint's API token; never returned");
        t
    };
    let reserved: Vec<String> = RESERVED_HEADERS
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(
            RESERVED_HEADER_PREFIXES
                .iter()
                .map(|(p, _)| format!("{p}*")),
        )
        .collect();
    let headers_input = json!({"type": "object", "nullable": true, "maxProperties": MAX_HEADERS, "writeOnly": true,
        "additionalProperties": {"type": "string", "minLength": 1, "maxLength": MAX_HEADER_VALUE_LEN,
                                 "pattern": HEADER_VALUE_PATTERN},
        "description": format!("Static extra headers sent with every upstream request to each of the provider's endpoints: \
            header name to value. Values are stored encrypted and never returned (answers list the names). \
            Replaces every header; null or {{}} removes them. Names are HTTP tokens of 1 to {MAX_HEADER_NAME_LEN} \
            characters, compared case-insensitively; these are refused (422 naming the header): {}. \
            At most {MAX_HEADERS_BYTES} bytes of names and values together. Credentials belong in the token.",
            reserved.join(", "))});
    let mut timeout_props = Map::new();
    for name in TIMEOUT_FIELDS {
        timeout_props.insert(
            name.to_owned(),
            json!({"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS, "nullable": true,
                   "description": "milliseconds; null or absent: the gateway's setting"}),
        );
    }
    let timeouts = json!({"type": "object", "additionalProperties": false, "required": TIMEOUT_FIELDS,
        "properties": timeout_props.clone(),
        "description": "The provider's own upstream timeouts: connect_ms (TCP and TLS), first_byte_ms (request sent to the answer's first byte), total_ms (the whole exchange); null: the gateway's setting."});
    let timeouts_input = json!({"type": "object", "nullable": true, "additionalProperties": false,
        "properties": timeout_props,
        "description": "Replaces all three; null or {} leaves them to the gateway. connect_ms and first_byte_ms must not exceed total_ms (else 422)."});
    let mut prices_or_null = prices.clone();
    prices_or_null["nullable"] = json!(true);
    let mut limits_or_null = limits.clone();
    limits_or_null["nullable"] = json!(true);
    let entries: Vec<(&str, Value)> = vec![
        (
            "Error",
            json!({
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "enum": ALL_KINDS.iter().map(|k| k.code).collect::<Vec<_>>()},
                        "message": {"type": "string"},
                        "details": {"type": "array", "items": {
                            "type": "object",
                            "required": ["field", "message"],
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        }},
                    },
                }},
            }),
        ),
        (
            "Status",
            json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}),
        ),
        (
            "AuthConfig",
            json!({
                "type": "object", "required": ["password_login", "sso", "signup", "allow_http", "gateway_public_url"],
                "properties": {"password_login": {"type": "boolean"}, "sso": {"type": "boolean"},
                               "signup": {"type": "boolean", "description": "LLMGW_ALLOW_SIGNUP"},
                               "allow_http": {"type": "boolean", "description": "LLMGW_UPSTREAM_ALLOW_HTTP: plain-http base URLs accepted"},
                               "gateway_public_url": {"type": "string", "nullable": true, "description": "LLMGW_GATEWAY_PUBLIC_URL"}},
            }),
        ),
        (
            "Signup",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email", "password"],
                "properties": {"email": email,
                               "password": {"type": "string", "format": "password", "minLength": PASSWORD_MIN_CHARS,
                                            "maxLength": PASSWORD_MAX_CHARS, "writeOnly": true}},
            }),
        ),
        (
            "Login",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email", "password"],
                "properties": {"email": {"type": "string", "description": "any string: a malformed address answers 401 like an unknown one"},
                               "password": {"type": "string", "format": "password", "minLength": 1,
                                            "maxLength": LOGIN_PASSWORD_MAX_CHARS, "writeOnly": true}},
            }),
        ),
        (
            "User",
            json!({
                "type": "object", "required": ["id", "email"],
                "properties": {"id": uuid, "email": {"type": "string"}},
            }),
        ),
        (
            "Session",
            json!({
                "type": "object", "required": ["token", "expires_at", "user"],
                "properties": {"token": {"type": "string", "description": "bearer token; shown only here"},
                               "expires_at": time, "user": schema_ref("User")},
            }),
        ),
        (
            "OrgInput",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": label},
            }),
        ),
        (
            "Org",
            json!({
                "type": "object", "required": ["id", "name", "role", "created_at", "limits"],
                "properties": {"id": uuid, "name": {"type": "string"}, "role": role, "created_at": time, "limits": limits},
            }),
        ),
        ("OrgList", list_of("Org")),
        (
            "OrgPatch",
            json!({
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "description": "Admins may rename; setting `limits` needs the owner role (403 otherwise). `limits: null` removes them all.",
                "properties": {"name": label, "limits": limits_or_null},
            }),
        ),
        (
            "Invite",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email"],
                "properties": {"email": {"allOf": [email], "description": "the invitee's address; it need not have an account yet"},
                               "role": {"type": "string", "enum": roles, "default": Role::Member.as_str()}},
            }),
        ),
        (
            "Invitation",
            json!({
                "type": "object",
                "required": ["id", "org_id", "email", "role", "invited_by", "created_at", "expires_at"],
                "properties": {"id": uuid, "org_id": uuid, "email": {"type": "string"}, "role": role,
                               "invited_by": {"type": "string", "format": "uuid", "nullable": true},
                               "created_at": time,
                               "expires_at": {"type": "string", "format": "date-time", "description": "7 days after creation"}},
            }),
        ),
        (
            "InvitationCreated",
            json!({
                "allOf": [schema_ref("Invitation"), {
                    "type": "object", "required": ["token"],
                    "properties": {"token": {"type": "string", "description": "`llmgwi_…`: shown only in this answer; \
                        the invitee accepts with it"}},
                }],
            }),
        ),
        ("InvitationList", list_of("Invitation")),
        (
            "InvitationAccept",
            json!({
                "type": "object", "additionalProperties": false, "required": ["token"],
                "properties": {"token": {"type": "string", "minLength": 1, "writeOnly": true,
                                         "description": "the token from the invitation's creation answer"}},
            }),
        ),
        (
            "MemberRemoved",
            json!({
                "type": "object", "required": ["revoked_api_keys", "transferred_api_keys"],
                "properties": {"revoked_api_keys": {"type": "integer", "minimum": 0},
                               "transferred_api_keys": {"type": "integer", "minimum": 0}},
            }),
        ),
        (
            "MemberPatch",
            json!({
                "type": "object", "additionalProperties": false, "required": ["role"],
                "properties": {"role": role},
            }),
        ),
        (
            "Member",
            json!({
                "type": "object", "required": ["user_id", "email", "role", "created_at"],
                "properties": {"user_id": uuid, "email": {"type": "string"}, "role": role, "created_at": time},
            }),
        ),
        ("MemberList", list_of("Member")),
        (
            "ProviderKeyCreate",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name", "base_url", "token"],
                "description": "base_url and token are the provider's own endpoint (weight 1); add further endpoints under /endpoints.",
                "properties": {"name": provider_name, "base_url": base_url, "token": token, "prices": prices_or_null,
                               "headers": headers_input, "timeouts": timeouts_input},
            }),
        ),
        (
            "ProviderKeyPatch",
            json!({
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "description": "A base_url that differs from the stored one must come with token in the same request (else 422 on token): the stored token is only ever sent to the base URL it was saved with.",
                "properties": {"name": provider_name, "base_url": base_url, "token": token, "status": status,
                               "prices": {"allOf": [prices_or_null], "description": "replaces every price; null or [] removes them"},
                               "headers": headers_input, "timeouts": timeouts_input},
            }),
        ),
        (
            "ProviderKey",
            json!({
                "type": "object",
                "required": ["id", "name", "base_url", "token_hint", "status", "prices", "endpoints", "headers", "timeouts", "created_at", "updated_at"],
                "properties": {"id": uuid, "name": {"type": "string"},
                               "base_url": {"type": "string", "description": "the provider's own endpoint's base URL"},
                               "token_hint": {"type": "string", "description": "last 4 characters of the token"},
                               "status": status, "prices": prices,
                               "endpoints": {"type": "array", "minItems": 1, "maxItems": MAX_ENDPOINTS,
                                             "items": schema_ref("ProviderEndpoint"),
                                             "description": "every endpoint, the provider's own (same id as the provider, its base_url and token) first"},
                               "headers": {"type": "array", "maxItems": MAX_HEADERS, "items": {"type": "string"},
                                           "description": "the names of the static upstream headers; their values are never returned"},
                               "timeouts": timeouts,
                               "created_at": time, "updated_at": time},
            }),
        ),
        ("ProviderKeyList", list_of("ProviderKey")),
        (
            "ProviderEndpoint",
            json!({
                "type": "object", "required": ["id", "base_url", "token_hint", "weight", "health"],
                "properties": {"id": {"type": "string", "format": "uuid",
                                      "description": "the provider's own id for its own endpoint"},
                               "base_url": {"type": "string"},
                               "token_hint": {"type": "string", "description": "last 4 characters of the token"},
                               "weight": weight,
                               "health": {"type": "string", "enum": healths,
                                          "description": "as the gateways report it (the worst replica's view); unknown while no report is available"}},
            }),
        ),
        ("ProviderEndpointList", list_of("ProviderEndpoint")),
        (
            "ProviderEndpointCreate",
            json!({
                "type": "object", "additionalProperties": false, "required": ["base_url", "token"],
                "description": format!("A provider has at most {MAX_ENDPOINTS} endpoints, its own included (else 422)."),
                "properties": {"base_url": base_url, "token": endpoint_token,
                               "weight": {"allOf": [weight], "default": WEIGHT_MIN}},
            }),
        ),
        (
            "ProviderEndpointPatch",
            json!({
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "description": "A base_url that differs from the stored one must come with token in the same request (else 422 on token): an endpoint's token is only ever sent to the base URL it was saved with. Patching the provider's own endpoint changes the provider's base_url and token.",
                "properties": {"base_url": base_url, "token": endpoint_token, "weight": weight},
            }),
        ),
        (
            "ProviderTest",
            json!({
                "type": "object", "required": ["reachable", "status", "latency_ms", "model_count", "models", "error"],
                "properties": {"reachable": {"type": "boolean"},
                               "status": {"type": "integer", "nullable": true, "description": "the provider's HTTP status"},
                               "latency_ms": int,
                               "model_count": {"type": "integer", "nullable": true},
                               "models": {"type": "array", "items": {"type": "string"}, "maxItems": TEST_MODELS_SHOWN,
                                          "description": "the first model ids the provider lists"},
                               "error": str_or_null},
            }),
        ),
        (
            "ApiKeyCreate",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": label,
                               "expires_at": {"type": "string", "format": "date-time", "nullable": true,
                                              "description": "must be in the future (a past or present time answers 422); omit or null for no expiry"},
                               "limits": limits_or_null, "allowed_models": allowed_models},
            }),
        ),
        (
            "ApiKeyPatch",
            json!({
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "description": "Only the fields given change. null clears: `expires_at` (never expires), `limits` (none), `allowed_models` (every model).",
                "properties": {"name": label,
                               "expires_at": {"type": "string", "format": "date-time", "nullable": true,
                                              "description": "must be in the future"},
                               "limits": limits_or_null, "allowed_models": allowed_models},
            }),
        ),
        (
            "LimitStates",
            json!({
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "array", "items": {
                    "type": "object", "required": ["limit", "scope", "max", "soft", "used", "remaining", "soft_reached", "resets_at"],
                    "properties": {
                        "limit": {"type": "string", "enum": COUNT_LIMITS.iter().copied().chain(["budget_per_month_usd"]).collect::<Vec<_>>()},
                        "scope": {"type": "string", "enum": ["api_key", "organization"]},
                        "max": {"description": "an integer; for budget_per_month_usd a decimal string"},
                        "soft": {"nullable": true, "description": "the soft threshold (soft_limit_percent of max, rounded up) in max's unit; null without soft_limit_percent"},
                        "used": {"nullable": true, "description": "what admission counts against max (settled usage plus reservations of requests still running), in max's unit; null while unknown (without Redis each gateway counts in its own memory)"},
                        "remaining": {"nullable": true, "description": "max minus used, at least 0; null while unknown"},
                        "soft_reached": {"type": "boolean", "nullable": true, "description": "used has reached soft; null while either is unknown"},
                        "resets_at": {"type": "string", "format": "date-time", "nullable": true,
                                      "description": "end of the UTC day or month for those periods; null for the sliding minute and for concurrency"},
                    },
                }}},
            }),
        ),
        (
            "ApiKey",
            json!({
                "type": "object",
                "required": ["id", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at", "limits", "allowed_models"],
                "properties": {"id": uuid, "name": {"type": "string"}, "prefix": {"type": "string"},
                               "created_at": time, "expires_at": time_or_null, "last_used_at": time_or_null, "revoked_at": time_or_null,
                               "limits": limits, "allowed_models": allowed_models},
            }),
        ),
        (
            "ApiKeyCreated",
            json!({
                "allOf": [schema_ref("ApiKey"), {
                    "type": "object", "required": ["key"],
                    "properties": {"key": {"type": "string", "description": "`llmgw_…`: shown only in this answer"}},
                }],
            }),
        ),
        ("ApiKeyList", list_of("ApiKey")),
        (
            "RequestLog",
            json!({
                "type": "object",
                "required": ["id", "request_id", "org_id", "status_code", "streamed", "canceled", "latency_ms", "created_at", "cost_usd"],
                "properties": {
                    "id": uuid, "request_id": {"type": "string"}, "org_id": uuid,
                    "api_key_id": {"type": "string", "format": "uuid", "nullable": true},
                    "provider_key_id": {"type": "string", "format": "uuid", "nullable": true},
                    "provider_name": str_or_null, "requested_model": str_or_null, "upstream_model": str_or_null,
                    "status_code": {"type": "integer"}, "streamed": {"type": "boolean"}, "canceled": {"type": "boolean"},
                    "prompt_tokens": int_or_null, "completion_tokens": int_or_null, "total_tokens": int_or_null,
                    "latency_ms": {"type": "integer"}, "ttfb_ms": {"type": "integer", "nullable": true},
                    "error_class": str_or_null, "created_at": time, "cost_usd": row_cost,
                    "endpoint_id": {"type": "string", "format": "uuid", "nullable": true,
                                    "description": "the endpoint that answered (the provider's own id for its own endpoint)"},
                    "attempts": {"type": "integer", "minimum": 1, "nullable": true,
                                 "description": "upstream attempts, retries and fallbacks included"},
                },
            }),
        ),
        ("RequestLogList", list_of("RequestLog")),
        (
            "UsageRow",
            json!({
                "type": "object",
                "required": ["key", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "requests_without_usage", "p50_latency_ms", "p95_latency_ms", "cost_usd"],
                "properties": {
                    "key": {"type": "string", "nullable": true, "description": "the day (YYYY-MM-DD), model, provider or API key id"},
                    "requests": int, "errors": int, "prompt_tokens": int, "completion_tokens": int, "total_tokens": int,
                    "requests_without_usage": {"type": "integer", "minimum": 0,
                        "description": "answered requests (status below 400) for which no token counts were known, e.g. streams whose upstream sent no usage; the token sums do not include them"},
                    "p50_latency_ms": {"type": "number", "nullable": true,
                        "description": "median latency, ms, from a latency histogram of 128 log buckets (growth 1.12): within 6 % of the exact value"},
                    "p95_latency_ms": {"type": "number", "nullable": true,
                        "description": "95th percentile latency, ms, from the same histogram (within 6 %)"},
                    "cost_usd": cost("sum of the rows' cost (rows without a price add nothing)"),
                },
            }),
        ),
        (
            "Usage",
            json!({
                "type": "object", "required": ["from", "to", "group_by", "data"],
                "properties": {"from": time, "to": time,
                               "group_by": {"type": "string", "enum": GROUP_BY_NAMES},
                               "data": {"type": "array", "items": schema_ref("UsageRow")}},
            }),
        ),
        (
            "AuditEntry",
            json!({
                "type": "object",
                "required": ["id", "org_id", "actor_user_id", "action", "target_type", "target_id", "details", "created_at"],
                "properties": {
                    "id": uuid, "org_id": uuid,
                    "actor_user_id": {"type": "string", "format": "uuid", "nullable": true, "description": "null: the CLI or the system"},
                    "action": {"type": "string", "example": "provider_key.update"},
                    "target_type": {"type": "string"},
                    "target_id": {"type": "string", "format": "uuid", "nullable": true},
                    "details": {"type": "object", "description": "what changed; never a secret"},
                    "created_at": time,
                },
            }),
        ),
        ("AuditList", list_of("AuditEntry")),
    ];
    Value::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::routes;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_and_every_schema_is_used() {
        let doc = document(&routes());
        let mut found = Vec::new();
        refs(&doc, &mut found);
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for r in &found {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.contains_key(name), "dangling {r}");
        }
        for name in schemas.keys() {
            assert!(
                found.iter().any(|r| r.ends_with(&format!("/{name}"))),
                "unused schema {name}"
            );
        }
    }

    #[test]
    fn operation_ids_are_unique_and_errors_documented() {
        let routes = routes();
        let mut ids: Vec<_> = routes.iter().map(|r| r.operation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), routes.len());
        for r in &routes {
            for s in r.error_statuses() {
                assert!(
                    ALL_KINDS.iter().any(|k| k.status == s),
                    "{} lists undocumented status {s}",
                    r.operation_id
                );
            }
        }
    }
}
